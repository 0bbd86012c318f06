"""The paper's comparison on one model: for each strategy and drop count, drop, evaluate and record.

Rows are appended to rows.jsonl as they finish; a restarted study with the same settings skips the finished rows.
One-shot scores are measured once; iterative picks are measured once per target up to the largest K (the plan for a
smaller K is a prefix of it); random baselines draw seeded random modules.
"""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from .arch import arch_for
from .bench import decode_speed_ratio
from .calibration import load_calibration
from .claims import check_claims, claims_markdown
from .errors import LlmdropError
from .evaluate import evaluate_tasks, perplexity, primary_metric
from .files import write_json
from .measure import Scores, measure
from .plan import DropPlan, iterative_drops, plan_drops
from .report import table
from .surgery import apply_plan, count_parameters


@dataclass
class StudyConfig:
    model: str
    targets: list[str]
    ks: list[int]
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    iterative: bool = False
    random_seeds: list[int] = field(default_factory=list)
    random_targets: list[str] = field(default_factory=lambda: ["attn"])
    calibration: str | None = None
    samples: int = 64
    seq_len: int = 1024
    batch_size: int = 4
    ppl_samples: int = 8
    eval_batch_size: int = 8
    data: str = "auto"
    dtype: str = "float32"
    speed_new_tokens: int = 32
    speed_repeats: int = 3

    def fingerprint(self) -> dict:
        """Settings that change a row's numbers: a resumed study must match them."""
        keep = ("model", "tasks", "limit", "calibration", "samples", "seq_len", "ppl_samples", "data", "dtype")
        return {k: getattr(self, k) for k in keep}


def _rows_path(out: Path) -> Path:
    return out / "rows.jsonl"


def load_rows(out: str | Path) -> list[dict]:
    path = _rows_path(Path(out))
    if not path.exists():
        return []
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["key"], row)  # overlapping shards may both finish a row: the first one counts
    return list(rows.values())


