"""The decode-time profile: shares per module kind add up to 1, the ideal speedup formula on a hand-made timing, and
the dropped set of a pruned model read in the base model's numbering."""

import copy

import pytest
from tiny import tiny_model

from llmdrop.plan import DropPlan
from llmdrop.profile import (
    KINDS,
    DroppedSet,
    Profile,
    dropped_set,
    dropped_share,
    ideal_for,
    ideal_speedup,
    profile_decode,
    shares_from_seconds,
)
from llmdrop.surgery import apply_plan


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shares_sum_to_one_and_hooks_are_removed(family):
    model = tiny_model(family)
    prof = profile_decode(model, context=24, batch=2, steps=3)
    shares = prof.shares()
    assert set(shares) == set(KINDS)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(v >= 0 for v in shares.values()), shares
    assert shares["attention"] > 0 and shares["mlp"] > 0 and shares["lm_head"] > 0
    # every layer's sublayers run inside it
    for i in range(4):
        inner = sum(prof.layers[k][i] for k in ("attention", "attn_norms", "mlp", "mlp_norms"))
        assert 0 < inner <= prof.layers["layer"][i]
    assert sum(prof.layers["layer"]) <= prof.total_s
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert prof.to_dict()["shares"] == shares and prof.step_ms() > 0


def test_a_pruned_model_is_profiled_too():
    model = tiny_model("llama")
    apply_plan(model, DropPlan(attn=[0, 2], mlp=[1], blocks=[3], num_layers=4))
    prof = profile_decode(model, context=16, steps=2)
    assert len(prof.layers["attention"]) == 3
    assert sum(prof.shares().values()) == pytest.approx(1.0, abs=1e-9)


def _hand_made() -> Profile:
    # 3 layers; 10 s of decoding: attention 1 + 2 + 3, MLP 0.5 each, norms 0.1 per sublayer, LM head 1.
    layers = {"attention": [1.0, 2.0, 3.0], "attn_norms": [0.1, 0.1, 0.1], "mlp": [0.5, 0.5, 0.5],
              "mlp_norms": [0.1, 0.1, 0.1], "layer": [1.8, 2.8, 3.8]}
    seconds = {"attention": 6.0, "mlp": 1.5, "norms": 0.6, "lm_head": 1.0}
    seconds["other"] = 10.0 - sum(seconds.values())
    return Profile(context=8, batch=1, steps=4, total_s=10.0, seconds=seconds, layers=layers)


def test_ideal_speedup_on_a_hand_made_timing():
    prof = _hand_made()
    assert prof.shares() == pytest.approx({"attention": 0.6, "mlp": 0.15, "norms": 0.06, "lm_head": 0.1,
                                           "other": 0.09})
    assert shares_from_seconds({"attention": 6.0, "mlp": 1.5, "norms": 0.6, "lm_head": 1.0}, 10.0) == \
        pytest.approx(prof.shares())
    # attention 1 and 2 with their norms: (2.1 + 3.1) / 10 = 0.52 -> 1 / 0.48
    attn = DroppedSet(attn=[1, 2], mlp=[], blocks=[])
    assert dropped_share(prof, attn) == pytest.approx(0.52)
    assert ideal_for(prof, attn) == pytest.approx({"dropped": "attn [1, 2]", "dropped_share": 0.52,
                                                   "ideal_speedup": 1 / 0.48})
    # block 0 whole (1.8), MLP 2 with its norm (0.6); attention 0 is inside block 0 and not counted twice
    mixed = DroppedSet(attn=[0], mlp=[2], blocks=[0])
    assert dropped_share(prof, mixed) == pytest.approx(0.24)
    assert ideal_for(prof, mixed)["ideal_speedup"] == pytest.approx(1 / 0.76)
    assert ideal_speedup(0.0) == 1.0 and ideal_speedup(0.5) == 2.0 and ideal_speedup(0.75) == 4.0
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            ideal_speedup(bad)
    assert ideal_for(prof, None) == {"dropped": None, "dropped_share": None, "ideal_speedup": None}


def test_dropped_set_is_read_in_the_base_numbering():
    base = tiny_model("llama")
    pruned = copy.deepcopy(base)
    apply_plan(pruned, DropPlan(attn=[0, 3], mlp=[2], blocks=[1], num_layers=4))
    assert dropped_set(base, pruned) == DroppedSet(attn=[0, 3], mlp=[2], blocks=[1])
    assert dropped_set(base, base) == DroppedSet(attn=[], mlp=[], blocks=[])
    # a pruned model as the reference: only what the other lost beyond it counts
    again = copy.deepcopy(pruned)
    apply_plan(again, DropPlan(attn=[1], num_layers=3))  # current numbering: layer 1 is base layer 2
    assert dropped_set(pruned, again) == DroppedSet(attn=[1], mlp=[], blocks=[])
    # blocks removed in two rounds cannot be matched to the base's layers
    twice = copy.deepcopy(pruned)
    apply_plan(twice, DropPlan(blocks=[0], num_layers=3))
    assert dropped_set(base, twice) is None
