"""The paper's four findings, checked against one study's own rows and scores.

He et al. report, on 7B-70B models: attention layers are more redundant than MLP layers and whole blocks; dropping
attention costs the least per module dropped; the deeper attention layers are the redundant ones; the
similarity metric picks better modules than chance. A study on another model may or may not agree, so each
check states its evidence and its verdict, computed here from the numbers, never written by hand.

Drop costs are judged on both average accuracy and perplexity: on a few hundred items accuracy is noisy (a point
or two either way), perplexity much less so, and when the two disagree the verdict says "mixed".
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .measure import Scores

HOLDS, FAILS, MIXED, UNTESTED = "holds", "does not hold", "mixed", "not tested"


@dataclass
class Claim:
    claim: str
    evidence: str
    verdict: str  # HOLDS, FAILS, MIXED or UNTESTED


@dataclass
class _Cost:
    """What a drop cost against the base model: accuracy points lost (None without tasks), perplexity ratio."""

    acc_drop: float | None  # average accuracy lost, in [0, 1] (negative: gained)
    ppl: float

    def __str__(self) -> str:
        acc = "" if self.acc_drop is None else f"-{100 * self.acc_drop:.1f} pts, "
        return f"{acc}ppl x{self.ppl:.2f}"


def _cost(base: dict, row: dict) -> _Cost:
    acc = base["average"] - row["average"] if "average" in base and "average" in row else None
    return _Cost(acc, row["perplexity"] / base["perplexity"])


def _by(rows: list[dict], strategy: str) -> dict[int, dict]:
    return {r["k"]: r for r in rows if r["strategy"] == strategy}


def _verdict(checks: list[tuple[bool | None, bool]]) -> str:
    """checks: (accuracy says it holds, or None without tasks; perplexity, or the one criterion, says it holds)."""
    if not checks:
        return UNTESTED
    votes = [v for acc, ppl in checks for v in (acc, ppl) if v is not None]
    return HOLDS if all(votes) else FAILS if not any(votes) else MIXED


def _no_worse(cost: _Cost, others: list[_Cost]) -> tuple[bool | None, bool]:
    acc = None if cost.acc_drop is None else all(cost.acc_drop <= o.acc_drop for o in others)
    return acc, all(cost.ppl <= o.ppl for o in others)


def check_claims(summary: list[dict], scores: Scores) -> list[Claim]:
    """`summary`: study rows with random seeds averaged (one per strategy and K), as in results.json."""
    claims = []
    # The median layer, not the mean: the first layer or two (which build the residual stream from the embeddings)
    # score far lower than the rest in every family, and a mean would mostly measure them.
    kinds = ("attn", "mlp", "block")
    median = {kind: statistics.median(scores.of(kind)) for kind in kinds}
    mean = {kind: statistics.mean(scores.of(kind)) for kind in kinds}
    claims.append(Claim(
        "attention is more redundant than MLP and blocks",
        "cosine similarity of the median layer: " + ", ".join(f"{k} {median[k]:.4f}" for k in kinds)
        + " (mean over layers: " + ", ".join(f"{k} {mean[k]:.3f}" for k in kinds) + ")",
        HOLDS if median["attn"] > median["mlp"] and median["attn"] > median["block"] else FAILS))

    base = next((r for r in summary if r["k"] == 0), None)
    per_target = {t: _by(summary, t) for t in ("attn", "mlp", "block")}
    shared = sorted(set.intersection(*(set(v) for v in per_target.values())) - {0}) if base else []
    parts, checks = [], []
    for k in shared:
        cost = {t: _cost(base, per_target[t][k]) for t in per_target}
        parts.append(f"K={k}: " + "; ".join(f"{t} {c}" for t, c in cost.items()))
        checks.append(_no_worse(cost["attn"], [cost["mlp"], cost["block"]]))
    claims.append(Claim("dropping attention loses least per module dropped",
                        " / ".join(parts) or "needs attn, mlp and block rows at a shared K", _verdict(checks)))

    order = sorted(range(scores.num_layers), key=lambda i: scores.attn[i], reverse=True)
    half = scores.num_layers / 2
    ks = sorted({r["k"] for r in summary if r["strategy"] == "attn" and r["k"] > 0}) or [scores.num_layers // 4]
    deep = {k: sum(1 for i in order[:k] if i >= half) for k in ks}
    claims.append(Claim(
        "deeper attention layers go first",
        "; ".join(f"{deep[k]} of the {k} most similar attention layers are in the deeper half" for k in ks),
        _verdict([(None, deep[k] > k / 2) for k in ks])))

    cosine, chance = per_target["attn"], _by(summary, "random-attn")
    parts, checks = [], []
    for k in sorted(set(cosine) & set(chance) - {0}) if base else []:
        c, r = _cost(base, cosine[k]), _cost(base, chance[k])
        parts.append(f"K={k}: cosine {c}; random {r}")
        checks.append(_no_worse(c, [r]))
    claims.append(Claim("cosine similarity beats random attention drops",
                        " / ".join(parts) or "needs base, one-shot and random attention rows at a shared K",
                        _verdict(checks)))
    return claims


def claims_markdown(claims: list[Claim]) -> str:
    lines = ["| paper's finding | on this model | evidence |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.verdict} | {c.evidence} |" for c in claims]
    return "\n".join(lines)
