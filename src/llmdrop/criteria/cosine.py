"""The paper's criterion: rank modules by the cosine similarity of the residual stream before and after them.

One-shot plans come from one measurement (or given scores: `choose_from_scores`), windows of consecutive blocks
from window scores, iterative plans from re-measuring the pruned model before each pick (`iterative_drops`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..arch import Arch
from ..calibration import Calibration
from ..choice import Choice, kv_saved_per_layer, ordered_picks
from ..configs import PlanSpec
from ..errors import LlmdropError
from ..measure import Scores, measure
from ..plan import DropPlan, plan_drops, plan_window
from ..surgery import apply_plan
from . import CRITERIA


def choose_from_scores(scores: Scores, spec: PlanSpec, exclude: DropPlan | None = None, config: Any = None,
                       dtype_bytes: int = 2) -> Choice:
    """The plan `spec` asks for, from cosine scores already measured (a scores file, or a study's one-shot scores).

    `exclude` lists modules already gone (a pruned checkpoint's drops): they are never picked again. `config` (the
    model's config) gives each layer's KV cache: `spec.objective` "kv" needs it, and with it any choice reports the
    KV bytes it frees (`dtype_bytes` per element: 4 for float32, 2 for bfloat16 / float16).
    """
    if spec.iterative:
        raise LlmdropError("{iterative} re-measures the model after every drop; it cannot work from given scores",
                           params=["iterative"])
    if CRITERIA[spec.criterion].needs_text:
        raise LlmdropError(f"{{criterion}} {spec.criterion} runs the model on calibration text; it cannot plan from "
                           "given scores alone (nor with {stream})", params=["criterion", "stream"])
    if spec.objective == "kv" and config is None:
        raise LlmdropError("{objective} kv needs the model's config to know what each layer's KV cache holds; pass "
                           "{config}", params=["objective", "config"])
    context, saved = kv_saved_per_layer(spec, config, dtype_bytes, exclude) if config is not None else (None, None)
    if saved is not None and len(saved) != scores.num_layers:
        raise LlmdropError(f"the scores are for a {scores.num_layers}-layer model but the config has {len(saved)} "
                           "layers; measure this model")
    k = spec.count(scores.num_layers)
    if spec.window:
        if not scores.window or scores.window["n"] != k:
            raise LlmdropError(f"{{window}} needs scores of windows of {k} blocks; measure them with "
                               f"{{window_size}} {k}", params=["window", "window_size"])
        plan = plan_window(scores, k, spec.protect, exclude)
        return Choice(plan, scores, picks=[("block", i) for i in plan.blocks]).with_kv(spec, context, saved)
    plan = plan_drops(scores, spec.target, k, spec.protect, exclude, saved, spec.weight)
    return Choice(plan, scores, picks=ordered_picks(plan, scores, saved, spec.weight)).with_kv(spec, context, saved)


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
    kv_saved: list[int] | None = None,
    kv_weight: float = 0.0,
    arch: Arch | None = None,
) -> Choice:
    """Drop one module at a time, re-measuring the already-pruned model before each pick. Modifies `model` in place.

    During the loop a dropped block is a layer with both sublayers removed (an exact identity), so layer indices
    stay the original ones; `apply_plan` removes those layers for real afterwards. Returns the plan, the scores
    measured at every step (the first are the one-shot scores) and the picks in the order they were made.
    `kv_saved` and `kv_weight` rank each step by KV cost as `plan_drops` does.
    """
    plan = DropPlan(target=target, method="iterative")
    gone = exclude or DropPlan()
    history: list[Scores] = []
    picks: list[tuple[str, int]] = []
    for step_no in range(n):
        scores = measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress,
                         model_name=model_name, arch=arch)
        history.append(scores)
        if step_no == 0:
            plan_drops(scores, target, n, protect, gone)  # fail before the slow loop if n modules cannot go
        step = plan_drops(scores, target, 1, protect, gone.plus(plan), kv_saved, kv_weight)
        picks += step.picks()
        plan = plan.plus(step)
        plan.num_layers = scores.num_layers
        apply_plan(model, DropPlan(attn=step.attn + step.blocks, mlp=step.mlp + step.blocks,
                                   num_layers=scores.num_layers), arch=arch)
    return Choice(plan, history[0], history, picks)


def choose(model: nn.Module, arch: Arch, spec: PlanSpec, k: int, calibration: Calibration | None,
           scores: Scores | None, exclude: DropPlan | None, dtype_bytes: int, batch_size: int, residual: bool,
           progress: bool, model_name: str, patch: str) -> Choice:
    """The criterion row's entry point (pipeline.choose): iterative, or one-shot / window from scores, measured now
    when none (or no matching window scores) were given."""
    context, saved = kv_saved_per_layer(spec, model.config, dtype_bytes, exclude)
    if spec.iterative:
        return iterative_drops(model, calibration, spec.target, k, spec.protect, batch_size, residual, progress,
                               exclude, model_name, saved, spec.weight, arch).with_kv(spec, context, saved)
    if scores is None or (spec.window and (not scores.window or scores.window["n"] != k)):
        scores = measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress,
                         window_size=k if spec.window else None, model_name=model_name, arch=arch)
    return choose_from_scores(scores, spec, exclude, model.config, dtype_bytes)


# ---- how a cosine choice reads in reports and records: the plan and the cosines say it all -----------------------

def describe(choice: Choice) -> str:
    return ""


def provenance(choice: Choice) -> dict:
    return {}


def column(choice: Choice) -> None:
    return None
