"""The loss criterion: how much the calibration next-token loss rises when one module alone is removed.

Cosine similarity (measure.py) is the paper's proxy for redundancy; SLEB (arXiv 2402.09025) and BlockPruner
(2406.10594) rank by the loss itself. For each candidate the module is swapped for its no-op (``DroppedAttention`` /
``DroppedMLP``; a block is both, an exact identity), the mean next-token loss over every calibration chunk is
computed in batches, and the original module object is put back, so the model is restored bit for bit. A candidate's
score is ``loss_without - base_loss`` in nats: lower = more redundant (it may be negative).

One candidate costs one sweep over the calibration chunks; `CriterionCost` counts sweeps, batched forward passes and
seconds so the price of the ranking is reported next to the plan. The orchestration (which candidates, one-shot or
greedy iterative) lives in pipeline.py.
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

from .arch import Arch, arch_for
from .calibration import Calibration
from .errors import LlmdropError
from .pruned_model import DroppedAttention, DroppedMLP

log = logging.getLogger("llmdrop")


@dataclass
class CriterionCost:
    """What ranking by loss cost: modules scored, sweeps over the calibration chunks (base losses, candidates and any
    cosine re-measurement), batched forward passes (sweeps x batches) and wall-clock seconds."""

    evaluations: int = 0
    sweeps: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    def add(self, other: CriterionCost) -> None:
        self.evaluations += other.evaluations
        self.sweeps += other.sweeps
        self.forward_passes += other.forward_passes
        self.seconds += other.seconds

    def to_dict(self) -> dict:
        return {"evaluations": self.evaluations, "sweeps": self.sweeps, "forward_passes": self.forward_passes,
                "seconds": round(self.seconds, 3)}

    def describe(self) -> str:
        return (f"{self.evaluations} removals scored by loss: {self.sweeps} calibration sweeps, "
                f"{self.forward_passes} forward passes, {self.seconds:.1f}s")


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


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


_STANDINS = {"attn": DroppedAttention, "mlp": DroppedMLP}
# What stands in for a removed sublayer: standin(kind, layer, sublayer) with kind attn / mlp / block and sublayer
# attn / mlp; None means the no-op. A linear patch would plug in here ("removed or patched").
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
    from .evaluate import perplexity

    return perplexity(model, _ids(calibration), batch_size, progress=False)["nll"]


def loss_scores(
    model: nn.Module,
    calibration: Calibration | torch.Tensor,
    modules: Iterable[tuple[str, int]],
    batch_size: int = 4,
    progress: bool = True,
    base: float | None = None,
    standin: Standin | None = None,
) -> LossScores:
    """The calibration loss increase when each of `modules` ((kind, layer), kind attn / mlp / block) alone is removed
    (replaced by its no-op, or by what `standin` returns for it).

    One sweep over the chunks per module, plus one for the base loss unless `base` (the loss of the model as it
    is, already known) is given. The model is left exactly as it was.
    """
    if not _is_count(batch_size):
        raise LlmdropError(f"{{batch_size}} must be a positive number of chunks (got {batch_size})",
                           params=["batch_size"])
    ids = _ids(calibration)
    if ids.ndim != 2 or ids.shape[1] < 2 or len(ids) == 0:
        raise LlmdropError("the loss criterion needs calibration chunks of at least 2 tokens")
    modules = list(modules)
    arch = arch_for(model)
    batches = math.ceil(len(ids) / batch_size)
    started = time.perf_counter()
    sweeps = 0
    if base is None:
        base = calibration_loss(model, ids, batch_size)
        sweeps += 1
    increases: dict[tuple[str, int], float] = {}
    for kind, i in tqdm(modules, desc="loss criterion", unit="module", disable=not progress):
        with removed(model, [(kind, i)], arch, standin):
            increases[(kind, i)] = calibration_loss(model, ids, batch_size) - base
        sweeps += 1
    cost = CriterionCost(len(modules), sweeps, sweeps * batches, time.perf_counter() - started)
    return LossScores(base, increases, ids.shape[0] * (ids.shape[1] - 1), cost)
