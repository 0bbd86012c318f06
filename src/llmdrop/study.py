"""The paper's comparison on one model: for each strategy and drop count, drop, evaluate and record.

Rows are appended to rows.jsonl as they finish; a restarted study with the same settings skips the finished rows.
One-shot scores are measured once; iterative picks are measured once per target up to the largest K (the plan for a
smaller K is a prefix of them, in the order they were made); random baselines draw seeded random modules. With
`criterion="loss"` every target also gets rows ranked by the calibration loss increase (`attn-loss`, and
`attn-loss-iterative` with `iterative`), whose picks are likewise measured once per target. With `patch="linear"`
every attention / MLP / joint row but the random ones gets a twin right after it (`attn+linear`, `attn-loss+linear`,
...): the same plan, with each dropped sublayer replaced by a least-squares linear map fitted on the calibration
chunks (patch.py) on a copy of the model before the drop. Block rows have no twin (a patch replaces a sublayer, not a
whole block). Plans come from the same orchestration as `llmdrop drop` (pipeline.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from .arch import arch_for
from .bench import decode_speed_ratio
from .calibration import load_calibration
from .choice import Choice
from .claims import check_claims, claims_markdown
from .configs import PlanSpec, StudyConfig
from .criteria import CRITERIA
from .criteria.cosine import choose_from_scores
from .errors import LlmdropError
from .evaluate import evaluate_tasks, perplexity
from .files import literal, write_json
from .measure import Scores, measure
from .models import load_model
from .patches import PATCHES, is_patched
from .pipeline import choose, prune
from .plan import DropPlan, random_plan
from .plots import plot_quality, plot_similarity
from .report import primary_metric, table
from .surgery import count_parameters

_log = logging.getLogger("llmdrop")


def _rows_path(out: Path) -> Path:
    return out / "rows.jsonl"


def load_rows(out: str | Path) -> list[dict]:
    """Every finished row of the study in `out`, once each.

    A line that is not a whole row (a crash or a full disk mid-append leaves a truncated last line) is skipped
    with a warning: that row counts as not done and runs again.
    """
    path = _rows_path(Path(out))
    if not path.exists():
        return []
    rows: dict[str, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            _log.warning("%s line %d is not a complete row (an interrupted write?); that row will run again", path, n)
            continue
        rows.setdefault(row["key"], row)  # overlapping shards may both finish a row: the first one counts
    return list(rows.values())


def _append_row(out: Path, row: dict) -> None:
    path = _rows_path(out)
    with path.open("a+b") as fh:
        # After a truncated line (no newline), start a new one: otherwise this row would be glued to the broken one.
        fh.seek(0, 2)
        glue = b""
        if fh.tell():
            fh.seek(-1, 2)
            glue = b"" if fh.read(1) == b"\n" else b"\n"
        fh.write(glue + (json.dumps(row) + "\n").encode())


def load_config(out: str | Path) -> StudyConfig:
    """The StudyConfig saved in a study directory (study.json)."""
    saved = Path(out) / "study.json"
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmdropError(f"{saved} does not exist; {Path(out)} is not a study directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LlmdropError(f"{saved} is not valid JSON (an interrupted write?); delete it to resume with the settings "
                           "given now, or choose another output directory") from None
    except OSError as err:
        raise LlmdropError(f"could not read {saved} ({err.strerror or err})") from None
    return StudyConfig.from_dict(data, source=str(saved))


def _prepare_dir(out: Path, config: StudyConfig, record: bool = True) -> bool:
    """Check that `out` can hold this study (a new directory, or one holding a study with the same settings) and
    create it; returns whether it was created. With `record`, also write study.json; run_study writes it only once
    the model and the calibration text were read (_record_settings), so a start that fails on a mistyped input
    leaves no settings behind to refuse the corrected run."""
    if out.exists() and not out.is_dir():
        raise LlmdropError(f"study directory {literal(out)} is a file; choose another {{output}}", params=["output"])
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LlmdropError(f"cannot create the study directory {literal(out)} ({literal(err.strerror or err)}); "
                           "choose another {output}", params=["output"]) from None
    saved = out / "study.json"
    if saved.exists() and load_config(out).fingerprint() != config.fingerprint():
        raise LlmdropError(
            f"{literal(out)} holds a study made with other settings ({literal(saved)}); choose another {{output}} to "
            "start a new one", params=["output"]
        )
    if record:
        _record_settings(out, config)
    return created


def _record_settings(out: Path, config: StudyConfig) -> None:
    write_json(out / "study.json", asdict(config))


# The paper's criterion is the table's first row: its rows are named by method alone ("one-shot", "iterative"); the
# others carry their name ("loss", "iterative-loss"). Keys and strategies are those of studies written before, so a
# study resumes across versions.
_PAPER = next(iter(CRITERIA))


def _kind(criterion: str, iterative: bool) -> str:
    if criterion == _PAPER:
        return "iterative" if iterative else "one-shot"
    return f"iterative-{criterion}" if iterative else criterion


@dataclass(frozen=True)
class Row:
    """One row of the grid: the unpruned base, a random draw (`seed`), or a plan of `criterion` (one-shot or
    `iterative`) for `target` and K, with `patch` standing where the dropped modules were."""

    target: str = "none"
    k: int = 0
    criterion: str = _PAPER
    iterative: bool = False
    patch: str = "zero"
    seed: int | None = None

    @property
    def key(self) -> str:
        if self.k == 0:
            return "base"
        if self.seed is not None:
            return f"random:{self.target}:{self.k}:{self.seed}"
        return f"{_kind(self.criterion, self.iterative)}{PATCHES[self.patch].suffix}:{self.target}:{self.k}"

    @property
    def strategy(self) -> str:
        if self.k == 0:
            return "base"
        if self.seed is not None:
            return f"random-{self.target}"
        named = "" if self.criterion == _PAPER else f"-{self.criterion}"
        return f"{self.target}{named}{'-iterative' if self.iterative else ''}{PATCHES[self.patch].suffix}"


def study_jobs(config: StudyConfig, block_patches: bool = True) -> list[Row]:
    """The study's grid, in order. With a `patch` that fits, every row but the random ones has a patched twin
    right after it; block rows only when `block_patches` (the family can carry a block map)."""
    rows = [Row()]
    for target in config.targets:
        criteria = dict.fromkeys([_PAPER, config.criterion])  # the paper's rows, and the chosen criterion's
        kinds = [(c, iterative) for c in criteria for iterative in (False, True) if config.iterative or not iterative]
        patches = ["zero"]
        if PATCHES[config.patch].fits and (target != "block" or block_patches):
            patches.append(config.patch)
        for k in config.counts:
            rows += [Row(target, k, criterion, iterative, patch) for criterion, iterative in kinds for patch in patches]
            rows += [Row(target, k, seed=seed) for seed in config.random_seeds if target in config.random_targets]
    return rows


def _cached_picks(path: Path, k: int) -> list[tuple[str, int]] | None:
    """The first picks saved in `path` when it holds at least k of them; None (measure again) otherwise."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if len(saved["picks"]) >= k:
            return [(kind, int(i)) for kind, i in saved["picks"]]
    except (ValueError, KeyError, TypeError):
        _log.warning("%s is not a complete cache of picks; measuring them again", path)
    return None


