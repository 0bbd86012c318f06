"""Perplexity on fixed-length token chunks (held-out text). Task accuracy goes through lm-evaluation-harness."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import Calibration
from .errors import LlmdropError


def perplexity(model: nn.Module, chunks: Calibration | torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over every position but the first of each chunk; also the token count.

    With BOS-prefixed chunks the BOS itself is never a target, as in lm-eval's rolling loglikelihood.
    """
    ids = chunks.input_ids if isinstance(chunks, Calibration) else chunks
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in tqdm(ids.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    if not math.isfinite(total):
        raise LlmdropError("the model's loss is not finite (NaN or inf); try --dtype float32")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}
