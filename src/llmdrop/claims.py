"""The paper's four findings, checked against one study's own rows and scores.

He et al. report, on 7B-70B models: attention layers are more redundant than MLP layers and whole blocks; dropping
attention costs the least per module dropped; the deeper attention layers are the redundant ones; the
similarity metric picks better modules than chance. A study on another model may or may not agree, so each
check states its evidence and whether it held, computed here from the numbers, never written by hand.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .measure import Scores


@dataclass
class Claim:
    claim: str
    evidence: str
    holds: bool | None  # None: the study lacks the rows to decide


def _by(rows: list[dict], strategy: str) -> dict[int, dict]:
    return {r["k"]: r for r in rows if r["strategy"] == strategy}


def _loss(base: dict, row: dict) -> tuple[str, float]:
    """What a drop cost: average accuracy lost when the study ran tasks, else the perplexity ratio."""
    if "average" in base and "average" in row:
        return ("acc", base["average"] - row["average"])
    return ("ppl", row["perplexity"] / base["perplexity"])


def _fmt(loss: tuple[str, float]) -> str:
    kind, v = loss
    return f"-{100 * v:.1f} points" if kind == "acc" else f"perplexity x{v:.2f}"


def _verdict(results: list[bool]) -> bool | None:
    return None if not results else all(results)


def check_claims(summary: list[dict], scores: Scores) -> list[Claim]:
    """`summary`: study rows with random seeds averaged (one per strategy and K), as in results.json."""
    claims = []
    mean = {kind: statistics.mean(scores.of(kind)) for kind in ("attn", "mlp", "block")}
    claims.append(Claim(
        "attention is more redundant than MLP and blocks",
        "mean cosine similarity over layers: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()),
        mean["attn"] > mean["mlp"] and mean["attn"] > mean["block"]))

    base = next((r for r in summary if r["k"] == 0), None)
    per_target = {t: _by(summary, t) for t in ("attn", "mlp", "block")}
    shared = sorted(set.intersection(*(set(v) for v in per_target.values())) - {0}) if base else []
    parts, results = [], []
    for k in shared:
        loss = {t: _loss(base, per_target[t][k]) for t in per_target}
        parts.append(f"K={k} " + ", ".join(f"{t} {_fmt(v)}" for t, v in loss.items()))
        results.append(loss["attn"][1] <= min(loss["mlp"][1], loss["block"][1]))
    claims.append(Claim("dropping attention loses least per module dropped",
                        "; ".join(parts) or "needs attn, mlp and block rows at a shared K", _verdict(results)))

    order = sorted(range(scores.num_layers), key=lambda i: scores.attn[i], reverse=True)
    half = scores.num_layers / 2
    ks = sorted({r["k"] for r in summary if r["strategy"] == "attn" and r["k"] > 0}) or [scores.num_layers // 4]
    parts, results = [], []
    for k in ks:
        deep = sum(1 for i in order[:k] if i >= half)
        parts.append(f"{deep} of the {k} most similar attention layers are in the deeper half")
        results.append(deep > k / 2)
    claims.append(Claim("deeper attention layers go first", "; ".join(parts), _verdict(results)))

    cosine, chance = per_target["attn"], _by(summary, "random-attn")
    parts, results = [], []
    for k in sorted(set(cosine) & set(chance) - {0}) if base else []:
        c, r = _loss(base, cosine[k]), _loss(base, chance[k])
        parts.append(f"K={k} cosine {_fmt(c)}, random {_fmt(r)}")
        results.append(c[1] <= r[1])
    claims.append(Claim("cosine similarity beats random attention drops",
                        "; ".join(parts) or "needs base, one-shot and random attention rows at a shared K",
                        _verdict(results)))
    return claims


def claims_markdown(claims: list[Claim]) -> str:
    mark = {True: "holds", False: "does not hold", None: "not tested"}
    lines = ["| paper's finding | on this model | evidence |", "|---|---|---|"]
    lines += [f"| {c.claim} | {mark[c.holds]} | {c.evidence} |" for c in claims]
    return "\n".join(lines)
