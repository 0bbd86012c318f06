"""The loss criterion: how much the calibration next-token loss rises when one module alone is removed.

Cosine similarity (measure.py) is the paper's proxy for redundancy; SLEB (arXiv 2402.09025) and BlockPruner
(2406.10594) rank by the loss itself. For each candidate the module is swapped for its no-op (``DroppedAttention`` /
``DroppedMLP``; a block is both, an exact identity), the mean next-token loss over every calibration chunk is
computed in batches, and the original module object is put back, so the model is restored bit for bit. A candidate's
score is ``loss_without - base_loss`` in nats: lower = more redundant (it may be negative).

One candidate costs one sweep over the calibration chunks; `CriterionCost` counts sweeps, batched forward passes and
seconds so the price of the ranking is reported next to the plan. `loss_drops` picks the modules: one-shot (every
candidate scored on the unpruned model) or greedy iterative (score, drop the best, score the rest again).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Arch, arch_for
from ..calibration import Calibration
from ..choice import Choice, kv_saved_per_layer
from ..configs import PlanSpec
from ..errors import LlmdropError
from ..evaluate import perplexity
from ..measure import Scores, measure
from ..options import is_int
from ..patches import PATCHES
from ..plan import DropPlan, cosine_order, loss_order, plan_by_loss, plan_drops
from ..pruned_model import DroppedAttention, DroppedMLP
from ..stream import LayerWalk
from ..surgery import apply_plan
from . import check_candidates

log = logging.getLogger("llmdrop")


@dataclass
class CriterionCost:
    """What ranking by loss cost: modules scored, sweeps over the calibration chunks (base losses, candidates and any
    cosine re-measurement), batched forward passes (sweeps x batches) and wall-clock seconds."""

    evaluations: int = 0
    sweeps: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    passes: float = 0.0  # the work in full passes of the model (a sweep from layer l on is (layers - l) / layers)

    def add(self, other: CriterionCost) -> None:
        self.evaluations += other.evaluations
        self.sweeps += other.sweeps
        self.forward_passes += other.forward_passes
        self.seconds += other.seconds
        self.passes += other.passes

    def to_dict(self) -> dict:
        return {"evaluations": self.evaluations, "sweeps": self.sweeps, "forward_passes": self.forward_passes,
                "passes": round(self.passes, 3), "seconds": round(self.seconds, 3)}

    def describe(self) -> str:
        return (f"{self.evaluations} removals scored by loss: {self.sweeps} calibration sweeps, "
                f"{self.forward_passes} forward passes, {self.passes:.1f} full passes of work, {self.seconds:.1f}s")


@dataclass
class LossScores:
    """Calibration loss with nothing (more) removed, and its increase when each measured module alone is removed."""

    base: float
    increases: dict[tuple[str, int], float] = field(default_factory=dict)  # (kind, layer) -> loss_without - base
    tokens: int = 0
    cost: CriterionCost = field(default_factory=CriterionCost)

    def of(self, kind: str, layer: int) -> float | None:
        return self.increases.get((kind, layer))

    def to_dict(self) -> dict:
        return {"base_loss": self.base, "tokens": self.tokens, "cost": self.cost.to_dict(),
                "increases": [{"module": kind, "layer": i, "loss_increase": v}
                              for (kind, i), v in self.increases.items()]}


_STANDINS = {"attn": DroppedAttention, "mlp": DroppedMLP}
# What stands in for a removed sublayer: standin(kind, layer, sublayer) with kind attn / mlp / block and sublayer
# attn / mlp; None means the no-op. A patch kind's stand-in plugs in here ("removed or patched").
Standin = Callable[[str, int, str], "nn.Module | None"]


@contextlib.contextmanager
def removed(model: nn.Module, modules: Iterable[tuple[str, int]], arch: Arch | None = None,
            standin: Standin | None = None) -> Iterator[None]:
    """Within the block, the given (kind, layer) modules are no-ops (or what `standin` returns); afterwards the very
    same module objects are back, so weights, buffers and hooks are as before. A "block" is both of its sublayers
    removed (an identity).

    Unlike surgery, nothing else changes: norms and KV-cache slots stay, which is exact for the cache-free passes
    the loss is measured with (a removed branch adds zero whatever its norms do). A stand-in that is not a no-op
    replaces the branch module only, so it sees the branch's normed input, as the module did.
    """
    arch = arch or arch_for(model)
    layers = model.get_submodule(arch.layers)
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for kind, i in modules:
            for sub in (("attn", "mlp") if kind == "block" else (kind,)):
                path = arch.attn if sub == "attn" else arch.mlp
                parent_path, _, name = path.rpartition(".")
                parent = layers[i].get_submodule(parent_path) if parent_path else layers[i]
                original = getattr(parent, name)
                if isinstance(original, _STANDINS[sub]):
                    continue  # already gone
                saved.append((parent, name, original))
                module = standin(kind, i, sub) if standin is not None else None
                setattr(parent, name, module if module is not None else _STANDINS[sub]())
        yield
    finally:
        for parent, name, original in reversed(saved):
            setattr(parent, name, original)


def _ids(calibration: Calibration | torch.Tensor) -> torch.Tensor:
    return calibration.input_ids if isinstance(calibration, Calibration) else calibration


def calibration_loss(model: nn.Module, calibration: Calibration | torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token loss (nats) over every position but the first of each calibration chunk, in batches."""
    return perplexity(model, _ids(calibration), batch_size, progress=False)["nll"]


