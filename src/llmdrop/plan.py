"""Which modules to drop, from scores: one-shot, iterative, joint (attention and MLP pooled) and block windows.

A DropPlan always holds ORIGINAL layer indices, whatever order surgery later removes things in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from torch import nn

from .errors import LlmdropError
from .measure import Scores, measure

TARGETS = ("attn", "mlp", "block", "joint")
_NAMES = {"attn": "attention layers", "mlp": "MLP layers", "block": "blocks", "joint": "attention + MLP modules"}


@dataclass
class DropPlan:
    """Modules to remove, by original layer index. `blocks` are whole layers; `attn` / `mlp` are sublayers."""

    attn: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_layers: int = 0
    target: str = ""
    method: str = "one-shot"
    chosen_scores: list[float] = field(default_factory=list)  # the score of each pick, in pick order

    def __post_init__(self) -> None:
        self.attn, self.mlp, self.blocks = sorted(self.attn), sorted(self.mlp), sorted(self.blocks)

    @property
    def size(self) -> int:
        return len(self.attn) + len(self.mlp) + len(self.blocks)

    def validate(self, num_layers: int) -> None:
        for kind in ("attn", "mlp", "blocks"):
            idx = getattr(self, kind)
            bad = [i for i in idx if not 0 <= i < num_layers]
            if bad or len(set(idx)) != len(idx):
                raise LlmdropError(f"plan lists {kind} indices {idx}, which are not distinct layers of 0..{num_layers - 1}")
        if len(self.blocks) >= num_layers:
            raise LlmdropError(f"plan drops all {num_layers} blocks; at least one must stay")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DropPlan:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def describe(self) -> str:
        parts = [f"{name} {idx}" for name, idx in (("blocks", self.blocks), ("attention", self.attn),
                                                     ("MLP", self.mlp)) if idx]
        return "; ".join(parts) if parts else "nothing"


def count_for(target: str, num_layers: int, n: int | None = None, ratio: float | None = None) -> int:
    """The number of modules to drop from --n or --ratio (a fraction of the target's modules)."""
    if (n is None) == (ratio is None):
        raise LlmdropError("give exactly one of --n (how many modules) or --ratio (which fraction)")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise LlmdropError(f"--ratio must be between 0 and 1, got {ratio}")
        n = round(ratio * num_layers * (2 if target == "joint" else 1))
    if n < 1:
        raise LlmdropError(f"nothing to drop: --n must be at least 1 (got {n})")
    return n


def _candidates(scores: Scores, target: str, protect: set[int], exclude: DropPlan | None) -> list[tuple[float, str, int]]:
    if target not in TARGETS:
        raise LlmdropError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    kinds = ("attn", "mlp") if target == "joint" else (target,)
    gone = exclude or DropPlan()
    taken = {"attn": set(gone.attn) | set(gone.blocks), "mlp": set(gone.mlp) | set(gone.blocks),
             "block": set(gone.blocks) | (set(gone.attn) & set(gone.mlp))}
    return [(s, kind, i) for kind in kinds for i, s in enumerate(scores.of(kind))
            if i not in protect and i not in taken[kind]]


def plan_drops(
    scores: Scores, target: str, n: int, protect: Iterable[int] = (), exclude: DropPlan | None = None
) -> DropPlan:
    """Drop the `n` modules of `target` with the HIGHEST cosine similarity (the most redundant ones).

    `joint` pools attention and MLP scores and takes the top n of both. `exclude` lists modules already gone.
    """
    protect = set(protect)
    bad = [p for p in protect if not 0 <= p < scores.num_layers]
    if bad:
        raise LlmdropError(f"--protect {bad}: the model has layers 0..{scores.num_layers - 1}")
    cands = _candidates(scores, target, protect, exclude)
    # One block must stay; a protected layer already guarantees that.
    limit = len(cands) - (1 if target == "block" and not protect else 0)
    if n > limit:
        raise LlmdropError(
            f"cannot drop {n} {_NAMES[target]}: only {limit} can go ({scores.num_layers} layers, "
            f"{len(protect)} protected); choose --n {limit} or fewer"
        )
    # Highest cosine first; ties go to the deeper layer, which the paper finds the more redundant.
    picked = sorted(cands, key=lambda c: (c[0], c[2]), reverse=True)[:n]
    chosen = {"attn": [], "mlp": [], "block": []}
    for _, kind, i in picked:
        chosen[kind].append(i)
    return DropPlan(attn=chosen["attn"], mlp=chosen["mlp"], blocks=chosen["block"], num_layers=scores.num_layers,
                    target=target, method="one-shot", chosen_scores=[c[0] for c in picked])


def plan_window(scores: Scores, n: int, protect: Iterable[int] = ()) -> DropPlan:
    """Drop the n consecutive blocks s..s+n-1 whose ends are most alike: max over s of cos(h_s, h_{s+n})."""
    if not scores.window or scores.window["n"] != n:
        raise LlmdropError(f"these scores hold no window of {n} blocks; measure with --window {n}")
    protect = set(protect)
    starts = [(s, start) for start, s in enumerate(scores.window["scores"])
              if not protect & set(range(start, start + n))]
    if not starts:
        raise LlmdropError(f"every window of {n} blocks touches a protected layer")
    best, start = max(starts)
    return DropPlan(blocks=list(range(start, start + n)), num_layers=scores.num_layers, target="block",
                    method="window", chosen_scores=[best])


def iterative_drops(
    model: nn.Module,
    calibration,
    target: str,
    n: int,
    protect: Iterable[int] = (),
    batch_size: int = 4,
    residual: bool = True,
    progress: bool = True,
) -> tuple[DropPlan, list[Scores]]:
    """Drop one module at a time, re-measuring the already-pruned model before each pick. Modifies `model` in place.

    During the loop a dropped block is a layer with both sublayers removed (an exact identity), so layer indices
    stay the original ones; `apply_plan` removes those layers for real afterwards. Returns the plan and the scores
    measured at every step (the first are the one-shot scores).
    """
    from .surgery import apply_plan  # surgery imports plan; import here to keep the module graph acyclic

    plan = DropPlan(target=target, method="iterative")
    history: list[Scores] = []
    for step_no in range(n):
        scores = measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress)
        history.append(scores)
        if step_no == 0:
            plan_drops(scores, target, n, protect)  # fail before the slow loop if n modules cannot go
        step = plan_drops(scores, target, 1, protect, exclude=plan)
        plan = DropPlan(attn=plan.attn + step.attn, mlp=plan.mlp + step.mlp, blocks=plan.blocks + step.blocks,
                        num_layers=scores.num_layers, target=target, method="iterative",
                        chosen_scores=plan.chosen_scores + step.chosen_scores)
        apply_plan(model, DropPlan(attn=step.attn + step.blocks, mlp=step.mlp + step.blocks,
                                   num_layers=scores.num_layers))
    return plan, history
