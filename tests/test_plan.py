import copy

import pytest
import torch
from tiny import random_ids, tiny_model

from llmdrop.criteria.cosine import iterative_drops
from llmdrop.errors import LlmdropError
from llmdrop.measure import Scores, measure
from llmdrop.plan import DropPlan, count_for, plan_drops, plan_window
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
    with pytest.raises(LlmdropError, match=r"protect \[9\]: the model has layers 0..3"):
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
    choice = iterative_drops(model, ids, "joint", 1, progress=False)
    plan, history = choice.plan, choice.history
    assert (plan.attn, plan.mlp, plan.blocks) == (one_shot.attn, one_shot.mlp, one_shot.blocks)
    assert len(history) == 1


def test_iterative_remeasures_the_pruned_model():
    ids = random_ids(2, 16)
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    choice = iterative_drops(model, ids, "attn", 2, progress=False)
    plan, history = choice.plan, choice.history
    first = plan_drops(history[0], "attn", 1).attn[0]
    apply_plan(reference, DropPlan(attn=[first], num_layers=4))
    again = measure(reference, ids, progress=False)
    assert history[1].attn == pytest.approx(again.attn, abs=1e-6)
    assert history[1].attn[first] == pytest.approx(1.0)  # a dropped attention adds nothing
    second = plan_drops(again, "attn", 1, exclude=DropPlan(attn=[first])).attn[0]
    assert plan.attn == sorted([first, second])
    assert choice.picks == [("attn", first), ("attn", second)]  # in the order they were made


def test_iterative_blocks_become_real_removals():
    ids = random_ids(2, 16)
    model = tiny_model("qwen2")
    plan = iterative_drops(model, ids, "block", 2, progress=False).plan
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
    with pytest.raises(LlmdropError, match="window_size 3"):
        plan_window(s, 3)


def test_reversed_protect_range_is_an_error():
    """D9: '29-0' used to protect nothing (range(29, 1) is empty)."""
    from llmdrop.plan import parse_protect

    assert parse_protect("0,1, 3-5") == [0, 1, 3, 4, 5]
    assert parse_protect("") == []
    with pytest.raises(LlmdropError, match="protect range '29-0' runs backwards; write it low to high"):
        parse_protect("29-0")
    for bad in ("-1", "1-x", "a,b"):
        with pytest.raises(LlmdropError, match="protect takes layer indices"):
            parse_protect(bad)


def test_ratio_that_rounds_to_nothing_names_the_ratio():
    """D5: --ratio 0.01 used to blame --n."""
    with pytest.raises(LlmdropError, match=r"ratio 0.01 of 30 modules rounds to 0 modules"):
        count_for("attn", 30, ratio=0.01)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(target="bogus", n=1), "target must be one of"),
    (dict(target="attn"), "give exactly one of n .* or ratio"),
    (dict(target="attn", n=1, ratio=0.5), "give exactly one of"),
    (dict(target="attn", n=0), "n must be at least 1"),
    (dict(target="attn", ratio=1.0), "ratio must be between 0 and 1"),
    (dict(target="attn", ratio=float("nan")), "ratio must be between 0 and 1"),
    (dict(target="attn", n=1, window=True), "window drops consecutive blocks"),
    (dict(target="block", n=1, window=True, iterative=True), "choose one of iterative and window"),
    (dict(target="attn", n=1, protect=(-1,)), "protect takes layer indices"),
    (dict(target="attn", n=1, criterion="foo"), "criterion must be one of cosine, loss"),
    (dict(target="attn", n=1, criterion="loss", candidates=0), "candidates must be a number of modules"),
    (dict(target="attn", n=1, candidates=2), "use it with criterion loss"),
    (dict(target="block", n=1, window=True, criterion="loss"), "window ranks runs of blocks by cosine only"),
])
def test_plan_spec_is_validated_when_built(kwargs, pattern):
    from llmdrop.configs import PlanSpec

    with pytest.raises(LlmdropError, match=pattern):
        PlanSpec(**kwargs)


def test_plan_spec_renders_flags_in_the_cli():
    from llmdrop.configs import PlanSpec

    with pytest.raises(LlmdropError) as err:
        PlanSpec("attn", n=0)
    assert str(err.value) == "nothing to drop: n must be at least 1 (got 0)"
    assert err.value.render() == "nothing to drop: --n must be at least 1 (got 0)"


def test_choose_from_scores_keeps_the_pick_order():
    from llmdrop.configs import PlanSpec
    from llmdrop.criteria.cosine import choose_from_scores
    from llmdrop.report import describe, plan_table

    s = _scores([0.1, 0.9, 0.5, 0.95], [0.92, 0.3, 0.97, 0.2])
    choice = choose_from_scores(s, PlanSpec("joint", n=3, protect=(2,)))
    assert choice.picks == [("attn", 3), ("mlp", 0), ("attn", 1)]
    assert describe(choice) == "plan (one-shot, target joint): drop attention [1, 3]; MLP [0]"
    assert plan_table(choice).splitlines()[2].split()[:2] == ["attn", "3"]
    with pytest.raises(LlmdropError, match="iterative re-measures"):
        choose_from_scores(s, PlanSpec("attn", n=1, iterative=True))
    with pytest.raises(LlmdropError, match="window_size 2"):
        choose_from_scores(s, PlanSpec("block", n=2, window=True))


