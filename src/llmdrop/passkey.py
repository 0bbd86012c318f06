"""Passkey retrieval: a random 5-digit key hidden at a chosen depth of filler text, asked for at the end.

The test of Mohtashami & Jaggi (Landmark Attention, 2023), as long-context papers run it: a fixed neutral filler
("The grass is green. The sky is blue. ...") repeated up to the requested length, with one sentence giving the pass
key placed at a fraction `depth` of the filler (0: right after the instruction, 1: right before the question).
Every prompt is exactly `context` tokens of the model's own tokenizer (BOS first for families that need it), so a
row of the result is a statement about that context length. The answer is read by greedy decoding of a few tokens
and scored as an exact match of the first run of digits with the key. Prompts and keys are a function of `seed`.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_for, check_positions
from .decoding import decode, prefill
from .errors import LlmdropError
from .options import count

log = logging.getLogger(__name__)

NAME = "passkey"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens read after the question: enough for " 12345." in any tokenizer seen


@dataclass
class PasskeyPrompt:
    """One prompt: its token ids (exactly the context length), the key, and where the key's first token sits."""

    input_ids: list[int]
    key: str
    depth: float
    key_position: int  # index in input_ids of the first token of the key (its first mention)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_depths(depths: Sequence[float]) -> list[float]:
    """Depths are fractions of the filler, 0 (start) to 1 (end); at least one. Each depth once, in the order given:
    a depth listed twice would count its correct answers twice against one row's trials."""
    depths = list(depths)
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise LlmdropError(f"{{depths}} must be fractions from 0 to 1, like 0,0.5,1 (got {bad[0] if bad else 'none'!r})",
                           params=["depths"])
    return list(dict.fromkeys(float(d) for d in depths))


def check_contexts(contexts: Sequence[int], config=None, param: str = "contexts") -> list[int]:
    """Whole numbers >= 1, none beyond the trained positions of `config` (a model's config, or the model) when
    given; each once, in the order given (a context listed twice would score accuracy above 1: both rows' answers
    over one row's trials)."""
    contexts = list(contexts)
    bad = [c for c in contexts if isinstance(c, bool) or not isinstance(c, int) or c < 1]
    if bad or not contexts:
        raise LlmdropError(f"{{{param}}} must be whole numbers of at least 1 (got {bad[0] if bad else 'none'!r})",
                           params=[param])
    if config is not None:
        check_positions(config, max(contexts), param)
    return list(dict.fromkeys(contexts))


