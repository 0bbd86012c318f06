"""Choose and prune: the one composition `drop`, `run`, the streamed drop, the study and the benchmarks share.

`choose` turns a PlanSpec into a Choice through the spec's criterion (a row of criteria.CRITERIA: cosine one-shot,
window or iterative; the calibration loss), after the checks every criterion shares. `prune` fits the patches of a
patch kind (a row of patches.PATCHES), applies the plan and records how it was made, in the model's config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .arch import Arch, arch_for
from .calibration import Calibration
from .choice import Choice
from .configs import PlanSpec
from .criteria import CRITERIA
from .errors import LlmdropError
from .files import write_json
from .measure import Scores
from .patches import PATCHES
from .pruned_model import CONFIG_KEY, PATCH_FITS
from .surgery import already_dropped, apply_plan, count_parameters, kv_cache_layers

log = logging.getLogger("llmdrop")


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
    arch: Arch | None = None,
) -> Choice:
    """Decide what to drop: from given scores, or by measuring `calibration` (one-shot, iterative or window; by
    the spec's criterion; given scores then only choose the candidates).

    Iterative mode drops as it goes, so it leaves `model` pruned; the other modes leave it untouched. A model that
    is already pruned keeps its drops out of the candidates, so a second drop removes new modules. A `patch` kind
    that fits makes the loss criterion score each candidate replaced by its own patch (and, iterative, put the
    patch of each pick in place before the next step) instead of removed. `arch` is the model's, when known.
    """
    arch = arch or arch_for(model)
    num_layers = len(model.get_submodule(arch.layers))
    k = spec.count(num_layers)
    spec.check_candidates(k)
    if scores is not None:
        scores.check_model(num_layers, model_name)
    if spec.iterative and scores is not None:
        raise LlmdropError("{iterative} re-measures after every drop; do not pass {scores} with it",
                           params=["iterative", "scores"])
    row = CRITERIA[spec.criterion]
    if row.needs_text and calibration is None:
        raise LlmdropError(f"{{criterion}} {spec.criterion} measures the model on calibration text: give "
                           "{calibration} (scores alone are not enough)", params=["criterion", "calibration"])
    need_window = spec.window and (scores is None or not scores.window or scores.window["n"] != k)
    if (scores is None or spec.iterative or need_window) and calibration is None:
        raise LlmdropError("no scores and no calibration text: give {scores} or {calibration}",
                           params=["scores", "calibration"])
    exclude = already_dropped(model, arch)
    elem = next(model.parameters()).element_size()
    return row.implementation().choose(model, arch, spec, k, calibration, scores, exclude if exclude.size else None,
                                       elem, batch_size, residual, progress, model_name, patch)


@dataclass
class Footprint:
    params: int
    kv_layers: int
    layers: int


def footprint(model: nn.Module, arch: Arch | None = None) -> Footprint:
    arch = arch or arch_for(model)
    return Footprint(count_parameters(model), kv_cache_layers(model), len(model.get_submodule(arch.layers)))


def provenance(choice: Choice, model_name: str = "") -> dict:
    """How a plan was made, recorded in the pruned checkpoint's config (its criterion adds what it measured)."""
    record = {"source_model": model_name, "method": choice.plan.method, "target": choice.plan.target,
              "criterion": choice.criterion}
    if choice.scores is not None:
        record.update(scores={k: choice.scores.of(k) for k in ("attn", "mlp", "block")},
                      residual=choice.scores.residual, calibration=choice.scores.calibration)
    if choice.objective == "kv":
        record["objective"] = {"name": "kv", "kv_context": choice.kv_context, "kv_weight": choice.kv_weight,
                               "kv_freed_bytes": choice.kv_freed()}
    record.update(CRITERIA[choice.criterion].implementation().provenance(choice))
    return record


def prune(model: nn.Module, choice: Choice, model_name: str = "", patch: str = "zero",
          calibration: Calibration | None = None, batch_size: int = 4, progress: bool = True,
          arch: Arch | None = None) -> Footprint:
    """Apply `choice` to `model` in place, with `patch` standing where the dropped modules were, and record how it
    was made in the config; returns the footprint after.

    A patch kind that fits (linear) is fitted first on `calibration`, on the model as it is (its modules still in
    place, in layer order, each with the patches before it active), and what it fitted goes to `choice.patch_fit`
    and the record; the choice's plan becomes the plan as applied (a patched block stays a layer: a patched
    attention and a dropped MLP). The one composition of fit -> apply -> record that every job uses.
    """
    arch = arch or arch_for(model)
    kind = PATCHES[patch]
    if kind.fits:
        if calibration is None:
            raise LlmdropError(f"{{patch}} {patch} fits each patch on calibration text: give {{calibration}}",
                               params=["patch", "calibration"])
        impl = kind.implementation()
        choice.patch_fit = impl.fit(model, choice, calibration, batch_size, progress=progress)
        choice.plan = impl.applied_plan(choice.plan)
    apply_plan(model, choice.plan, provenance(choice, model_name), arch)
    if choice.patch_fit is not None:
        record = getattr(model.config, CONFIG_KEY)
        record[PATCH_FITS] = [*record.get(PATCH_FITS, []), choice.patch_fit]
    return footprint(model, arch)


def write_provenance(folder: str | Path, choice: Choice) -> None:
    """scores.json and plan.json beside a pruned checkpoint: what was measured and what was dropped."""
    folder = Path(folder)
    choice.scores.save(folder / "scores.json")
    write_json(folder / "plan.json", choice.plan.to_dict())
