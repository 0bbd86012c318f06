"""k-quant GGUF exports through llama.cpp's own quantizer (llama-cpp-python's ``llama_model_quantize``).

The GGUF writer (gguf.py) writes float32 GGUFs itself and q8_0 with the `gguf` package's port of ggml's Q8_0; the
k-quant mixtures (q6_k, q5_k_m, q4_k_m) are llama.cpp's: which tensor gets which type depends on the tensor's role
and layer (Q4_K_M gives attn_v and half the ffn_down Q6_K, output.weight Q6_K, ...), and the quantizer is the only
place that rule lives, so a float32 GGUF is written first and handed to it. Torch-free; llama_cpp is imported only
when a quantization runs.

What a type cannot hold: llama.cpp's quantizer itself falls back for a tensor whose rows are not a multiple of the
type's block (256 for k-quants: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, rows that are not a multiple of 32 either
-> F16; llama-quant.cpp, tensor_type_fallback), so a patch narrower than 256 is still written, in a 32-block type.
The writer's exact stand-ins (the 1/32 identity of an MLP patch's feed-forward, gguf.py's _EXACT) must stay float32
whatever the mixture: each is named in the quantizer's tensor-type overrides (``tt_overrides``) as F32. 1-D tensors
and norms are never quantized by llama.cpp.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import LlmdropError
from ..files import literal
from .families import OUTTYPES, QUANTIZED

log = logging.getLogger("llmdrop")

# families.QUANTIZED -> the llama_ftype llama.cpp's quantizer takes (include/llama.h)
FTYPES = {"q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
_FALLBACKS = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


def check_outtype(outtype: str) -> None:
    """Refuse, before any work, an out type the GGUF export does not know or cannot produce here."""
    if outtype not in OUTTYPES:
        raise LlmdropError(f"unknown outtype '{literal(outtype)}'; {{outtype}} must be one of {', '.join(OUTTYPES)}",
                           params=["outtype"])
    if outtype in QUANTIZED and importlib.util.find_spec("llama_cpp") is None:
        plain = [t for t in OUTTYPES if t not in QUANTIZED]
        raise LlmdropError(f"{{outtype}} {outtype} quantizes with llama.cpp's quantizer, which needs llama-cpp-python: "
                           "pip install llama-cpp-python (bash scripts/setup.sh --test builds it), or choose {outtype} "
                           f"{', '.join(plain[:-1])} or {plain[-1]}", params=["outtype"])


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def quantize(src: str | Path, dst: str | Path, outtype: str, keep_f32: Iterable[str] = (),
             threads: int | None = None) -> int:
    """Quantize the float32 / float16 GGUF `src` into `dst` with llama.cpp's `outtype` mixture (a row of FTYPES);
    the tensors named in `keep_f32` stay float32. Returns how many tensors llama.cpp had to give another type
    because their rows do not fit the type's blocks. llama.cpp's log goes to the debug log, its error into the
    LlmdropError when it fails."""
    import llama_cpp
    from llama_cpp import _logger

    check_outtype(outtype)
    if outtype not in FTYPES:
        raise LlmdropError(f"{{outtype}} {outtype} is written by the GGUF writer, not llama.cpp's quantizer",
                           params=["outtype"])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[outtype])
    params.nthread = threads or _threads()
    # One override per exact tensor, anchored: the quantizer applies the first pattern that matches (std::regex).
    names = sorted(set(keep_f32))
    overrides = (llama_cpp.llama_model_tensor_override * (len(names) + 1))()
    patterns = [f"^{re.escape(name)}$".encode() for name in names]  # kept alive while the quantizer runs
    for slot, pattern in zip(overrides, patterns):
        slot.pattern, slot.type = pattern, llama_cpp.GGML_TYPE_F32
    overrides[len(names)].pattern = None  # the list ends at a null pattern
    if names:
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    log.info("quantizing %s to %s with llama.cpp's quantizer (%d threads)", Path(src).name, outtype, params.nthread)
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own
    text = "".join(lines)
    log.debug("llama.cpp quantizer:\n%s", text)
    if status != 0:
        failed = [line.strip() for line in text.splitlines() if "failed" in line or "error" in line.lower()]
        why = failed[-1] if failed else f"status {status}"
        raise LlmdropError(f"llama.cpp's quantizer could not write {literal(outtype)} ({literal(why)}); choose another "
                           "{outtype}", params=["outtype"])
    found = _FALLBACKS.search(text)
    fallbacks = int(found.group(1)) if found else 0
    if fallbacks:
        log.info("%d of %s tensors have rows that are no multiple of %s's block and were given another type by "
                 "llama.cpp", fallbacks, found.group(2), outtype)
    return fallbacks
