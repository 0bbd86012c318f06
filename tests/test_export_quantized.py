"""Quantized GGUF exports (--outtype q8_0 / q6_k / q5_k_m / q4_k_m): llama.cpp's own quantizer, checked by llama.cpp.

Two references. The model with the file's own weights (dequantized with the gguf package and put back into the
transformers model) is what llama.cpp should compute: it differs only by llama.cpp's quantized activations
(its k-quant and q8_0 matmuls quantize the input row to 8 bits) and its f16 KV cache. The unquantized model is what
the user had: the agreement with it is what quantization costs, stated as measured (random tiny models have flat
logits, so their argmax flips more easily than a trained model's; tests/test_llama_cpp.py measures SmolLM2-135M).
"""

import copy
import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from tiny import _COMMON, VOCAB, bpe_tokenizer, llama_cpp_ready, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from llmdrop.errors import LlmdropError
from llmdrop.export.families import OUTTYPES, QUANTIZED
from llmdrop.export.gguf import _LAYER_TENSORS, export_gguf
from llmdrop.plan import DropPlan
from llmdrop.pruned_model import patch_sublayer
from llmdrop.surgery import apply_plan

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (setup.sh installs it)")
MODULES = {"layers": "model.layers", "attn": "self_attn", "mlp": "mlp"}
# k-quants pack rows in blocks of 256: this tiny llama is wide enough for them (tiny.py's 64 is not; see
# test_rows_narrower_than_a_block_fall_back).
WIDE = 256
# attention patches at 0 (llama.cpp's layer-0 head count) and 2, an MLP patch at 1, layer 3 emptied (zero attention,
# zero MLP: the last layer, which must still write a feed-forward), layer 2's MLP a zero drop under a patch.
PATCHES = (("attn", 0), ("attn", 2), ("mlp", 1))
PLAN = DropPlan(attn=[0, 2, 3], mlp=[1, 2, 3], num_layers=4)
# The measured agreement with the unquantized model on 4 x 32 positions, and the largest logit error as a share of
# the logit range (with the model with the file's own weights: 0.013 .. 0.017 and >= 120 / 128 for every type).
MEASURED = {"q8_0": (124, 0.021), "q6_k": (114, 0.049), "q5_k_m": (113, 0.082), "q4_k_m": (101, 0.163)}
# The tensor type most weights take in each mixture.
MAIN_TYPE = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K"}



def _llama(width: int):
    """tiny.py's llama at `width` (MLP twice as wide), its vocabulary that of _tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**_COMMON, "hidden_size": width, "intermediate_size": 2 * width,
                            "vocab_size": len(VOCAB) + 1})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def wide():
    """The 256-wide llama pruned with every kind of sublayer drop and patch llama.cpp's deci graph takes."""
    model = _llama(WIDE)
    g = torch.Generator().manual_seed(3)
    for kind, i in PATCHES:
        patch_sublayer(model, MODULES, kind, i, torch.randn(WIDE, WIDE, generator=g) * WIDE ** -0.5)
    apply_plan(model, PLAN)
    return model


def _prompts(n=4, length=32):
    return [torch.randint(4, len(VOCAB) + 1, (length,), generator=torch.Generator().manual_seed(s)).tolist()
            for s in range(n)]


