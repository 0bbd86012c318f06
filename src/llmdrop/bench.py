"""Speed and memory of several models in one run: prefill and decode tokens/s with the KV cache, KV bytes, sizes.

Settings are interleaved across models and repeated; figures are medians with the spread (min-max) of the repeats,
and ratios are against the first model, so a noisy shared machine hurts every model alike. Decoding feeds one token
at a time with the KV cache, as generation does, and is interleaved: every model holds its prefilled cache and they
take turns of TURN_TOKENS tokens each (the first to go rotating), so a slow spell of the machine falls on all of them
within one repeat instead of on whichever model it caught. Two runtimes: transformers (the models in memory) and llama.cpp
(each model's GGUF export through llama-cpp-python, flash attention on). Threads are pinned for the whole run:
``torch.set_num_threads(n)`` for transformers (restored afterwards), ``n_threads = n_threads_batch = n`` for llama.cpp.
The decoding itself is decoding.py's (prefill, greedy steps, the turns), the llama.cpp runtime llama_cpp.py's; this
module holds the two bench loops and the `llmdrop bench` job.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import check_positions, kv_bytes_per_layer, text_config
from .configs import BenchConfig
from .decoding import TURN_TOKENS, decode, decode_step, interleaved, kv_bytes, prefill
from .errors import LlmdropError
from .export import export
from .files import check_output, literal, write_json
from .llama_cpp import check_llama_cpp, llama_prefill, llama_step, load_llama, profile_llama_decode, random_ids
from .models import load_model, resolve
from .profile import dropped_set, ideal_for, profile_decode
from .report import dir_bytes, table
from .surgery import count_parameters, dropped_flags

log = logging.getLogger(__name__)



def kv_bytes_formula(model: nn.Module, batch: int, context: int) -> int:
    """2 (K and V) x batch x tokens kept x KV heads x head dim x bytes, summed over the kept attention layers
    (arch.kv_bytes_per_layer, from the config alone: an independent check of the bytes read from a real cache)."""
    elem = next(model.parameters()).element_size()
    per_layer = kv_bytes_per_layer(model.config, context, dtype_bytes=elem, batch=batch)
    attn_gone, _ = dropped_flags(model)
    return sum(size for size, gone in zip(per_layer, attn_gone) if not gone)


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
    runtime: str = "transformers"


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
    """Median prefill / decode throughput per (model, context, batch); every repeat visits every model in turn.
    A model is known by its place in `models`, not its name: one given twice is measured twice (a noise check)."""
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
                steps, prefill_s = [], []
                for i, (_, model) in enumerate(models):
                    vocab = text_config(model.config).vocab_size
                    ids = torch.randint(10, vocab, (batch, context), generator=g)
                    ids = ids.to(next(model.parameters()).device)
                    t0 = time.perf_counter()
                    logits, cache = prefill(model, ids)
                    prefill_s.append(time.perf_counter() - t0)
                    if rep == 0:
                        kv[(i, context, batch)] = (kv_bytes(cache), kv_bytes_formula(model, batch, context))
                    steps.append(decode_step(model, logits, cache))
                    bar.update()
                decode_s = interleaved(steps, new_tokens)
                del steps  # the caches go before the next setting's
                if rep < warmup:
                    continue
                for i, (t_prefill, t_decode) in enumerate(zip(prefill_s, decode_s)):
                    slot = timings.setdefault((i, context, batch), {"prefill": [], "decode": []})
                    slot["prefill"].append(batch * context / t_prefill)
                    slot["decode"].append(batch * new_tokens / t_decode)
    bar.close()
    rows = []
    for i, (name, model) in enumerate(models):
        for context, batch in settings:
            t = timings[(i, context, batch)]
            measured, formula = kv[(i, context, batch)]
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
    """Each row against the first model's row at the same setting in the same runtime, with the spread of the repeats:
    min-max of the tokens/s, and min-max of the per-repeat ratios (repeat r of a model over repeat r of the first
    model, which ran next to it in the same pass)."""
    first = rows[0].model
    base: dict[tuple, BenchRow] = {}
    for r in rows:  # the first model's own rows: a model given twice must not stand in for it
        if r.model == first:
            base.setdefault((r.runtime, r.context, r.batch), r)
    out = []
    for r in rows:
        b = base[(r.runtime, r.context, r.batch)]
        row = {**asdict(r), "prefill_ratio": r.prefill_tok_s / b.prefill_tok_s,
               "decode_ratio": r.decode_tok_s / b.decode_tok_s, "kv_ratio": r.kv_bytes / b.kv_bytes,
               "params_ratio": r.params / b.params}
        for kind in ("prefill", "decode"):
            runs, base_runs = getattr(r, f"{kind}_runs"), getattr(b, f"{kind}_runs")
            row[f"{kind}_min"], row[f"{kind}_max"] = (min(runs), max(runs)) if runs else (None, None)
            paired = [x / y for x, y in zip(runs, base_runs)] if len(runs) == len(base_runs) and runs else []
            row[f"{kind}_ratio_min"], row[f"{kind}_ratio_max"] = (min(paired), max(paired)) if paired else (None, None)
        out.append(row)
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process's own program so far.

    Linux: VmHWM from /proc/self/status, the high-water mark of this program's memory. Not ``ru_maxrss``: Linux
    carries it across fork and exec, so a spawned child would report at least its parent's resident size at the
    fork (a bench that holds three models made every child read the same 3 GiB). Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _child_peak_rss(spec: str, dtype: str, context: int, batch: int, new_tokens: int, queue,
                    cache_dir: str | None = None, threads: int | None = None, gguf: str | None = None) -> None:
    if threads:  # a fresh process of its own: pinning it changes nothing in the caller
        torch.set_num_threads(threads)
    if gguf is not None:
        llm = load_llama(gguf, context + new_tokens, threads)
        llama_prefill(llm, random_ids(llm.n_vocab(), 1, context, 0)[0])
        step = llama_step(llm)
        for _ in range(new_tokens):
            step()
        queue.put(peak_rss_bytes())
        return
    model, _ = load_model(spec, dtype=dtype, progress=False, cache_dir=cache_dir)
    with torch.inference_mode():
        ids = torch.randint(10, text_config(model.config).vocab_size, (batch, context))
        logits, cache = prefill(model, ids)
        decode(model, logits, cache, new_tokens)
    queue.put(peak_rss_bytes())


def peak_rss_of(spec: str, dtype: str, context: int, batch: int, new_tokens: int,
                cache_dir: str | Path | None = None, threads: int | None = None, gguf: str | Path | None = None) -> int:
    """Peak RSS of a fresh process that loads `spec` and runs one prefill + decode: one model's memory alone.
    With `gguf`, the process runs that file in llama.cpp instead (batch 1)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak_rss, args=(spec, dtype, context, batch, new_tokens, queue,
                                                     None if cache_dir is None else str(cache_dir), threads,
                                                     None if gguf is None else str(gguf)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory probe for {spec} failed (exit code {proc.exitcode})")
    return queue.get()


def decode_speed_ratio(model: nn.Module, base: nn.Module, context: int, new_tokens: int,
                       repeats: int) -> tuple[float, int, int]:
    """Decode tokens/s of `model` over `base` (interleaved, medians after a warm-up), and the KV bytes of `model`
    and of `base` at `context` tokens, batch 1: `run_bench` on the two models, reduced to what a report needs."""
    [(ratio, kv)], base_kv = decode_speed_ratios([model], base, context, new_tokens, repeats)
    return ratio, kv, base_kv


def decode_speed_ratios(models: Sequence[nn.Module], base: nn.Module, context: int, new_tokens: int,
                        repeats: int) -> tuple[list[tuple[float, int]], int]:
    """([(decode tokens/s over `base`, KV bytes) per model], the base's KV bytes) at `context` tokens, batch 1: every
    model interleaved with the base in one `run_bench`, so a slow spell of the machine falls on all of them."""
    rows = run_bench([("base", base), *((f"model{i}", m) for i, m in enumerate(models))], [context], [1], new_tokens,
                     repeats, progress=False)
    return [(r.decode_tok_s / rows[0].decode_tok_s, r.kv_bytes) for r in rows[1:]], rows[0].kv_bytes


# ---- llama.cpp ----------------------------------------------------------------------------------------------------

def run_llama_bench(
    models: list[tuple[str, str | Path, nn.Module]],
    contexts: list[int],
    new_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[BenchRow]:
    """`run_bench` for GGUF files in llama.cpp (batch 1: llama-cpp-python's Llama holds one sequence).

    `models`: (name, .gguf path, the transformers model it was exported from: its parameters and KV formula).
    Every repeat prefills every model in turn at every context and then decodes them taking turns, as run_bench
    does; the prompts are the same random tokens. Flash attention is on, so llama.cpp allocates K and V for the kept
    attention layers only. KV bytes are what llama.cpp's f16 cache holds for the prompt: the formula at 2 bytes per
    element.
    """
    check_llama_cpp()
    check_settings(contexts, [1], new_tokens, repeats)
    llms = [(name, load_llama(path, max(contexts) + new_tokens, threads), model) for name, path, model in models]
    timings: dict[tuple, dict[str, list[float]]] = {}
    bar = tqdm(total=(warmup + repeats) * len(contexts) * len(llms), desc="bench llama.cpp", unit="run",
               disable=not progress)
    try:
        for rep in range(warmup + repeats):
            for context in contexts:
                prefill_s = []
                for _, llm, _ in llms:
                    prefill_s.append(llama_prefill(llm, random_ids(llm.n_vocab(), 1, context, seed)[0]))
                    bar.update()
                decode_s = interleaved([llama_step(llm) for _, llm, _ in llms], new_tokens)
                if rep < warmup:
                    continue
                for i, (t_prefill, t_decode) in enumerate(zip(prefill_s, decode_s)):
                    slot = timings.setdefault((i, context), {"prefill": [], "decode": []})
                    slot["prefill"].append(context / t_prefill)
                    slot["decode"].append(new_tokens / t_decode)
    finally:
        bar.close()
        for _, llm, _ in llms:
            llm.close()
    rows = []
    for i, (name, _, model) in enumerate(models):
        elem = next(model.parameters()).element_size()
        for context in contexts:
            t = timings[(i, context)]
            kv = kv_bytes_formula(model, 1, context) * 2 // elem
            rows.append(BenchRow(name, context, 1, statistics.median(t["prefill"]), statistics.median(t["decode"]), kv,
                                 kv, count_parameters(model), t["prefill"], t["decode"], runtime="llama.cpp"))
    return rows


# ---- the bench job --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Pin torch's intra-op threads to `threads` (None: leave them) for a block; yields the count in use and puts the
    previous count back after (the library changes no process-wide setting for good)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def check_context_limit(model: nn.Module, spec: str, contexts: Sequence[int]) -> None:
    """A prompt longer than the positions the model was trained for is an error naming the limit. (Decoding may run
    `new_tokens` past it: the timing of a step does not depend on whether its position was trained.)"""
    check_positions(model, max(contexts), "contexts", model=literal(spec))


def compare(config: BenchConfig | Sequence[str], *args: Any, **options: Any) -> list[dict]:
    """The `llmdrop bench` job: load every model in `specs`, bench them interleaved in each of `runtimes`
    ("transformers": `run_bench`; "llama.cpp": each model's GGUF export, written to a temporary file with
    `llmdrop.export.export` at `gguf_outtype`, through `run_llama_bench`, batch 1 only), and return one dict per
    (model, runtime, context, batch) with medians, spread (min-max) and ratios to the first model, checkpoint bytes
    and (`memory`) the peak RSS of a fresh process per model.

    `threads` pins the threads of both runtimes (None: torch's current count, used for llama.cpp too); the count is
    in the output. `profile` adds, per row, the share of decode time per module kind over `profile_steps` steps in
    the row's runtime (transformers: profile.profile_decode; llama.cpp: llama_cpp.profile_llama_decode) and the
    ideal decode speedup of the model's dropped set on the first model's profile, next to the achieved one.
    Written to `output` as JSON when given. Settings, runtimes and the output location are checked before any model
    loads; contexts beyond a model's trained positions right after it loads. Takes a BenchConfig, or the models and
    the config's fields (`compare(["a", "b"], [512], new_tokens=64)`).
    """
    if not isinstance(config, BenchConfig):
        config = BenchConfig([config] if isinstance(config, str) else list(config), *args, **options)
    specs, contexts, batches, new_tokens, repeats = (config.models, config.contexts, config.batches, config.new_tokens,
                                                     config.repeats)
    runtimes, threads, dtype, cache_dir, progress = (config.runtimes, config.threads, config.dtype, config.cache_dir,
                                                     config.progress)
    gguf_outtype, output = config.gguf_outtype, config.output
    if "llama.cpp" in runtimes:
        check_llama_cpp()
    if output is not None:
        check_output(output, overwrite=True, kind="file")  # a result file is replaced, as measure's
    models = []
    for spec in specs:
        model = load_model(spec, dtype=dtype, progress=progress, cache_dir=cache_dir)[0]
        check_context_limit(model, spec, contexts)
        models.append((spec, model))
    rows: list[dict] = []
    with torch_threads(threads) as n_threads, tempfile.TemporaryDirectory(prefix="llmdrop-bench-") as tmp:
        ggufs = _export_ggufs(specs, tmp, gguf_outtype, dtype, cache_dir, progress) if "llama.cpp" in runtimes else {}
        if "transformers" in runtimes:
            rows += ratios(run_bench(models, contexts, batches, new_tokens, repeats, progress=progress))
        if "llama.cpp" in runtimes:
            if batches != [1]:
                log.info("llama.cpp runs batch 1 only (llama-cpp-python's Llama holds one sequence)")
            rows += ratios(run_llama_bench([(spec, ggufs[spec], model) for spec, model in models], contexts,
                                           new_tokens, repeats, threads=n_threads, progress=progress))
        log.info("threads: %d (torch.set_num_threads; llama.cpp n_threads)", n_threads)
        for row in rows:
            row["threads"] = n_threads
        profiles = _profile_rows(models, rows, config.profile_steps, progress, ggufs, n_threads) if config.profile else None
        del models  # the memory probes below run in fresh processes; the bench models are no longer needed here
        for row in rows:
            where = resolve(row["model"], progress=False, cache_dir=cache_dir)
            row["checkpoint_bytes"] = dir_bytes(where) if isinstance(where, Path) else None
        if config.memory:
            peak = {}
            for row in rows:
                key = (row["model"], row["runtime"])
                if key not in peak:
                    peak[key] = peak_rss_of(row["model"], dtype, max(contexts),
                                            max(batches) if row["runtime"] == "transformers" else 1, new_tokens,
                                            cache_dir, n_threads, ggufs.get(row["model"]) if key[1] == "llama.cpp"
                                            else None)
                row["peak_rss_bytes"] = peak[key]
    for r in rows:
        if r["kv_bytes"] != r["kv_bytes_formula"]:
            log.warning("%s: KV bytes %d differ from the formula %d", r["model"], r["kv_bytes"], r["kv_bytes_formula"])
    if output is not None:
        how = (f"torch.set_num_threads({n_threads}) for transformers; n_threads = n_threads_batch = {n_threads} for "
               "llama.cpp")
        meta = {"new_tokens": new_tokens, "repeats": repeats, "turn_tokens": TURN_TOKENS, "dtype": dtype,
                "runtimes": runtimes, "threads": n_threads, "threads_how": how}
        if "llama.cpp" in runtimes:
            meta["llama_cpp"] = {"gguf_outtype": gguf_outtype, "flash_attn": True, "batch": 1}
        if profiles is not None:
            meta["profiles"] = profiles
        write_json(output, {"rows": rows, **meta})
        log.info("rows written to %s", output)
    return rows


def _export_ggufs(specs: Sequence[str], folder: str, outtype: str, dtype: str, cache_dir, progress: bool) -> dict:
    """Each model's GGUF export in `folder` (the export's own errors, e.g. a family it cannot write, propagate)."""
    out = {}
    for n, spec in enumerate(specs):
        if spec in out:  # a model given twice runs twice from one export
            continue
        path = Path(folder) / f"model{n}.gguf"
        try:
            export(spec, "gguf", path, outtype=outtype, dtype=dtype, cache_dir=cache_dir, progress=progress)
        except LlmdropError as err:
            raise LlmdropError(f"the llama.cpp runtime runs each model's GGUF export, and {literal(spec)} cannot be exported "
                               f"({err.template}); leave llama.cpp out of {{runtimes}} for it",
                               params=[*err.params, "runtimes"]) from None
        out[spec] = path
    return out


def _profile_rows(models: list[tuple[str, nn.Module]], rows: list[dict], steps: int, progress: bool,
                  ggufs: dict | None = None, threads: int | None = None) -> list[dict]:
    """Profile every model at every setting of `rows` in its runtime (transformers: timed hooks; llama.cpp: the
    GGUF in `ggufs` through llama_cpp.profile_llama_decode, batch 1), attach the shares and the ideal speedup (first
    model's profile in the same runtime, each model's dropped set) to the rows; return the profiles."""
    settings = sorted({(r["runtime"], r["context"], r["batch"]) for r in rows})
    base_name, base = models[0]
    dropped = {name: dropped_set(base, model) for name, model in models}
    found: dict[tuple, object] = {}
    bar = tqdm(total=len(settings) * len(models), desc="profile", unit="run", disable=not progress)
    for runtime, context, batch in settings:
        for name, model in models:
            found[(name, runtime, context, batch)] = (
                profile_llama_decode(ggufs[name], context, steps, threads) if runtime == "llama.cpp"
                else profile_decode(model, context, batch, steps))
            bar.update()
    bar.close()
    for row in rows:
        setting = (row["runtime"], row["context"], row["batch"])
        own = found[(row["model"], *setting)]
        row["profile"], row["profile_step_ms"] = own.shares(), own.step_ms()
        row["profile_source"] = PROFILE_SOURCES[row["runtime"]]
        ideal = ideal_for(found[(base_name, *setting)], dropped[row["model"]])
        row.update(ideal)
        row["achieved_over_ideal"] = (row["decode_ratio"] / ideal["ideal_speedup"]
                                      if ideal["ideal_speedup"] else None)
    return [{"model": name, "runtime": runtime, **p.to_dict()} for (name, runtime, _, _), p in found.items()]


PROFILE_SOURCES = {"transformers": "transformers (timed forward hooks)",
                   "llama.cpp": "llama.cpp (graph eval callback at sublayer boundaries)"}


def _spread(lo: float | None, hi: float | None, digits: int = 0) -> str:
    return "" if lo is None or hi is None else f"{lo:,.{digits}f}-{hi:,.{digits}f}"


BENCH_HEADERS = ["model", "runtime", "context", "batch", "prefill tok/s", "min-max", "x", "decode tok/s", "min-max",
                 "x", "x min-max", "KV MiB", "x", "params x", "peak RSS MiB"]
PROFILE_HEADERS = ["model", "runtime", "context", "batch", "attn %", "mlp %", "norms %", "lm_head %", "other %",
                   "dropped %", "ideal x", "achieved x", "achieved/ideal", "step ms profiled", "step ms bench"]


def bench_table_rows(rows: list[dict]) -> list[list]:
    """Rows of `compare`'s result for a table with BENCH_HEADERS: medians, min-max of the repeats, ratios."""
    return [[r["model"], r["runtime"], r["context"], r["batch"], r["prefill_tok_s"],
             _spread(r["prefill_min"], r["prefill_max"]), r["prefill_ratio"], r["decode_tok_s"],
             _spread(r["decode_min"], r["decode_max"], 1), r["decode_ratio"],
             _spread(r["decode_ratio_min"], r["decode_ratio_max"], 3), r["kv_bytes"] / 2**20, r["kv_ratio"],
             r["params_ratio"], _mib(r.get("peak_rss_bytes"))] for r in rows]


def _mib(size: int | None) -> float | str:
    # Not measured (--no-memory) is n/a: a 0.0000 would read as a measured zero.
    return "n/a" if size is None else size / 2**20


def _bench_step_ms(row: dict) -> float:
    """Milliseconds per decode step in the timed runs: a step makes one token for each of the batch's sequences."""
    return 1000 * row["batch"] / row["decode_tok_s"]


def profile_header(rows: list[dict]) -> str:
    """The line above the profile table: how the rows' shares were measured (their `profile_source`, one per runtime
    present) and what ideal x means."""
    sources = list(dict.fromkeys(r["profile_source"] for r in rows if "profile_source" in r))
    return (f"share of decode time per module kind, from {' and '.join(sources) or 'no profile'}; ideal x = "
            "1 / (1 - share of the dropped modules on the first model)")


def profile_table_rows(rows: list[dict]) -> list[list]:
    """Rows of a profiled `compare` result for a table with PROFILE_HEADERS ([] when it was not profiled): each
    model's own shares of decode time (percent), the base model's share of the dropped modules, the ideal speedup
    1 / (1 - that share), the achieved decode ratio and their ratio, and the decode step in the profile (with its
    timing overhead) and in the bench."""
    out = []
    for r in rows:
        if "profile" not in r:
            continue
        shares = [100 * r["profile"][k] for k in ("attention", "mlp", "norms", "lm_head", "other")]
        share = r.get("dropped_share")
        out.append([r["model"], r["runtime"], r["context"], r["batch"], *shares,
                    "" if share is None else 100 * share, r.get("ideal_speedup") or "", r["decode_ratio"],
                    r.get("achieved_over_ideal") or "", r.get("profile_step_ms") or "", _bench_step_ms(r)])
    return out


def bench_tables(rows: list[dict]) -> str:
    """`compare`'s rows as the command line prints them: the bench table, then the profile table when profiled."""
    out = table(BENCH_HEADERS, bench_table_rows(rows))
    if any("profile" in r for r in rows):
        out += "\n\n" + profile_header(rows) + "\n" + table(PROFILE_HEADERS, profile_table_rows(rows))
    return out