def loss_scores(
    model: nn.Module,
    calibration: Calibration | torch.Tensor,
    modules: Iterable[tuple[str, int]],
    batch_size: int = 4,
    progress: bool = True,
    base: float | None = None,
    standin: Standin | None = None,
    arch: Arch | None = None,
    reuse_prefix: bool = True,
) -> LossScores:
    """The calibration loss increase when each of `modules` ((kind, layer), kind attn / mlp / block) alone is removed
    (replaced by its no-op, or by what `standin` returns for it).

    One sweep over the chunks per module, plus one for the base loss unless `base` (the loss of the model as it
    is, already known) is given. With `reuse_prefix` (the default) the sweeps share their common start: the walk
    holds every chunk's hidden state at a candidate's layer, so a candidate at layer l costs the layers from l on
    (about half a pass on average) instead of a full pass; without, each is a full pass (the reference; the losses
    are the same within float rounding). The model is left exactly as it was.
    """
    if not is_int(batch_size) or batch_size < 1:
        raise LlmdropError(f"{{batch_size}} must be a positive number of chunks (got {batch_size})",
                           params=["batch_size"])
    ids = _ids(calibration)
    if ids.ndim != 2 or ids.shape[1] < 2 or len(ids) == 0:
        raise LlmdropError("the loss criterion needs calibration chunks of at least 2 tokens")
    modules = list(modules)
    arch = arch or arch_for(model)
    batches = math.ceil(len(ids) / batch_size)
    started = time.perf_counter()
    sweeps = 0
    reuse_prefix = reuse_prefix and bool(modules)
    if base is None:
        base = calibration_loss(model, ids, batch_size)
        sweeps += 1
    bar = tqdm(total=len(modules), desc="loss criterion", unit="module", disable=not progress)
    try:
        if reuse_prefix:
            losses, passes = _losses_by_walk(model, arch, ids, batch_size, modules, standin, bar)
        else:
            losses, passes = {}, float(len(modules))
            for kind, i in modules:
                with removed(model, [(kind, i)], arch, standin):
                    losses[(kind, i)] = calibration_loss(model, ids, batch_size)
                bar.update()
    finally:
        bar.close()
    increases = {m: losses[m] - base for m in modules}
    sweeps += len(modules)
    cost = CriterionCost(len(modules), sweeps, sweeps * batches, time.perf_counter() - started,
                         passes=sweeps - len(modules) + passes)
    return LossScores(base, increases, ids.shape[0] * (ids.shape[1] - 1), cost)


def _losses_by_walk(model: nn.Module, arch: Arch, ids: torch.Tensor, batch_size: int, modules: list[tuple[str, int]],
                    standin: Standin | None, bar) -> tuple[dict[tuple[str, int], float], float]:
    """Each module's calibration loss with it alone removed, in one walk over the layers: the chunks' hidden states
    are held at the input of a candidate's layer (what the model as it is computes there), so a candidate at layer
    l runs layers l, l + 1, ... and the head only. (The losses, the cost in full passes: decoder-layer calls over
    layers x batches, the walk's advances included.)"""
    by_layer = sorted(modules, key=lambda m: m[1])
    losses: dict[tuple[str, int], float] = {}
    with LayerWalk(model, arch, ids, batch_size) as walk:
        walk.start(by_layer[0][1])
        for kind, i in by_layer:
            while walk.at < i:
                walk.run(walk.at)
            with removed(model, [(kind, i)], arch, standin):
                total, tokens = walk.loss_from(i)
            losses[(kind, i)] = total / tokens
            bar.update()
        return losses, walk.layer_calls / walk.full_pass


