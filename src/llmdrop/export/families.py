"""Which model families the export formats can express (shared by the formats; the package entry point imports them)."""

from __future__ import annotations

from ..errors import LlmdropError

# The families whose layers llama.cpp's llama / deci graphs and vLLM's Nemotron-NAS loader express: llama-shaped
# projections and norms, no sandwich norms, no per-head norms.
EXPORTABLE = ("llama", "mistral")


def check_exportable(family: str, what: str) -> None:
    """Refuse a family that `what` (a format's description) cannot express."""
    if family not in EXPORTABLE:
        raise LlmdropError(f"{what} supports the {' and '.join(EXPORTABLE)} families; '{family}' cannot be expressed "
                           "that way yet")
