"""Export a (pruned) model to GGUF for llama.cpp, with the `gguf` package's writer.

One writer per family (FAMILY_WRITERS): llama-shaped families (llama, mistral, qwen2) here, Gemma-3 in gguf_gemma3.py
(block drops only). Block drops keep the family's own architecture (llama, qwen2, gemma3) with fewer layers.
Attention / MLP drops use llama.cpp's `deci` architecture (Nemotron-NAS): per-layer head counts and KV head counts,
0 where the attention is gone, and per-layer feed-forward lengths, 0 where the MLP is gone; the dropped layers'
tensors are simply absent. A linear patch of an
attention is deci's "linear attention" (heads but no KV heads: ``attn_output @ attn_norm(h)``, no bias, no KV cache,
models/deci.cpp), its weight written as attn_output in the orientation of an ordinary output projection. deci has
no linear feed-forward; an MLP patch ``W x`` is written as an exactly equivalent SwiGLU feed-forward of width d (see
_linear_ffn).

Qwen2 / Qwen2.5 is llama-shaped plus q / k / v biases, which deci loads too (models/deci.cpp creates them through
create_tensor_qkv as optional tensors, and build_qkv in llama-graph.cpp adds each one present). Its own qwen2
graph rotates the two halves of each head (NEOX), as HF does; deci rotates interleaved pairs (NORM), as llama
does, so in a deci file the q / k biases are permuted with their weights. A linear patch stays bias-free (deci's
linear attention reads no bias). Its byte-level BPE is written as llama.cpp's `gpt2` model with the `qwen2`
pre-tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arch import arch_for, head_counts, layer_types
from ..errors import LlmdropError
from ..files import atomic_file
from ..surgery import dropped_flags, patched_flags
from . import gguf_gemma3
from .families import (  # noqa: F401  (OUTTYPES: public here)
    GGUF_FAMILIES,
    NO_GGUF_ROUTE,
    OUTTYPES,
    QUANTIZED,
    check_exportable,
)
from .quantize import check_outtype, quantize

log = logging.getLogger("llmdrop")

# HF module path inside a llama decoder layer -> llama.cpp tensor name.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",  # Qwen2's q / k / v biases (deci and llama load them when present)
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.linear_attn.weight": "attn_output.weight",  # a linear patch: deci's "linear attention"
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# What llama.cpp's NORM rotary layout (llama, deci) needs permuted, and by which head count: q's or k's.
_ROTARY = {"self_attn.q_proj.weight": "q", "self_attn.q_proj.bias": "q", "self_attn.k_proj.weight": "k",
           "self_attn.k_proj.bias": "k"}
# llama.cpp's deci graph skips the rest of a layer whose feed-forward length is 0, attention output included
# (models/deci.cpp: `if (n_ff == 0) continue;` comes before the residual add). A dropped MLP under a kept attention
# is therefore written as a tiny feed-forward whose weights are all zero: it adds exactly 0, as the drop does. So is
# a dropped MLP in the last layer whatever its attention (see _zero_ffn_layers).
ZERO_FFN_WIDTH = 32
# An MLP patch W x as deci's SwiGLU feed-forward down(silu(gate x + b) * up x): gate = 0, b = LINEAR_FFN_GATE, up = W,
# down = I / LINEAR_FFN_GATE. silu(32) = 32 / (1 + e^-32) is exactly 32 in float32 (e^-32 ~ 1e-14 vanishes next to
# 1) and 1/32 is a power of two, so the feed-forward returns W x up to the rounding of W x itself.
LINEAR_FFN_GATE = 32.0


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp applies rotary embeddings to interleaved pairs; HF Llama to the two halves of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _array(t: torch.Tensor, outtype: str, name: str):
    import gguf

    a = t.detach().float().cpu().numpy()
    if a.ndim == 1 or outtype == "f32" or name.endswith("norm.weight") or min(a.shape) <= ZERO_FFN_WIDTH:
        return a.astype(np.float32), None
    if outtype == "f16":
        return a.astype(np.float16), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(a, q8), q8


def _copy_tokenizer_fields(writer, source: Path) -> int:
    """Copy the source GGUF's tokenizer.* fields; returns its token count."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    n_tokens = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if field.name == "tokenizer.ggml.tokens":
            n_tokens = len(field.data)
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    return n_tokens


