import copy

import pytest
import torch
from manual import branch, residual_stream
from tiny import random_ids, tiny_model

from llmdrop.arch import arch_for
from llmdrop.errors import LlmdropError
from llmdrop.plan import DropPlan
from llmdrop.surgery import apply_plan, count_parameters, kv_cache_layers


def _layer_output(model, i, ids):
    captured = {}
    layer = model.get_submodule(arch_for(model).layers)[i]
    handle = layer.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    out = captured["out"]
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_dropped_sublayer_is_an_identity_residual(family, kind):
    model = tiny_model(family)
    ids = random_ids(2, 20)
    arch = arch_for(model)
    decoder = model.get_submodule(arch.layers.rpartition(".")[0])
    layer_no = 1
    original = copy.deepcopy(model)
    apply_plan(model, DropPlan(**{kind: [layer_no]}, num_layers=4))
    h_in = residual_stream(model, ids)[layer_no]["in"]  # layers before are untouched
    with torch.no_grad():
        layer = original.get_submodule(arch.layers)[layer_no]
        if kind == "attn":  # h_out = h_in + MLP branch of h_in
            expected = h_in + branch(layer, arch, "mlp", h_in, decoder, ids.shape[1], layer_no)[2]
        else:  # h_out = h_mid = h_in + attention branch
            expected = h_in + branch(layer, arch, "attn", h_in, decoder, ids.shape[1], layer_no)[2]
    torch.testing.assert_close(_layer_output(model, layer_no, ids), expected, rtol=0, atol=1e-6)


def test_dropped_modules_leave_no_parameters(family):
    model = tiny_model(family)
    arch = arch_for(model)
    layer = model.get_submodule(arch.layers)[2]
    attn_params = sum(p.numel() for p in layer.get_submodule(arch.attn).parameters())
    attn_params += sum(p.numel() for n in arch.attn_norms for p in layer.get_submodule(n).parameters())
    mlp_params = sum(p.numel() for p in layer.get_submodule(arch.mlp).parameters())
    mlp_params += sum(p.numel() for n in arch.mlp_norms for p in layer.get_submodule(n).parameters())
    before = count_parameters(model)
    apply_plan(model, DropPlan(attn=[2], mlp=[2], num_layers=4))
    assert count_parameters(model) == before - attn_params - mlp_params
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(f"{arch.layers}.2.") for n in names)
    assert kv_cache_layers(model) == 3


@pytest.mark.parametrize("dropped", [[0], [0, 2], [1, 3]])
def test_cached_generation_equals_uncached(family, dropped):
    model = tiny_model(family)
    apply_plan(model, DropPlan(attn=dropped, num_layers=4))
    ids = random_ids(2, 10, seed=3)  # 10 prompt + 12 new tokens: past Gemma's 6-token sliding window
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=3)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_cache_holds_only_kept_attention_layers(family):
    model = tiny_model(family)
    apply_plan(model, DropPlan(attn=[0, 2], num_layers=4))
    out = model(input_ids=random_ids(1, 9), use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert len(cache.layers) == 2
    assert all(layer.keys.shape[-2] > 0 for layer in cache.layers)
    kept_types = [t for i, t in enumerate(getattr(model.config, "layer_types", None) or []) if i not in (0, 2)]
    if kept_types:  # each compact slot has the type of the layer using it
        assert [getattr(layer, "is_sliding", False) for layer in cache.layers] == ["sliding" in t for t in kept_types]


def test_block_drop_removes_layers_and_keeps_layer_types(family):
    model = tiny_model(family)
    types = list(getattr(model.config, "layer_types", None) or [])
    ref = tiny_model(family)
    apply_plan(model, DropPlan(blocks=[1], num_layers=4))
    assert len(model.get_submodule(arch_for(model).layers)) == 3 == model.config.num_hidden_layers
    if types:
        assert model.config.layer_types == [types[0], types[2], types[3]]
    ids = random_ids(2, 10, seed=4)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=3)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))
    # The same as running the original with layer 1 skipped entirely.
    ref_layers = ref.get_submodule(arch_for(ref).layers)
    del ref_layers[1]
    ref.config.num_hidden_layers = 3
    if types:
        ref.config.layer_types = [types[0], types[2], types[3]]
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids, use_cache=False).logits)


def test_mixed_block_and_sublayer_drops_compact_the_cache():
    model = tiny_model("gemma3")
    apply_plan(model, DropPlan(blocks=[0], attn=[2], mlp=[3], num_layers=4))
    assert model.config.llmdrop["attn"] == [1] and model.config.llmdrop["mlp"] == [2]
    assert kv_cache_layers(model) == 2
    ids = random_ids(1, 8)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=3)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_plan_for_another_model_is_refused():
    model = tiny_model("llama")
    with pytest.raises(LlmdropError, match="made for 30 layers"):
        apply_plan(model, DropPlan(attn=[1], num_layers=30))
    with pytest.raises(LlmdropError, match="distinct layers"):
        apply_plan(model, DropPlan(attn=[7], num_layers=4))
    with pytest.raises(LlmdropError, match="at least one must stay"):
        apply_plan(model, DropPlan(blocks=[0, 1, 2, 3], num_layers=4))


def test_dropped_flags_and_already_dropped():
    from llmdrop.surgery import already_dropped, dropped_flags

    model = tiny_model("llama")
    assert dropped_flags(model) == ([False] * 4, [False] * 4) and already_dropped(model).size == 0
    apply_plan(model, DropPlan(attn=[1, 3], mlp=[0], num_layers=4))
    assert dropped_flags(model, arch_for(model)) == ([False, True, False, True], [True, False, False, False])
    gone = already_dropped(model)
    assert (gone.attn, gone.mlp, gone.num_layers) == ([1, 3], [0], 4)
    assert kv_cache_layers(model) == 2


def test_apply_plan_records_provenance():
    model = tiny_model("llama")
    apply_plan(model, DropPlan(attn=[2], num_layers=4), provenance={"source_model": "tiny"})
    assert model.config.llmdrop["source_model"] == "tiny" and model.config.llmdrop["attn"] == [2]
