"""Tiny random models, one per supported family, and a character-level tokenizer: fast, offline, deterministic."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
VOCAB = SPECIALS + list(string.printable)
VOCAB_SIZE = 112  # > len(VOCAB); a little slack like real vocabularies

_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    tie_word_embeddings=False,
)
# Gemma's sliding window is shorter than the test sequences so that windows are really exercised.
_GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**_COMMON),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16, sliding_window=6, layer_types=list(_GEMMA_TYPES)),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=6, layer_types=list(_GEMMA_TYPES)),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves norms at their neutral value; jitter every parameter so no branch is trivially identical.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def random_ids(samples: int = 3, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(VOCAB), (samples, seq_len), generator=g)


BPE_VOCAB = [*VOCAB, "th"]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer over BPE_VOCAB with one merge (llama.cpp wants merges), for models llama.cpp loads."""
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(BPE_VOCAB)}, merges=[("t", "h")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def llama_cpp_logits(path: Path, ids: list[int], n_ctx: int = 64):
    """llama.cpp's logits (numpy, [len(ids), vocab]) for `ids` in the GGUF at `path`, loaded for this call only."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def llama_cpp_ready(path: Path) -> Path:
    """A tiny llama checkpoint llama.cpp loads: a BPE tokenizer with one merge, the embedding sized to its vocabulary."""
    tok = bpe_tokenizer()
    config = tiny_model("llama").config
    config.vocab_size = len(BPE_VOCAB)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """The first `n` greedy tokens llama-cpp-python generates after `ids` (its generator does not stop at EOS, so
    compare with as many tokens as transformers produced)."""
    got: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        got.append(token)
        if len(got) == n:
            break
    return got