def _picks(model: nn.Module, cal, row: Row, scores: Scores, out: Path, config: StudyConfig,
           progress: bool) -> list[tuple[str, int]]:
    """The picks of a row's criterion and method up to the largest K, most redundant first (the plan for a smaller K
    is their prefix), made once per target through pipeline.choose and cached in the study directory; an iterative
    choice prunes as it goes, so it runs on a copy."""
    k = max(config.counts)
    path = out / f"{_kind(row.criterion, row.iterative)}-{row.target}.json"
    cached = _cached_picks(path, k)
    if cached is not None:
        return cached
    spec = PlanSpec(row.target, n=k, criterion=row.criterion, iterative=row.iterative,
                    candidates=config.candidates if "candidates" in CRITERIA[row.criterion].options else None)
    choice = choose(copy.deepcopy(model) if row.iterative else model, spec, calibration=cal,
                    scores=None if row.iterative else scores, batch_size=config.batch_size, progress=progress,
                    model_name=config.model_name)
    write_json(path, {"picks": choice.picks, "scores": [s.to_dict() for s in choice.history],
                      **CRITERIA[row.criterion].implementation().provenance(choice)})
    return choice.picks


def _plan_for(row: Row, base: nn.Module, scores: Scores, cal, out: Path, config: StudyConfig,
              num_layers: int, progress: bool) -> DropPlan:
    """The plan of one row: nothing (base), a seeded random draw, one-shot from the shared cosine scores, or the
    prefix of its criterion's cached picks (iterative, or a criterion that runs the model); a patched row's plan is
    that of its twin."""
    if row.k == 0:
        return DropPlan(num_layers=num_layers)
    if row.seed is not None:
        return random_plan(row.target, row.k, num_layers, row.seed)
    if row.iterative or CRITERIA[row.criterion].needs_text:
        picks = _picks(base, cal, row, scores, out, config, progress)[:row.k]
        return DropPlan.from_picks(picks, num_layers, row.target, "iterative" if row.iterative else "one-shot",
                                   criterion=row.criterion)
    return choose_from_scores(scores, PlanSpec(row.target, n=row.k, criterion=row.criterion)).plan


