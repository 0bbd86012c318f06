"""Choosing and pruning, the one orchestration `drop`, `run`, the streamed drop and the study share.

A PlanSpec says what to drop (target, how many, protected layers, strategy, criterion, objective); `choose` turns it
into a Choice by measuring a model (one-shot, window, or iterative re-measurement; by cosine, or by the calibration
loss each removal causes; for quality alone, or traded against the KV cache each drop frees), `choose_from_scores` by
reading given cosine scores; `prune` applies a Choice and records how it was made.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .arch import arch_for, kv_bytes_per_layer
from .calibration import Calibration
from .configs import KV_CONTEXT, PlanSpec
from .criteria import check_candidates
from .criterion import CriterionCost, LossScores, loss_scores
from .errors import LlmdropError
from .files import write_json
from .measure import Scores, measure
from .plan import (
    DropPlan,
    cosine_order,
    loss_order,
    plan_by_loss,
    plan_drops,
    plan_window,
)
from .report import human_bytes, table
from .surgery import already_dropped, apply_plan, count_parameters, kv_cache_layers

log = logging.getLogger("llmdrop")

def kv_context_for(spec: PlanSpec, config) -> int:
    """The context KV savings are computed at: `spec.kv_context`, checked against the model's positions, else
    KV_CONTEXT or the model's limit if shorter."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and limit > 0 else None
    if spec.kv_context is None:
        return min(KV_CONTEXT, limit) if limit else KV_CONTEXT
    if limit and spec.kv_context > limit:
        raise LlmdropError(f"{{kv_context}} {spec.kv_context} is beyond the {limit} positions this model was trained "
                           f"for (max_position_embeddings); choose {{kv_context}} {limit} or less",
                           params=["kv_context"])
    return spec.kv_context


def kv_saved_per_layer(spec: PlanSpec, config, dtype_bytes: int = 2,
                       exclude: DropPlan | None = None) -> tuple[int, list[int]]:
    """(context, bytes): the KV-cache bytes (batch 1) each layer's attention holds at the spec's context, 0 where it
    is already gone; what dropping that attention or block frees."""
    context = kv_context_for(spec, config)
    saved = kv_bytes_per_layer(config, context, dtype_bytes)
    for i in (exclude.attn + exclude.blocks) if exclude is not None else ():
        if 0 <= i < len(saved):
            saved[i] = 0
    return context, saved


@dataclass
class Choice:
    """A plan and the measurements it came from (one Scores per step when iterative), with the picks in order.

    With the loss criterion, `losses` holds the loss measurements (one per step when iterative), `candidates` the
    bound on how many modules each step measured, and `cost` what ranking by loss cost.
    """

    plan: DropPlan
    scores: Scores
    history: list[Scores] = field(default_factory=list)
    picks: list[tuple[str, int]] = field(default_factory=list)  # (kind, layer) in the order they were chosen
    criterion: str = "cosine"
    losses: list[LossScores] = field(default_factory=list)
    candidates: int | None = None
    cost: CriterionCost | None = None
    # KV cache: the objective, the context (tokens) and weight of the ranking, and the bytes (batch 1) each layer's
    # attention holds at that context (0 where already gone); None when the model's config was not at hand.
    objective: str = "quality"
    kv_context: int | None = None
    kv_weight: float = 0.0
    kv_saved: list[int] | None = None

    def kv_freed(self) -> int | None:
        """KV-cache bytes (batch 1, at `kv_context` tokens) the plan's attention and block drops free."""
        if self.kv_saved is None:
            return None
        return sum(self.kv_saved[i] for i in set(self.plan.attn) | set(self.plan.blocks))

    def kv_total(self) -> int | None:
        """KV-cache bytes (batch 1, at `kv_context` tokens) of the model before this plan."""
        return None if self.kv_saved is None else sum(self.kv_saved)

    def loss_increase(self, step: int, pick: tuple[str, int]) -> float | None:
        """The loss increase a pick had when it was chosen (step `step` of an iterative choice)."""
        if not self.losses:
            return None
        return self.losses[min(step, len(self.losses) - 1)].of(*pick)