@dataclass
class LossEvidence:
    """What ranking by loss measured (a Choice's `evidence`): the loss measurements (one per step when iterative),
    the bound on how many modules each step measured, and what it cost."""

    steps: list[LossScores] = field(default_factory=list)
    candidates: int | None = None
    cost: CriterionCost = field(default_factory=CriterionCost)

    def increase(self, step: int, pick: tuple[str, int]) -> float | None:
        """The loss increase a pick had when it was chosen (step `step` of an iterative choice)."""
        if not self.steps:
            return None
        return self.steps[min(step, len(self.steps) - 1)].of(*pick)

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "steps": [s.to_dict() for s in self.steps],
                "cost": self.cost.to_dict()}


class _Run:
    """One loss ranking of `model` on `calibration`: the cosine re-measurements it needs, the stand-in of `patch`
    (None: removal), and the cost of it all."""

    def __init__(self, model: nn.Module, calibration: Calibration | torch.Tensor, batch_size: int, residual: bool,
                 progress: bool, model_name: str, patch: str, arch: Arch):
        self.model, self.calibration, self.batch_size, self.arch = model, calibration, batch_size, arch
        self.residual, self.progress, self.model_name = residual, progress, model_name
        self.cost = CriterionCost()
        self.batches = math.ceil(len(_ids(calibration)) / batch_size)
        self.fits: list[tuple[str, int]] = []
        kind = PATCHES[patch]
        self.patch = kind.implementation() if kind.fits else None
        self.standin = self.patch.standin(model, calibration, batch_size, self.fits) if self.patch else None
        self.steps: list[LossScores] = []

    def cosine(self) -> Scores:
        self.cost.sweeps += 1
        self.cost.passes += 1
        self.cost.forward_passes += self.batches
        return measure(self.model, self.calibration, batch_size=self.batch_size, residual=self.residual,
                       progress=self.progress, model_name=self.model_name, arch=self.arch)

    def measure(self, order: list[tuple[str, int]], candidates: int | None, base: float | None = None) -> LossScores:
        measured = loss_scores(self.model, self.calibration, order[:candidates] if candidates else order,
                               self.batch_size, self.progress, base=base, standin=self.standin, arch=self.arch)
        self.steps.append(measured)
        return measured

    def drop(self, step: DropPlan) -> None:
        """The pick goes as it will stay: replaced by its patch (the next ones scored on that), or removed."""
        picked = DropPlan(attn=step.attn, mlp=step.mlp, blocks=step.blocks, num_layers=step.num_layers)
        if self.patch is not None:
            self.patch.fit(self.model, picked, self.calibration, self.batch_size, progress=False)
            self.fits.extend(picked.picks())
            apply_plan(self.model, self.patch.applied_plan(picked), arch=self.arch)
        else:
            apply_plan(self.model, DropPlan(attn=step.attn + step.blocks, mlp=step.mlp + step.blocks,
                                            num_layers=step.num_layers), arch=self.arch)

    def evidence(self, candidates: int | None, started: float) -> LossEvidence:
        for measured in self.steps:
            self.cost.add(measured.cost)
        self.cost.sweeps += len(self.fits)  # each patch fit: one pass over the chunks, cut short after its module
        self.cost.passes += len(self.fits)  # (at most)
        self.cost.forward_passes += len(self.fits) * self.batches
        self.cost.seconds = time.perf_counter() - started
        log.info("loss criterion: %s", self.cost.describe())
        return LossEvidence(self.steps, candidates, self.cost)


def _one_shot(run: _Run, scores: Scores, target: str, n: int, protect: tuple[int, ...], gone: DropPlan,
              candidates: int | None) -> tuple[DropPlan, list[tuple[str, int]]]:
    """Every candidate scored on the unpruned model, the n lowest go; the model is left untouched."""
    measured = run.measure(cosine_order(scores, target, protect, gone), candidates)
    plan = plan_by_loss(scores, measured.increases, target, n, protect, gone)
    return plan, loss_order(scores, measured.increases, target, protect, gone)[:n]


