import pytest
import torch
from manual import mean_cos, residual_stream
from tiny import random_ids, tiny_model

from llmdrop.errors import LlmdropError
from llmdrop.measure import measure


def test_manual_reference_matches_the_model(family):
    """The hand computation used as reference below reproduces the model's own hidden states."""
    model = tiny_model(family)
    ids = random_ids(2, 20)
    ref = residual_stream(model, ids)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(len(ref) - 1):  # the last entry may be after the final norm
        torch.testing.assert_close(ref[i]["out"], hidden[i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [True, False])
def test_scores_equal_hook_free_computation(family, residual):
    model = tiny_model(family)
    ids = random_ids(3, 20)
    scores = measure(model, ids, batch_size=2, residual=residual, progress=False)
    ref = residual_stream(model, ids)
    assert scores.tokens == ids.numel()
    for i, r in enumerate(ref):
        if residual:
            expected_attn, expected_mlp = mean_cos(r["in"], r["mid"]), mean_cos(r["mid"], r["out"])
        else:
            expected_attn, expected_mlp = mean_cos(r["attn_in"], r["attn_raw"]), mean_cos(r["mlp_in"], r["mlp_raw"])
        assert scores.attn[i] == pytest.approx(expected_attn, abs=1e-5)
        assert scores.mlp[i] == pytest.approx(expected_mlp, abs=1e-5)
        assert scores.block[i] == pytest.approx(mean_cos(r["in"], r["out"]), abs=1e-5)


def test_batching_does_not_change_scores():
    model = tiny_model("llama")
    ids = random_ids(5, 12)
    a = measure(model, ids, batch_size=1, progress=False)
    b = measure(model, ids, batch_size=5, progress=False)
    assert a.attn == pytest.approx(b.attn, abs=1e-6) and a.block == pytest.approx(b.block, abs=1e-6)


def test_window_scores_equal_hook_free_computation():
    model = tiny_model("qwen3")
    ids = random_ids(2, 16)
    scores = measure(model, ids, window=2, progress=False)
    ref = residual_stream(model, ids)
    boundaries = [ref[0]["in"]] + [r["out"] for r in ref]
    assert len(scores.window["scores"]) == len(ref) - 1
    for s, value in enumerate(scores.window["scores"]):
        assert value == pytest.approx(mean_cos(boundaries[s], boundaries[s + 2]), abs=1e-5)
    # A window of one block is the block score itself.
    one = measure(model, ids, window=1, progress=False)
    assert one.window["scores"] == pytest.approx(one.block, abs=1e-9)


def test_non_finite_activations_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(LlmdropError, match="layer 2"):
        measure(model, random_ids(1, 8), progress=False)


def test_hooks_are_removed_after_measuring():
    model = tiny_model("llama")
    before = logits = model(random_ids(1, 8)).logits
    measure(model, random_ids(1, 8), progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(random_ids(1, 8)).logits, before)
    del logits
