"""Speed and memory of several models in one run: prefill and decode tokens/s with the KV cache, KV bytes, sizes.

Settings are interleaved across models and repeated; figures are medians, and ratios are against the first model,
so a noisy shared machine hurts every model alike. Decoding feeds one token at a time with the cache, as
generation does.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LlmdropError
from .surgery import count_parameters

log = logging.getLogger(__name__)


def _cache_kwarg(model: nn.Module) -> str:
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


def decode(model: nn.Module, logits: torch.Tensor, cache, steps: int,
           on_step: Callable[[object], None] | None = None) -> torch.Tensor:
    """Greedy decoding of `steps` tokens, one at a time, reusing and growing `cache`. Returns the new tokens."""
    tokens = []
    key = _cache_kwarg(model)
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        out = model(input_ids=nxt, use_cache=True, **{key: cache})
        logits = out.logits[:, -1]
        if on_step is not None:
            on_step(cache)
    return torch.cat(tokens, dim=1)


def kv_bytes(cache) -> int:
    """Bytes of keys and values held by a cache object."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def kv_bytes_formula(model: nn.Module, batch: int, context: int) -> int:
    """2 (K and V) x batch x tokens kept x KV heads x head dim x bytes, summed over the kept attention layers."""
    from .arch import arch_for
    from .pruned_model import DroppedAttention

    arch = arch_for(model)
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    elem = next(model.parameters()).element_size()
    total = 0
    for layer, kind in zip(model.get_submodule(arch.layers), types):
        if isinstance(layer.get_submodule(arch.attn), DroppedAttention):
            continue
        # A sliding-window layer keeps the last window-1 tokens: with the new one that makes the window.
        tokens = min(context, config.sliding_window - 1) if "sliding" in kind and config.sliding_window else context
        total += 2 * batch * tokens * kv_heads * head_dim * elem
    return total


@dataclass
class BenchRow:
    model: str
    context: int
    batch: int
    prefill_tok_s: float
    decode_tok_s: float
    kv_bytes: int
    kv_bytes_formula: int
    params: int
    prefill_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)


def run_bench(
    models: list[tuple[str, nn.Module]],
    contexts: list[int],
    batches: list[int],
    new_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = True,
    seed: int = 0,
) -> list[BenchRow]:
    """Median prefill / decode throughput per (model, context, batch); every repeat visits every model in turn."""
    check_settings(contexts, batches, new_tokens, repeats)
    settings = [(c, b) for c in contexts for b in batches]
    timings: dict[tuple, dict[str, list[float]]] = {}
    kv: dict[tuple, tuple[int, int]] = {}
    total = (warmup + repeats) * len(settings) * len(models)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    with torch.inference_mode():
        for rep in range(warmup + repeats):
            for context, batch in settings:
                g = torch.Generator().manual_seed(seed + context + batch)
                for name, model in models:
                    vocab = model.config.get_text_config(decoder=True).vocab_size
                    ids = torch.randint(10, vocab, (batch, context), generator=g)
                    ids = ids.to(next(model.parameters()).device)
                    t0 = time.perf_counter()
                    logits, cache = prefill(model, ids)
                    t1 = time.perf_counter()
                    if rep == 0:
                        kv[(name, context, batch)] = (kv_bytes(cache), kv_bytes_formula(model, batch, context))
                    decode(model, logits, cache, new_tokens)
                    t2 = time.perf_counter()
                    bar.update()
                    if rep < warmup:
                        continue
                    slot = timings.setdefault((name, context, batch), {"prefill": [], "decode": []})
                    slot["prefill"].append(batch * context / (t1 - t0))
                    slot["decode"].append(batch * new_tokens / (t2 - t1))
    bar.close()
    rows = []
    for name, model in models:
        for context, batch in settings:
            t = timings[(name, context, batch)]
            measured, formula = kv[(name, context, batch)]
            rows.append(BenchRow(name, context, batch, statistics.median(t["prefill"]), statistics.median(t["decode"]),
                                 measured, formula, count_parameters(model), t["prefill"], t["decode"]))
    return rows


def check_settings(contexts: Sequence[int], batches: Sequence[int], new_tokens: int, repeats: int) -> None:
    """Every length and count must be a whole number >= 1: a 0 would end in a reshape error or a missing median."""
    for param, values in (("contexts", contexts), ("batches", batches), ("new_tokens", [new_tokens]),
                          ("repeats", [repeats])):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad or not values:
            raise LlmdropError(f"{{{param}}} must be whole numbers of at least 1 (got {bad[0] if bad else 'none'!r})",
                               params=[param])


