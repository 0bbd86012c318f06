"""llama.cpp, through llama-cpp-python (optional: imported inside the functions that use it): the runtime the bench
times GGUF exports in, and the per-layer, per-kind decode profile of a GGUF model read through the graph evaluation
callback.

The runtime: `load_llama` opens a GGUF (flash attention on, batch 1, `threads` for decode and prompt alike),
`llama_prefill` times a prompt from an empty cache, and `llama_step` is one greedy token per call, the stepper the
bench's turns take (decoding.interleaved).

The profile: llama.cpp's scheduler asks an eval callback (``cb_eval`` of the context parameters) about every node of
the compute graph before computing it; a node the callback asks for ends a stretch of nodes that is computed as one
piece, after which the callback runs again. We ask for the node that ends each sublayer, by the names llama.cpp's graph
builders give them (``attn_norm-<i>``, ``kqv_out-<i>``, ``attn_out-<i>``, ``ffn_norm-<i>``, ``ffn_out-<i>``,
``l_out-<i>``, ``result_norm``, ``result_output``, ...), and read ``time.perf_counter()`` each time one completes: the
time since the previous boundary belongs to that sublayer. Layers without attention (llama.cpp's deci graph) simply
have no attention boundary, and a linear attention ends at ``wo-<i>``. Graph building, scheduling and everything after
the last boundary is "other", as are residual adds.

The boundaries cost something: llama.cpp computes the graph in ~150 pieces instead of one, and the callback runs
once per node (in Python). `Profile.step_ms` is the profiled step; compare it with an unprofiled decode (bench)
to see the overhead. Shares are taken within the profiled run, where every kind pays the same kind of cost.

The result is a `profile.Profile`, so `profile.dropped_set` / `ideal_for` give the ideal speedup of a drop on a
llama.cpp base profile exactly as on a transformers one.
"""


from __future__ import annotations

import ctypes
import importlib.util
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import LlmdropError
from .profile import KINDS, Profile

# ---- the runtime ----------------------------------------------------------------------------------------------------

def check_llama_cpp() -> None:
    """The llama.cpp runtime needs llama-cpp-python; a clear error when it is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LlmdropError("the llama.cpp runtime needs llama-cpp-python, which is not installed: pip install "
                           "llama-cpp-python (bash scripts/setup.sh --test builds it), or leave llama.cpp out of "
                           "{runtimes}", params=["runtimes"])


def load_llama(path: str | Path, n_ctx: int, threads: int | None):
    """llama-cpp-python's Llama for the GGUF at `path`: `n_ctx` tokens, flash attention, `threads` for both decode
    and prompt (None: llama.cpp's default)."""
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, flash_attn=True,
                 logits_all=False, verbose=False, seed=0)


def random_ids(vocab: int, batch: int, context: int, seed: int) -> torch.Tensor:
    """The bench's random prompt tokens for a setting (ids below 10 are left out: special tokens in most vocabularies)."""
    g = torch.Generator().manual_seed(seed + context + batch)
    return torch.randint(10, vocab, (batch, context), generator=g)


def llama_prefill(llm, ids: torch.Tensor) -> float:
    """Prefill `ids` from an empty cache; seconds."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids.tolist())
    return time.perf_counter() - t0


def llama_step(llm) -> Callable[[], None]:
    """One greedy token at a time after `llama_prefill`, each call one step."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()

    def step() -> None:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        llm.eval([int(logits.argmax())])

    return step


# ---- the decode profile ---------------------------------------------------------------------------------------------

# Which sublayer a boundary node ends: per-layer slot (as in Profile.layers) or a whole-model kind.
LAYER_BOUNDARIES = {
    "attn_norm": "attn_norms",
    "attn_post_norm": "attn_norms",  # gemma-style post-norms
    "kqv_out": "attention",  # attention's result (deci: after the output projection too)
    "attn_out": "attention",
    "wo": "attention",  # deci linear attention: the one matmul
    "ffn_inp": "other",  # residual add after attention
    "sa_out": "other",
    "ffn_norm": "mlp_norms",
    "ffn_out": "mlp",
    "ffn_post_norm": "mlp_norms",
    "l_out": "other",  # residual add after the MLP
}
MODEL_BOUNDARIES = {"embd": "other", "inp_embd": "other", "result_norm": "norms", "result_output": "lm_head"}
_LAYER_NAME = re.compile(r"^(?P<name>[a-z_]+)-(?P<layer>\d+)$")
_SLOT_KIND = {"attention": "attention", "attn_norms": "norms", "mlp": "mlp", "mlp_norms": "norms", "other": "other"}


