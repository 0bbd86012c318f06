"""The continuation-only scorer gives lm-eval's own log-likelihoods: same sums, same greedy flags, same cache calls."""

import random

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402

from llmdrop.lmeval_model import ContinuationScoringLM  # noqa: E402


def _requests(seed: int, n: int = 11) -> list:
    """Requests of mixed lengths, one-token and long continuations, and one longer than the model's window."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        context = [rng.randrange(4, 100) for _ in range(rng.randint(1, 40))]
        continuation = [rng.randrange(4, 100) for _ in range(rng.choice([1, 1, 3, 9]))]
        reqs.append(((f"ctx{i}", f"cont{i}"), context, continuation))
    reqs.append((("long", "tail"), [rng.randrange(4, 100) for _ in range(90)], [5, 6, 7]))  # truncated from the left
    reqs.append((None, [1], [8, 9, 10]))  # a rolling window: no cache key
    return reqs


def _lms(model, tokenizer, batch_size=3):
    kwargs = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=64)
    return HFLM(**kwargs), ContinuationScoringLM(**kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_equal_lm_evals_own(family, seed):
    torch.manual_seed(seed)
    model = tiny_model(family)
    stock, ours = _lms(model, tiny_tokenizer())
    reqs = _requests(seed)
    expected = stock._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(got) == len(reqs)
    for (e_sum, e_greedy), (g_sum, g_greedy) in zip(expected, got, strict=True):
        assert g_sum == pytest.approx(e_sum, rel=1e-5, abs=1e-4)
        assert g_greedy == e_greedy


def test_greedy_flag_is_true_when_the_continuation_is_the_argmax():
    model = tiny_model("llama")
    _, ours = _lms(model, tiny_tokenizer())
    context = [5, 17, 30]
    with torch.no_grad():
        nxt = int(model(torch.tensor([context])).logits[0, -1].argmax())
        other = (nxt + 1) % 100 + 4
    (_, greedy), (_, not_greedy) = ours._loglikelihood_tokens([(("a", "b"), context, [nxt]), (("a", "c"), context, [other])],
                                                              disable_tqdm=True)
    assert greedy and not not_greedy


def test_only_the_scored_positions_reach_the_head():
    model = tiny_model("llama")
    _, ours = _lms(model, tiny_tokenizer(), batch_size=2)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    ours._loglikelihood_tokens([(("a", "b"), list(range(4, 34)), [40, 41]), (("c", "d"), list(range(4, 32)), [50])],
                               disable_tqdm=True)
    # inputs of 31 and 28 tokens, padded to 31; their continuations are predicted at positions 29-30 and 27:
    # three positions reach the head, not 2 x 31.
    assert seen == [3]


def test_cache_hook_gets_every_keyed_answer():
    _, ours = _lms(tiny_model("llama"), tiny_tokenizer())
    calls = []
    ours.cache_hook.add_partial = lambda kind, key, answer: calls.append((kind, key, answer))
    reqs = _requests(3)
    answers = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    keyed = [(r[0], a) for r, a in zip(reqs, answers, strict=True) if r[0] is not None]
    assert sorted((k, a) for _, k, a in calls) == sorted(keyed)
    assert all(kind == "loglikelihood" for kind, _, _ in calls)