@dataclass
class _Inputs:
    """What every row of a study reads: the unpruned model, its tokenizer and Arch, the calibration and held-out
    chunks, the one-shot scores."""

    base: nn.Module
    tokenizer: object
    arch: object
    cal: object
    held: object
    scores: Scores | None = None

    @property
    def num_layers(self) -> int:
        return len(self.base.get_submodule(self.arch.layers))


def _inputs(config: StudyConfig, out: Path, progress: bool, cache_dir) -> _Inputs:
    """Load the model and read the text, checking what the grid needs of them before any slow pass; a start that
    fails here leaves no settings (and no directory it made) behind to refuse the corrected run."""
    created = _prepare_dir(out, config, record=False)
    try:
        base, tok = load_model(config.model_name, dtype=config.dtype, progress=progress, cache_dir=cache_dir)
        arch = arch_for(base)
        num_layers = len(base.get_submodule(arch.layers))
        bad = [k for k in config.counts if k > (2 * num_layers if "joint" in config.targets else num_layers - 1)]
        if bad:
            raise LlmdropError(f"drop counts {bad} do not fit a {num_layers}-layer model")
        if PATCHES[config.patch].fits:  # before measuring, not at the first patched row
            PATCHES[config.patch].implementation().check_model(base, arch, None, config.samples * config.seq_len)
        cal = load_calibration(tok, config.calibration, config.samples, config.seq_len, bos=arch.needs_bos)
        held = load_calibration(tok, config.calibration, config.ppl_samples, config.seq_len, bos=arch.needs_bos,
                                skip=config.samples)
    except BaseException:
        if created:  # a start that failed leaves no empty directory behind (rmdir: only while it is empty)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    _record_settings(out, config)
    return _Inputs(base, tok, arch, cal, held)


