"""One-pass layer-wise patch fitting (patches/linear.py over stream.LayerWalk): the same patches as one pass per
module, about one forward pass of work for any number of patches, hidden states spilled to disk past a budget, and
the streamed fit behind `drop --stream --patch linear`."""

import json
from pathlib import Path

import pytest
import torch
from tiny import CONFIGS, FAMILIES, random_ids, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import llmdrop
from llmdrop import stream
from llmdrop.arch import arch_for
from llmdrop.cli import main
from llmdrop.configs import PlanSpec, RunConfig
from llmdrop.errors import LlmdropError
from llmdrop.patches.linear import applied_plan, block_patch_fits, fit_patches, fit_streamed
from llmdrop.plan import DropPlan
from llmdrop.pruned_model import PatchedAttention
from llmdrop.run import drop, measure_model
from llmdrop.surgery import apply_plan

FAST = dict(samples=4, seq_len=24, progress=False)


def _weights(model):
    """{(slot, layer): weight} of every patch in `model`."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for slot, path in (("attn", "self_attn"), ("mlp", "mlp")):
            module = getattr(layer, path)
            linear = getattr(module, "linear_attn", None) or getattr(module, "linear_mlp", None)
            if linear is not None:
                out[(slot, i)] = linear.weight.detach().clone()
    return out


def _plans(family):
    plans = [DropPlan(attn=[0, 2], mlp=[2, 3], num_layers=4), DropPlan(mlp=[1], attn=[3], num_layers=4)]
    if block_patch_fits(arch_for(tiny_model(family))):
        plans.append(DropPlan(blocks=[1, 3], attn=[2], num_layers=4, target="block"))
    return plans


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_fit_equals_the_per_module_fit(family):
    """Attention, MLP and (where the family carries them) block patches: the one-pass walk fits what one pass per
    module, each on the model with the patches before it installed, fits."""
    ids = random_ids(8, 24, seed=3)
    for plan in _plans(family):
        new, old = tiny_model(family), tiny_model(family)
        a = fit_patches(new, plan, ids, batch_size=3, progress=False)
        b = fit_patches(old, plan, ids, batch_size=3, progress=False, layerwise=False)
        wa, wb = _weights(new), _weights(old)
        assert wa.keys() == wb.keys() and len(wa) == len(a["modules"])
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-6, rtol=0), (plan, key)
        _same_modules(a["modules"], b["modules"])
        assert (a["method"], b["method"]) == ("layerwise", "per-module")
        ids2 = random_ids(2, 16, seed=9)
        with torch.no_grad():
            assert torch.allclose(new(input_ids=ids2).logits, old(input_ids=ids2).logits, atol=1e-5)


def _deep_llama(layers=12):
    config = CONFIGS["llama"]()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _same_modules(a, b):
    assert [(m["module"], m["layer"]) for m in a] == [(m["module"], m["layer"]) for m in b]
    assert [m["explained"] for m in a] == pytest.approx([m["explained"] for m in b], abs=1e-5)


def _count_layer_calls(model):
    calls = [0]
    handles = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for layer in model.model.layers]
    return calls, handles


def test_layerwise_fit_costs_about_one_pass_for_any_number_of_patches():
    """Decoder-layer calls, counted on the layers: about layers x batches for the walk, whatever K; the per-module
    fit pays a pass (up to each module) per patch."""
    layers, batches = 12, 3
    ids = random_ids(9, 16, seed=1)
    full = layers * batches
    for targets in ([5], [1, 3, 5, 7, 9, 11], list(range(1, 12))):
        plan = DropPlan(attn=targets, mlp=targets[::2], num_layers=layers)
        k = len(targets) + len(targets[::2])
        counted = {}
        for layerwise in (True, False):
            model = _deep_llama(layers)
            calls, handles = _count_layer_calls(model)
            info = fit_patches(model, plan, ids, batch_size=3, progress=False, layerwise=layerwise)
            for h in handles:
                h.remove()
            counted[layerwise] = calls[0]
            # the walk's first cut-short pass also reaches (and stops at) the first patched layer's pre-hook
            assert info["layer_calls"] <= calls[0] <= info["layer_calls"] + batches
            assert info["forward_passes"] == pytest.approx(info["layer_calls"] / full, abs=1e-3)
        # a pass to the last patched layer, plus one (cut-short) call of each patched layer to gather its
        # statistics: at most (layers + K) x batches, against the per-module fit's pass up to each of the K modules
        assert counted[True] <= (max(targets) + 1 + k + 1) * batches <= (layers + k + 1) * batches
        assert counted[False] == sum(i + 1 for _, i in plan.picks()) * batches
        if k >= 6:
            assert counted[False] >= 3 * full and counted[True] <= counted[False] / 2


def test_hidden_states_spill_to_disk_past_max_memory(monkeypatch):
    made = []
    real = stream.tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(stream.tempfile, "mkdtemp", mkdtemp)
    ids = random_ids(8, 24, seed=3)
    plan = DropPlan(attn=[1, 2], mlp=[2], num_layers=4)
    in_memory, on_disk = tiny_model("gemma3"), tiny_model("gemma3")
    fit_patches(in_memory, plan, ids, batch_size=3, progress=False)
    assert not made
    fit_patches(on_disk, plan, ids, batch_size=3, progress=False, max_memory=3 * 24 * 64 * 4 + 1)  # about one chunk
    assert len(made) == 1 and not Path(made[0]).exists()
    wa, wb = _weights(in_memory), _weights(on_disk)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(LlmdropError, match="max_memory must be a positive number of bytes"):
        fit_patches(tiny_model("llama"), plan, ids, progress=False, max_memory=0)


def test_a_model_patched_before_keeps_its_patches_in_the_walk():
    ids = random_ids(8, 24, seed=3)
    model = tiny_model("llama")
    fit_patches(model, DropPlan(attn=[1], num_layers=4), ids, progress=False)
    before = model.model.layers[1].self_attn.linear_attn.weight.detach().clone()
    info = fit_patches(model, DropPlan(attn=[1, 3], num_layers=4), ids, progress=False)
    assert [(m["module"], m["layer"]) for m in info["modules"]] == [("attn", 3)]
    assert torch.equal(model.model.layers[1].self_attn.linear_attn.weight, before)
    reference = tiny_model("llama")
    fit_patches(reference, DropPlan(attn=[1, 3], num_layers=4), ids, progress=False)
    assert torch.allclose(model.model.layers[3].self_attn.linear_attn.weight,
                          reference.model.layers[3].self_attn.linear_attn.weight, atol=1e-6)


# ---------------------------------------------------------------- streamed


def _saved(tmp_path, family, dtype=None):
    path = tmp_path / f"src-{family}"
    model = tiny_model(family)
    if dtype is not None:
        model = model.to(dtype)
        model.config.dtype = str(dtype).removeprefix("torch.")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family, budget", [("llama", 2000), ("gemma3", None), ("phi3", 2000)])  # 2000: on disk
def test_streamed_fit_equals_the_fit_in_memory(tmp_path, family, budget):
    src = _saved(tmp_path, family)
    ids = random_ids(8, 24, seed=3)
    for plan in _plans(family):
        model = tiny_model(family)
        info = fit_patches(model, plan, ids, batch_size=3, progress=False)
        weights, streamed = fit_streamed(src, plan, ids, batch_size=3, max_memory=budget, progress=False)
        expected = _weights(model)
        assert weights.keys() == expected.keys()
        assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in weights)
        _same_modules(streamed["modules"], info["modules"])
        assert streamed["layer_calls"] >= info["layer_calls"]  # the walk starts at layer 0 when it streams


@pytest.mark.parametrize("family, target", [("llama", "joint"), ("gemma3", "attn"), ("qwen3", "block")])
def test_cli_streamed_drop_with_linear_patches_equals_the_drop_in_memory(tmp_path, text_file, family, target):
    """`llmdrop drop SRC --stream --patch linear --scores s.json`: one layer in memory, the checkpoint written tensor
    by tensor; it loads with llmdrop.load and gives the logits of `drop --patch linear` in memory."""
    src = _saved(tmp_path, family)
    common = ["--calibration", str(text_file), "--samples", "4", "--seq-len", "24", "--batch-size", "3", "-q"]
    assert main(["measure", str(src), *common, "-o", str(tmp_path / "s.json")]) == 0
    plan = ["--target", target, "--n", "2", "--patch", "linear", "--scores", str(tmp_path / "s.json")]
    assert main(["drop", str(src), *common, *plan, "-o", str(tmp_path / "mem")]) == 0
    assert main(["drop", str(src), *common, *plan, "--stream", "--max-memory", "1KB", "-o", str(tmp_path / "st")]) == 0
    mem, st = llmdrop.load(tmp_path / "mem")[0], llmdrop.load(tmp_path / "st")[0]
    ids = random_ids(2, 16, seed=4)
    with torch.no_grad():
        assert torch.allclose(st(input_ids=ids).logits, mem(input_ids=ids).logits, atol=1e-5, rtol=0)
    a, b = (json.loads((tmp_path / d / "config.json").read_text())["llmdrop"] for d in ("mem", "st"))
    for key in ("attn", "mlp", "patched_attn", "patched_mlp", "plan", "modules"):
        assert a[key] == b[key], key
    assert a["patched_attn"] or a["patched_mlp"]
    _same_modules(b["patch_fits"][0]["modules"], a["patch_fits"][0]["modules"])
    assert b["patch_fits"][0]["method"] == "layerwise, streamed"
    assert json.loads((tmp_path / "st" / "plan.json").read_text()) == json.loads((tmp_path / "mem" / "plan.json")
                                                                                 .read_text())


def test_streamed_patches_are_saved_in_the_checkpoints_precision(tmp_path, text_file):
    """A bfloat16 source: drop in memory (loaded in float32, saved as bfloat16) and streamed write the same tensors."""
    from safetensors.torch import load_file

    src = _saved(tmp_path, "llama", dtype=torch.bfloat16)
    scores = tmp_path / "s.json"
    config = dict(calibration=str(text_file), batch_size=3, **FAST)
    measure_model(RunConfig(str(src), output=str(scores), **config))
    spec = PlanSpec("attn", n=2)
    drop(RunConfig(str(src), plan=spec, scores=str(scores), output=str(tmp_path / "mem"), patch="linear", **config))
    drop(RunConfig(str(src), plan=spec, scores=str(scores), output=str(tmp_path / "st"), patch="linear", stream=True,
                   **config))
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "st" / "model.safetensors")
    patches = [k for k in a if "linear_attn" in k]
    assert len(patches) == 2 and a.keys() == b.keys()
    assert all(b[k].dtype == torch.bfloat16 for k in patches)
    # the two fits differ only in float rounding, which bfloat16 mostly hides
    assert all((a[k].float() - b[k].float()).abs().max() <= 1e-2 for k in patches)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in patches)


def test_streamed_repatching_keeps_the_patches_the_source_carries(tmp_path, text_file):
    src = _saved(tmp_path, "llama")
    config = dict(calibration=str(text_file), batch_size=3, **FAST)
    first = drop(RunConfig(str(src), plan=PlanSpec("attn", n=1), output=str(tmp_path / "a"), patch="linear", **config))
    layer = first.choice.plan.attn[0]
    drop(RunConfig(str(tmp_path / "a"), plan=PlanSpec("mlp", n=1), output=str(tmp_path / "b"), patch="linear",
                   stream=True, **config))
    a, b = llmdrop.load(tmp_path / "a")[0], llmdrop.load(tmp_path / "b")[0]
    record = b.config.llmdrop
    assert record["patched_attn"] == [layer] and len(record["patched_mlp"]) == 1 and len(record["patch_fits"]) == 2
    assert isinstance(b.model.layers[layer].self_attn, PatchedAttention)
    assert torch.equal(a.model.layers[layer].self_attn.linear_attn.weight, b.model.layers[layer].self_attn.linear_attn
                       .weight)


def test_streamed_patch_problems_are_found_before_measuring(tmp_path, text_file, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("measured before checking the patch")

    monkeypatch.setattr("llmdrop.run.measure_streamed", boom)
    common = dict(calibration=str(text_file), stream=True, patch="linear", progress=False)
    with pytest.raises(LlmdropError, match="needs at least 64"):
        drop(RunConfig(str(_saved(tmp_path, "llama")), plan=PlanSpec("attn", n=1), output=str(tmp_path / "o"),
                       samples=2, seq_len=16, **common))
    with pytest.raises(LlmdropError, match="sandwich norms"):
        drop(RunConfig(str(_saved(tmp_path, "gemma3")), plan=PlanSpec("block", n=1), output=str(tmp_path / "o"),
                       samples=4, seq_len=24, **common))
    assert not (tmp_path / "o").exists()


def test_applied_plan_of_a_streamed_block_patch(tmp_path):
    """stream.drop_streamed with patches: a block's map stands as its attention, its MLP goes, the layer stays."""
    src = _saved(tmp_path, "llama")
    plan = DropPlan(blocks=[2], num_layers=4, target="block")
    ids = random_ids(8, 24, seed=3)
    weights, _ = fit_streamed(src, plan, ids, progress=False)
    stream.drop_streamed(src, applied_plan(plan), tmp_path / "o", patches=weights)
    model = tiny_model("llama")
    fit_patches(model, plan, ids, progress=False)
    apply_plan(model, applied_plan(plan))
    loaded = llmdrop.load(tmp_path / "o")[0]
    assert len(loaded.model.layers) == 4 and not any(True for _ in loaded.model.layers[2].mlp.parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids[:2]).logits, model(input_ids=ids[:2]).logits, atol=1e-5)
