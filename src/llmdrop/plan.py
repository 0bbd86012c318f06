"""Which modules to drop, from scores: pure policy (scores in, a DropPlan out), no model involved.

One-shot picks, joint (attention and MLP pooled), windows of consecutive blocks, seeded random baselines and the
ranking by measured loss increases live here; iterative drops and loss measurements need a model, so they live with the
orchestration in pipeline.py and criterion.py.
A DropPlan always holds ORIGINAL layer indices, whatever order surgery later removes things in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .criteria import CRITERIA
from .errors import LlmdropError
from .options import TARGETS, is_int, is_number

if TYPE_CHECKING:  # scores are only read here; measuring them needs torch, planning does not
    from .measure import Scores

KINDS = ("attn", "mlp", "block")
# What a plan optimises: quality alone (the paper's ranking), or quality traded against the KV cache a drop frees.
OBJECTIVES = ("quality", "kv")
# Targets whose removal frees KV cache (an MLP holds none).
KV_TARGETS = ("attn", "block")
_NAMES = {"attn": "attention layers", "mlp": "MLP layers", "block": "blocks", "joint": "attention + MLP modules"}
# A pick names its kind the way Scores does ("block"); the plan keeps blocks under `blocks`.
_FIELD = {"attn": "attn", "mlp": "mlp", "block": "blocks"}


@dataclass
class DropPlan:
    """Modules to remove, by original layer index. `blocks` are whole layers; `attn` / `mlp` are sublayers."""

    attn: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_layers: int = 0
    target: str = ""
    method: str = "one-shot"
    # The value each pick had by `criterion`, in pick order: its cosine, or the loss increase its removal caused.
    chosen_scores: list[float] = field(default_factory=list)
    criterion: str = "cosine"

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
    def from_dict(cls, d: object) -> DropPlan:
        """A plan read back from JSON (plan.json, a checkpoint's record); anything it cannot use is an error."""
        if not isinstance(d, dict):
            raise LlmdropError(f"a drop plan must be a JSON object, not {type(d).__name__}; use the plan.json llmdrop wrote")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise LlmdropError(f"drop plan has unknown fields {', '.join(map(str, unknown))}; use the plan.json llmdrop wrote")
        for key in ("attn", "mlp", "blocks"):
            value = d.get(key, [])
            if not isinstance(value, list) or not all(is_int(i) and i >= 0 for i in value):
                raise LlmdropError(f"drop plan field '{key}' must be a list of layer indices (got {value!r:.60})")
        if not is_int(d.get("num_layers", 0)) or d.get("num_layers", 0) < 0:
            raise LlmdropError(f"drop plan field 'num_layers' must be a layer count (got {d['num_layers']!r:.60})")
        if d.get("target", "") not in ("", *TARGETS):
            raise LlmdropError(f"drop plan target {d['target']!r:.60} is not one of {', '.join(TARGETS)}")
        if not isinstance(d.get("method", ""), str):
            raise LlmdropError(f"drop plan field 'method' must be a string (got {d['method']!r:.60})")
        if d.get("criterion", "cosine") not in CRITERIA:
            raise LlmdropError(f"drop plan criterion {d['criterion']!r:.60} is not one of {', '.join(CRITERIA)}")
        chosen = d.get("chosen_scores", [])
        if not isinstance(chosen, list) or not all(is_number(x) for x in chosen):
            raise LlmdropError(f"drop plan field 'chosen_scores' must be a list of finite numbers (got {chosen!r:.60})")
        return cls(**d)

    @classmethod
    def from_picks(cls, picks: Iterable[tuple[str, int]], num_layers: int = 0, target: str = "",
                   method: str = "one-shot", chosen_scores: Iterable[float] = (), criterion: str = "cosine") -> DropPlan:
        """The plan of (kind, layer) picks, kind one of attn / mlp / block."""
        lists: dict[str, list[int]] = {"attn": [], "mlp": [], "blocks": []}
        for kind, i in picks:
            lists[_FIELD[kind]].append(i)
        return cls(**lists, num_layers=num_layers, target=target, method=method, chosen_scores=list(chosen_scores),
                   criterion=criterion)

    def plus(self, step: DropPlan) -> DropPlan:
        """This plan with `step`'s modules added (same layer numbering), keeping this plan's target and method."""
        return DropPlan(attn=self.attn + step.attn, mlp=self.mlp + step.mlp, blocks=self.blocks + step.blocks,
                        num_layers=self.num_layers or step.num_layers, target=self.target, method=self.method,
                        chosen_scores=self.chosen_scores + step.chosen_scores, criterion=self.criterion)

    def picks(self) -> list[tuple[str, int]]:
        """(kind, layer) of every module, attention first; the order of picks is not kept by a plan."""
        return [("attn", i) for i in self.attn] + [("mlp", i) for i in self.mlp] + [("block", i) for i in self.blocks]

    def describe(self) -> str:
        parts = [f"{name} {idx}" for name, idx in (("blocks", self.blocks), ("attention", self.attn),
                                                     ("MLP", self.mlp)) if idx]
        return "; ".join(parts) if parts else "nothing"


def parse_protect(text: str) -> list[int]:
    """Layer indices from '0,1,29' or '0-3' (ranges inclusive); a reversed range like '29-0' is an error."""
    out: list[int] = []
    for part in filter(None, (t.strip() for t in str(text).split(","))):
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise LlmdropError(f"{{protect}} takes layer indices like 0,1,29 or 0-3, not '{part}'",
                               params=["protect"]) from None
        if first > last:
            raise LlmdropError(f"{{protect}} range '{part}' runs backwards; write it low to high ({last}-{first})",
                               params=["protect"])
        out.extend(range(first, last + 1))
    return out


def count_for(target: str, num_layers: int, n: int | None = None, ratio: float | None = None) -> int:
    """The number of modules to drop from `n`, or from `ratio` (a fraction of the target's modules)."""
    if (n is None) == (ratio is None):
        raise LlmdropError("give exactly one of {n} (how many modules) or {ratio} (which fraction)", params=["n", "ratio"])
    if ratio is not None:
        if not 0 < ratio < 1:
            raise LlmdropError(f"{{ratio}} must be between 0 and 1, got {ratio}", params=["ratio"])
        total = num_layers * (2 if target == "joint" else 1)
        n = round(ratio * total)
        if n < 1:
            raise LlmdropError(f"{{ratio}} {ratio} of {total} modules rounds to 0 modules; raise it to at least "
                               f"{0.5 / total:.3g}", params=["ratio"])
    if n < 1:
        raise LlmdropError(f"nothing to drop: {{n}} must be at least 1 (got {n})", params=["n"])
    return n


def _candidates(scores: Scores, target: str, protect: set[int], exclude: DropPlan | None) -> list[tuple[float, str, int]]:
    if target not in TARGETS:
        raise LlmdropError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    kinds = ("attn", "mlp") if target == "joint" else (target,)
    gone = exclude or DropPlan()
    # A block whose attention and MLP are both gone is already an identity: it is not a candidate either.
    taken = {"attn": set(gone.attn) | set(gone.blocks), "mlp": set(gone.mlp) | set(gone.blocks),
             "block": set(gone.blocks) | (set(gone.attn) & set(gone.mlp))}
    return [(s, kind, i) for kind in kinds for i, s in enumerate(scores.of(kind))
            if i not in protect and i not in taken[kind]]


def _check_protect(protect: set[int], num_layers: int) -> None:
    bad = sorted(p for p in protect if not 0 <= p < num_layers)
    if bad:
        raise LlmdropError(f"{{protect}} {bad}: the model has layers 0..{num_layers - 1}", params=["protect"])


def _check_limit(n: int, cands: list, target: str, protect: set[int], exclude: DropPlan | None,
                 num_layers: int) -> None:
    # One block must stay; a protected layer already guarantees that.
    limit = len(cands) - (1 if target == "block" and not protect and cands else 0)
    if n > limit:
        gone = f", {exclude.size} already dropped" if exclude is not None and exclude.size else ""
        advice = f"choose {{n}} {limit} or fewer" if limit > 0 else "nothing of this target is left to drop"
        raise LlmdropError(
            f"cannot drop {n} {_NAMES[target]}: only {limit} can go ({num_layers} layers, "
            f"{len(protect)} protected{gone}); {advice}", params=["n"] if limit > 0 else [],
        )


def kv_cost(cos: float, saved: float, weight: float) -> float:
    """What removing a module costs per KV byte it frees, for `objective` kv: ``(1 - cos) / saved ** weight``.

    ``1 - cos`` is how much the module changes the residual stream (what its removal loses, the paper's measure);
    `saved` the KV-cache bytes its removal frees at the planned context. The lowest cost goes first. Why this form:

    - weight 0 is the quality ranking exactly (every divisor is 1; `plan_drops` breaks cost ties by cosine, then the
      deeper layer, as the cosine ranking does);
    - weight 1 is the similarity lost per byte freed; in between trades the two: a module whose removal frees r
      times the bytes may change the stream r ** weight times as much and still rank level;
    - it has no units to normalise: bytes or tokens, batch 1 or 8, float32 or bfloat16 scale every divisor alike,
      and a model whose layers all hold the same cache (no sliding windows) keeps its quality ranking at any weight.

    A module that frees nothing (its attention is already gone) ranks last when weight > 0.
    """
    if weight == 0:
        return 1.0 - cos
    if saved <= 0:
        return math.inf
    return (1.0 - cos) / saved ** weight


def plan_drops(
    scores: Scores, target: str, n: int, protect: Iterable[int] = (), exclude: DropPlan | None = None,
    kv_saved: Sequence[float] | None = None, kv_weight: float = 0.0,
) -> DropPlan:
    """Drop the `n` modules of `target` with the HIGHEST cosine similarity (the most redundant ones).

    `joint` pools attention and MLP scores and takes the top n of both. `exclude` lists modules already gone
    (earlier iterative picks, or the drops of an already pruned checkpoint): they are never picked again.
    With `kv_saved` (the KV bytes each layer's attention holds, see `arch.kv_bytes_per_layer`) and `kv_weight` > 0
    the modules go by `kv_cost` instead, lowest first (attention and blocks only; `chosen_scores` stay cosines).
    """
    protect = set(protect)
    _check_protect(protect, scores.num_layers)
    cands = _candidates(scores, target, protect, exclude)
    _check_limit(n, cands, target, protect, exclude, scores.num_layers)
    if kv_saved is not None and kv_weight:
        picked = kv_order(cands, kv_saved, kv_weight, target, exclude)[:n]
    else:
        # Highest cosine first; ties go to the deeper layer, which the paper finds the more redundant.
        picked = sorted(cands, key=lambda c: (c[0], c[2]), reverse=True)[:n]
    return DropPlan.from_picks([(kind, i) for _, kind, i in picked], scores.num_layers, target, "one-shot",
                               [c[0] for c in picked])


def kv_order(cands: list[tuple[float, str, int]], kv_saved: Sequence[float], kv_weight: float, target: str,
             exclude: DropPlan | None = None) -> list[tuple[float, str, int]]:
    """Candidates (cos, kind, layer) by `kv_cost`, lowest first; ties by higher cosine, then the deeper layer."""
    if target not in KV_TARGETS:
        raise LlmdropError(f"{{objective}} kv ranks modules by the KV cache their removal frees and MLP sublayers hold "
                           f"none: use {{target}} attn or block, not {target}", params=["objective", "target"])
    if any(c[2] >= len(kv_saved) for c in cands):
        raise LlmdropError(f"KV bytes are given for {len(kv_saved)} layers but the scores have more; compute them "
                           "from this model's config")
    gone = set(exclude.attn) if exclude is not None else set()

    def saved(kind: str, i: int) -> float:
        return 0 if kind == "block" and i in gone else kv_saved[i]  # a block whose attention is gone frees no cache

    return sorted(cands, key=lambda c: (kv_cost(c[0], saved(c[1], c[2]), kv_weight), -c[0], -c[2]))


def cosine_order(scores: Scores, target: str, protect: Iterable[int] = (),
                 exclude: DropPlan | None = None) -> list[tuple[str, int]]:
    """Every module of `target` that may go, as (kind, layer), in the order `plan_drops` picks them: highest cosine
    first, ties to the deeper layer. The loss criterion measures the first M of them (`candidates`)."""
    protect = set(protect)
    _check_protect(protect, scores.num_layers)
    cands = sorted(_candidates(scores, target, protect, exclude), key=lambda c: (c[0], c[2]), reverse=True)
    return [(kind, i) for _, kind, i in cands]


def loss_order(scores: Scores, increases: dict[tuple[str, int], float], target: str, protect: Iterable[int] = (),
               exclude: DropPlan | None = None) -> list[tuple[str, int]]:
    """The modules of `target` that may go, most redundant first by the loss criterion.

    `increases` maps (kind, layer) to the calibration loss increase when that module alone is removed. Measured
    modules come first, lowest increase first (ties: higher cosine, then the deeper layer); modules without a
    measurement (outside the `candidates` that were measured) follow in cosine order.
    """
    order = cosine_order(scores, target, protect, exclude)
    rank = {p: r for r, p in enumerate(order)}
    measured = sorted((p for p in order if p in increases), key=lambda p: (increases[p], rank[p]))
    return measured + [p for p in order if p not in increases]


def plan_by_loss(scores: Scores, increases: dict[tuple[str, int], float], target: str, n: int,
                 protect: Iterable[int] = (), exclude: DropPlan | None = None, method: str = "one-shot") -> DropPlan:
    """Drop the `n` modules of `target` whose removal alone raised the calibration loss least (SLEB / BlockPruner).

    Every pick must have a measured increase (`chosen_scores` holds them): too few measured modules is an error
    naming `candidates`, the bound on how many were measured.
    """
    protect = set(protect)
    _check_protect(protect, scores.num_layers)
    _check_limit(n, _candidates(scores, target, protect, exclude), target, protect, exclude, scores.num_layers)
    picked = loss_order(scores, increases, target, protect, exclude)[:n]
    unmeasured = [p for p in picked if p not in increases]
    if unmeasured:
        measured = n - len(unmeasured)
        raise LlmdropError(f"only {measured} of the {n} modules to drop have a measured loss; raise {{candidates}} to "
                           f"at least {n}", params=["candidates"])
    return DropPlan.from_picks(picked, scores.num_layers, target, method, [increases[p] for p in picked], "loss")


def plan_window(scores: Scores, n: int, protect: Iterable[int] = (), exclude: DropPlan | None = None) -> DropPlan:
    """Drop the n consecutive blocks s..s+n-1 whose ends are most alike: max over s of cos(h_s, h_{s+n})."""
    if not scores.window or scores.window["n"] != n:
        raise LlmdropError(f"these scores hold no window of {n} blocks; measure with {{window_size}} {n}",
                           params=["window_size"])
    protect = set(protect)
    _check_protect(protect, scores.num_layers)
    gone = set(exclude.blocks) if exclude is not None else set()
    starts = [(s, start) for start, s in enumerate(scores.window["scores"])
              if not (protect | gone) & set(range(start, start + n))]
    if not starts:
        raise LlmdropError(f"every window of {n} blocks touches a protected layer")
    best, start = max(starts)
    return DropPlan(blocks=list(range(start, start + n)), num_layers=scores.num_layers, target="block",
                    method="window", chosen_scores=[best])


def random_plan(target: str, n: int, num_layers: int, seed: int, protect: Iterable[int] = ()) -> DropPlan:
    """`n` modules of `target` drawn at random (the baseline the similarity metric must beat), reproducible by seed."""
    if target not in TARGETS:
        raise LlmdropError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    protect = set(protect)
    _check_protect(protect, num_layers)
    rng = random.Random(seed)
    layers = [i for i in range(num_layers) if i not in protect]
    if target == "joint":
        pool = [(kind, i) for kind in ("attn", "mlp") for i in layers]
    else:
        pool = [(target, i) for i in layers]
    limit = len(pool) - (1 if target == "block" and not protect else 0)
    if not 1 <= n <= limit:
        raise LlmdropError(f"cannot drop {n} random {_NAMES[target]}: between 1 and {limit} can go")
    # One draw from the whole pool: without protect these are the draws earlier studies made for the same seed.
    return DropPlan.from_picks(rng.sample(pool, n), num_layers, target, f"random-{seed}")
