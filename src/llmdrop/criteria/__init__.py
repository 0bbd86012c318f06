"""Selection criteria: how the modules to drop are ranked. One row per criterion, read by the plan spec's checks,
the command line, the study and the reports; a new criterion is a row here and its module beside this file.

Torch-free: the command line reads the table to build `--help`. A row's `choose` imports its implementation when a
plan is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ..errors import LlmdropError

if TYPE_CHECKING:
    from ..configs import PlanSpec


@dataclass(frozen=True)
class Criterion:
    """One way of ranking modules.

    `options` are the PlanSpec fields only this criterion reads, each with what it does (a spec that sets one with
    another criterion is an error that says so). `windows`: it can rank runs of consecutive blocks; `kv`: it can be
    traded against the KV cache a drop frees (objective kv); `needs_text`: it runs the model on calibration text even
    when cosine scores are given. `check` holds the rules between its options and the rest of a spec. `module` (next
    to this file) implements `choose(model, arch, spec, k, calibration, scores, exclude, ...)` (a Choice) and how its
    choices read: `describe(choice)` (added to the one-line plan), `provenance(choice)` (added to the checkpoint's
    record) and `column(choice)` (an extra column of the plan table, or None).
    """

    help: str
    module: str
    options: dict[str, str] = field(default_factory=dict)
    windows: bool = False
    kv: bool = False
    needs_text: bool = False
    check: Callable[[PlanSpec, int | None], None] | None = None

    def implementation(self) -> Any:
        return import_module(self.module, __name__)


def check_candidates(candidates: int | None, k: int, iterative: bool) -> None:
    """A one-shot loss plan drops its k picks from the measured candidates: fewer than k cannot rank them all."""
    if not iterative and candidates is not None and candidates < k:
        raise LlmdropError(f"{{candidates}} {candidates} is fewer than the {k} modules to drop: a one-shot loss plan "
                           f"measures every pick; raise {{candidates}} to at least {k} or add {{iterative}}",
                           params=["candidates", "iterative"])


def _check_loss(spec: PlanSpec, k: int | None) -> None:
    if k is not None:
        check_candidates(spec.candidates, k, spec.iterative)


CRITERIA: dict[str, Criterion] = {
    "cosine": Criterion("rank by the cosine similarity of each module's input and output residual stream, the most "
                        "similar first (the paper)", ".cosine", windows=True, kv=True),
    "loss": Criterion("rank by the calibration loss increase when each module alone is removed (SLEB-style; one "
                      "calibration pass per candidate; with --patch linear: replaced by its own patch, one more "
                      "partial pass each)", ".loss", needs_text=True, check=_check_loss,
                      options={"candidates": "bounds how many modules the loss criterion measures"}),
}


def check_spec(spec: PlanSpec, k: int | None = None) -> None:
    """The rules a criterion sets on a plan spec: its options only with it, windows and the kv objective only where
    it can rank them, and its own rules (with `k`, the number of modules to drop, when known)."""
    row = CRITERIA[spec.criterion]
    for name, other in CRITERIA.items():
        for option, role in other.options.items():
            if name != spec.criterion and getattr(spec, option) is not None:
                raise LlmdropError(f"{{{option}}} {role}: use it with {{criterion}} {name}",
                                   params=[option, "criterion"])
    if spec.window and not row.windows:
        able = " or ".join(n for n, c in CRITERIA.items() if c.windows)
        raise LlmdropError(f"{{window}} ranks runs of blocks by {able} only; drop {{criterion}} {spec.criterion} or "
                           "{window}", params=["window", "criterion"])
    if spec.objective == "kv" and not row.kv:
        able = " or ".join(n for n, c in CRITERIA.items() if c.kv)
        raise LlmdropError(f"{{objective}} kv trades {able} similarity against KV bytes: use it with {{criterion}} "
                           f"{able}", params=["objective", "criterion"])
    if row.check is not None:
        row.check(spec, k)
