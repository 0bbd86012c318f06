"""Apply a DropPlan to a live model, in place: the dropped weights leave memory, the KV cache shrinks.

Sublayers become parameter-free no-ops, or linear patches (pruned_model.py, fitted by patch.py); whole blocks are
removed from the layer list and the config (layer count, per-layer types such as Gemma's sliding windows) follows.
Kept attention layers get compact KV slots.
"""

from __future__ import annotations

from torch import nn

from .arch import Arch, arch_for
from .errors import LlmdropError
from .plan import DropPlan
from .pruned_model import (
    CONFIG_KEY,
    PATCH_FITS,
    PATCHED_ATTN,
    PATCHED_MLP,
    DroppedAttention,
    DroppedMLP,
    PatchedAttention,
    PatchedMLP,
    compact_kv_slots,
    drop_sublayers,
    record_of,
)

# Per-layer config lists that must shrink with the layer list when blocks go.
PER_LAYER_CONFIG_LISTS = ("layer_types",)


def dropped_flags(model: nn.Module, arch: Arch | None = None) -> tuple[list[bool], list[bool]]:
    """Per layer (current numbering): is its attention gone, is its MLP gone (a no-op or a linear patch).

    The one answer for bench, export and the KV-cache count (a patched attention holds no cache either);
    `patched_flags` tells which of them are patches. pruned_model.py keeps its own copy because it must import
    nothing from llmdrop.
    """
    arch = arch or arch_for(model)
    layers = model.get_submodule(arch.layers)
    return ([isinstance(layer.get_submodule(arch.attn), (DroppedAttention, PatchedAttention)) for layer in layers],
            [isinstance(layer.get_submodule(arch.mlp), (DroppedMLP, PatchedMLP)) for layer in layers])


def patched_flags(model: nn.Module, arch: Arch | None = None) -> tuple[list[bool], list[bool]]:
    """Per layer (current numbering): is its attention a linear patch, is its MLP a linear patch."""
    arch = arch or arch_for(model)
    layers = model.get_submodule(arch.layers)
    return ([isinstance(layer.get_submodule(arch.attn), PatchedAttention) for layer in layers],
            [isinstance(layer.get_submodule(arch.mlp), PatchedMLP) for layer in layers])


def dropped_sublayers(model: nn.Module, arch: Arch | None = None) -> tuple[list[int], list[int]]:
    """Indices (current numbering) of the layers whose attention / MLP is gone (a no-op or a linear patch)."""
    attn, mlp = dropped_flags(model, arch)
    return [i for i, gone in enumerate(attn) if gone], [i for i, gone in enumerate(mlp) if gone]


def already_dropped(model: nn.Module, arch: Arch | None = None) -> DropPlan:
    """The sublayers a (re)loaded pruned model has already lost, as a plan in its current numbering.

    Planning excludes them: a dropped sublayer scores cos 1.0 and would otherwise be picked again, a no-op.
    """
    attn, mlp = dropped_sublayers(model, arch)
    return DropPlan(attn=attn, mlp=mlp, num_layers=len(model.get_submodule((arch or arch_for(model)).layers)))


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


def apply_plan(model: nn.Module, plan: DropPlan, provenance: dict | None = None, arch: Arch | None = None) -> nn.Module:
    """Drop what `plan` lists (original indices) from `model`, in place, and return it.

    A sublayer that is already a linear patch (patch.fit_patches installs them before this) stays one. The config
    gets an ``llmdrop`` entry: the sublayers gone in the new numbering and which of them are patches (what a reload
    needs), the module paths, the plan, plus `provenance` (how the plan was made: scores, calibration, source model).
    `arch` is the model's, when the caller has it.
    """
    arch = arch or arch_for(model)
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
    attn, mlp = dropped_sublayers(model, arch)
    patched_attn, patched_mlp = (
        [i for i, patched in enumerate(flags) if patched] for flags in patched_flags(model, arch))
    config = model.config
    previous = record_of(config)
    entry = {
        "attn": attn,
        "mlp": mlp,
        PATCHED_ATTN: patched_attn,
        PATCHED_MLP: patched_mlp,
        "modules": arch.modules(),
        "original_num_layers": previous.get("original_num_layers", num_layers),
        "plan": plan.to_dict(),
    }
    if previous.get(PATCH_FITS) and (patched_attn or patched_mlp):  # how the patches still in the model were fitted
        entry[PATCH_FITS] = previous[PATCH_FITS]
    entry.update(provenance or {})
    setattr(config, CONFIG_KEY, entry)
    return model


def kv_cache_layers(model: nn.Module) -> int:
    """How many layers hold a KV cache (kept attention layers; a patched attention holds none)."""
    attn, _ = dropped_flags(model)
    return attn.count(False)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once; a linear patch's d x d weights count)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