def _hf_tokenizer_fields(writer, tokenizer, pre: str = "default") -> int:
    """BPE (GPT-2 style) vocabularies from a HF tokenizer.json, with llama.cpp's pre-tokenizer `pre`; other kinds
    get a clear error. Returns the token count."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise LlmdropError(f"GGUF export of a {model.get('type')} tokenizer is not supported; export a model that "
                           "came from a GGUF file, or one with a BPE tokenizer")
    if model.get("byte_fallback"):
        # SentencePiece-style BPE (Gemma, Llama 2): llama.cpp would read it as GPT-2 byte-level BPE and tokenize wrongly.
        raise LlmdropError("GGUF export of a SentencePiece-style (byte-fallback) BPE tokenizer is not supported; "
                           "export a model that came from a GGUF file")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in state.get("added_tokens", [])}}
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size  # ids the vocabulary skips
    special = {t["content"] for t in state.get("added_tokens", []) if t.get("special")}
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # BPE ignores scores (llama.cpp too), but transformers' GGUF reader needs them: with them llmdrop (through
    # transformers) loads its own exports back.
    writer.add_token_scores([0.0] * size)
    writer.add_token_merges(merges)
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{name}_token_id")(tid)
    return size


def _hparams(writer, config, n_layers: int, no_attn: list[bool], no_mlp: list[bool], outtype: str,
             lin_attn: list[bool] | None = None, lin_mlp: list[bool] | None = None) -> None:
    """The model's shape as llama.cpp's llama (no sublayer drops) or deci (per-layer counts) architecture reads it.

    `no_attn` / `no_mlp`: the sublayer is gone; `lin_attn` / `lin_mlp`: what is gone is a linear patch (deci's
    linear attention: heads, no KV heads; an MLP patch: a feed-forward of width d, see _linear_ffn)."""
    n_head, n_kv, head_dim = head_counts(config)
    lin_attn = lin_attn or [False] * len(no_attn)
    lin_mlp = lin_mlp or [False] * len(no_mlp)
    zero_attn = [a and not lin for a, lin in zip(no_attn, lin_attn)]  # gone and adding nothing
    writer.add_name(str(getattr(config, "_name_or_path", "") or "llmdrop model"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    if any(no_attn) or any(no_mlp):
        # llama.cpp sizes every layer's attention heads from layer 0's head count (hparams.n_head() reads layer 0),
        # so layer 0 keeps n_head > 0 even when its attention is gone; see _layer0_stand_in for what stands there.
        writer.add_head_count([n_head if (not zero or i == 0) else 0 for i, zero in enumerate(zero_attn)])
        writer.add_head_count_kv([0 if gone else n_kv for gone in no_attn])
        zero_ffn = _zero_ffn_layers(zero_attn, no_mlp, lin_mlp)
        writer.add_feed_forward_length([config.hidden_size if lm else ZERO_FFN_WIDTH if z else 0 if m
                                        else config.intermediate_size for m, lm, z in zip(no_mlp, lin_mlp, zero_ffn)])
    else:
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    _file_type(writer, outtype)


def _file_type(writer, outtype: str) -> None:
    """general.file_type of what the writer itself writes (the quantizer sets its own)."""
    import gguf

    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])


def _layer0_stand_in(hidden: int) -> list[tuple[str, torch.Tensor]]:
    """Layer 0 must keep attention heads (see _hparams): a dropped layer-0 attention is written as deci's "linear
    attention" (heads but no KV heads, an output projection only) with an all-zero projection. It adds exactly 0 and
    has no KV cache."""
    return [("blk.0.attn_norm.weight", torch.ones(hidden)), ("blk.0.attn_output.weight", torch.zeros(hidden, hidden))]


def _zero_ffn_layers(zero_attn: list[bool], no_mlp: list[bool], lin_mlp: list[bool]) -> list[bool]:
    """The layers whose dropped (unpatched) MLP is written as the all-zero feed-forward of _zero_ffn.

    Under a kept or patched attention: deci's `if (n_ff == 0) continue;` would skip the attention's residual add.
    In the last layer whatever its attention: there the `continue` also skips the step that picks the output rows
    (``ggml_get_rows(cur, inp_out_ids)``), so llama.cpp's output-ids input is left out of the graph and the first
    evaluation aborts (``GGML_ASSERT(buffer)`` in ggml-backend.cpp; llama-cpp-python 0.3.36, measured).
    """
    last = len(no_mlp) - 1
    return [m and not lm and (not a or i == last) for i, (a, m, lm) in enumerate(zip(zero_attn, no_mlp, lin_mlp))]


def _zero_ffn(i: int, hidden: int) -> list[tuple[str, torch.Tensor]]:
    """The feed-forward of width ZERO_FFN_WIDTH that stands for a dropped MLP under a kept attention."""
    return [(f"blk.{i}.ffn_norm.weight", torch.ones(hidden)),
            (f"blk.{i}.ffn_gate.weight", torch.zeros(ZERO_FFN_WIDTH, hidden)),
            (f"blk.{i}.ffn_up.weight", torch.zeros(ZERO_FFN_WIDTH, hidden)),
            (f"blk.{i}.ffn_down.weight", torch.zeros(hidden, ZERO_FFN_WIDTH))]


def _linear_ffn(i: int, weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The SwiGLU feed-forward that computes an MLP patch's ``W x`` exactly (see LINEAR_FFN_GATE); ffn_norm is the
    kept MLP norm."""
    d = weight.shape[0]
    return [(f"blk.{i}.ffn_up.weight", weight),
            (f"blk.{i}.ffn_gate.weight", torch.zeros(d, d)),
            (f"blk.{i}.ffn_gate.bias", torch.full((d,), LINEAR_FFN_GATE)),
            (f"blk.{i}.ffn_down.weight", torch.eye(d) / LINEAR_FFN_GATE)]