def _ordered_picks(plan: DropPlan, scores: Scores, kv_saved: list[int] | None = None,
                   kv_weight: float = 0.0) -> list[tuple[str, int]]:
    """A one-shot plan's picks in choice order: highest cosine first, ties to the deeper layer (as plan_drops);
    by KV cost with `kv_weight` > 0."""
    if kv_saved is not None and kv_weight:
        from .plan import kv_order

        cands = [(scores.of(kind)[i], kind, i) for kind, i in plan.picks()]
        return [(kind, i) for _, kind, i in kv_order(cands, kv_saved, kv_weight, plan.target or "attn")]
    return sorted(plan.picks(), key=lambda p: (scores.of(p[0])[p[1]], p[1]), reverse=True)


def _with_kv(choice: Choice, spec: PlanSpec, context: int | None, saved: list[int] | None) -> Choice:
    choice.objective, choice.kv_weight = spec.objective, spec.weight
    choice.kv_context, choice.kv_saved = context, saved
    return choice


def choose_from_scores(scores: Scores, spec: PlanSpec, exclude: DropPlan | None = None, config=None,
                       dtype_bytes: int = 2) -> Choice:
    """The plan `spec` asks for, from scores already measured (a scores file, or a study's one-shot scores).

    `exclude` lists modules already gone (a pruned checkpoint's drops): they are never picked again. `config` (the
    model's config) gives each layer's KV cache: `spec.objective` "kv" needs it, and with it any choice reports the
    KV bytes it frees (`dtype_bytes` per element: 4 for float32, 2 for bfloat16 / float16).
    """
    if spec.iterative:
        raise LlmdropError("{iterative} re-measures the model after every drop; it cannot work from given scores",
                           params=["iterative"])
    if spec.criterion == "loss":
        raise LlmdropError("{criterion} loss runs the model on calibration text; it cannot plan from given scores "
                           "alone (nor with {stream})", params=["criterion", "stream"])
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
        return _with_kv(Choice(plan, scores, picks=[("block", i) for i in plan.blocks]), spec, context, saved)
    plan = plan_drops(scores, spec.target, k, spec.protect, exclude, saved, spec.weight)
    return _with_kv(Choice(plan, scores, picks=_ordered_picks(plan, scores, saved, spec.weight)), spec, context, saved)


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
                         model_name=model_name)
        history.append(scores)
        if step_no == 0:
            plan_drops(scores, target, n, protect, gone)  # fail before the slow loop if n modules cannot go
        step = plan_drops(scores, target, 1, protect, gone.plus(plan), kv_saved, kv_weight)
        picks += step.picks()
        plan = plan.plus(step)
        plan.num_layers = scores.num_layers
        apply_plan(model, DropPlan(attn=step.attn + step.blocks, mlp=step.mlp + step.blocks,
                                   num_layers=scores.num_layers))
    return Choice(plan, history[0], history, picks)