def _measure_row(job: Row, inputs: _Inputs, out: Path, config: StudyConfig, progress: bool) -> dict:
    """One row: its plan applied to a copy of the model (with its patch kind standing in), evaluated."""
    t0 = time.perf_counter()
    plan = _plan_for(job, inputs.base, inputs.scores, inputs.cal, out, config, inputs.num_layers, progress)
    model = copy.deepcopy(inputs.base)
    choice = Choice(plan, inputs.scores, criterion=plan.criterion)
    if plan.size:  # the patches fitted on the copy with everything in place, then the rest dropped
        prune(model, choice, config.model_name, patch=job.patch, calibration=inputs.cal, batch_size=config.batch_size,
              progress=progress, arch=inputs.arch)
    # the row keeps the plan as chosen (a patched block is a layer with a patched attention in the model)
    row = {"key": job.key, "strategy": job.strategy, "target": job.target, "k": job.k, "seed": job.seed,
           "plan": plan.to_dict(), "params": count_parameters(model)}
    if choice.patch_fit is not None:
        row["patch"] = choice.patch_fit
    if config.tasks:
        ev = evaluate_tasks(model, inputs.tokenizer, config.tasks, limit=config.limit, batch_size=config.eval_batch_size,
                            data=config.data, bos=inputs.arch.needs_bos, progress=progress)
        row["tasks"] = {name: r["metrics"][primary_metric(r["metrics"])] for name, r in ev["tasks"].items()}
        row["task_n"] = {name: r["n"] for name, r in ev["tasks"].items()}
        row["average"] = sum(row["tasks"].values()) / len(row["tasks"])
        row["data"] = ev["data"]
    row["perplexity"] = perplexity(model, inputs.held, config.batch_size, progress=False)["perplexity"]
    row["decode_ratio"], row["kv_bytes"], _ = decode_speed_ratio(model, inputs.base, config.seq_len,
                                                                 config.speed_new_tokens, config.speed_repeats)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_study(config: StudyConfig, output: str | Path, progress: bool = True, log=None,
              shard: tuple[int, int] = (0, 1), cache_dir: str | Path | None = None) -> list[dict]:
    """Run (or resume) the study into the directory `output`; returns every row in it, finished earlier, now, or by
    other shards.

    `shard=(i, n)` runs only rows i, i+n, i+2n, ... of the grid, so n processes (or machines sharing the directory)
    split one study; each appends its rows to the same rows.jsonl. Status lines go to `log` (default: the
    "llmdrop" logger at INFO).
    """
    say = log or _log.info
    index, count = shard
    if not 0 <= index < count:
        raise LlmdropError(f"shard {index}/{count} does not exist: use 0/{count} to {count - 1}/{count}")
    out = Path(output)
    inputs = _inputs(config, out, progress, cache_dir)
    blocks_fit = not PATCHES[config.patch].fits or PATCHES[config.patch].implementation().block_fits(inputs.arch)
    if not blocks_fit and "block" in config.targets:
        say("study: block rows have no linear-patched twin here (this family norms attention's output again, "
            "which would distort a block's map)")
    done = {r["key"] for r in load_rows(out)}
    scores_path = out / "scores.json"
    if scores_path.exists():
        inputs.scores = Scores.load(scores_path)
    else:
        inputs.scores = measure(inputs.base, inputs.cal, batch_size=config.batch_size, progress=progress,
                                model_name=config.model_name, arch=inputs.arch)
        inputs.scores.save(scores_path)
    jobs = study_jobs(config, blocks_fit)
    mine = [j for n, j in enumerate(jobs) if n % count == index]
    pending = [j for j in mine if j.key not in done]
    say(f"study: {len(jobs)} rows, {len(done)} already done, {len(pending)} to run"
        + (f" (shard {index}/{count}: {len(mine)} of the rows)" if count > 1 else ""))
    for n, job in enumerate(pending, 1):
        if any(r["key"] == job.key for r in load_rows(out)):
            continue  # another process (a shard, a second run) finished it meanwhile
        row = _measure_row(job, inputs, out, config, progress)
        _append_row(out, row)
        say(f"[{n}/{len(pending)}] {job.key}: " + (f"avg {row['average']:.4f} " if "average" in row else "")
            + f"ppl {row['perplexity']:.2f} ({row['seconds']}s)"
            + (f"; {PATCHES[job.patch].implementation().describe(row['patch'])}" if "patch" in row else ""))
    rows = load_rows(out)  # with the rows other shards finished meanwhile
    write_results(out, rows, inputs.scores, config)
    return rows


def _summarise(rows: list[dict]) -> list[dict]:
    """Random rows averaged over seeds, with each seed's lowest and highest average and perplexity under "range";
    other rows as they are; ordered by strategy then K.

    Perplexity is averaged geometrically (the mean of the losses): one seed that wrecks the model would otherwise
    decide the arithmetic mean on its own."""
    merged: dict[tuple, list[dict]] = {}
    for r in rows:
        merged.setdefault((r["strategy"], r["k"]), []).append(r)
    out = []
    for group in merged.values():
        first = dict(group[0])
        if len(group) > 1:
            for key in ("average", "perplexity", "decode_ratio", "kv_bytes", "params"):
                if all(key in g for g in group):
                    mean = statistics.geometric_mean if key == "perplexity" else statistics.mean
                    first[key] = mean(g[key] for g in group)
            first["range"] = {key: [min(g[key] for g in group), max(g[key] for g in group)]
                              for key in ("average", "perplexity") if all(key in g for g in group)}
            if all("tasks" in g for g in group):
                first["tasks"] = {t: statistics.mean(g["tasks"][t] for g in group) for t in group[0]["tasks"]}
            first["seeds"] = len(group)
        out.append(first)
    # A patched strategy's rows sit right under the same strategy's rows without patches, K by K.
    order = {s: i for i, s in enumerate(dict.fromkeys(_unpatched(r["strategy"]) for r in rows))}
    return sorted(out, key=lambda r: (order[_unpatched(r["strategy"])], r["k"], _unpatched(r["strategy"]) != r["strategy"]))


def _unpatched(strategy: str) -> str:
    """The strategy of a patched row's twin: "attn+linear" -> "attn"."""
    for row in PATCHES.values():
        if row.suffix and strategy.endswith(row.suffix):
            return strategy.removesuffix(row.suffix)
    return strategy


