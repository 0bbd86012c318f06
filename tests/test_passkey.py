"""The built-in passkey retrieval task: deterministic prompts, the key where it was asked for, and scoring checked
with model stubs that know the answer (100%) or never do (0%)."""

import random
import re
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model
from torch import nn
from transformers import LlamaConfig

from llmdrop.errors import LlmdropError
from llmdrop.passkey import make_prompt, passkey_eval, read_answer


class _Stub(nn.Module):
    """A causal-LM stand-in for greedy decoding: on the prompt it decides a whole answer per row, then emits it one
    token per call (as one-hot logits), the way bench.prefill / bench.decode drive a model."""

    def __init__(self, tokenizer, answer_of, max_positions: int = 4096):
        super().__init__()
        self.config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_positions)
        self.anchor = nn.Parameter(torch.zeros(1))  # where the inputs go
        self.tokenizer, self.answer_of = tokenizer, answer_of
        self.queues: list[list[int]] = []
        self.prompts: list[list[int]] = []

    def forward(self, input_ids, use_cache=True, past_key_values=None, logits_to_keep=None):
        if past_key_values is None:  # the prompt
            self.prompts += input_ids.tolist()
            texts = [self.tokenizer.decode(row) for row in input_ids.tolist()]
            self.queues = [self.tokenizer(self.answer_of(t), add_special_tokens=False)["input_ids"] for t in texts]
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e4)
        for row, queue in enumerate(self.queues):
            logits[row, 0, queue.pop(0) if queue else self.tokenizer.eos_token_id] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values or object())


@pytest.fixture
def tokenizer(tokenizer):
    """The character tokenizer, decoding to the exact text (its default decoder puts spaces between tokens)."""
    from tokenizers import decoders

    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    assert tokenizer.decode(tokenizer("ab 12")["input_ids"]) == "ab 12"
    return tokenizer


def _oracle(text: str) -> str:
    return " " + re.search(r"pass key is (\d{5})", text).group(1) + "."


def test_prompts_are_deterministic_for_a_seed_and_differ_across_seeds(tokenizer):
    rngs = [random.Random("s1"), random.Random("s1"), random.Random("s2")]
    a, b, c = ([make_prompt(tokenizer, 400, 0.5, rng) for _ in range(3)] for rng in rngs)
    assert [p.input_ids for p in a] == [p.input_ids for p in b]
    assert [p.key for p in a] != [p.key for p in c]
    assert len({p.key for p in a}) == 3 and all(re.fullmatch(r"\d{5}", p.key) for p in a)
    stub = _Stub(tokenizer, _oracle)
    first = passkey_eval(stub, tokenizer, [300], depths=[0.3], trials=4, seed=7, bos=False, progress=False)
    prompts = list(stub.prompts)
    stub.prompts.clear()
    again = passkey_eval(stub, tokenizer, [300], depths=[0.3], trials=4, seed=7, bos=False, progress=False)
    assert stub.prompts == prompts and again == first


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_key_sits_at_the_requested_depth(tokenizer, depth, bos):
    context = 2000
    p = make_prompt(tokenizer, context, depth, random.Random(0), bos=bos)
    assert len(p.input_ids) == context
    assert (p.input_ids[0] == tokenizer.bos_token_id) == bos
    key_ids = tokenizer(p.key, add_special_tokens=False)["input_ids"]
    assert p.input_ids[p.key_position : p.key_position + len(key_ids)] == key_ids
    # What is not filler (instruction, needle, question) bounds how far the key can sit from depth x context.
    from llmdrop.passkey import INSTRUCTION, NEEDLE, QUESTION

    fixed = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                for t in (INSTRUCTION, NEEDLE.format(key=p.key), QUESTION)) + bos
    assert fixed < 0.15 * context
    assert abs(p.key_position - depth * context) <= fixed, (p.key_position, depth * context)
    assert p.key_position >= fixed - len(tokenizer(NEEDLE.format(key=p.key) + QUESTION)["input_ids"])  # after it
    prefix = tokenizer.decode(p.input_ids[: p.key_position])
    assert prefix.endswith("The pass key is ")


def test_an_oracle_scores_100_and_a_constant_answer_0(tokenizer):
    oracle = passkey_eval(_Stub(tokenizer, _oracle), tokenizer, [300, 600], trials=3, bos=False, progress=False)
    assert oracle["accuracy_overall"] == 1.0 and oracle["examples"] == []
    assert set(oracle["accuracy"]) == {"300", "600"}
    assert all(acc == 1.0 for row in oracle["accuracy"].values() for acc in row.values())
    assert [r["depth"] for r in oracle["rows"][:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    constant = passkey_eval(_Stub(tokenizer, lambda text: " 77777777"), tokenizer, [300, 600], trials=3, bos=False,
                            batch_size=2, progress=False)
    assert constant["accuracy_overall"] == 0.0 and constant["by_context"] == {"300": 0.0, "600": 0.0}
    # 8 greedy tokens: the space, then 7 digits
    assert len(constant["examples"]) == 10 and constant["examples"][0]["answer"].strip() == "7777777"


def test_answers_are_read_as_the_first_digits():
    assert read_answer(" 12345. Remember") == "12345"
    assert read_answer(" the key is 1234567") == "1234567"  # a longer number is not the key
    assert read_answer(" no digits") is None


def test_a_real_tiny_model_runs_end_to_end_with_the_cache(tokenizer):
    model = tiny_model("llama")
    res = passkey_eval(model, tokenizer, [300], depths=[0.5], trials=2, batch_size=2, progress=False)
    assert res["rows"][0]["trials"] == 2 and 0.0 <= res["accuracy_overall"] <= 1.0
    assert res["bos"] is False  # llama needs no BOS; gemma would get it from arch.needs_bos
    gemma = passkey_eval(tiny_model("gemma3"), tokenizer, [300], depths=[0.5], trials=1, progress=False)
    assert gemma["bos"] is True


def test_bad_settings_are_errors(tokenizer):
    stub = _Stub(tokenizer, _oracle, max_positions=512)
    with pytest.raises(LlmdropError, match="contexts 1024 is beyond the 512 positions"):
        passkey_eval(stub, tokenizer, [256, 1024], bos=False, progress=False)
    with pytest.raises(LlmdropError, match="contexts 100 is too short for the passkey prompt"):
        passkey_eval(stub, tokenizer, [100], bos=False, progress=False)
    with pytest.raises(LlmdropError, match="depths must be fractions from 0 to 1"):
        passkey_eval(stub, tokenizer, [300], depths=[0.5, 1.5], bos=False, progress=False)
    with pytest.raises(LlmdropError, match="trials must be a whole number"):
        passkey_eval(stub, tokenizer, [300], trials=0, bos=False, progress=False)


def test_a_context_or_depth_listed_twice_runs_once(tokenizer):
    """A26: [300, 300] ran twice and divided both rows' correct answers by one row's trials (accuracy 2.0)."""
    stub = _Stub(tokenizer, _oracle)
    res = passkey_eval(stub, tokenizer, [300, 600, 300], depths=[0.5, 0.0, 0.5], trials=2, bos=False, progress=False)
    assert res["contexts"] == [300, 600] and res["depths"] == [0.5, 0.0]
    assert [(r["context"], r["depth"]) for r in res["rows"]] == [(300, 0.5), (300, 0.0), (600, 0.5), (600, 0.0)]
    assert res["by_context"] == {"300": 1.0, "600": 1.0} and res["accuracy_overall"] == 1.0
    assert len(stub.prompts) == 8
