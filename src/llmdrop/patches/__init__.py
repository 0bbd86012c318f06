"""Patch kinds: what stands where a dropped module was. One row per kind, read by the configs' checks, the command
line, the study and the drop jobs; a new kind is a row here, its module beside this file and its runtime class in
pruned_model.py (which checkpoints copy, so it stays self-contained).

Torch-free: the command line reads the table to build `--help`. A row's functions import the implementation when
they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ..errors import LlmdropError


@dataclass(frozen=True)
class Patch:
    """One patch kind. `module` (next to this file; None: nothing to fit) implements `check_model(model, arch,
    target, tokens)` (before any slow work), `fit(model, plan_or_choice, calibration, batch_size, progress)` (installs
    the patches, returns what was fitted), `applied_plan(plan)` (the plan to apply after the fit), `standin(model,
    calibration, batch_size, fitted)` (for the loss criterion: score a module replaced by its patch) and
    `describe(info)`, and `block_fits(arch)` (whether the family can carry a whole block's patch). `streams`: it
    works on a streamed drop (one layer in memory); a kind that fits and streams also implements `fit_streamed(path,
    plan, calibration, dtype, batch_size, max_memory, progress)` -> ({(slot, layer): weight}, what was fitted), the
    weights stream.drop_streamed writes. `suffix` marks a study row."""

    help: str
    module: str | None = None
    streams: bool = True
    suffix: str = ""

    def implementation(self) -> Any:
        if self.module is None:
            raise LlmdropError("this patch kind fits nothing")
        return import_module(self.module, __name__)

    @property
    def fits(self) -> bool:
        return self.module is not None


PATCHES: dict[str, Patch] = {
    "zero": Patch("nothing stands where the module was (the paper)"),
    "linear": Patch("a d x d least-squares map from what the module read to what it added, fitted on the calibration "
                    "text layer by layer; no KV cache; a block's map becomes its attention and its MLP goes",
                    ".linear", suffix="+linear"),
}


def patch_help() -> str:
    return "what stands where a dropped attention / MLP / block was: " + "; ".join(
        f"{name}: {row.help}" for name, row in PATCHES.items())


def check_options(kind: str, stream: bool) -> None:
    """`kind` combines with the rest of the job (found before any model is loaded)."""
    if stream and not PATCHES[kind].streams:
        raise LlmdropError(f"{{patch}} {kind} fits its patches on the model in memory; it does not combine with "
                           "{stream}: drop without {stream}, or use {patch} zero",
                           params=["patch", "stream"])


def is_patched(key: str) -> bool:
    """A study row key of a patched twin ("one-shot+linear:attn:8")."""
    method = key.split(":", 1)[0]
    return any(row.suffix and method.endswith(row.suffix) for row in PATCHES.values())
