"""Where each decoder family keeps its layers, attention, MLP and mid-residual point: data, not code paths.

A pre-norm decoder layer computes ``h_mid = h_in + Attn(norm1(h_in))`` and ``h_out = h_mid + MLP(norm2(h_mid))``.
Measurement hooks the layer's input and output, and the input of ``mid`` (the first module that reads ``h_mid``).
Surgery replaces ``attn`` / ``mlp`` and the norms that serve only that branch (``attn_norms`` / ``mlp_norms``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import LlmdropError

log = logging.getLogger("llmdrop")


@dataclass(frozen=True)
class Arch:
    """Module paths of one decoder family, relative to the CausalLM model (``layers``) or to one layer (the rest)."""

    family: str
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    mid: str = "post_attention_layernorm"
    # Families whose every sequence must start with BOS: without it Gemma-3-270M's perplexity is 60.9 instead of 23.5.
    needs_bos: bool = False
    detected: bool = field(default=False, compare=False)

    def modules(self) -> dict:
        """The paths surgery needs, as recorded in a pruned checkpoint's config (see pruned_model.py)."""
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in _RECORDED}


_RECORDED = ("layers", "attn", "mlp", "attn_norms", "mlp_norms")

_LLAMA_LIKE = {}
_SANDWICH = {
    # Gemma normalises each branch's output too; the residual stream is still h_in, h_mid, h_out.
    "attn_norms": ("input_layernorm", "post_attention_layernorm"),
    "mlp_norms": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "mid": "pre_feedforward_layernorm",
    "needs_bos": True,
}

FAMILIES: dict[str, Arch] = {
    "llama": Arch("llama", **_LLAMA_LIKE),
    "mistral": Arch("mistral", **_LLAMA_LIKE),
    "qwen2": Arch("qwen2", **_LLAMA_LIKE),
    "qwen3": Arch("qwen3", **_LLAMA_LIKE),
    "phi3": Arch("phi3", **_LLAMA_LIKE),
    "gemma2": Arch("gemma2", **_SANDWICH),
    "gemma3_text": Arch("gemma3_text", **_SANDWICH),
}


def _missing_paths(model: nn.Module, arch: Arch) -> list[str]:
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError:
        return [arch.layers]
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return [f"{arch.layers} (a non-empty ModuleList)"]
    missing = []
    for path in (arch.attn, arch.mlp, arch.mid, *arch.attn_norms, *arch.mlp_norms):
        try:
            layers[0].get_submodule(path)
        except AttributeError:
            missing.append(f"{arch.layers}.0.{path}")
    return missing


def _family_of(config) -> str:
    text = text_config(config)
    return getattr(text, "model_type", None) or getattr(config, "model_type", None) or "unknown"


def arch_for_config(config) -> Arch:
    """The family entry for a config, without building the model: a llama-shaped guess (``detected``) when the
    family is not in FAMILIES. `arch_for(model)` also checks that the paths exist."""
    family = _family_of(config)
    return FAMILIES.get(family) or Arch(family, detected=True)


def head_counts(config) -> tuple[int, int, int]:
    """(attention heads, KV heads, head dimension) of a decoder config, with the defaults transformers applies."""
    config = text_config(config)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def text_config(config):
    """The decoder's own config: a multimodal config (Gemma-3's) holds it inside, a text-only config is it."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The positions the model was trained for (max_position_embeddings) of a config or of a model (its config);
    None when the config does not say."""
    if isinstance(config, nn.Module):
        config = getattr(config, "config", None)
    limit = getattr(text_config(config), "max_position_embeddings", None) if config is not None else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def check_positions(config, tokens: int, param: str, model: str = "this model") -> None:
    """Refuse `tokens` positions beyond the trained ones of a config (or model): they would be measured as if valid,
    silently. `param` names the option that set `tokens`; `model` says whose limit it is (a bench has several)."""
    limit = max_positions(config)
    if limit is not None and tokens > limit:
        raise LlmdropError(f"{{{param}}} {tokens} is beyond the {limit} positions {model} was trained for "
                           f"(max_position_embeddings); choose {{{param}}} {limit} or less", params=[param])


def layer_types(config) -> list[str]:
    """Each layer's attention type as its KV cache sees it: the config's `layer_types` when it has them, else every
    layer sliding-window when `sliding_window` is set (Mistral) and full otherwise (transformers' own inference)."""
    config = text_config(config)
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def kv_tokens_per_layer(config, context: int) -> list[int]:
    """Tokens each layer's KV cache holds after `context` tokens: all of them in a full-attention layer, the last
    `sliding_window - 1` in a sliding-window layer (transformers keeps window - 1; the new token makes the window),
    none in a layer without attention (a "dummy", "mlp" or "moe" layer type)."""
    window = getattr(text_config(config), "sliding_window", None)
    tokens = []
    for kind in layer_types(config):
        if kind in ("dummy", "mlp", "moe"):
            tokens.append(0)
        elif "sliding" in kind and window:
            tokens.append(min(context, window - 1))
        else:
            tokens.append(context)
    return tokens


def kv_bytes_per_layer(config, context: int, dtype_bytes: int = 2, batch: int = 1) -> list[int]:
    """Bytes of keys and values each layer holds after `context` tokens: 2 (K and V) x batch x tokens held x KV
    heads x head dimension x `dtype_bytes` (4 for float32, 2 for bfloat16 / float16). What dropping that layer's
    attention (or the whole block) saves."""
    _, n_kv, head_dim = head_counts(config)
    return [2 * batch * tokens * n_kv * head_dim * dtype_bytes for tokens in kv_tokens_per_layer(config, context)]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a working precision by name ("float32", "bfloat16", "float16")."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def arch_for(model: nn.Module) -> Arch:
    """The family entry for this model, or a llama-shaped guess for an unknown family that has every expected path.

    Raises LlmdropError naming the family and what was not found when neither works.
    """
    arch = arch_for_config(model.config)
    family = arch.family if arch.family != "unknown" else type(model).__name__
    missing = _missing_paths(model, arch)
    if not arch.detected:
        if missing:
            raise LlmdropError(
                f"model family '{family}' does not have the module paths llmdrop expects ({', '.join(missing)}); "
                "this transformers version may have renamed them"
            )
        return arch
    if missing:
        raise LlmdropError(
            f"unsupported model family '{family}': could not find {', '.join(missing)}; "
            f"supported families: {', '.join(sorted(FAMILIES))}"
        )
    log.debug("model family '%s' is not in llmdrop's table; its layers are llama-shaped, so it is treated as such",
              family)
    return arch