def loss_drops(
    model: nn.Module,
    calibration: Calibration,
    target: str,
    n: int,
    protect: Iterable[int] = (),
    candidates: int | None = None,
    iterative: bool = False,
    scores: Scores | None = None,
    batch_size: int = 4,
    residual: bool = True,
    progress: bool = True,
    exclude: DropPlan | None = None,
    model_name: str = "",
    patch: str = "zero",
) -> Choice:
    """Pick `n` modules by the calibration loss increase their removal alone causes (lowest first); with `patch`
    "linear", the increase when each is replaced by its own linear patch instead (one more partial pass each).

    One-shot: every candidate (or the `candidates` most similar by cosine, from `scores` or one measurement) is
    scored on the unpruned model and the n lowest go; the model is left untouched. `iterative`: greedy, SLEB-style:
    score, drop the best for real, score the rest again on the pruned model, ... so `model` is left pruned (blocks as
    identities, as `iterative_drops`); with `candidates` the cosine is re-measured before each step to choose them.
    """
    protect = tuple(protect)
    if candidates is not None and (not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1):
        raise LlmdropError(f"{{candidates}} must be a number of modules of at least 1 (got {candidates!r})",
                           params=["candidates"])
    check_candidates(candidates, n, iterative)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise LlmdropError(f"{{batch_size}} must be a positive number of chunks (got {batch_size})",
                           params=["batch_size"])
    started = time.perf_counter()
    cost = CriterionCost()
    batches = math.ceil(len(_chunks(calibration)) / batch_size)

    def cosine() -> Scores:
        cost.sweeps += 1
        cost.forward_passes += batches
        return measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress,
                       model_name=model_name)

    if scores is None:
        scores = cosine()
    else:
        scores.check_model(len(model.get_submodule(arch_for(model).layers)), model_name)
    gone = exclude or DropPlan()
    plan_drops(scores, target, n, protect, gone)  # fail before the slow loop if n modules cannot go
    history: list[Scores] = [scores] if iterative else []
    steps: list[LossScores] = []
    fits: list[tuple[str, int]] = []
    standin = None
    if patch == "linear":
        from .patch import patch_standin

        standin = patch_standin(model, calibration, batch_size, fits)
    if not iterative:
        order = cosine_order(scores, target, protect, gone)
        measured = loss_scores(model, calibration, order[:candidates] if candidates else order, batch_size, progress,
                               standin=standin)
        steps.append(measured)
        plan = plan_by_loss(scores, measured.increases, target, n, protect, gone)
        picks = loss_order(scores, measured.increases, target, protect, gone)[:n]
    else:
        plan = DropPlan(target=target, method="iterative", criterion="loss", num_layers=scores.num_layers)
        picks = []
        base: float | None = None
        for step_no in range(n):
            if step_no and candidates:
                scores = cosine()
                history.append(scores)
            taken = gone.plus(plan)
            order = cosine_order(scores, target, protect, taken)
            measured = loss_scores(model, calibration, order[:candidates] if candidates else order, batch_size,
                                   progress, base=base, standin=standin)
            steps.append(measured)
            step = plan_by_loss(scores, measured.increases, target, 1, protect, taken, method="iterative")
            pick = step.picks()[0]
            picks.append(pick)
            base = measured.base + measured.increases[pick]  # the loss of the model with this pick gone
            plan = plan.plus(step)
            if standin is not None:  # the pick goes as it will stay: replaced by its patch, the next ones scored on that
                from .patch import applied_plan, fit_patches

                picked = DropPlan(attn=step.attn, mlp=step.mlp, blocks=step.blocks, num_layers=scores.num_layers)
                fit_patches(model, picked, calibration, batch_size, progress=False)
                fits.append(pick)
                apply_plan(model, applied_plan(picked))
            else:
                apply_plan(model, DropPlan(attn=step.attn + step.blocks, mlp=step.mlp + step.blocks,
                                           num_layers=scores.num_layers))
    for measured in steps:
        cost.evaluations += measured.cost.evaluations
        cost.sweeps += measured.cost.sweeps
        cost.forward_passes += measured.cost.forward_passes
    cost.sweeps += len(fits)  # each patch fit: one pass over the chunks, cut short after its module
    cost.forward_passes += len(fits) * batches
    cost.seconds = time.perf_counter() - started
    log.info("loss criterion: %s", cost.describe())
    return Choice(plan, history[0] if history else scores, history, picks, "loss", steps, candidates, cost)


def _chunks(calibration: Calibration | object):
    return calibration.input_ids if isinstance(calibration, Calibration) else calibration


def choose(
    model: nn.Module,
    spec: PlanSpec,
    calibration: Calibration | None = None,
    scores: Scores | None = None,
    batch_size: int = 4,
    residual: bool = True,
    progress: bool = True,
    model_name: str = "",
    patch: str = "zero",
) -> Choice:
    """Decide what to drop: from given scores, or by measuring `calibration` (one-shot, iterative or window; by
    cosine or, with `spec.criterion` "loss", by the calibration loss; given scores then only choose the candidates).

    Iterative mode drops as it goes, so it leaves `model` pruned; the other modes leave it untouched. A model that
    is already pruned keeps its drops out of the candidates, so a second drop removes new modules. `patch` "linear"
    makes the loss criterion score each candidate replaced by its own linear patch (and, iterative, put the patch of
    each pick in place before the next step) instead of removed.
    """
    arch = arch_for(model)
    num_layers = len(model.get_submodule(arch.layers))
    k = spec.count(num_layers)
    spec.check_candidates(k)
    if scores is not None:
        scores.check_model(num_layers, model_name)
    if spec.iterative and scores is not None:
        raise LlmdropError("{iterative} re-measures after every drop; do not pass {scores} with it",
                           params=["iterative", "scores"])
    if spec.criterion == "loss" and calibration is None:
        raise LlmdropError("{criterion} loss measures the calibration loss without each module: give {calibration} "
                           "(scores alone are not enough)", params=["criterion", "calibration"])
    need_window = spec.window and (scores is None or not scores.window or scores.window["n"] != k)
    if (scores is None or spec.iterative or need_window) and calibration is None:
        raise LlmdropError("no scores and no calibration text: give {scores} or {calibration}",
                           params=["scores", "calibration"])
    exclude = already_dropped(model, arch)
    exclude = exclude if exclude.size else None
    elem = next(model.parameters()).element_size()
    context, saved = kv_saved_per_layer(spec, model.config, elem, exclude)  # a bad kv_context fails before measuring
    if spec.criterion == "loss":
        return _with_kv(loss_drops(model, calibration, spec.target, k, spec.protect, spec.candidates, spec.iterative,
                                   scores, batch_size, residual, progress, exclude, model_name, patch), spec, context,
                                saved)
    if spec.iterative:
        return _with_kv(iterative_drops(model, calibration, spec.target, k, spec.protect, batch_size, residual,
                                        progress, exclude, model_name, saved, spec.weight), spec, context, saved)
    if scores is None or need_window:
        scores = measure(model, calibration, batch_size=batch_size, residual=residual, progress=progress,
                         window_size=k if spec.window else None, model_name=model_name)
    return choose_from_scores(scores, spec, exclude, model.config, elem)


