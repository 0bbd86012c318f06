"""Decoding with the KV cache, as generation does: one prefill of the prompt, then greedy steps of one token each.

The primitives under the bench, the passkey task and the decode profile. Only the last position's logits are
computed, and the steppers of several models can take turns (`interleaved`) so that a slow spell of a shared machine
falls on all of them alike. Nothing here knows about llmdrop's jobs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

TURN_TOKENS = 16  # decode steps a model takes per turn (see `interleaved`)


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model.forward` takes the KV cache."""
    # transformers 5.24 renamed `past_key_values` to `cache`; earlier 5.x releases only know the old name.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model: nn.Module, ids: torch.Tensor):
    """Run the prompt once, filling a fresh cache; returns (last logits, cache).

    Like generation, only the last position's logits are computed: the full [batch, context, vocab] tensor would
    dominate both time and memory (3 GiB for SmolLM2 at batch 8 x 2048) and hide what the KV cache costs.
    """
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, use_cache=True, **extra)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.logits[:, -1], cache


def decode_step(model: nn.Module, logits: torch.Tensor, cache) -> Callable[[], torch.Tensor]:
    """Greedy decoding with `cache`, one token per call: each call feeds the argmax of the last logits, grows the
    cache and returns the token it fed."""
    key = cache_kwarg(model)
    state = {"logits": logits}

    def step() -> torch.Tensor:
        nxt = state["logits"].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, use_cache=True, **{key: cache})
        state["logits"] = out.logits[:, -1]
        return nxt

    return step


def decode(model: nn.Module, logits: torch.Tensor, cache, steps: int,
           on_step: Callable[[object], None] | None = None) -> torch.Tensor:
    """Greedy decoding of `steps` tokens, one at a time, reusing and growing `cache`. Returns the new tokens."""
    step = decode_step(model, logits, cache)
    tokens = []
    for _ in range(steps):
        tokens.append(step())
        if on_step is not None:
            on_step(cache)
    return torch.cat(tokens, dim=1)


def interleaved(steps: Sequence[Callable[[], object]], n: int, turn: int = TURN_TOKENS) -> list[float]:
    """Seconds each stepper spent taking `n` steps, the steppers taking turns of `turn` steps each (the last turn may
    be shorter); the first to go rotates from round to round, so no stepper always follows the same one.

    Turns of several steps rather than one: switching models every token costs each step a little (the next model's
    weights and cache are cold), which weighs more on a faster model and shrinks its measured speedup."""
    spent = [0.0] * len(steps)
    for r, start in enumerate(range(0, n, turn)):
        for k in range(len(steps)):
            i = (r + k) % len(steps)
            t0 = time.perf_counter()
            for _ in range(min(turn, n - start)):
                steps[i]()
            spent[i] += time.perf_counter() - t0
    return spent


def kv_bytes(cache) -> int:
    """Bytes of keys and values held by a cache object."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
