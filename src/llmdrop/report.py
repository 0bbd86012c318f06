"""Plain-text tables for the terminal and Markdown for reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .criteria import CRITERIA
from .measure import Scores

if TYPE_CHECKING:
    from .choice import Choice


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    """Aligned columns; numbers right-aligned. `markdown` gives a GitHub table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(values):
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(out) + " |") if markdown else "  ".join(out).rstrip()

    sep = ("|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
           if markdown else "  ".join("-" * w for w in widths))
    return "\n".join([line([str(h) for h in headers]), sep, *(line(r) for r in cells)])


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def primary_metric(metrics: dict) -> str:
    """The accuracy a task is summarised by: length-normalised where lm-eval reports it."""
    return "acc_norm" if "acc_norm" in metrics else "acc"


def scores_table(scores: Scores, markdown: bool = False) -> str:
    """One row per layer: the three cosine similarities and the rank of each (1 = most redundant)."""
    ranks = {k: _ranks(scores.of(k)) for k in ("attn", "mlp", "block")}
    rows = [[i, scores.attn[i], ranks["attn"][i], scores.mlp[i], ranks["mlp"][i], scores.block[i], ranks["block"][i]]
            for i in range(scores.num_layers)]
    return table(["layer", "attn cos", "rank", "mlp cos", "rank", "block cos", "rank"], rows, markdown)


def scores_summary(scores: Scores) -> str:
    """The per-layer table of `llmdrop measure`, and the best window of blocks when the scores hold one."""
    best = scores.best_window()
    if not best:
        return scores_table(scores)
    first, last, cos = best
    return f"{scores_table(scores)}\nbest window of {last - first + 1} blocks: layers {first}..{last} (cos {cos:.4f})"


def _ranks(values: Sequence[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: (values[i], i), reverse=True)
    ranks = [0] * len(values)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def dir_bytes(path: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the weight files in a checkpoint directory (0 if it has none)."""
    return sum(f.stat().st_size for f in Path(path).glob(pattern))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def run_report(model_name: str, choice, summary_markdown: str, heal: dict | None = None) -> str:
    """Markdown report of one `llmdrop run`: the plan, before/after figures, and every layer's scores. `heal` is the
    entry record_heal added (a healed run): what healing trained on, and how far."""
    cal = choice.scores.calibration
    lines = [
        f"# llmdrop: {model_name}",
        "",
        f"Dropped ({choice.plan.method}, target `{choice.plan.target}`): {choice.plan.describe()}.",
        "",
        f"Calibration: {cal.get('source', '?')}, {cal.get('samples', '?')} chunks x {cal.get('seq_len', '?')} tokens"
        f" ({choice.scores.tokens:,} tokens{', BOS-prefixed' if cal.get('bos') else ''}).",
        "",
    ]
    if heal:
        lines += [
            f"Healed: distilled from the unpruned model (KL per token, training {heal['train']}, AdamW lr {heal['lr']:g}) "
            f"for {heal['steps']:,} steps, {heal['tokens']:,} tokens of {heal['calibration']} text read after its first "
            f"{heal['skip_tokens']:,} tokens, which hold the calibration and held-out chunks: the perplexity below is on "
            f"text healing never trained on. KL to the unpruned model {heal['first_kl']:.4f} (first step) -> "
            f"{heal['final_kl']:.4f} (last step).",
            "",
        ]
    lines += [
        "## Before and after",
        "",
        summary_markdown,
        "",
        "## Scores (cosine similarity of the residual stream; higher = more redundant)",
        "",
        "![per-layer similarity](similarity.png)",
        "",
        scores_table(choice.scores, markdown=True),
        "",
    ]
    return "\n".join(lines)


# ---- a Choice in words: the plan line, the plan table, the KV rows (the criterion adds what only it measured) -----

def describe(choice: Choice) -> str:
    """One line: "plan (one-shot, target attn): drop attention [3, 5]"; a criterion other than cosine adds itself
    (and what it cost), the kv objective its context and weight and the KV cache the plan frees."""
    plan = choice.plan
    if choice.objective == "kv":
        freed, total = choice.kv_freed(), choice.kv_total()
        share = f" of {human_bytes(total)}" if total else ""
        return (f"plan ({plan.method}, target {plan.target}, objective kv at {choice.kv_context:,} tokens, weight "
                f"{choice.kv_weight:g}): drop {plan.describe()} (frees {human_bytes(freed or 0)}{share} of KV cache per "
                "sequence)")
    if choice.criterion == next(iter(CRITERIA)):  # the paper's criterion goes without saying
        return f"plan ({plan.method}, target {plan.target}): drop {plan.describe()}"
    extra = CRITERIA[choice.criterion].implementation().describe(choice)
    return f"plan ({plan.method}, target {plan.target}, criterion {choice.criterion}): drop {plan.describe()}{extra}"


def plan_table(choice: Choice) -> str:
    """The modules to drop, in pick order, with the cosine each had (one-shot scores) and the criterion's own column
    (the loss criterion: the calibration loss increase its removal caused when it was picked)."""
    picks = choice.picks or choice.plan.picks()
    if choice.objective == "kv" and choice.kv_saved is not None:
        rows = [[kind, i, choice.scores.of(kind)[i], human_bytes(choice.kv_saved[i])] for kind, i in picks]
        return table(["module", "layer", "cos (one-shot)", f"KV saved at {choice.kv_context:,} tokens"], rows)
    headers = ["module", "layer", "cos (one-shot)"]
    rows = [[kind, i, choice.scores.of(kind)[i]] for kind, i in picks]
    column = CRITERIA[choice.criterion].implementation().column(choice)
    if column is not None:
        headers.append(column[0])
        rows = [[*row, value] for row, value in zip(rows, column[1])]
    return table(headers, rows)


def kv_rows(choice: Choice, ppl_before: float | None = None, ppl_after: float | None = None,
            evals: dict | None = None) -> list[list]:
    """Report rows (label, before, after) of the KV cache a choice frees at its context (batch 1, computed from
    the config), and what it frees per unit of quality lost: per 1% perplexity rise, and per point of average
    accuracy lost when `evals` holds task results before and after. None of them without KV figures."""
    freed, total = choice.kv_freed(), choice.kv_total()
    if freed is None or not total:
        return []
    n = f"{choice.kv_context:,}"
    rows = [[f"KV cache at {n} tokens (batch 1, from the config)", human_bytes(total), human_bytes(total - freed)],
            [f"KV saved at {n} tokens", "", f"{human_bytes(freed)} ({freed / total:.0%})"]]
    if ppl_before and ppl_after is not None and math.isfinite(ppl_after):
        rise = 100 * (ppl_after / ppl_before - 1)
        rows.append([f"KV saved at {n} tokens per 1% perplexity rise", "",
                     human_bytes(freed / rise) if rise > 0 else "perplexity did not rise"])
    if evals and evals.get("before") and evals.get("after"):
        lost = []
        for name, result in evals["before"]["tasks"].items():
            metric = primary_metric(result["metrics"])
            lost.append(100 * (result["metrics"][metric] - evals["after"]["tasks"][name]["metrics"][metric]))
        points = sum(lost) / len(lost) if lost else 0.0
        rows.append([f"KV saved at {n} tokens per accuracy point lost (mean of {len(lost)} tasks)", "",
                     human_bytes(freed / points) if points > 0 else "accuracy did not fall"])
    return rows
