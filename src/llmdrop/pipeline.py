"""The steps of `llmdrop drop` / `llmdrop run` as library calls: choose what to drop, drop it, summarise it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .calibration import Calibration
from .errors import LlmdropError
from .measure import Scores, measure
from .plan import DropPlan, count_for, iterative_drops, plan_drops, plan_window
from .report import table
from .surgery import apply_plan, count_parameters, kv_cache_layers


@dataclass
class Choice:
    """A plan and the measurements it came from (one Scores per step when iterative)."""

    plan: DropPlan
    scores: Scores
    history: list[Scores] = field(default_factory=list)


def choose(
    model: nn.Module,
    target: str,
    n: int | None = None,
    ratio: float | None = None,
    calibration: Calibration | None = None,
    scores: Scores | None = None,
    iterative: bool = False,
    window: bool = False,
    protect: Iterable[int] = (),
    batch_size: int = 4,
    residual: bool = True,
    progress: bool = True,
    model_name: str = "",
) -> Choice:
    """Decide what to drop: from given scores, or by measuring `calibration` (one-shot, iterative or window).

    Iterative mode drops as it goes, so it leaves `model` pruned; the other modes leave it untouched.
    """
    from .arch import arch_for

    num_layers = len(model.get_submodule(arch_for(model).layers))
    k = count_for(target, num_layers, n, ratio)
    if scores is not None and scores.num_layers != num_layers:
        raise LlmdropError(f"the scores are for a {scores.num_layers}-layer model but this model has {num_layers} layers")
    if window and target != "block":
        raise LlmdropError("--window drops consecutive blocks: use it with --target block")
    if iterative and window:
        raise LlmdropError("choose one of --iterative and --window")
    if (scores is None or iterative or (window and not scores.window)) and calibration is None:
        raise LlmdropError("no scores and no calibration text: give --scores or calibration text")
    if iterative:
        if scores is not None:
            raise LlmdropError("--iterative re-measures after every drop; do not pass --scores with it")
        plan, history = iterative_drops(model, calibration, target, k, protect, batch_size, residual, progress)
        for s in history:
            s.model = model_name
        return Choice(plan, history[0], history)
    if scores is None or (window and not scores.window):
        scores = measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress,
                         window=k if window else None, model_name=model_name)
    plan = plan_window(scores, k, protect) if window else plan_drops(scores, target, k, protect)
    return Choice(plan, scores)


@dataclass
class Footprint:
    params: int
    kv_layers: int
    layers: int


def footprint(model: nn.Module) -> Footprint:
    from .arch import arch_for

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


def plan_table(choice: Choice) -> str:
    plan = choice.plan
    rows = []
    picks = [("attn", i) for i in plan.attn] + [("mlp", i) for i in plan.mlp] + [("block", i) for i in plan.blocks]
    for kind, i in picks:
        rows.append([kind, i, choice.scores.of(kind)[i]])
    return table(["module", "layer", "cos (one-shot)"], rows)
