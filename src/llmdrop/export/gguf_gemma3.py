"""Gemma-3 (model_type gemma3_text) as llama.cpp's `gemma3` architecture: block drops only.

What llama.cpp reads (the llama.cpp vendored by llama-cpp-python 0.3.36: src/models/gemma3.cpp, src/llama-model.cpp,
conversion/gemma.py):

- Sliding / global layers: ``gemma3.attention.sliding_window`` > 0 turns sliding windows on, and
  ``load_swa_pattern(ml, 6)`` reads ``gemma3.attention.sliding_window_pattern`` either as a per-layer array (bool or
  int, 1 = sliding) or as a period n (layer il slides when ``il % n < n - 1``; 6 when the key is absent). A block
  drop breaks the period, so the kept layers' pattern is written as the array unless it is still the period-6
  pattern (then the integer, which older llama.cpp reads too). With no sliding layer kept no window is written.
- Rotary bases: ``gemma3.rope.freq_base`` for global layers (with ``rope.scaling.type`` / ``factor`` for a linear
  scaling), ``gemma3.rope.freq_base_swa`` for sliding ones (their scale is fixed at 1). Gemma uses NEOX rotary
  (the two halves of a head), as HF does: no q / k permutation.
- Norms: HF's Gemma3RMSNorm multiplies by ``1 + w``; llama.cpp's RMS norm by its weight, so every norm (attn, q, k,
  post-attention, pre- and post-feed-forward, output) is written as ``1 + w``, as llama.cpp's converter does.
- Embedding scale ``sqrt(n_embd)`` and the GELU (tanh) gated MLP are built into the graph.
- Query scale: llama.cpp multiplies q by ``1/sqrt(head_dim)`` (``1/sqrt(n_embd / n_head)`` for its 27B type, which it
  recognises by 62 layers) and reads no query_pre_attn_scalar. HF scales by ``query_pre_attn_scalar ** -0.5``; the
  ratio is folded into q_norm's weight (rotary is linear, so scaling before it is the same), which also keeps a
  block-dropped 27B (no longer 62 layers) right.
- ``gemma3.final_logit_softcapping`` when the config has one; attention logit soft-capping does not exist there.

The gemma3 graph computes every layer's attention and MLP, with one head count for all layers: it cannot skip a
sublayer, so attention / MLP drops (and linear patches) are refused.
"""

from __future__ import annotations

import math

import torch

from ..arch import head_counts
from ..errors import LlmdropError

ARCH = "gemma3"
# HF tensor (under the layer) -> (llama.cpp tensor, Gemma's 1 + w norm)
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm.weight", True),
    "self_attn.q_proj.weight": ("attn_q.weight", False),
    "self_attn.k_proj.weight": ("attn_k.weight", False),
    "self_attn.v_proj.weight": ("attn_v.weight", False),
    "self_attn.o_proj.weight": ("attn_output.weight", False),
    "self_attn.q_norm.weight": ("attn_q_norm.weight", True),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", True),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", True),
    "pre_feedforward_layernorm.weight": ("ffn_norm.weight", True),
    "post_feedforward_layernorm.weight": ("post_ffw_norm.weight", True),
    "mlp.gate_proj.weight": ("ffn_gate.weight", False),
    "mlp.up_proj.weight": ("ffn_up.weight", False),
    "mlp.down_proj.weight": ("ffn_down.weight", False),
}
TOP_TENSORS = {
    "model.embed_tokens.weight": ("token_embd.weight", False),
    "model.norm.weight": ("output_norm.weight", True),
    "lm_head.weight": ("output.weight", False),  # absent (tied) -> llama.cpp reuses token_embd
}
Q_NORM = "self_attn.q_norm.weight"
SLIDING = {"sliding_attention": True, "full_attention": False}  # HF layer type -> llama.cpp is_swa
SWA_PERIOD = 6  # models/gemma3.cpp: load_swa_pattern(ml, 6)
LAYERS_27B = 62  # models/gemma3.cpp: LLM_TYPE_27B scales queries by 1/sqrt(n_embd / n_head)
ACTIVATION = "gelu_pytorch_tanh"  # llama.cpp's LLM_FFN_GELU (tanh approximation)
# rope_type per HF layer type that llama.cpp can express: sliding layers have a fixed frequency scale of 1.
ROPE_TYPES = {"full_attention": ("default", "linear"), "sliding_attention": ("default",)}

SUBLAYER_REFUSAL = (
    "llama.cpp's gemma3 graph (models/gemma3.cpp) computes every layer's attention and MLP and cannot skip either, "
    "and its deci graph, which can, has no sandwich norms, so a Gemma-3 GGUF export expresses block drops only: drop "
    "whole blocks for llama.cpp, or serve the attention / MLP drops with vLLM (see the deployment table in "
    "docs/deployment.md)"
)