def boundary(name: str) -> tuple[str, int | None] | None:
    """(slot or kind, layer index or None) when a graph node named `name` ends a sublayer, else None."""
    if name in MODEL_BOUNDARIES:
        return MODEL_BOUNDARIES[name], None
    m = _LAYER_NAME.match(name)
    if m and m["name"] in LAYER_BOUNDARIES:
        return LAYER_BOUNDARIES[m["name"]], int(m["layer"])
    return None


class _Recorder:
    """The eval callback's state: seconds per layer slot and per kind while `on`."""

    def __init__(self, n_layers: int, get_name) -> None:
        self.on = False
        self.get_name = get_name
        self.last = 0.0
        self.layers = {slot: [0.0] * n_layers for slot in ("layer", "attention", "attn_norms", "mlp", "mlp_norms")}
        self.seconds = dict.fromkeys(KINDS, 0.0)

    def __call__(self, tensor: int, ask: bool, _user) -> bool:
        if not self.on:
            return not ask  # ask: compute everything in one piece; after a piece: carry on
        where = self._where(tensor)
        if ask:
            return where is not None
        now = time.perf_counter()
        spent, self.last = now - self.last, now
        slot, layer = where
        if layer is None:
            self.seconds[slot] += spent
        else:
            self.seconds[_SLOT_KIND[slot]] += spent
            self.layers["layer"][layer] += spent
            if slot != "other":
                self.layers[slot][layer] += spent
        return True

    def _where(self, tensor: int):
        # Node addresses are reused between graphs with other names, so the name is read every time.
        return boundary(self.get_name(tensor).decode(errors="replace"))


def profile_llama_decode(gguf: str | Path, context: int, steps: int = 16, threads: int | None = None,
                         seed: int = 0) -> Profile:
    """Time `steps` greedy decode steps of the GGUF model at `gguf` after a `context`-token random prompt (not
    timed), per layer and module kind (see the module docstring). Flash attention on, batch 1, `threads` for both
    decode and prompt (None: llama.cpp's default)."""
    import llama_cpp
    import numpy as np
    from llama_cpp._ggml import libggml

    check_llama_cpp()
    if steps < 1 or context < 1:
        raise LlmdropError("profile settings (context, steps) must be whole numbers of at least 1")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load messages: errors only
    get_name = libggml.ggml_get_name
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise LlmdropError(f"llama.cpp could not load {gguf}")
    n_layers = llama_cpp.llama_model_n_layer(model)
    recorder = _Recorder(n_layers, get_name)
    callback = llama_cpp.ggml_backend_sched_eval_callback(recorder)  # kept alive until the context is freed
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = context + steps + 8
    params.n_batch = params.n_ubatch = min(512, params.n_ctx)
    if threads:
        params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.no_perf = True
    params.cb_eval = callback
    ctx = llama_cpp.llama_init_from_model(model, params)
    try:
        if not ctx:
            raise LlmdropError(f"llama.cpp could not make a context of {params.n_ctx} tokens for {gguf}")
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

        def decode(tokens: list[int]) -> None:
            arr = (llama_cpp.llama_token * len(tokens))(*tokens)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
                raise LlmdropError(f"llama.cpp failed to decode with {gguf}")

        def next_token() -> int:
            return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,)).argmax())

        rng = np.random.default_rng(seed + context)
        prompt = rng.integers(10, vocab, context).tolist()
        for start in range(0, context, params.n_batch):
            decode(prompt[start:start + params.n_batch])
        decode([next_token()])  # one untimed step: one-off costs of the first single-token graph
        total = 0.0
        recorder.on = True
        for _ in range(steps):
            token = next_token()
            t0 = recorder.last = time.perf_counter()
            decode([token])
            end = time.perf_counter()
            recorder.seconds["other"] += end - recorder.last  # after the last boundary: output copy, sync
            total += end - t0
        recorder.on = False
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return Profile(context, 1, steps, total, dict(recorder.seconds), recorder.layers)