def _prepare_dir(out: Path, config: StudyConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "study.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        if StudyConfig(**previous).fingerprint() != config.fingerprint():
            raise LlmdropError(
                f"{out} holds a study made with other settings ({saved}); choose another -o to start a new one"
            )
    write_json(saved, asdict(config))


def _random_plan(target: str, k: int, num_layers: int, seed: int) -> DropPlan:
    rng = random.Random(seed)
    if target == "joint":
        picks = rng.sample([(kind, i) for kind in ("attn", "mlp") for i in range(num_layers)], k)
        return DropPlan(attn=[i for kind, i in picks if kind == "attn"], mlp=[i for kind, i in picks if kind == "mlp"],
                        num_layers=num_layers, target=target, method=f"random-{seed}")
    idx = rng.sample(range(num_layers), k)
    key = "blocks" if target == "block" else target
    return DropPlan(**{key: idx}, num_layers=num_layers, target=target, method=f"random-{seed}")


def _iterative_order(model: nn.Module, cal, target: str, k: int, out: Path, config: StudyConfig, progress: bool):
    """The iterative picks up to k, in order (cached in the study directory)."""
    path = out / f"iterative-{target}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if len(saved["picks"]) >= k:
            return [tuple(p) for p in saved["picks"]]
    work = copy.deepcopy(model)
    _, history = iterative_drops(work, cal, target, k, batch_size=config.batch_size, progress=progress)
    picks, done = [], DropPlan()
    for scores in history:
        step = plan_drops(scores, target, 1, exclude=done)
        kind, i = next((kind, idx[0]) for kind, idx in (("attn", step.attn), ("mlp", step.mlp), ("block", step.blocks))
                       if idx)
        picks.append((kind, i))
        done = DropPlan(attn=done.attn + step.attn, mlp=done.mlp + step.mlp, blocks=done.blocks + step.blocks)
    write_json(path, {"picks": picks, "scores": [s.to_dict() for s in history]})
    return picks


def _plan_from_picks(picks, num_layers: int, target: str) -> DropPlan:
    return DropPlan(attn=[i for kind, i in picks if kind == "attn"], mlp=[i for kind, i in picks if kind == "mlp"],
                    blocks=[i for kind, i in picks if kind == "block"], num_layers=num_layers, target=target,
                    method="iterative")


def study_jobs(config: StudyConfig) -> list[tuple[str, str, str, int, int | None]]:
    """The study's grid, in order: (row key, strategy, target, K, random seed or None)."""
    jobs: list[tuple[str, str, str, int, int | None]] = [("base", "base", "none", 0, None)]
    for target in config.targets:
        for k in config.ks:
            jobs.append((f"one-shot:{target}:{k}", target, target, k, None))
            if config.iterative:
                jobs.append((f"iterative:{target}:{k}", f"{target}-iterative", target, k, None))
            for seed in config.random_seeds if target in config.random_targets else ():
                jobs.append((f"random:{target}:{k}:{seed}", f"random-{target}", target, k, seed))
    return jobs


def run_study(config: StudyConfig, out: str | Path, progress: bool = True, log=print,
              shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run (or resume) the study into `out`; returns every row in it, finished earlier, now, or by other shards.

    `shard=(i, n)` runs only rows i, i+n, i+2n, ... of the grid, so n processes (or machines sharing the directory)
    split one study; each appends its rows to the same rows.jsonl.
    """
    from .models import load_model

    index, count = shard
    if not 0 <= index < count:
        raise LlmdropError(f"shard {index}/{count} does not exist: use 0/{count} to {count - 1}/{count}")
    out = Path(out)
    _prepare_dir(out, config)
    done = {r["key"] for r in load_rows(out)}
    base, tok = load_model(config.model, dtype=config.dtype, progress=progress)
    arch = arch_for(base)
    num_layers = len(base.get_submodule(arch.layers))
    bad = [k for k in config.ks if k > (2 * num_layers if "joint" in config.targets else num_layers - 1)]
    if bad:
        raise LlmdropError(f"drop counts {bad} do not fit a {num_layers}-layer model")
    cal = load_calibration(tok, config.calibration, config.samples, config.seq_len, bos=arch.needs_bos)
    held = load_calibration(tok, config.calibration, config.ppl_samples, config.seq_len, bos=arch.needs_bos,
                            skip=config.samples)
    scores_path = out / "scores.json"
    if scores_path.exists():
        scores = Scores.load(scores_path)
    else:
        scores = measure(base, cal, batch_size=config.batch_size, progress=progress, model_name=config.model)
        scores.save(scores_path)

    jobs = study_jobs(config)
    mine = [j for n, j in enumerate(jobs) if n % count == index]
    pending = [j for j in mine if j[0] not in done]
    log(f"study: {len(jobs)} rows, {len(done)} already done, {len(pending)} to run"
        + (f" (shard {index}/{count}: {len(mine)} of the rows)" if count > 1 else ""))
    for n, (key, strategy, target, k, seed) in enumerate(pending, 1):
        if any(r["key"] == key for r in load_rows(out)):
            continue  # another process (a shard, a second run) finished it meanwhile
        t0 = time.perf_counter()
        if key == "base":
            plan = DropPlan(num_layers=num_layers)
        elif key.startswith("iterative"):
            order = _iterative_order(base, cal, target, max(config.ks), out, config, progress)
            plan = _plan_from_picks(order[:k], num_layers, target)
        elif seed is not None:
            plan = _random_plan(target, k, num_layers, seed)
        else:
            plan = plan_drops(scores, target, k)
        model = copy.deepcopy(base)
        if plan.size:
            apply_plan(model, plan)
        row = {"key": key, "strategy": strategy, "target": target, "k": k, "seed": seed, "plan": plan.to_dict(),
               "params": count_parameters(model)}
        if config.tasks:
            ev = evaluate_tasks(model, tok, config.tasks, limit=config.limit, batch_size=config.eval_batch_size,
                                data=config.data, bos=arch.needs_bos, progress=progress)
            row["tasks"] = {name: r["metrics"][primary_metric(r["metrics"])] for name, r in ev["tasks"].items()}
            row["task_n"] = {name: r["n"] for name, r in ev["tasks"].items()}
            row["average"] = sum(row["tasks"].values()) / len(row["tasks"])
            row["data"] = ev["data"]
        row["perplexity"] = perplexity(model, held, config.batch_size, progress=False)["perplexity"]
        row["decode_ratio"], row["kv_bytes"], _ = decode_speed_ratio(model, base, config.seq_len,
                                                                     config.speed_new_tokens, config.speed_repeats)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        with _rows_path(out).open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        del model
        log(f"[{n}/{len(pending)}] {key}: " + (f"avg {row['average']:.4f} " if "average" in row else "")
            + f"ppl {row['perplexity']:.2f} ({row['seconds']}s)")
    rows = load_rows(out)  # with the rows other shards finished meanwhile
    write_results(out, rows, scores, config)
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
    order = {s: i for i, s in enumerate(dict.fromkeys(r["strategy"] for r in rows))}
    return sorted(out, key=lambda r: (order[r["strategy"]], r["k"]))


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


def write_results(out: Path, rows: list[dict], scores: Scores, config: StudyConfig) -> None:
    from .plots import plot_quality, plot_similarity

    summary = _summarise(rows)
    write_json(out / "results.json", {"config": asdict(config), "rows": summary})
    plot_similarity(scores, out / "similarity.png")
    plot_quality(summary, out / "quality.png", title=config.model)
    n_items = next((r.get("task_n") for r in rows if r.get("task_n")), {})
    text = [f"# Study: {config.model}", "",
            f"Calibration: {scores.calibration.get('source')}, {config.samples} x {config.seq_len} tokens. "
            f"Tasks: {', '.join(f'{t} ({n} items)' for t, n in n_items.items()) or 'none'}; "
            "accuracy is acc_norm where lm-eval reports it, else acc. Perplexity on "
            f"{config.ppl_samples} held-out chunks. KV MiB and decode x (decode tokens/s over the base model, "
            f"median of {config.speed_repeats}) at batch 1, context {config.seq_len}."
            + (" Random rows: the mean over seeds (geometric for perplexity); the quality plot shades from the "
               "worst seed to the best." if config.random_seeds else ""), "",
            results_table(rows), "", _noise_note(summary), "", "The paper's findings, checked on these rows:", "",
            claims_markdown(check_claims(summary, scores)), "",
            "![similarity](similarity.png)", "", "![quality](quality.png)", ""]
    (out / "results.md").write_text("\n".join(text))


def report_existing(out: str | Path) -> list[dict]:
    """Rewrite results.md / results.json / plots from the rows finished so far (for an interrupted study)."""
    out = Path(out)
    config = StudyConfig(**json.loads((out / "study.json").read_text()))
    rows = load_rows(out)
    if not rows:
        raise LlmdropError(f"{out} holds no finished rows yet")
    write_results(out, rows, Scores.load(out / "scores.json"), config)
    return rows