@dataclass
class Footprint:
    params: int
    kv_layers: int
    layers: int


def footprint(model: nn.Module) -> Footprint:
    return Footprint(count_parameters(model), kv_cache_layers(model), len(model.get_submodule(arch_for(model).layers)))


def provenance(choice: Choice, model_name: str = "") -> dict:
    """How a plan was made, recorded in the pruned checkpoint's config."""
    record = {"source_model": model_name, "method": choice.plan.method, "target": choice.plan.target,
              "criterion": choice.criterion, "scores": {k: choice.scores.of(k) for k in ("attn", "mlp", "block")},
              "residual": choice.scores.residual, "calibration": choice.scores.calibration}
    if choice.objective == "kv":
        record["objective"] = {"name": "kv", "kv_context": choice.kv_context, "kv_weight": choice.kv_weight,
                               "kv_freed_bytes": choice.kv_freed()}
    if choice.criterion == "loss":
        record["loss"] = {"candidates": choice.candidates, "steps": [s.to_dict() for s in choice.losses],
                          "cost": choice.cost.to_dict() if choice.cost else None}
    return record


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
    """One line: "plan (one-shot, target attn): drop attention [3, 5]"; the loss criterion adds itself and its cost,
    the kv objective its context and weight and the KV cache the plan frees."""
    plan = choice.plan
    if choice.objective == "kv":
        freed, total = choice.kv_freed(), choice.kv_total()
        share = f" of {human_bytes(total)}" if total else ""
        return (f"plan ({plan.method}, target {plan.target}, objective kv at {choice.kv_context:,} tokens, weight "
                f"{choice.kv_weight:g}): drop {plan.describe()} (frees {human_bytes(freed or 0)}{share} of KV cache per "
                "sequence)")
    if choice.criterion == "cosine":
        return f"plan ({plan.method}, target {plan.target}): drop {plan.describe()}"
    cost = f" ({choice.cost.describe()})" if choice.cost else ""
    return f"plan ({plan.method}, target {plan.target}, criterion {choice.criterion}): drop {plan.describe()}{cost}"


def plan_table(choice: Choice) -> str:
    """The modules to drop, in pick order, with the cosine each had (one-shot scores) and, with the loss criterion,
    the calibration loss increase its removal caused when it was picked."""
    picks = choice.picks or choice.plan.picks()
    if choice.objective == "kv" and choice.kv_saved is not None:
        rows = [[kind, i, choice.scores.of(kind)[i], human_bytes(choice.kv_saved[i])] for kind, i in picks]
        return table(["module", "layer", "cos (one-shot)", f"KV saved at {choice.kv_context:,} tokens"], rows)
    if choice.criterion != "loss":
        return table(["module", "layer", "cos (one-shot)"], [[kind, i, choice.scores.of(kind)[i]] for kind, i in picks])
    rows = [[kind, i, choice.scores.of(kind)[i], choice.loss_increase(n, (kind, i))] for n, (kind, i) in enumerate(picks)]
    return table(["module", "layer", "cos (one-shot)", "loss increase (nats)"], rows)


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
        from .evaluate import primary_metric

        lost = []
        for name, result in evals["before"]["tasks"].items():
            metric = primary_metric(result["metrics"])
            lost.append(100 * (result["metrics"][metric] - evals["after"]["tasks"][name]["metrics"][metric]))
        points = sum(lost) / len(lost) if lost else 0.0
        rows.append([f"KV saved at {n} tokens per accuracy point lost (mean of {len(lost)} tasks)", "",
                     human_bytes(freed / points) if points > 0 else "accuracy did not fall"])
    return rows
