"""vLLM model classes for llmdrop's sublayer-pruned checkpoints: vLLM's own model, the recorded sublayers replaced.

``Llmdrop<Arch>`` subclasses vLLM's class for ``<Arch>`` (``LlmdropLlamaForCausalLM`` is vLLM's
``LlamaForCausalLM``) and, once vLLM has built it, replaces what config.json's ``llmdrop`` record lists:

- a dropped attention becomes ``NoAttention`` and its norms (the record's ``attn_norms``) ``SkipNorm``;
- a dropped MLP becomes ``NoMLP``, its norms (``mlp_norms``) ``SkipNorm``;
- a linear patch becomes ``LinearPatch`` (``x W^T``, d x d, no bias) and the norms stay, as in ``llmdrop.load``.

vLLM sizes its KV cache from the attention modules registered in the compilation config's forward context; a
replaced attention is taken out of it, so only kept attention layers hold cache. The replaced modules' weights are
built by vLLM's constructor and freed here, before any checkpoint weight is read (a peak of the base's layer weights
during start-up, never during serving). Everything else (fused residual-add norms, biases, q/k norms, Gemma's
sandwich norms and scaled embeddings, sliding-window layers) is vLLM's own code, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.utils import PPMissingLayer

from ..pruned_model import PATCHED_ATTN, PATCHED_MLP, record_of
from .families import ARCHITECTURES


class NoAttention(nn.Module):
    """A dropped attention: adds zero to the residual stream, holds no weights and no KV cache."""

    def forward(self, *args: Any, hidden_states: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states if hidden_states is not None else args[1])


class NoMLP(nn.Module):
    """A dropped MLP: adds zero to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class SkipNorm(nn.Module):
    """A norm that only served a dropped branch. vLLM's RMSNorm also adds the residual when given one (returning
    the normed sum and the sum); this does the add and skips the norm, whose output only the dropped branch read."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if residual is None:
            return x
        x = x + residual
        return x, x


class LinearPatch(nn.Module):
    """A linear patch: ``x W^T`` with W d x d, no bias, named as llmdrop saves it (``linear_attn`` / ``linear_mlp``).
    Replicated on every tensor-parallel rank: its output is the full hidden state, as the reduced o_proj's was."""

    def __init__(self, name: str, hidden_size: int, prefix: str):
        super().__init__()
        self.name = name
        # no quantization: the patch is small and its fit was made in full precision
        setattr(self, name, ReplicatedLinear(hidden_size, hidden_size, bias=False, prefix=f"{prefix}.{name}"))

    def forward(self, *args: Any, hidden_states: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        x = hidden_states if hidden_states is not None else (args[1] if len(args) > 1 else args[0])
        out, _ = getattr(self, self.name)(x)
        return out


def _forget_attention(module: nn.Module, vllm_config: Any) -> None:
    """Take every attention layer inside `module` out of vLLM's forward context, so none gets a KV cache."""
    context = vllm_config.compilation_config.static_forward_context
    for sub in module.modules():
        if isinstance(sub, AttentionLayerBase):
            context.pop(getattr(sub, "layer_name", None), None)


def apply_drops(model: nn.Module, vllm_config: Any) -> None:
    """Replace the sublayers config.json's ``llmdrop`` record lists, in vLLM's model, in place."""
    config = vllm_config.model_config.hf_config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    record = record_of(config)
    modules = record["modules"]
    layers = model.get_submodule(modules["layers"])
    prefix = modules["layers"]
    patched = {"attn": set(record.get(PATCHED_ATTN, [])), "mlp": set(record.get(PATCHED_MLP, []))}
    for kind, stand_in, name in (("attn", NoAttention, "linear_attn"), ("mlp", NoMLP, "linear_mlp")):
        for i in record.get(kind, []):
            layer = layers[i]
            if isinstance(layer, PPMissingLayer):  # another pipeline stage holds this layer
                continue
            path = modules[kind]
            _forget_attention(layer.get_submodule(path), vllm_config)
            if i in patched[kind]:
                module = LinearPatch(name, text.hidden_size, f"{prefix}.{i}.{path}")
            else:
                module = stand_in()
                for norm in modules[f"{kind}_norms"]:
                    setattr(layer, norm, SkipNorm())
            setattr(layer, path, module)


_CLASSES: dict[str, type] = {}


def model_class(arch: str) -> type:
    """The plugin's class ``Llmdrop<Arch>``: vLLM's class for ``<Arch>`` with the recorded drops applied."""
    if arch not in _CLASSES:
        from vllm import ModelRegistry

        stock = ModelRegistry.models[ARCHITECTURES[arch]].load_model_cls()

        def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:  # noqa: N807
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
            apply_drops(self, vllm_config)

        _CLASSES[arch] = type(arch, (stock,), {"__init__": __init__, "__module__": __name__})
    return _CLASSES[arch]


def __getattr__(name: str) -> type:
    # vLLM imports a registered "module:Class" by getattr on this module: the classes are made on first use.
    if name in ARCHITECTURES:
        return model_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