def _reader(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _with_file_weights(model, path):
    """`model` with every weight replaced by the GGUF's (dequantized, q / k rotary layout undone)."""
    _, tensors = _reader(path)
    out = copy.deepcopy(model)
    n_head, n_kv = out.config.num_attention_heads, out.config.num_key_value_heads
    top = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.norm.weight": "output_norm.weight"}
    with torch.no_grad():
        for key, param in out.state_dict().items():
            if key in top:
                name = top[key]
            else:
                _, _, i, rest = key.split(".", 3)
                name = f"blk.{i}." + ("ffn_up.weight" if rest == "mlp.linear_mlp.weight" else _LAYER_TENSORS[rest])
            t = tensors[name]
            value = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(param.shape)
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = n_head if name.endswith("attn_q.weight") else n_kv
                value = value.reshape(heads, value.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(value.shape)
            param.copy_(value)
    return out


def _agreement(path, reference, prompts):
    """(positions whose argmax agrees, of how many, the largest logit error over the logit range) in llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    agree = total = 0
    worst = 0.0
    try:
        for ids in prompts:
            with torch.no_grad():
                ref = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
            worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    finally:
        llm.close()
    return agree, total, worst


def test_quantized_types_are_one_vocabulary():
    """--outtype and --gguf-outtype read families.OUTTYPES: the k-quant mixtures are choices of both."""
    from dataclasses import fields

    from llmdrop.configs import BenchConfig
    from llmdrop.export import ExportConfig
    from llmdrop.options import option_of

    def choices(config, name):
        return option_of(next(f for f in fields(config) if f.name == name)).choices

    assert set(QUANTIZED) < set(OUTTYPES) and {"q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "f32"} == set(OUTTYPES)
    assert choices(ExportConfig, "outtype") == choices(BenchConfig, "gguf_outtype") == OUTTYPES


@needs_llama_cpp
@pytest.mark.parametrize("outtype", list(MEASURED))
def test_quantized_export_runs_in_llama_cpp(tmp_path, wide, outtype):
    model = wide
    f16 = export_gguf(model, bpe_tokenizer(), tmp_path / "f16.gguf", outtype="f16")
    path = export_gguf(model, bpe_tokenizer(), tmp_path / f"{outtype}.gguf", outtype=outtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f16.gguf", f"{outtype}.gguf"])  # no f32 left
    assert path.stat().st_size < 0.7 * f16.stat().st_size
    reader, tensors = _reader(path)
    kinds = {name: t.tensor_type.name for name, t in tensors.items()}
    assert kinds["blk.0.attn_output.weight"] == MAIN_TYPE[outtype]  # a linear patch is quantized like any weight
    assert kinds["blk.1.ffn_up.weight"] == MAIN_TYPE[outtype]  # so is an MLP patch's W
    # ... but its exact stand-ins stay float32 (gguf.py's _EXACT: the 1/32 identity, the zero gate)
    assert kinds["blk.1.ffn_down.weight"] == kinds["blk.1.ffn_gate.weight"] == "F32"
    assert kinds["blk.1.ffn_gate.bias"] == "F32" and kinds["output_norm.weight"] == "F32"
    down = np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(WIDE, WIDE)
    assert np.array_equal(down, np.eye(WIDE, dtype=np.float32) / 32)
    if outtype != "q8_0":  # llama.cpp's own mixture: its file type, and Q6_K for the output as Q4_K_M / Q5_K_M want
        field = reader.get_field("general.file_type")
        assert field.contents() == {"q6_k": 18, "q5_k_m": 17, "q4_k_m": 15}[outtype]
        assert kinds["output.weight"] == "Q6_K"

    prompts = _prompts()
    agree, total, worst = _agreement(path, _with_file_weights(model, path), prompts)
    # What llama.cpp computes is the file's model: 8-bit activations and an f16 KV cache apart (measured 1.3-1.7%)
    assert worst < 0.03 and agree >= 0.9 * total
    agree, total, worst = _agreement(path, model, prompts)
    measured_agree, measured_worst = MEASURED[outtype]
    assert agree >= measured_agree - 6 and worst < 1.25 * measured_worst, (agree, worst)


@needs_llama_cpp
def test_rows_narrower_than_a_block_fall_back(tmp_path):
    """tiny.py's 64-wide llama: no row holds a 256-block, and llama.cpp's quantizer gives every weight its 32-block
    fallback (Q4_K -> Q5_0, the output's Q6_K -> Q8_0) instead of failing; the file still runs in llama.cpp."""
    model = _llama(64)
    apply_plan(model, DropPlan(attn=[1], mlp=[2], num_layers=4))
    path = export_gguf(model, bpe_tokenizer(), tmp_path / "q.gguf", outtype="q4_k_m")
    _, tensors = _reader(path)
    kinds = {t.tensor_type.name for t in tensors.values()}
    assert kinds <= {"Q5_0", "Q8_0", "F32"} and "Q5_0" in kinds
    agree, total, worst = _agreement(path, _with_file_weights(model, path), _prompts(2, 24))
    assert worst < 0.03 and agree >= 0.9 * total


def test_a_k_quant_without_llama_cpp_is_one_sentence_before_any_work(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the out type was checked")

    with pytest.raises(LlmdropError, match=r"^outtype q4_k_m quantizes with llama.cpp's quantizer, which needs "
                                           r"llama-cpp-python: pip install llama-cpp-python .*or choose outtype "
                                           r"f32, f16 or q8_0$"):
        export_gguf(tiny_model("llama"), bpe_tokenizer(), tmp_path / "m.gguf", outtype="q4_k_m")
    base = llama_cpp_ready(tmp_path / "base")
    monkeypatch.setattr("llmdrop.models.load_model", no_loading)
    from llmdrop.cli import main

    capsys.readouterr()
    code = main(["export", str(base), "--format", "gguf", "-o", str(tmp_path / "m.gguf"), "--outtype", "q5_k_m",
                 "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--outtype q5_k_m quantizes with llama.cpp's quantizer, which needs llama-cpp-python" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    # f32 / f16 / q8_0 are the writer's own: they need no llama.cpp
    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    export_gguf(tiny_model("llama"), bpe_tokenizer(), tmp_path / "q8.gguf", outtype="q8_0")


@needs_llama_cpp
def test_a_failed_quantization_keeps_the_existing_output(tmp_path, monkeypatch):
    """The float32 file beside the output is removed, the output being replaced is kept whole."""
    model = tiny_model("llama")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the user's file")

    def fail(src, dst, *args, **kwargs):
        assert src.is_file() and src.parent == out.parent  # the float32 GGUF, written beside the output
        raise LlmdropError("llama.cpp's quantizer could not write q4_k_m (stand-in failure); choose another outtype")

    monkeypatch.setattr("llmdrop.export.gguf.quantize", fail)
    with pytest.raises(LlmdropError, match="stand-in failure"):
        export_gguf(model, bpe_tokenizer(), out, outtype="q4_k_m", overwrite=True)
    assert out.read_bytes() == b"the user's file" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    monkeypatch.undo()
    export_gguf(model, bpe_tokenizer(), out, outtype="q4_k_m", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
