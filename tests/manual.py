"""Hook-free reference computation: each layer's residual stream computed by hand from the module table.

Used to check that the hooks in llmdrop.measure see exactly h_in, h_mid and h_out, and that surgery leaves an exact
identity residual.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from llmdrop.arch import arch_for


def _mask(seq_len: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    return torch.zeros(seq_len, seq_len, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def branch(layer, arch, kind: str, x: torch.Tensor, decoder, ids_len: int, index: int = 0) -> tuple:
    """(normed branch input, branch output added to the residual) for one sublayer, computed by hand."""
    norms = arch.attn_norms if kind == "attn" else arch.mlp_norms
    module = layer.get_submodule(arch.attn if kind == "attn" else arch.mlp)
    normed = layer.get_submodule(norms[0])(x)
    if kind == "attn":
        pos = torch.arange(ids_len)[None]
        rotary = decoder.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            pe = rotary(x, pos, decoder.config.layer_types[index])
        else:
            pe = rotary(x, pos)
        window = getattr(module, "sliding_window", None)
        raw = module(hidden_states=normed, position_embeddings=pe, attention_mask=_mask(ids_len, window, x.dtype),
                     position_ids=pos)[0]
    else:
        raw = module(normed)
    out = raw
    for norm in norms[1:]:
        out = layer.get_submodule(norm)(out)
    return normed, raw, out


def residual_stream(model, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: h_in, h_mid, h_out, and the branches' normed inputs and raw outputs, all computed by hand."""
    arch = arch_for(model)
    decoder = model.get_submodule(arch.layers.rpartition(".")[0])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[0]  # embeddings, as the model scales them
        out = []
        for i, layer in enumerate(model.get_submodule(arch.layers)):
            a_in, a_raw, a_out = branch(layer, arch, "attn", h, decoder, ids.shape[1], i)
            mid = h + a_out
            m_in, m_raw, m_out = branch(layer, arch, "mlp", mid, decoder, ids.shape[1], i)
            h_out = mid + m_out
            out.append({"in": h, "mid": mid, "out": h_out, "attn_in": a_in, "attn_raw": a_raw, "mlp_in": m_in,
                        "mlp_raw": m_raw})
            h = h_out
    return out


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()


__all__ = ["residual_stream", "mean_cos", "F"]