def check_drops(no_attn: list[bool], no_mlp: list[bool]) -> None:
    if any(no_attn) or any(no_mlp):
        raise LlmdropError(SUBLAYER_REFUSAL)


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    if not all(t in rope for t in ROPE_TYPES):  # older configs: one rope_theta and rope_local_base_freq
        rope = {"full_attention": {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 1e6),
                                   **(getattr(config, "rope_scaling", None) or {})},
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": getattr(config, "rope_local_base_freq", 1e4)}}
    for kind, allowed in ROPE_TYPES.items():
        got = rope[kind].get("rope_type", rope[kind].get("type", "default"))
        if got not in allowed:
            raise LlmdropError(f"llama.cpp's gemma3 architecture cannot express rope type '{got}' on {kind} layers "
                               f"(it takes {' or '.join(allowed)})")
    return rope


def sliding_flags(config) -> list[bool]:
    """Per kept layer: does it use the sliding window (from the config's layer_types, which block drops shrink)."""
    types = list(config.layer_types)
    unknown = sorted(set(types) - set(SLIDING))
    if unknown:
        raise LlmdropError(f"layer types {', '.join(unknown)} have no counterpart in llama.cpp's gemma3 architecture")
    return [SLIDING[t] for t in types]


def period_pattern(n_layers: int, period: int = SWA_PERIOD) -> list[bool]:
    """llama_hparams::set_swa_pattern(period): layer il slides when il % period < period - 1."""
    return [il % period < period - 1 for il in range(n_layers)]


def _query_scale_ratio(config, n_layers: int) -> float:
    """HF's query scale over llama.cpp's, folded into q_norm."""
    n_head, _, head_dim = head_counts(config)
    llama_cpp = 1 / math.sqrt(config.hidden_size / n_head if n_layers == LAYERS_27B else head_dim)
    return config.query_pre_attn_scalar ** -0.5 / llama_cpp


def check_config(config) -> None:
    """Refuse what llama.cpp's gemma3 graph does not compute."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise LlmdropError("llama.cpp's gemma3 architecture has no attention logit soft-capping, which this model uses")
    if getattr(config, "use_bidirectional_attention", False):
        raise LlmdropError("llama.cpp's gemma3 architecture is causal; this model uses bidirectional attention")
    if getattr(config, "hidden_activation", ACTIVATION) != ACTIVATION:
        raise LlmdropError(f"llama.cpp's gemma3 architecture uses the {ACTIVATION} MLP, not "
                           f"{config.hidden_activation}")
    _rope(config)
    sliding_flags(config)


def hparams(writer, config, n_layers: int) -> None:
    """The keys llama.cpp's gemma3 loader reads (general ones plus models/gemma3.cpp's own)."""
    import gguf

    check_config(config)
    n_head, n_kv, head_dim = head_counts(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = _rope(config)
    full = rope["full_attention"]
    writer.add_rope_freq_base(float(full["rope_theta"]))
    if full.get("rope_type", full.get("type", "default")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    sliding = sliding_flags(config)
    if any(sliding):
        writer.add_sliding_window(int(config.sliding_window))
        # The period when the kept layers still follow it (older llama.cpp reads only that), else one flag a layer.
        writer.add_sliding_window_pattern(SWA_PERIOD if sliding == period_pattern(n_layers) else sliding)
        writer.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def tensors(model, layers_path: str, config) -> list[tuple[str, torch.Tensor]]:
    """Every tensor under its llama.cpp name: Gemma norms as 1 + w, HF's query scale folded into q_norm."""
    state = model.state_dict()
    prefix = layers_path + "."
    n_layers = len(model.get_submodule(layers_path))
    ratio = _query_scale_ratio(config, n_layers)
    out: list[tuple[str, torch.Tensor]] = []
    for key, value in state.items():
        if key.startswith(prefix):
            i, _, rest = key[len(prefix):].partition(".")
            if rest not in LAYER_TENSORS:
                raise LlmdropError(f"tensor {key} has no counterpart in llama.cpp's gemma3 architecture")
            name, shift = LAYER_TENSORS[rest]
            name = f"blk.{i}.{name}"
        elif key in TOP_TENSORS:
            if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                continue
            name, shift = TOP_TENSORS[key]
        else:
            raise LlmdropError(f"tensor {key} has no counterpart in llama.cpp's gemma3 architecture")
        value = value.detach().float()
        if shift:
            value = value + 1.0
        if key.endswith(Q_NORM) and ratio != 1.0:
            value = value * ratio
        out.append((name, value))
    return out
