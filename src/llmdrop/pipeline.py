"""Choosing and pruning, the one orchestration `drop`, `run`, the streamed drop and the study share.

A PlanSpec says what to drop (target, how many, protected layers, strategy); `choose` turns it into a Choice by
measuring a model (one-shot, window, or iterative re-measurement), `choose_from_scores` by reading given scores;
`prune` applies a Choice and records how it was made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .arch import arch_for
from .calibration import Calibration
from .errors import LlmdropError
from .files import write_json
from .measure import Scores, measure
from .plan import TARGETS, DropPlan, count_for, plan_drops, plan_window
from .report import table
from .surgery import already_dropped, apply_plan, count_parameters, kv_cache_layers


@dataclass(frozen=True)
class PlanSpec:
    """What to drop: `target` (attn, mlp, block, joint), exactly one of `n` (modules) or `ratio` (a fraction of the
    target's modules), layers to `protect`, and the strategy: one-shot (default), `iterative` (re-measure after each
    drop) or `window` (the best run of n consecutive blocks). Validated when built."""

    target: str
    n: int | None = None
    ratio: float | None = None
    protect: tuple[int, ...] = ()
    iterative: bool = False
    window: bool = False

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise LlmdropError(f"{{target}} must be one of {', '.join(TARGETS)} (got {self.target!r})", params=["target"])
        if (self.n is None) == (self.ratio is None):
            raise LlmdropError("give exactly one of {n} (how many modules) or {ratio} (which fraction)",
                               params=["n", "ratio"])
        if self.n is not None and (not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1):
            raise LlmdropError(f"nothing to drop: {{n}} must be at least 1 (got {self.n})", params=["n"])
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not math.isfinite(self.ratio) or not 0 < self.ratio < 1):
            raise LlmdropError(f"{{ratio}} must be between 0 and 1, got {self.ratio}", params=["ratio"])
        protect = tuple(self.protect)
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in protect):
            raise LlmdropError(f"{{protect}} takes layer indices (non-negative integers), not {list(protect)}",
                               params=["protect"])
        object.__setattr__(self, "protect", tuple(sorted(set(protect))))
        if self.window and self.target != "block":
            raise LlmdropError("{window} drops consecutive blocks: use it with {target} block", params=["window", "target"])
        if self.iterative and self.window:
            raise LlmdropError("choose one of {iterative} and {window}", params=["iterative", "window"])

    @property
    def method(self) -> str:
        return "iterative" if self.iterative else "window" if self.window else "one-shot"

    def count(self, num_layers: int) -> int:
        """How many modules this spec drops from a model with `num_layers` layers."""
        return count_for(self.target, num_layers, self.n, self.ratio)


@dataclass
class Choice:
    """A plan and the measurements it came from (one Scores per step when iterative), with the picks in order."""

    plan: DropPlan
    scores: Scores
    history: list[Scores] = field(default_factory=list)
    picks: list[tuple[str, int]] = field(default_factory=list)  # (kind, layer) in the order they were chosen


def _ordered_picks(plan: DropPlan, scores: Scores) -> list[tuple[str, int]]:
    """A one-shot plan's picks in choice order: highest cosine first, ties to the deeper layer (as plan_drops)."""
    return sorted(plan.picks(), key=lambda p: (scores.of(p[0])[p[1]], p[1]), reverse=True)


def choose_from_scores(scores: Scores, spec: PlanSpec, exclude: DropPlan | None = None) -> Choice:
    """The plan `spec` asks for, from scores already measured (a scores file, or a study's one-shot scores).

    `exclude` lists modules already gone (a pruned checkpoint's drops): they are never picked again.
    """
    if spec.iterative:
        raise LlmdropError("{iterative} re-measures the model after every drop; it cannot work from given scores",
                           params=["iterative"])
    k = spec.count(scores.num_layers)
    if spec.window:
        if not scores.window or scores.window["n"] != k:
            raise LlmdropError(f"{{window}} needs scores of windows of {k} blocks; measure them with "
                               f"{{window_size}} {k}", params=["window", "window_size"])
        plan = plan_window(scores, k, spec.protect, exclude)
        return Choice(plan, scores, picks=[("block", i) for i in plan.blocks])
    plan = plan_drops(scores, spec.target, k, spec.protect, exclude)
    return Choice(plan, scores, picks=_ordered_picks(plan, scores))