def _iterative(run: _Run, scores: Scores, target: str, n: int, protect: tuple[int, ...], gone: DropPlan,
               candidates: int | None, history: list[Scores]) -> tuple[DropPlan, list[tuple[str, int]]]:
    """Greedy, SLEB-style: score, drop the best for real, score the rest again on the pruned model, ...; with
    `candidates` the cosine is re-measured before each step to choose them."""
    plan = DropPlan(target=target, method="iterative", criterion="loss", num_layers=scores.num_layers)
    picks: list[tuple[str, int]] = []
    base: float | None = None
    for step_no in range(n):
        if step_no and candidates:
            scores = run.cosine()
            history.append(scores)
        taken = gone.plus(plan)
        measured = run.measure(cosine_order(scores, target, protect, taken), candidates, base)
        step = plan_by_loss(scores, measured.increases, target, 1, protect, taken, method="iterative")
        pick = step.picks()[0]
        picks.append(pick)
        base = measured.base + measured.increases[pick]  # the loss of the model with this pick gone
        plan = plan.plus(step)
        run.drop(step)
    return plan, picks


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
    arch: Arch | None = None,
) -> Choice:
    """Pick `n` modules by the calibration loss increase their removal alone causes (lowest first); with a `patch`
    kind that fits (linear), the increase when each is replaced by its own patch instead (one more partial pass each).

    One-shot: every candidate (or the `candidates` most similar by cosine, from `scores` or one measurement) is
    scored on the unpruned model and the n lowest go; the model is left untouched. `iterative`: greedy, SLEB-style:
    score, drop the best for real, score the rest again on the pruned model, ... so `model` is left pruned (blocks as
    identities, as `iterative_drops`); with `candidates` the cosine is re-measured before each step to choose them.
    """
    protect = tuple(protect)
    if candidates is not None and (not is_int(candidates) or candidates < 1):
        raise LlmdropError(f"{{candidates}} must be a number of modules of at least 1 (got {candidates!r})",
                           params=["candidates"])
    check_candidates(candidates, n, iterative)
    if not is_int(batch_size) or batch_size < 1:
        raise LlmdropError(f"{{batch_size}} must be a positive number of chunks (got {batch_size})",
                           params=["batch_size"])
    started = time.perf_counter()
    arch = arch or arch_for(model)
    run = _Run(model, calibration, batch_size, residual, progress, model_name, patch, arch)
    if scores is None:
        scores = run.cosine()
    else:
        scores.check_model(len(model.get_submodule(arch.layers)), model_name)
    gone = exclude or DropPlan()
    plan_drops(scores, target, n, protect, gone)  # fail before the slow loop if n modules cannot go
    history: list[Scores] = [scores] if iterative else []
    if iterative:
        plan, picks = _iterative(run, scores, target, n, protect, gone, candidates, history)
    else:
        plan, picks = _one_shot(run, scores, target, n, protect, gone, candidates)
    return Choice(plan, history[0] if history else scores, history, picks, "loss",
                  run.evidence(candidates, started))


def choose(model: nn.Module, arch: Arch, spec: PlanSpec, k: int, calibration: Calibration | None,
           scores: Scores | None, exclude: DropPlan | None, dtype_bytes: int, batch_size: int, residual: bool,
           progress: bool, model_name: str, patch: str) -> Choice:
    """The criterion row's entry point (pipeline.choose)."""
    context, saved = kv_saved_per_layer(spec, model.config, dtype_bytes, exclude)
    return loss_drops(model, calibration, spec.target, k, spec.protect, spec.candidates, spec.iterative, scores,
                      batch_size, residual, progress, exclude, model_name, patch, arch).with_kv(spec, context, saved)


# ---- how a loss choice reads in reports and records (report.py and pipeline.provenance ask the criterion) -------

def describe(choice: Choice) -> str:
    """What to add to the one-line plan: its cost."""
    return f" ({choice.evidence.cost.describe()})" if choice.evidence is not None else ""


def provenance(choice: Choice) -> dict:
    return {"loss": choice.evidence.to_dict()} if choice.evidence is not None else {}


def column(choice: Choice) -> tuple[str, list[float | None]]:
    """The plan table's extra column: the loss increase each pick had when it was picked."""
    picks = choice.picks or choice.plan.picks()
    values = [choice.evidence.increase(n, pick) if choice.evidence is not None else None
              for n, pick in enumerate(picks)]
    return "loss increase (nats)", values