def make_prompt(tokenizer, context: int, depth: float, rng: random.Random, bos: bool = False) -> PasskeyPrompt:
    """A prompt of exactly `context` tokens with a fresh 5-digit key from `rng` at `depth` of the filler.

    Layout: [BOS] instruction, filler before, needle, filler after, question. The filler is the fixed sentence
    block repeated and cut to the token budget; `depth` splits that budget (rounded to a token).
    """
    key = str(rng.randint(10000, 99999))
    head = ([tokenizer.bos_token_id] if bos else []) + _ids(tokenizer, INSTRUCTION)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    budget = context - len(head) - len(needle) - len(question)
    if budget < 0:
        need = context - budget
        raise LlmdropError(f"{{contexts}} {context} is too short for the passkey prompt, which needs at least {need} "
                           "tokens with this tokenizer", params=["contexts"])
    unit = _ids(tokenizer, FILLER)
    filler = unit * (budget // len(unit) + 1)
    before = round(depth * budget)
    ids = head + filler[:before] + needle + filler[: budget - before] + question
    # The key's first token inside the needle: the first position where the needle differs from one without digits.
    offset = _key_offset(tokenizer, key)
    return PasskeyPrompt(ids, key, depth, len(head) + before + offset)


def _key_offset(tokenizer, key: str) -> int:
    prefix = _ids(tokenizer, NEEDLE.split("{key}")[0])
    full = _ids(tokenizer, NEEDLE.format(key=key))
    n = 0
    while n < len(prefix) and full[n] == prefix[n]:
        n += 1
    return n


def read_answer(text: str) -> str | None:
    """The first run of digits in the generated text (None when there is none)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


def greedy_answer(model: nn.Module, ids: torch.Tensor, new_tokens: int = ANSWER_TOKENS) -> torch.Tensor:
    """`new_tokens` greedy tokens after each row of `ids` [batch, context], with the KV cache (decoding's prefill and
    decode: only the last position's logits are computed). Returns [batch, new_tokens]."""
    logits, cache = prefill(model, ids)
    return decode(model, logits, cache, new_tokens)


def passkey_eval(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    bos: bool | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Passkey retrieval accuracy per context length (tokens) and depth: `trials` prompts each, seeded.

    `bos`: start every prompt with BOS (None: as the model's family needs, arch.needs_bos). Prompts of one
    (context, depth) all have exactly `context` tokens, so `batch_size` of them run per forward pass without padding.
    A context beyond the model's max_position_embeddings is an error.
    Returns {"task": "passkey", "seed", "trials", "contexts", "depths", "accuracy": {context: {depth: acc}},
    "by_context": {context: acc}, "accuracy_overall", "rows": [{"context", "depth", "correct", "trials",
    "accuracy"}], "examples": [first wrong answer per (context, depth), if any]} (JSON-ready: keys are strings).
    """
    count(trials, "trials")
    count(batch_size, "batch_size")
    depths = check_depths(depths)
    contexts = check_contexts(contexts, model)
    if bos is None:
        bos = arch_for(model).needs_bos
    if bos and tokenizer.bos_token_id is None:
        raise LlmdropError("this model family needs a BOS token at the start of each sequence, but the tokenizer has none")
    device = next(model.parameters()).device
    rows, examples = [], []
    total = len(contexts) * len(depths) * trials
    bar = tqdm(total=total, desc="passkey", unit="prompt", disable=not progress)
    with torch.inference_mode():
        for context in contexts:
            for depth in depths:
                # One generator per (seed, context, depth): a row does not change when other rows are added.
                rng = random.Random(f"{seed}:{context}:{depth}")
                prompts = [make_prompt(tokenizer, context, depth, rng, bos) for _ in range(trials)]
                correct = 0
                for start in range(0, trials, batch_size):
                    group = prompts[start : start + batch_size]
                    ids = torch.tensor([p.input_ids for p in group], dtype=torch.long, device=device)
                    out = greedy_answer(model, ids)
                    for p, tokens in zip(group, out.tolist()):
                        text = tokenizer.decode(tokens, skip_special_tokens=True)
                        got = read_answer(text)
                        if got == p.key:
                            correct += 1
                        elif not any(e["context"] == context and e["depth"] == depth for e in examples):
                            examples.append({"context": context, "depth": depth, "key": p.key, "answer": text})
                    bar.update(len(group))
                rows.append({"context": context, "depth": depth, "correct": correct, "trials": trials,
                             "accuracy": correct / trials})
    bar.close()
    accuracy = {str(c): {str(r["depth"]): r["accuracy"] for r in rows if r["context"] == c} for c in contexts}
    by_context = {str(c): sum(r["correct"] for r in rows if r["context"] == c) / (trials * len(depths))
                  for c in contexts}
    overall = sum(r["correct"] for r in rows) / (trials * len(rows))
    return {"task": NAME, "seed": seed, "trials": trials, "contexts": contexts, "depths": depths, "bos": bos,
            "accuracy": accuracy, "by_context": by_context, "accuracy_overall": overall, "rows": rows,
            "examples": examples}


def passkey_table_rows(result: dict) -> list[list]:
    """Rows (context, depth, accuracy, correct / trials) of a passkey result, for a table."""
    return [[r["context"], r["depth"], r["accuracy"], f"{r['correct']}/{r['trials']}"] for r in result["rows"]]
