"""What the export formats can express: model families and GGUF tensor types (shared by the formats and the
command line; torch-free)."""

from __future__ import annotations

from ..errors import LlmdropError

# The families whose layers llama.cpp's llama / deci graphs and vLLM's Nemotron-NAS loader express: llama-shaped
# projections and norms, no sandwich norms, no per-head norms. These take attention / MLP drops too.
EXPORTABLE = ("llama", "mistral")
# llama.cpp's deci graph also loads optional q / k / v biases: in GGUF, Qwen2 / Qwen2.5 takes attention / MLP drops
# and linear patches as well.
GGUF_SUBLAYER_FAMILIES = (*EXPORTABLE, "qwen2")
# GGUF takes these plus Gemma-3 (llama.cpp's gemma3 architecture, block drops only); export/gguf.py has one writer
# per family (FAMILY_WRITERS).
GGUF_FAMILIES = (*GGUF_SUBLAYER_FAMILIES, "gemma3_text")
# Families llama.cpp runs that have no GGUF route from llmdrop, and why: the error points to vLLM.
NO_GGUF_ROUTE = {
    "qwen3": "llmdrop writes no GGUF for Qwen3: llama.cpp's deci graph, the one that skips dropped attention and MLPs, "
             "has no per-head q / k norms, and its qwen3 graph computes every layer's attention and MLP; serve the "
             "pruned checkpoint with vLLM instead (see the deployment table in docs/deployment.md)",
}
# The GGUF tensor types (`--outtype`, `--gguf-outtype`): the writer produces f32, f16 and q8_0 itself; QUANTIZED are
# llama.cpp's k-quant mixtures, made by its own quantizer from a float32 GGUF (export/quantize.py).
QUANTIZED = ("q6_k", "q5_k_m", "q4_k_m")
OUTTYPES = ("f32", "f16", "q8_0", *QUANTIZED)


def _listed(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_exportable(family: str, what: str, families: tuple[str, ...] = EXPORTABLE) -> None:
    """Refuse a family that `what` (a format's description) cannot express; `families` are those it can."""
    if family not in families:
        raise LlmdropError(f"{what} supports the {_listed(families)} families; '{family}' cannot be expressed "
                           "that way yet")
