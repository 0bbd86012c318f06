"""lm-evaluation-harness's HF model, scoring log-likelihoods without the vocabulary-sized work nobody reads.

lm-eval's `HFLM` computes the LM head and a log-softmax over the whole vocabulary at every position of every request,
then keeps only the positions that predict the continuation. For a multiple-choice task most positions are context,
and with a large vocabulary that head is most of the cost: on Gemma-3-270M (262k words, 640 wide) the head and its
log-softmax take about three quarters of a forward pass on a CPU. Here the head reads only the hidden states of the
positions that predict a continuation token (a hook on the output embeddings gathers them), so the model's own logit
post-processing (Gemma's soft-capping, for one) still runs on them. The tokens each position sees are the same as
in `HFLM` (right padding, no attention mask), so the scores are the same up to float rounding; the rest of `HFLM`
(tokenization, generation) is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str] | None, list[int], list[int]]


class ContinuationScoringLM(HFLM):
    """`HFLM` for a causal model in memory whose log-likelihood requests compute logits only where they are scored."""

    def _scores_only_continuations(self) -> bool:
        return (self.backend == "causal" and isinstance(self.batch_size, int)
                and self.model.get_output_embeddings() is not None)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if not self._scores_only_continuations():  # "auto" batch sizes, seq2seq: lm-eval's own way
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # Longest first, as lm-eval does: similar lengths share a batch, so little padding and few scored positions.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests") as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                for i, answer in zip(batch, self._score_batch([requests[i] for i in batch]), strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:  # rolling windows are cached per document by the caller
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
        return results  # type: ignore[return-value]

    def _score_batch(self, batch: list[Request]) -> list[tuple[float, bool]]:
        inputs, spans = [], []
        for _, context, continuation in batch:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError("a log-likelihood request needs a context and a continuation that fits the model")
            # Like HFLM: keep the last max_length + 1 tokens (truncating context from the left) and feed all but the
            # last; the positions from len - len(continuation) on predict the continuation.
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]
            inputs.append(tokens)
            spans.append((len(tokens) - len(continuation), len(tokens)))
        width = max(len(t) for t in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)  # right padding with 0, as HFLM pads
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        rows = torch.tensor([row for row, (s, e) in enumerate(spans) for _ in range(s, e)], device=self.device)
        cols = torch.tensor([p for s, e in spans for p in range(s, e)], device=self.device)

        def scored_positions_only(_module, args):  # [batch, width, d] -> [1, scored positions, d]
            return (args[0][rows, cols][None],) + args[1:]

        hook = self.model.get_output_embeddings().register_forward_pre_hook(scored_positions_only)
        try:
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                logits = self.model(ids.to(self.device)).logits
        finally:
            hook.remove()
        logprobs = F.log_softmax(logits[0], dim=-1, dtype=self.softmax_dtype)  # [scored positions, vocabulary]
        answers, at = [], 0
        for (_, _, continuation), (s, e) in zip(batch, spans, strict=True):
            scored, at = logprobs[at:at + e - s], at + e - s
            target = torch.tensor(continuation, dtype=torch.long, device=scored.device)
            greedy = bool((scored.argmax(dim=-1) == target).all())
            answers.append((float(scored.gather(1, target[:, None]).sum()), greedy))
        return answers