# Tensors of the exact stand-ins that must stay float32 whatever the outtype (a quantized 1/32 is no longer exact).
_EXACT = ("ffn_gate.weight", "ffn_down.weight")


def _tensors(model: nn.Module, layers_path: str, config, no_attn: list[bool], no_mlp: list[bool],
             lin_attn: list[bool] | None = None, lin_mlp: list[bool] | None = None,
             permute: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Every tensor under its llama.cpp name, stand-ins included; q / k (weights and biases) permuted for the NORM
    rotary layout of llama.cpp's llama and deci graphs unless `permute` is False (qwen2's own graph is NEOX)."""
    lin_attn = lin_attn or [False] * len(no_attn)
    lin_mlp = lin_mlp or [False] * len(no_mlp)
    zero_attn = [a and not lin for a, lin in zip(no_attn, lin_attn)]
    n_head, n_kv, _ = head_counts(config)
    state = model.state_dict()
    prefix = layers_path + "."
    tensors: list[tuple[str, torch.Tensor]] = [("token_embd.weight", state["model.embed_tokens.weight"]),
                                               ("output_norm.weight", state["model.norm.weight"])]
    if not getattr(config, "tie_word_embeddings", False):
        tensors.append(("output.weight", state["lm_head.weight"]))
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        i, _, rest = key[len(prefix):].partition(".")
        if rest == "mlp.linear_mlp.weight":
            tensors += _linear_ffn(int(i), value)
            continue
        if rest not in _LAYER_TENSORS:
            raise LlmdropError(f"tensor {key} has no llama.cpp name; this model is not plain llama-shaped")
        if permute and rest in _ROTARY:
            value = _rope_permute(value, n_head if _ROTARY[rest] == "q" else n_kv)
        tensors.append((f"blk.{i}.{_LAYER_TENSORS[rest]}", value))
    if zero_attn[0]:
        tensors += _layer0_stand_in(config.hidden_size)
    for i, zero in enumerate(_zero_ffn_layers(zero_attn, no_mlp, lin_mlp)):
        if zero:
            tensors += _zero_ffn(i, config.hidden_size)
    return tensors


@dataclass(frozen=True)
class FamilyWriter:
    """How one family becomes a llama.cpp architecture: everything that differs between families is here.

    `drops` is (no_attn, no_mlp, lin_attn, lin_mlp), per kept layer (see _hparams)."""

    arch: Callable  # (config, drops) -> the llama.cpp architecture; raises for what it cannot express
    hparams: Callable  # (writer, config, drops, outtype) -> None
    tensors: Callable  # (model, layers_path, config, drops) -> [(llama.cpp name, tensor)]
    exact: Callable = lambda drops: set()  # tensor names that must stay float32 whatever the outtype
    tokenizer_pre: str = "default"  # tokenizer.ggml.pre for a vocabulary built from the HF tokenizer


def _llama_arch(config, drops) -> str:
    no_attn, no_mlp = drops[:2]
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in layer_types(config):
        # Mistral 7B v0.1: the file is right up to the window, so it is written, with a warning rather than refused
        log.warning("llama.cpp's llama and deci graphs attend to every position; this model's sliding window of %d "
                    "tokens is not written, so the GGUF matches it only up to %d tokens of context", window, window)
    return "deci" if any(no_attn) or any(no_mlp) else "llama"


def _llama_hparams(writer, config, drops, outtype: str) -> None:
    no_attn, no_mlp, lin_attn, lin_mlp = drops
    _hparams(writer, config, len(no_attn), no_attn, no_mlp, outtype, lin_attn, lin_mlp)


def _llama_tensors(model: nn.Module, layers_path: str, config, drops) -> list[tuple[str, torch.Tensor]]:
    return _tensors(model, layers_path, config, *drops)


def _llama_exact(drops) -> set[str]:
    return {f"blk.{i}.{t}" for i, lin in enumerate(drops[3]) if lin for t in _EXACT}


def _gemma3_arch(config, drops) -> str:
    gguf_gemma3.check_drops(*drops[:2])
    gguf_gemma3.check_config(config)
    return gguf_gemma3.ARCH


def _gemma3_hparams(writer, config, drops, outtype: str) -> None:
    _common_hparams(writer, config, outtype)
    gguf_gemma3.hparams(writer, config, len(drops[0]))


def _gemma3_tensors(model: nn.Module, layers_path: str, config, drops) -> list[tuple[str, torch.Tensor]]:
    return gguf_gemma3.tensors(model, layers_path, config)


def _qwen2_arch(config, drops) -> str:
    """deci for attention / MLP drops, else llama.cpp's own qwen2 graph."""
    kinds = sorted(set(layer_types(config)) - {"full_attention"})
    if kinds:
        raise LlmdropError(f"llama.cpp's deci and qwen2 graphs attend to every position in every layer; this Qwen2 "
                           f"model has {', '.join(kinds)} layers (use_sliding_window), which they cannot express")
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise LlmdropError(f"GGUF export of a Qwen2 model writes plain rotary embeddings; this model's '{kind}' "
                           "rope scaling is not written yet")
    if config.hidden_act != "silu":
        raise LlmdropError(f"llama.cpp's deci and qwen2 graphs use the SiLU-gated MLP, not {config.hidden_act}")
    return _llama_arch(config, drops).replace("llama", "qwen2")