def ratios(rows: list[BenchRow]) -> list[dict]:
    """Each row against the first model's row at the same setting."""
    base = {(r.context, r.batch): r for r in rows if r.model == rows[0].model}
    out = []
    for r in rows:
        b = base[(r.context, r.batch)]
        out.append({**asdict(r), "prefill_ratio": r.prefill_tok_s / b.prefill_tok_s,
                    "decode_ratio": r.decode_tok_s / b.decode_tok_s, "kv_ratio": r.kv_bytes / b.kv_bytes,
                    "params_ratio": r.params / b.params})
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_peak_rss(spec: str, dtype: str, context: int, batch: int, new_tokens: int, queue,
                    cache_dir: str | None = None) -> None:
    from .models import load_model

    model, _ = load_model(spec, dtype=dtype, progress=False, cache_dir=cache_dir)
    with torch.inference_mode():
        ids = torch.randint(10, model.config.get_text_config(decoder=True).vocab_size, (batch, context))
        logits, cache = prefill(model, ids)
        decode(model, logits, cache, new_tokens)
    queue.put(peak_rss_bytes())


def peak_rss_of(spec: str, dtype: str, context: int, batch: int, new_tokens: int,
                cache_dir: str | Path | None = None) -> int:
    """Peak RSS of a fresh process that loads `spec` and runs one prefill + decode: one model's memory alone."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak_rss, args=(spec, dtype, context, batch, new_tokens, queue,
                                                     None if cache_dir is None else str(cache_dir)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory probe for {spec} failed (exit code {proc.exitcode})")
    return queue.get()


def decode_speed_ratio(model: nn.Module, base: nn.Module, context: int, new_tokens: int,
                       repeats: int) -> tuple[float, int, int]:
    """Decode tokens/s of `model` over `base` (interleaved, medians after a warm-up), and the KV bytes of `model`
    and of `base` at `context` tokens, batch 1: `run_bench` on the two models, reduced to what a report needs."""
    rows = run_bench([("base", base), ("model", model)], [context], [1], new_tokens, repeats, progress=False)
    base_row, model_row = rows
    return model_row.decode_tok_s / base_row.decode_tok_s, model_row.kv_bytes, base_row.kv_bytes


def compare(
    specs: Sequence[str],
    contexts: Sequence[int] = (512,),
    batches: Sequence[int] = (1,),
    new_tokens: int = 128,
    repeats: int = 3,
    memory: bool = True,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    output: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """The `llmdrop bench` job: load every model in `specs`, bench them interleaved (`run_bench`), and return one
    dict per (model, context, batch) with ratios to the first model, checkpoint bytes and (`memory`) the peak RSS
    of a fresh process per model. Written to `output` as JSON when given; settings and the output location are
    checked before any model loads.
    """
    from .files import check_output, write_json
    from .models import load_model, resolve
    from .report import dir_bytes

    if not specs:
        raise LlmdropError("nothing to compare: give at least one model in {specs}", params=["specs"])
    contexts, batches = list(contexts), list(batches)
    check_settings(contexts, batches, new_tokens, repeats)
    if output is not None:
        check_output(output, overwrite=True, kind="file")  # a result file is replaced, as measure's
    models = [(spec, load_model(spec, dtype=dtype, progress=progress, cache_dir=cache_dir)[0]) for spec in specs]
    rows = ratios(run_bench(models, contexts, batches, new_tokens, repeats, progress=progress))
    del models  # the memory probes below run in fresh processes; the bench models are no longer needed here
    for row in rows:
        where = resolve(row["model"], progress=False, cache_dir=cache_dir)
        row["checkpoint_bytes"] = dir_bytes(where) if isinstance(where, Path) else None
    if memory:
        peak = {spec: peak_rss_of(spec, dtype, max(contexts), max(batches), new_tokens, cache_dir) for spec in specs}
        for row in rows:
            row["peak_rss_bytes"] = peak[row["model"]]
    for r in rows:
        if r["kv_bytes"] != r["kv_bytes_formula"]:
            log.warning("%s: KV bytes %d differ from the formula %d", r["model"], r["kv_bytes"], r["kv_bytes_formula"])
    if output is not None:
        write_json(output, {"rows": rows, "new_tokens": new_tokens, "repeats": repeats, "dtype": dtype})
        log.info("rows written to %s", output)
    return rows
