"""Recovering quality without training: dropped attention layers replaced by zero (the paper) or by a least-squares
linear patch (llmdrop.patch), on SmolLM2-135M, held-out perplexity as a ratio to the unpruned model.

Calibration (cosine scores and patch fits): the first C4 documents of the shared excerpt, 16 x 512 tokens. Held-out
perplexity: 16 x 512 tokens of documents 1700-1999 of the same file, which calibration never reads (it stops after
a few dozen documents). Picks: one-shot cosine (the paper's), the same for both replacements.

python benchmarks/recover_quality.py [--model smollm2-135m] [--target attn|block] [--ks 8,12,15]
                                     [--criterion cosine|loss] [--samples 16] [--heldout-samples 16] [--seq-len 512]
                                     [--name recover_quality]

A run keeps the rows of other K measured earlier under the same --name (so --ks 15 adds to a finished --ks 8).

--criterion loss ranks attention layers by the calibration loss increase when each alone is removed (one-shot, every
layer scored, on the same calibration chunks) instead of by cosine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header  # noqa: E402

from llmdrop.arch import arch_for  # noqa: E402
from llmdrop.calibration import load_calibration  # noqa: E402
from llmdrop.choice import Choice  # noqa: E402
from llmdrop.criteria.loss import loss_drops  # noqa: E402
from llmdrop.evaluate import perplexity  # noqa: E402
from llmdrop.measure import measure  # noqa: E402
from llmdrop.models import load_model  # noqa: E402
from llmdrop.pipeline import prune  # noqa: E402
from llmdrop.plan import plan_drops  # noqa: E402
from llmdrop.report import table  # noqa: E402
from llmdrop.surgery import count_parameters, kv_cache_layers  # noqa: E402

CAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "c4_validation_2k.jsonl"
HELDOUT_DOCS = (1700, 2000)
BATCH = 4


def _heldout_file(folder: Path) -> Path:
    lines = CAL.read_text(encoding="utf-8").splitlines()[HELDOUT_DOCS[0]:HELDOUT_DOCS[1]]
    path = folder / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", choices=["attn", "block"], default="attn")
    ap.add_argument("--ks", default="8,12,15")
    ap.add_argument("--criterion", choices=["cosine", "loss", "loss-patched"], default="cosine",
                    help="loss-patched: the loss increase with each candidate replaced by its own linear patch")
    ap.add_argument("--samples", type=int, default=16, help="calibration chunks (cosine picks and patch fits)")
    ap.add_argument("--heldout-samples", type=int, default=16, help="held-out chunks (perplexity)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--name", default="recover_quality", help="results file stem under benchmarks/results")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    model, tok = load_model(args.model, progress=False)
    arch = arch_for(model)
    cal = load_calibration(tok, CAL, args.samples, args.seq_len, bos=arch.needs_bos)
    assert cal.documents < HELDOUT_DOCS[0], "calibration would reach the held-out documents"
    with tempfile.TemporaryDirectory() as d:
        held = load_calibration(tok, _heldout_file(Path(d)), args.heldout_samples, args.seq_len, bos=arch.needs_bos)

    def ppl(m) -> float:
        return perplexity(m, held, BATCH, progress=False)["perplexity"]

    started = time.perf_counter()
    base_ppl = ppl(model)
    scores = measure(model, cal, batch_size=BATCH, progress=False)
    print(f"base perplexity {base_ppl:.2f}, calibration {cal.documents} documents", flush=True)
    rows, raw = [], []
    select_s = 0.0
    if args.criterion != "cosine":  # one ranking for every K: the one-shot loss order, all layers scored
        t0 = time.perf_counter()
        ranked = loss_drops(copy.deepcopy(model), cal, args.target, max(ks), scores=scores, batch_size=BATCH,
                            progress=False, patch="linear" if args.criterion == "loss-patched" else "zero")
        select_s = time.perf_counter() - t0
        order = [i for kind, i in ranked.picks]
    for k in ks:
        plan = plan_drops(scores, args.target, k)
        if args.criterion != "cosine":
            key = "attn" if args.target == "attn" else "blocks"
            plan = type(plan)(**{key: order[:k]}, num_layers=plan.num_layers, target=args.target, criterion="loss")
        for patch in ("zero", "linear"):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            choice = Choice(plan, scores, criterion=plan.criterion)
            prune(m, choice, args.model, patch=patch, calibration=cal, batch_size=BATCH, progress=False)
            info, fit_s = choice.patch_fit, time.perf_counter() - t0
            p = ppl(m)
            raw.append({"k": k, "target": args.target, "criterion": args.criterion, "patch": patch, "perplexity": p,
                        "ratio": p / base_ppl,
                        "layers": plan.attn or plan.blocks, "params": count_parameters(m),
                        "kv_layers": kv_cache_layers(m), "fit": info and {**info, "wall_s": fit_s},
                        "command": " ".join(["python", *sys.argv])})
            print(raw[-1]["k"], patch, raw[-1]["ratio"], flush=True)
            del m
    # Rows of other K measured earlier under the same name stay (a run with --ks 15 adds to one with --ks 8).
    store = RESULTS / f"{args.name}.json"
    earlier = json.loads(store.read_text())["rows"] if store.exists() else []
    raw = sorted([r for r in earlier if r["k"] not in ks] + raw, key=lambda r: (r["k"], r["patch"] != "zero"))
    for r in raw:
        info = r["fit"]
        explained = (sum(x["explained"] for x in info["modules"]) / len(info["modules"])) if info else None
        fit_s = info.get("wall_s", info["seconds"]) if info else None
        rows.append([f"{args.target} {r['k']}", r["criterion"], r["patch"], r["perplexity"], r["ratio"], r["params"],
                     r["kv_layers"], f"{explained:.3f}" if explained is not None else "-",
                     f"{fit_s:.0f}s, {info['forward_passes']} partial passes" if info else "-"])
    headers = ["dropped", "picked by", "replaced by", "held-out ppl", "x base", "parameters", "KV layers",
               "output explained (mean)", "fit cost"]
    base_row = ["none (base)", "-", "-", base_ppl, 1.0, count_parameters(model), kv_cache_layers(model), "-", "-"]
    targets = ({} if args.target != "attn" else {8: 1.15, 15: 1.8} if args.model == "smollm2-135m" else {6: 1.3})
    verdicts = []
    for r in raw:
        if r["patch"] == "linear" and r["k"] in targets:
            target = targets[r["k"]]
            verdict = "met" if r["ratio"] <= target else f"missed by {r['ratio'] - target:.3f}"
            verdicts.append(f"- attention {r['k']}, linear patch: {r['ratio']:.3f}x base, target <= {target}: {verdict}")
    title = {"cosine": "linear patches", "loss": "loss-aware selection and linear patches",
             "loss-patched": "patch-aware loss selection and linear patches"}[args.criterion]
    if args.target == "block":
        title += ", blocks"
    if args.samples != 16:
        title += f", {args.samples} x {args.seq_len} calibration tokens"
    commands = dict.fromkeys(r.get("command", "python benchmarks/recover_quality.py") for r in raw)
    text = header(f"Recovering quality: {title} ({args.model})", " && ".join(commands))
    text += (f"Calibration (cosine picks and patch fits): the first {cal.documents} C4 documents of "
             f"`../shared/data/calibration/c4_validation_2k.jsonl`, {args.samples} x {args.seq_len} tokens"
             + (", BOS at the start of every chunk" if arch.needs_bos else "") + ". Held-out "
             f"perplexity: {args.heldout_samples} x {args.seq_len} tokens of documents {HELDOUT_DOCS[0]}-"
             f"{HELDOUT_DOCS[1] - 1} of the same file, never used for calibration. "
             + ("One-shot cosine picks (the paper's)" if args.criterion == "cosine" else
                f"One-shot loss picks: every {'attention layer' if args.target == 'attn' else 'block'} "
                f"{'removed' if args.criterion == 'loss' else 'replaced by its own linear patch'} alone, "
                f"the calibration loss increase ranked lowest "
                f"first ({ranked.cost.describe() if ranked.cost else ''}; {select_s:.0f}s)")
             + ", the same layers for both replacements. Linear patch: the ridge least-squares d x d map from the "
             "attention's normed input to its "
             "output (a block: from the block's normed input to everything it added; it becomes the layer's attention "
             "and the MLP goes), no bias, fitted layer by layer with the earlier patches active (no training). A "
             "patched attention holds d x d weights and no KV cache. Total time of the last run "
             f"{time.perf_counter() - started:.0f}s.\n\n")
    text += table(headers, [base_row, *rows], markdown=True) + "\n"
    if verdicts:
        text += "\nIssue targets (without training):\n\n" + "\n".join(verdicts) + "\n"
    # The section only: `common.render()` (what the other scripts call) folds it into BENCHMARKS.md.
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text.rstrip() + "\n")
    store.write_text(json.dumps({"base_perplexity": base_ppl, "rows": raw}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