def _qwen2_tensors(model: nn.Module, layers_path: str, config, drops) -> list[tuple[str, torch.Tensor]]:
    return _tensors(model, layers_path, config, *drops, permute=_qwen2_arch(config, drops) == "deci")


_LLAMA_WRITER = FamilyWriter(_llama_arch, _llama_hparams, _llama_tensors, _llama_exact)
# arch.py family -> writer; the keys are families.GGUF_FAMILIES.
FAMILY_WRITERS: dict[str, FamilyWriter] = {
    "llama": _LLAMA_WRITER,
    "mistral": _LLAMA_WRITER,
    "qwen2": FamilyWriter(_qwen2_arch, _llama_hparams, _qwen2_tensors, _llama_exact, tokenizer_pre="qwen2"),
    "gemma3_text": FamilyWriter(_gemma3_arch, _gemma3_hparams, _gemma3_tensors),
}


def _common_hparams(writer, config, outtype: str) -> None:
    writer.add_name(str(getattr(config, "_name_or_path", "") or "llmdrop model"))
    _file_type(writer, outtype)


# Tensors with one row per vocabulary entry: llama.cpp wants exactly as many rows as the tokenizer has tokens.
_VOCAB_ROWS = ("token_embd.weight", "output.weight")


def _fit_vocab(name: str, value: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Drop the embedding / output rows past the tokenizer's last token (ids no text can produce), as llama.cpp's
    own converter does for Gemma-3; fewer rows than tokens cannot load."""
    if name not in _VOCAB_ROWS or value.shape[0] == n_tokens:
        return value
    if value.shape[0] < n_tokens:
        raise LlmdropError(f"the tokenizer has {n_tokens} tokens but {name} only {value.shape[0]} rows; llama.cpp "
                           "needs one row per token")
    return value[:n_tokens]


def export_gguf(model: nn.Module, tokenizer, out: str | Path, outtype: str = "f32",
                source_gguf: str | Path | None = None, overwrite: bool = False, threads: int | None = None) -> Path:
    """Write `model` as a GGUF file at `out` (atomically). Tokenizer metadata comes from `source_gguf` when given
    (the file the model was converted from), else from the HF tokenizer.

    f32, f16 and q8_0 are written here; the k-quant mixtures (families.QUANTIZED) are a float32 GGUF written beside
    `out` and quantized by llama.cpp's own quantizer (`threads`: its threads, None for every core this process
    may use) into the output; the float32 file is removed either way."""
    check_outtype(outtype)
    arch = arch_for(model)
    if arch.family in NO_GGUF_ROUTE:
        raise LlmdropError(NO_GGUF_ROUTE[arch.family])
    check_exportable(arch.family, "GGUF export (llama.cpp's llama / deci / gemma3 architectures)", GGUF_FAMILIES)
    family = FAMILY_WRITERS[arch.family]
    if source_gguf is None and tokenizer is None:
        raise LlmdropError("GGUF export needs the tokenizer (or the source .gguf) for its vocabulary")
    config = model.config.get_text_config(decoder=True)
    no_attn, no_mlp = dropped_flags(model, arch)
    lin_attn, lin_mlp = patched_flags(model, arch)
    drops = (no_attn, no_mlp, lin_attn, lin_mlp)
    llama_arch = family.arch(config, drops)  # refuses what the family's llama.cpp graph cannot express
    tensors = family.tensors(model, arch.layers, config, drops)
    exact = family.exact(drops)

    def write(path: Path, tensor_type: str) -> None:
        _write(path, llama_arch, family, config, drops, tensors, exact, tensor_type, tokenizer, source_gguf)

    with atomic_file(out, overwrite) as tmp:
        if outtype not in QUANTIZED:
            write(tmp, outtype)
        else:
            # Beside the output and under its partial name, so a killed export leaves nothing the next one keeps.
            whole = tmp.with_name(tmp.name + "-f32")
            try:
                write(whole, "f32")
                quantize(whole, tmp, outtype, keep_f32=exact, threads=threads)
            finally:
                whole.unlink(missing_ok=True)
    return Path(out).expanduser()


def _write(path: Path, llama_arch: str, family: FamilyWriter, config, drops, tensors, exact: set[str], outtype: str,
           tokenizer, source_gguf) -> None:
    """One GGUF file at `path` with every tensor in `outtype` (f32, f16 or q8_0), the exact ones in float32."""
    import gguf

    writer = gguf.GGUFWriter(str(path), llama_arch)
    try:
        family.hparams(writer, config, drops, outtype)
        if source_gguf is not None:
            n_tokens = _copy_tokenizer_fields(writer, Path(source_gguf))
        else:
            n_tokens = _hf_tokenizer_fields(writer, tokenizer, family.tokenizer_pre)
        # The embedding rows are cut to the tokenizer's tokens (below): the vocabulary size must say the same,
        # or readers that trust it (transformers' GGUF loader) expect rows the file does not hold.
        writer.add_vocab_size(n_tokens)
        for tname, value in tensors:
            array, qtype = _array(_fit_vocab(tname, value, n_tokens), "f32" if tname in exact else outtype, tname)
            if qtype is None:
                writer.add_tensor(tname, array)
            else:
                writer.add_tensor(tname, array, raw_dtype=qtype)  # the shape is read from the quantized bytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def source_gguf_of(spec: str, config, cache_dir: str | Path | None = None) -> Path | None:
    """The GGUF file a model came from (an alias or a .gguf path, for itself or for the model it was pruned from)."""
    from ..models import ALIASES
    from ..pruned_model import record_of

    for candidate in (spec, record_of(config).get("source_model")):
        if not candidate:
            continue
        if candidate in ALIASES:
            return ALIASES[candidate].path(cache_dir)
        if str(candidate).endswith(".gguf") and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    return None
