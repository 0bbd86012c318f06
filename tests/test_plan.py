import copy

import pytest
import torch
from tiny import random_ids, tiny_model

from llmdrop.errors import LlmdropError
from llmdrop.measure import Scores, measure
from llmdrop.plan import DropPlan, count_for, iterative_drops, plan_drops, plan_window
from llmdrop.surgery import apply_plan


def _scores(attn, mlp, block=None):
    return Scores(attn=attn, mlp=mlp, block=block or [0.5] * len(attn), tokens=1)


def test_one_shot_drops_the_highest_cosine():
    plan = plan_drops(_scores([0.1, 0.9, 0.5, 0.95], [0.2] * 4), "attn", 2)
    assert plan.attn == [1, 3] and plan.mlp == [] and plan.chosen_scores == [0.95, 0.9]


def test_joint_pools_attention_and_mlp():
    s = _scores([0.1, 0.9, 0.5, 0.95], [0.92, 0.3, 0.97, 0.2])
    plan = plan_drops(s, "joint", 3)
    pooled = sorted([(v, "attn", i) for i, v in enumerate(s.attn)] + [(v, "mlp", i) for i, v in enumerate(s.mlp)],
                    reverse=True)[:3]
    assert plan.attn == sorted(i for _, k, i in pooled if k == "attn")
    assert plan.mlp == sorted(i for _, k, i in pooled if k == "mlp")
    assert (plan.attn, plan.mlp) == ([3], [0, 2])


def test_protect_and_exclude():
    s = _scores([0.1, 0.9, 0.5, 0.95], [0.2] * 4)
    assert plan_drops(s, "attn", 2, protect=[3]).attn == [1, 2]
    assert plan_drops(s, "attn", 1, exclude=DropPlan(attn=[3])).attn == [1]
    assert plan_drops(s, "block", 1, exclude=DropPlan(blocks=[0, 1])).blocks == [3]  # ties go deeper
    with pytest.raises(LlmdropError, match="only 0 can go"):
        plan_drops(s, "block", 1, exclude=DropPlan(blocks=[0, 1, 2]))


def test_too_many_drops_is_a_clear_error():
    s = _scores([0.1] * 4, [0.2] * 4)
    with pytest.raises(LlmdropError, match="cannot drop 5 attention layers: only 4 can go"):
        plan_drops(s, "attn", 5)
    with pytest.raises(LlmdropError, match="only 3 can go"):
        plan_drops(s, "block", 4)
    with pytest.raises(LlmdropError, match="only 2 can go"):
        plan_drops(s, "attn", 3, protect=[0, 1])
    with pytest.raises(LlmdropError, match="--protect"):
        plan_drops(s, "attn", 1, protect=[9])


def test_count_from_n_or_ratio():
    assert count_for("attn", 30, n=8) == 8
    assert count_for("attn", 30, ratio=0.25) == 8
    assert count_for("joint", 30, ratio=0.25) == 15
    for bad in (dict(n=0), dict(ratio=1.5), dict()):
        with pytest.raises(LlmdropError):
            count_for("attn", 30, **bad)


def test_iterative_k1_equals_one_shot_k1(family):
    ids = random_ids(2, 16)
    model = tiny_model(family)
    one_shot = plan_drops(measure(copy.deepcopy(model), ids, progress=False), "joint", 1)
    plan, history = iterative_drops(model, ids, "joint", 1, progress=False)
    assert (plan.attn, plan.mlp, plan.blocks) == (one_shot.attn, one_shot.mlp, one_shot.blocks)
    assert len(history) == 1


def test_iterative_remeasures_the_pruned_model():
    ids = random_ids(2, 16)
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    plan, history = iterative_drops(model, ids, "attn", 2, progress=False)
    first = plan_drops(history[0], "attn", 1).attn[0]
    apply_plan(reference, DropPlan(attn=[first], num_layers=4))
    again = measure(reference, ids, progress=False)
    assert history[1].attn == pytest.approx(again.attn, abs=1e-6)
    assert history[1].attn[first] == pytest.approx(1.0)  # a dropped attention adds nothing
    assert plan.attn == sorted([first, plan_drops(again, "attn", 1, exclude=DropPlan(attn=[first])).attn[0]])


def test_iterative_blocks_become_real_removals():
    ids = random_ids(2, 16)
    model = tiny_model("qwen2")
    plan, _ = iterative_drops(model, ids, "block", 2, progress=False)
    assert len(plan.blocks) == 2
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_window_picks_the_best_run():
    s = _scores([0.5] * 5, [0.5] * 5)
    s.window = {"n": 2, "scores": [0.1, 0.8, 0.3, 0.7]}
    assert plan_window(s, 2).blocks == [1, 2]
    assert plan_window(s, 2, protect=[2]).blocks == [3, 4]
    with pytest.raises(LlmdropError, match="--window 3"):
        plan_window(s, 3)