def iterative_drops(
    model: nn.Module,
    calibration: Calibration,
    target: str,
    n: int,
    protect: Iterable[int] = (),
    batch_size: int = 4,
    residual: bool = True,
    progress: bool = True,
    exclude: DropPlan | None = None,
    model_name: str = "",
) -> Choice:
    """Drop one module at a time, re-measuring the already-pruned model before each pick. Modifies `model` in place.

    During the loop a dropped block is a layer with both sublayers removed (an exact identity), so layer indices
    stay the original ones; `apply_plan` removes those layers for real afterwards. Returns the plan, the scores
    measured at every step (the first are the one-shot scores) and the picks in the order they were made.
    """
    plan = DropPlan(target=target, method="iterative")
    gone = exclude or DropPlan()
    history: list[Scores] = []
    picks: list[tuple[str, int]] = []
    for step_no in range(n):
        scores = measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress,
                         model_name=model_name)
        history.append(scores)
        if step_no == 0:
            plan_drops(scores, target, n, protect, gone)  # fail before the slow loop if n modules cannot go
        step = plan_drops(scores, target, 1, protect, exclude=gone.plus(plan))
        picks += step.picks()
        plan = plan.plus(step)
        plan.num_layers = scores.num_layers
        apply_plan(model, DropPlan(attn=step.attn + step.blocks, mlp=step.mlp + step.blocks,
                                   num_layers=scores.num_layers))
    return Choice(plan, history[0], history, picks)


def choose(
    model: nn.Module,
    spec: PlanSpec,
    calibration: Calibration | None = None,
    scores: Scores | None = None,
    batch_size: int = 4,
    residual: bool = True,
    progress: bool = True,
    model_name: str = "",
) -> Choice:
    """Decide what to drop: from given scores, or by measuring `calibration` (one-shot, iterative or window).

    Iterative mode drops as it goes, so it leaves `model` pruned; the other modes leave it untouched. A model that
    is already pruned keeps its drops out of the candidates, so a second drop removes new modules.
    """
    arch = arch_for(model)
    num_layers = len(model.get_submodule(arch.layers))
    k = spec.count(num_layers)
    if scores is not None:
        scores.check_model(num_layers, model_name)
    if spec.iterative and scores is not None:
        raise LlmdropError("{iterative} re-measures after every drop; do not pass {scores} with it",
                           params=["iterative", "scores"])
    need_window = spec.window and (scores is None or not scores.window or scores.window["n"] != k)
    if (scores is None or spec.iterative or need_window) and calibration is None:
        raise LlmdropError("no scores and no calibration text: give {scores} or {calibration}",
                           params=["scores", "calibration"])
    exclude = already_dropped(model, arch)
    exclude = exclude if exclude.size else None
    if spec.iterative:
        return iterative_drops(model, calibration, spec.target, k, spec.protect, batch_size, residual, progress,
                               exclude, model_name)
    if scores is None or need_window:
        scores = measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress,
                         window_size=k if spec.window else None, model_name=model_name)
    return choose_from_scores(scores, spec, exclude)


@dataclass
class Footprint:
    params: int
    kv_layers: int
    layers: int


def footprint(model: nn.Module) -> Footprint:
    return Footprint(count_parameters(model), kv_cache_layers(model), len(model.get_submodule(arch_for(model).layers)))


def provenance(choice: Choice, model_name: str = "") -> dict:
    """How a plan was made, recorded in the pruned checkpoint's config."""
    return {"source_model": model_name, "method": choice.plan.method, "target": choice.plan.target,
            "scores": {k: choice.scores.of(k) for k in ("attn", "mlp", "block")},
            "residual": choice.scores.residual, "calibration": choice.scores.calibration}


def prune(model: nn.Module, choice: Choice, model_name: str = "") -> Footprint:
    """Apply the choice in place, recording how it was made in the config; returns the footprint after."""
    apply_plan(model, choice.plan, provenance(choice, model_name))
    return footprint(model)


def write_provenance(folder: str | Path, choice: Choice) -> None:
    """scores.json and plan.json beside a pruned checkpoint: what was measured and what was dropped."""
    folder = Path(folder)
    choice.scores.save(folder / "scores.json")
    write_json(folder / "plan.json", choice.plan.to_dict())


def describe(choice: Choice) -> str:
    """One line: "plan (one-shot, target attn): drop attention [3, 5]"."""
    plan = choice.plan
    return f"plan ({plan.method}, target {plan.target}): drop {plan.describe()}"


def plan_table(choice: Choice) -> str:
    """The modules to drop, in pick order, with the cosine each had when it was picked (one-shot scores)."""
    picks = choice.picks or choice.plan.picks()
    rows = [[kind, i, choice.scores.of(kind)[i]] for kind, i in picks]
    return table(["module", "layer", "cos (one-shot)"], rows)
