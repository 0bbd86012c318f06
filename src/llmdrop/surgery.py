"""Apply a DropPlan to a live model, in place: the dropped weights leave memory, the KV cache shrinks.

Sublayers become parameter-free no-ops (pruned_model.py); whole blocks are removed from the layer list and the config
(layer count, per-layer types such as Gemma's sliding windows) follows. Kept attention layers get compact KV slots.
"""

from __future__ import annotations

from torch import nn

from .arch import arch_for
from .errors import LlmdropError
from .plan import DropPlan
from .pruned_model import CONFIG_KEY, DroppedAttention, DroppedMLP, compact_kv_slots, drop_sublayers

# Per-layer config lists that must shrink with the layer list when blocks go.
PER_LAYER_CONFIG_LISTS = ("layer_types",)


def dropped_sublayers(model: nn.Module) -> tuple[list[int], list[int]]:
    """Indices (current numbering) of the layers whose attention / MLP is a no-op."""
    arch = arch_for(model)
    layers = model.get_submodule(arch.layers)
    attn = [i for i, layer in enumerate(layers) if isinstance(layer.get_submodule(arch.attn), DroppedAttention)]
    mlp = [i for i, layer in enumerate(layers) if isinstance(layer.get_submodule(arch.mlp), DroppedMLP)]
    return attn, mlp


def _remove_blocks(model: nn.Module, layers_path: str, blocks: list[int]) -> None:
    layers = model.get_submodule(layers_path)
    keep = [i for i in range(len(layers)) if i not in set(blocks)]
    parent, _, name = layers_path.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.ModuleList([layers[i] for i in keep]))
    for new, layer in enumerate(model.get_submodule(layers_path)):
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    config = model.config.get_text_config(decoder=True)
    config.num_hidden_layers = len(keep)
    for key in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in keep])


def apply_plan(model: nn.Module, plan: DropPlan, record: dict | None = None) -> nn.Module:
    """Drop what `plan` lists (original indices) from `model`, in place, and return it.

    The config gets an ``llmdrop`` entry: the sublayers gone in the new numbering (what a reload needs), the module
    paths, the plan, plus `record` (scores, calibration, ...).
    """
    arch = arch_for(model)
    num_layers = len(model.get_submodule(arch.layers))
    if plan.num_layers and plan.num_layers != num_layers:
        raise LlmdropError(
            f"the plan was made for {plan.num_layers} layers but the model has {num_layers}; "
            "apply a plan to the model it was measured on"
        )
    plan.validate(num_layers)
    blocks = set(plan.blocks)
    drop_sublayers(model, arch.modules(), [i for i in plan.attn if i not in blocks],
                   [i for i in plan.mlp if i not in blocks])
    if blocks:
        _remove_blocks(model, arch.layers, plan.blocks)
        compact_kv_slots(model, arch.modules())
    attn, mlp = dropped_sublayers(model)
    config = model.config
    previous = getattr(config, CONFIG_KEY, None) or {}
    entry = {
        "attn": attn,
        "mlp": mlp,
        "modules": arch.modules(),
        "original_num_layers": previous.get("original_num_layers", num_layers),
        "plan": plan.to_dict(),
    }
    entry.update(record or {})
    setattr(config, CONFIG_KEY, entry)
    return model


def kv_cache_layers(model: nn.Module) -> int:
    """How many layers hold a KV cache (kept attention layers)."""
    arch = arch_for(model)
    return sum(1 for layer in model.get_submodule(arch.layers)
               if not isinstance(layer.get_submodule(arch.attn), DroppedAttention))


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