def test_plan_from_picks_and_plus():
    plan = DropPlan.from_picks([("mlp", 3), ("attn", 1), ("block", 0), ("attn", 0)], 4, "joint", "iterative")
    assert (plan.attn, plan.mlp, plan.blocks) == ([0, 1], [3], [0])
    more = plan.plus(DropPlan(attn=[2]))
    assert more.attn == [0, 1, 2] and more.method == "iterative" and more.num_layers == 4


def test_random_plan_is_the_seeded_draw_studies_made():
    import random

    from llmdrop.plan import random_plan

    for target in ("attn", "mlp", "block"):
        field = "blocks" if target == "block" else target
        assert getattr(random_plan(target, 3, 10, seed=4), field) == sorted(random.Random(4).sample(range(10), 3))
    pool = [(kind, i) for kind in ("attn", "mlp") for i in range(10)]
    joint = random_plan("joint", 5, 10, seed=1)
    picks = random.Random(1).sample(pool, 5)
    assert joint.attn == sorted(i for k, i in picks if k == "attn") and joint.method == "random-1"
    assert 7 not in random_plan("attn", 9, 10, seed=0, protect=[7]).attn
    with pytest.raises(LlmdropError, match="between 1 and 9 can go"):
        random_plan("block", 10, 10, seed=0)


@pytest.mark.parametrize("data,pattern", [
    ([1, 2], "must be a JSON object"),
    ({"attn": [1], "extra": 1}, "unknown fields extra"),
    ({"attn": "1"}, "'attn' must be a list of layer indices"),
    ({"attn": [-1]}, "'attn' must be a list of layer indices"),
    ({"blocks": [True]}, "'blocks' must be a list of layer indices"),
    ({"num_layers": "4"}, "'num_layers' must be a layer count"),
    ({"target": "bogus"}, "target 'bogus' is not one of"),
    ({"chosen_scores": [float("nan")]}, "'chosen_scores' must be a list of finite numbers"),
    ({"criterion": "foo"}, "criterion 'foo' is not one of cosine, loss"),
])
def test_plan_from_dict_rejects_what_it_cannot_use(data, pattern):
    with pytest.raises(LlmdropError, match=pattern):
        DropPlan.from_dict(data)


def test_plan_round_trips_through_a_dict():
    plan = DropPlan(attn=[3, 1], mlp=[2], num_layers=4, target="joint", chosen_scores=[0.9, 0.8, 0.7])
    assert DropPlan.from_dict(plan.to_dict()) == plan
    by_loss = DropPlan(attn=[1], num_layers=4, target="attn", chosen_scores=[-0.01], criterion="loss")
    assert DropPlan.from_dict(by_loss.to_dict()) == by_loss
    old = plan.to_dict()
    del old["criterion"]  # plan.json files written before the loss criterion
    assert DropPlan.from_dict(old).criterion == "cosine"


def test_loss_order_and_plan_by_loss():
    from llmdrop.plan import cosine_order, loss_order, plan_by_loss

    s = _scores([0.1, 0.9, 0.5, 0.95], [0.92, 0.3, 0.97, 0.2])
    assert cosine_order(s, "attn") == [("attn", 3), ("attn", 1), ("attn", 2), ("attn", 0)]
    increases = {("attn", 0): 0.02, ("attn", 2): -0.01, ("mlp", 1): 0.02, ("mlp", 3): 0.5}
    # measured first, lowest increase first (a tie goes to the higher cosine), then the rest by cosine
    assert loss_order(s, increases, "joint") == [("attn", 2), ("mlp", 1), ("attn", 0), ("mlp", 3), ("mlp", 2),
                                                 ("attn", 3), ("mlp", 0), ("attn", 1)]
    plan = plan_by_loss(s, increases, "joint", 3, protect=[0])
    assert (plan.attn, plan.mlp, plan.chosen_scores, plan.criterion) == ([2], [1, 3], [-0.01, 0.02, 0.5], "loss")
    assert plan_by_loss(s, increases, "attn", 1, exclude=DropPlan(attn=[2])).attn == [0]
    with pytest.raises(LlmdropError, match=r"only 2 of the 3 modules to drop have a measured loss; raise candidates "
                                           "to at least 3"):
        plan_by_loss(s, increases, "attn", 3)
    with pytest.raises(LlmdropError, match="cannot drop 5 attention layers"):
        plan_by_loss(s, increases, "attn", 5)


def test_plan_does_not_import_surgery():
    """plan <-> surgery was an import cycle; plan is pure policy now (scores are only read, under TYPE_CHECKING)."""
    import ast
    from pathlib import Path

    import llmdrop.plan

    tree = ast.parse(Path(llmdrop.plan.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "collections.abc", "dataclasses", "typing", "errors", "measure", "options",
                        "criteria"}