def results_table(rows: list[dict], markdown: bool = True) -> str:
    summary = _summarise(rows)
    base = next((r for r in summary if r["k"] == 0), None)
    tasks = list(summary[0].get("tasks", {})) if summary else []
    headers = ["strategy", "K", *tasks, "average", "perplexity", "params (M)", "KV MiB", "decode x"]
    body = []
    for r in summary:
        label = r["strategy"] + (f" ({r['seeds']} seeds)" if r.get("seeds") else "")
        body.append([label, r["k"], *(r.get("tasks", {}).get(t, float("nan")) for t in tasks),
                     r.get("average", float("nan")), r["perplexity"], r["params"] / 1e6, r["kv_bytes"] / 2**20,
                     r["decode_ratio"] if base else float("nan")])
    return table(headers, body, markdown=markdown)


def _noise_note(summary: list[dict]) -> str:
    """How far apart two averages must be to mean anything: the binomial standard error of the base average."""
    base = next((r for r in summary if r["k"] == 0 and r.get("tasks") and r.get("task_n")), None)
    if base is None:
        return ""
    var = sum(p * (1 - p) / base["task_n"][t] for t, p in base["tasks"].items() if base["task_n"].get(t))
    se = math.sqrt(var) / len(base["tasks"])
    return (f"Standard error of the base model's average accuracy: {100 * se:.1f} points (binomial, per-task item "
            "counts); differences between rows smaller than about twice that are noise.")


def _patch_note(rows: list[dict]) -> str:
    """What the `+linear` rows are, when there are any, else nothing."""
    patched = [r for r in rows if is_patched(r["key"]) and r.get("patch")]
    linear = PATCHES["linear"].suffix
    if not patched:
        return ""
    fits = [m["explained"] for r in patched for m in r["patch"].get("modules", [])]
    mean = f"; on average a patch reproduces {sum(fits) / len(fits):.3f} of its module's output energy" if fits else ""
    return (f"Rows ending `{linear}`: the plan of the row above each, with each dropped attention / MLP sublayer "
            "replaced by a least-squares d x d linear map from what it read to what it added (an attention patch "
            "needs no KV cache), fitted layer by layer on the calibration chunks, ridge "
            f"{patched[0]['patch'].get('ridge')}{mean}. A dropped block's map goes from its normed input to everything "
            "it added, and stands as the layer's attention with the MLP gone"
            + ("." if any(r["target"] == "block" for r in patched) or not any(r["target"] == "block" for r in rows)
               else "; block rows have no twin here (this family norms attention's output again)."))


def write_results(out: Path, rows: list[dict], scores: Scores, config: StudyConfig) -> None:
    summary = _summarise(rows)
    write_json(out / "results.json", {"config": asdict(config), "rows": summary})
    plot_similarity(scores, out / "similarity.png")
    plot_quality(summary, out / "quality.png", title=config.model_name)
    n_items = next((r.get("task_n") for r in rows if r.get("task_n")), {})
    text = [f"# Study: {config.model_name}", "",
            f"Calibration: {scores.calibration.get('source')}, {config.samples} x {config.seq_len} tokens. "
            f"Tasks: {', '.join(f'{t} ({n} items)' for t, n in n_items.items()) or 'none'}; "
            "accuracy is acc_norm where lm-eval reports it, else acc. Perplexity on "
            f"{config.ppl_samples} held-out chunks. KV MiB and decode x (decode tokens/s over the base model, "
            f"median of {config.speed_repeats}) at batch 1, context {config.seq_len}."
            + (" Random rows: the mean over seeds (geometric for perplexity); the quality plot shades from the "
               "worst seed to the best." if config.random_seeds else ""), "",
            results_table(rows), "", *(line for note in (_patch_note(rows), _noise_note(summary)) if note
                                       for line in (note, "")),
            "The paper's findings, checked on these rows:", "",
            claims_markdown(check_claims(summary, scores)), "",
            "![similarity](similarity.png)", "", "![quality](quality.png)", ""]
    (out / "results.md").write_text("\n".join(text))


def report_existing(out: str | Path) -> list[dict]:
    """Rewrite results.md / results.json / plots from the rows finished so far (for an interrupted study)."""
    out = Path(out)
    config = load_config(out)
    rows = load_rows(out)
    if not rows:
        raise LlmdropError(f"{out} holds no finished rows yet")
    write_results(out, rows, Scores.load(out / "scores.json"), config)
    return rows
