"""A Choice: what a criterion decided to drop, the measurements it came from, and the KV cache the plan frees.

Every criterion (criteria/) returns one; pruning applies it (pipeline.prune) and the reports describe it (report.py).
What only one criterion measures (the loss criterion's loss increases and cost) is its `evidence`, which the
criterion's own module reads and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .arch import kv_bytes_per_layer, max_positions
from .configs import KV_CONTEXT, PlanSpec
from .errors import LlmdropError
from .plan import DropPlan, kv_order

if TYPE_CHECKING:
    from .measure import Scores


@dataclass
class Choice:
    """A plan and the measurements it came from (one Scores per step when iterative), with the picks in order.

    `criterion` names the row of criteria.CRITERIA that made it, and `evidence` holds what only that criterion
    measured (None for cosine). `patch_fit` is what the patches that stand in for the dropped modules fitted
    (None: nothing stands in), set when the choice is pruned with a patch.
    """

    plan: DropPlan
    scores: Scores | None = None  # None: a plan given as it is, measured by nothing
    history: list[Scores] = field(default_factory=list)
    picks: list[tuple[str, int]] = field(default_factory=list)  # (kind, layer) in the order they were chosen
    criterion: str = "cosine"
    evidence: Any = None
    # KV cache: the objective, the context (tokens) and weight of the ranking, and the bytes (batch 1) each layer's
    # attention holds at that context (0 where already gone); None when the model's config was not at hand.
    objective: str = "quality"
    kv_context: int | None = None
    kv_weight: float = 0.0
    kv_saved: list[int] | None = None
    patch_fit: dict | None = None

    def kv_freed(self) -> int | None:
        """KV-cache bytes (batch 1, at `kv_context` tokens) the plan's attention and block drops free."""
        if self.kv_saved is None:
            return None
        return sum(self.kv_saved[i] for i in set(self.plan.attn) | set(self.plan.blocks))

    def kv_total(self) -> int | None:
        """KV-cache bytes (batch 1, at `kv_context` tokens) of the model before this plan."""
        return None if self.kv_saved is None else sum(self.kv_saved)

    def with_kv(self, spec: PlanSpec, context: int | None, saved: list[int] | None) -> Choice:
        """This choice with the spec's objective and the KV figures it was ranked (or is reported) with."""
        self.objective, self.kv_weight = spec.objective, spec.weight
        self.kv_context, self.kv_saved = context, saved
        return self


def kv_context_for(spec: PlanSpec, config: Any) -> int:
    """The context KV savings are computed at: `spec.kv_context`, checked against the model's positions, else
    KV_CONTEXT or the model's limit if shorter."""
    limit = max_positions(config)
    limit = limit if limit and limit > 0 else None
    if spec.kv_context is None:
        return min(KV_CONTEXT, limit) if limit else KV_CONTEXT
    if limit and spec.kv_context > limit:
        raise LlmdropError(f"{{kv_context}} {spec.kv_context} is beyond the {limit} positions this model was trained "
                           f"for (max_position_embeddings); choose {{kv_context}} {limit} or less",
                           params=["kv_context"])
    return spec.kv_context


def kv_saved_per_layer(spec: PlanSpec, config: Any, dtype_bytes: int = 2,
                       exclude: DropPlan | None = None) -> tuple[int, list[int]]:
    """(context, bytes): the KV-cache bytes (batch 1) each layer's attention holds at the spec's context, 0 where it
    is already gone; what dropping that attention or block frees."""
    context = kv_context_for(spec, config)
    saved = kv_bytes_per_layer(config, context, dtype_bytes)
    for i in (exclude.attn + exclude.blocks) if exclude is not None else ():
        if 0 <= i < len(saved):
            saved[i] = 0
    return context, saved


def ordered_picks(plan: DropPlan, scores: Scores, kv_saved: list[int] | None = None,
                  kv_weight: float = 0.0) -> list[tuple[str, int]]:
    """A one-shot plan's picks in choice order: highest cosine first, ties to the deeper layer (as plan_drops);
    by KV cost with `kv_weight` > 0."""
    if kv_saved is not None and kv_weight:
        cands = [(scores.of(kind)[i], kind, i) for kind, i in plan.picks()]
        return [(kind, i) for _, kind, i in kv_order(cands, kv_saved, kv_weight, plan.target or "attn")]
    return sorted(plan.picks(), key=lambda p: (scores.of(p[0])[p[1]], p[1]), reverse=True)
