"""The mergekit passthrough YAML that rebuilds a block-dropped model from its base: kept layers as slices."""

from __future__ import annotations

from pathlib import Path

from ..errors import LlmdropError
from ..files import write_text
from ..pruned_model import PATCHED_ATTN, PATCHED_MLP, record_of


def kept_ranges(num_layers: int, dropped: list[int]) -> list[tuple[int, int]]:
    """Half-open [start, end) runs of the layers that stay."""
    ranges, start = [], None
    for i in range(num_layers + 1):
        keep = i < num_layers and i not in set(dropped)
        if keep and start is None:
            start = i
        elif not keep and start is not None:
            ranges.append((start, i))
            start = None
    return ranges


def mergekit_yaml(config, base: str, dtype: str = "float32") -> str:
    """YAML for `mergekit-yaml` that reproduces the block drops recorded in `config` from the model at `base`."""
    record = record_of(config)
    if record.get(PATCHED_ATTN) or record.get(PATCHED_MLP):
        raise LlmdropError("mergekit's passthrough merge copies whole layers from the base model, so it cannot express "
                           "a linear patch (a fitted weight the base does not have); export this checkpoint as gguf "
                           "(attention patches) or vllm")
    if record.get("attn") or record.get("mlp"):
        raise LlmdropError("mergekit's passthrough merge copies whole layers, so it cannot express attention or MLP "
                           "drops; the gguf and vllm formats can (for the llama and mistral families)")
    plan = record.get("plan") or {}
    if not plan.get("blocks"):
        raise LlmdropError("this checkpoint records no block drops (was it written by `llmdrop drop --target block`?)")
    total = record.get("original_num_layers") or plan.get("num_layers")
    lines = ["# Written by llmdrop: the same layers as the block-dropped checkpoint, copied from its base model.",
             "merge_method: passthrough", f"dtype: {dtype}", "slices:"]
    for start, end in kept_ranges(total, plan["blocks"]):
        lines += ["  - sources:", f"      - model: {base}", f"        layer_range: [{start}, {end}]"]
    return "\n".join(lines) + "\n"


def export_mergekit(config, base: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the YAML of mergekit_yaml at `out`, whole or not at all."""
    return write_text(out, mergekit_yaml(config, str(base), dtype), overwrite=overwrite)
