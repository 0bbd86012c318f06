import pytest
import torch
from manual import mean_cos, residual_stream
from tiny import random_ids, tiny_model

from llmdrop.errors import LlmdropError
from llmdrop.measure import Scores, measure


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
    scores = measure(model, ids, window_size=2, progress=False)
    ref = residual_stream(model, ids)
    boundaries = [ref[0]["in"]] + [r["out"] for r in ref]
    assert len(scores.window["scores"]) == len(ref) - 1
    for s, value in enumerate(scores.window["scores"]):
        assert value == pytest.approx(mean_cos(boundaries[s], boundaries[s + 2]), abs=1e-5)
    # A window of one block is the block score itself.
    one = measure(model, ids, window_size=1, progress=False)
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


def _valid(n=4):
    return {"attn": [0.5] * n, "mlp": [0.6] * n, "block": [0.7] * n, "tokens": 64, "model_name": "m",
            "calibration": {}, "residual": True, "window": None}


@pytest.mark.parametrize("case,change,pattern", [
    ("D14 NaN", {"attn": [0.5, float("nan"), 0.5, 0.5]}, r"'attn' holds nan"),
    ("D15 inf", {"mlp": [float("inf")] * 4}, r"'mlp' holds inf"),
    ("D15 out of range", {"block": [0.5, 3.0, 0.5, 0.5]}, r"'block' holds 3.0"),
    ("D16 short", {"attn": [0.5] * 3}, r"'attn' must be a list of 4 values, one per layer \(got 3 values\)"),
    ("D17 long", {"attn": [0.5] * 5}, r"'attn' must be a list of 4 values"),
    ("D18 strings", {"attn": ["x"] * 4}, r"'attn' holds 'x'"),
    ("D21 null", {"attn": None}, r"'attn' must be a list of 4 values, one per layer \(got null\)"),
    ("bools", {"attn": [True] * 4}, r"'attn' holds True"),
    ("tokens", {"tokens": 0}, r"'tokens' must be a positive token count"),
    ("unknown", {"surprise": 1}, r"unknown fields surprise"),
    ("window", {"window": {"n": 2, "scores": [0.5] * 2}}, r"window 'scores' must be a list of 3 values"),
    ("window n", {"window": {"n": 9, "scores": []}}, r"'window' must be"),
])
def test_scores_from_dict_rejects_what_it_cannot_rank(case, change, pattern):
    with pytest.raises(LlmdropError, match=pattern):
        Scores.from_dict({**_valid(), **change})


def test_scores_from_dict_accepts_its_own_output_and_the_old_model_key():
    data = {**_valid(), "window": {"n": 2, "scores": [0.1, 0.9, 0.3]}}
    scores = Scores.from_dict(data)
    assert Scores.from_dict(scores.to_dict()) == scores
    assert scores.best_window() == (1, 2, 0.9)
    old = {**_valid()}
    old["model"] = old.pop("model_name")
    assert Scores.from_dict(old).model_name == "m" == Scores.from_dict(old).model


@pytest.mark.parametrize("case,content,pattern", [
    ("D19 a number", "5", "holds a JSON int, not scores"),
    ("D20 a list", "[1, 2]", "holds a JSON list, not scores"),
    ("D22 binary", b"\xff\xfe\x00\x01binary", "is not text"),
    ("invalid JSON", "{", "is not valid JSON"),
    ("D23 a directory", None, "is a directory"),
    ("D24 missing", "missing", "does not exist"),
])
def test_scores_load_is_one_sentence(case, content, pattern, tmp_path):
    path = tmp_path / "s.json"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content != "missing":
        path.write_text(content)
    with pytest.raises(LlmdropError, match=pattern):
        Scores.load(path)


def test_scores_for_another_model_warn(caplog):
    scores = Scores.from_dict(_valid())
    with caplog.at_level("WARNING", logger="llmdrop"):
        scores.check_model(4, "m")
        assert not caplog.text
        scores.check_model(4, "other")  # D25
    assert "measured on m, not on other" in caplog.text
    with pytest.raises(LlmdropError, match="4-layer model but this model has 30"):
        scores.check_model(30)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_non_positive_batch_size_is_one_sentence(batch_size):
    """C15 / C16: torch's split used to raise a RuntimeError."""
    with pytest.raises(LlmdropError, match="batch_size must be a positive number of chunks"):
        measure(tiny_model("llama"), random_ids(1, 8), batch_size=batch_size, progress=False)


def test_window_size_out_of_range():
    with pytest.raises(LlmdropError, match="choose window_size between 1 and 4"):
        measure(tiny_model("llama"), random_ids(1, 8), window_size=5, progress=False)


def test_a_process_group_alone_does_not_shard(monkeypatch):
    """Data-parallel measuring happens only with an explicit shard, not because some process group exists."""
    import torch.distributed as dist

    model = tiny_model("llama")
    ids = random_ids(4, 8)
    alone = measure(model, ids, progress=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("all-reduce without a shard"))
    again = measure(model, ids, progress=False)
    assert again.tokens == alone.tokens and again.attn == alone.attn
    assert measure(model, ids, progress=False, shard=(0, 1)).attn == alone.attn


def test_shard_is_validated():
    model = tiny_model("llama")
    with pytest.raises(LlmdropError, match=r"shard \(2, 2\) is not a rank"):
        measure(model, random_ids(1, 8), shard=(2, 2), progress=False)
    with pytest.raises(LlmdropError, match="needs an initialised torch.distributed process group"):
        measure(model, random_ids(1, 8), shard=(0, 2), progress=False)


def test_two_shards_add_up_to_one_process(monkeypatch):
    """The all-reduce over shards: each rank's float64 sums added give the single-process scores."""
    import torch.distributed as dist

    model = tiny_model("qwen2")
    ids = random_ids(5, 8)
    alone = measure(model, ids, batch_size=2, progress=False, window_size=2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    parts = []
    monkeypatch.setattr(dist, "all_reduce", lambda t: parts.append(t.clone()))
    measure(model, ids, batch_size=2, progress=False, window_size=2, shard=(0, 2))
    measure(model, ids, batch_size=2, progress=False, window_size=2, shard=(1, 2))
    total = parts[0] + parts[1]

    def reduce_to_total(t):
        t.copy_(total)

    monkeypatch.setattr(dist, "all_reduce", reduce_to_total)
    both = measure(model, ids, batch_size=2, progress=False, window_size=2, shard=(1, 2))
    assert both.tokens == alone.tokens and both.calibration.get("ranks") == 2
    for kind in ("attn", "mlp", "block"):
        assert both.of(kind) == pytest.approx(alone.of(kind), abs=1e-9)
    assert both.window["scores"] == pytest.approx(alone.window["scores"], abs=1e-9)
