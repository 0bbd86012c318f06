"""The loss criterion (`PlanSpec(criterion="loss")`, `--criterion loss`): rank modules by the calibration loss their
removal alone causes, one-shot or greedy iterative, bounded by `candidates`, the model restored exactly."""

import copy
import json

import pytest
import torch
from tiny import random_ids, tiny_model

import llmdrop
from llmdrop.configs import PlanSpec
from llmdrop.criteria.cosine import choose_from_scores
from llmdrop.criteria.loss import calibration_loss, loss_drops, loss_scores, removed
from llmdrop.errors import LlmdropError
from llmdrop.measure import measure
from llmdrop.patches import PATCHES
from llmdrop.pipeline import choose, prune
from llmdrop.plan import DropPlan, cosine_order
from llmdrop.report import describe, plan_table
from llmdrop.surgery import already_dropped, apply_plan

KINDS = ("attn", "mlp")


def _own_text(model, samples=4, seq_len=16):
    """Chunks the model itself continues greedily: removing any module that matters raises its loss on them."""
    ids = random_ids(samples, 2)
    with torch.no_grad():
        while ids.shape[1] < seq_len:
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def _with_identity_attention(family, layer=2):
    """A tiny model whose attention in `layer` adds exactly zero (o_proj zeroed), and text it predicts confidently."""
    model = tiny_model(family)
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.lm_head.weight.mul_(4)  # a confident model: dropping a module that matters costs loss
    return model, _own_text(model)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _real_increase(model, ids, pick, base):
    """The loss increase of removing `pick` for real (surgery on a copy), to check the criterion against."""
    pruned = copy.deepcopy(model)
    kind, i = pick
    apply_plan(pruned, DropPlan.from_picks([pick], num_layers=4) if kind != "block"
               else DropPlan(blocks=[i], num_layers=4))
    return calibration_loss(pruned, ids, 2) - base


def test_loss_picks_the_module_whose_removal_changes_nothing(family):
    model, ids = _with_identity_attention(family)
    choice = choose(model, PlanSpec("attn", n=1, criterion="loss"), calibration=ids, batch_size=2, progress=False)
    assert choice.picks == [("attn", 2)] and choice.plan.attn == [2]
    assert choice.plan.criterion == "loss" and choice.plan.chosen_scores == [0.0]  # exactly: nothing changed
    assert all(v > 0 for pick, v in choice.evidence.steps[0].increases.items() if pick != ("attn", 2))
    assert describe(choice).startswith("plan (one-shot, target attn, criterion loss): drop attention [2] (")
    table = plan_table(choice).splitlines()
    assert "loss increase" in table[0] and table[2].split()[:2] == ["attn", "2"]


def test_loss_increases_are_those_of_real_drops():
    model = tiny_model("llama")
    ids = random_ids(4, 16)
    base = calibration_loss(model, ids, 2)
    picks = [(kind, i) for kind in ("attn", "mlp", "block") for i in range(4)]
    measured = loss_scores(model, ids, picks, batch_size=2, progress=False)
    assert measured.base == base and measured.tokens == 4 * 15
    for pick in picks:
        assert measured.increases[pick] == pytest.approx(_real_increase(model, ids, pick, base), abs=1e-6), pick
    # joint pools attention and MLP: the two lowest increases of the eight go, in that order
    choice = choose(model, PlanSpec("joint", n=2, criterion="loss"), calibration=ids, batch_size=2, progress=False)
    lowest = sorted((p for p in picks if p[0] != "block"), key=measured.increases.get)[:2]
    assert choice.picks == lowest and choice.plan.chosen_scores == [measured.increases[p] for p in lowest]


@pytest.mark.parametrize("target", ["joint", "block"])
def test_the_model_is_restored_bit_exactly(family, target):
    model = tiny_model(family)
    ids = random_ids(3, 12)
    before, modules = _state(model), dict(model.named_modules())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    choose(model, PlanSpec(target, n=2, criterion="loss"), calibration=ids, batch_size=2, progress=False)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert dict(model.named_modules()) == modules  # the very same module objects, nothing left swapped
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_removed_restores_even_after_an_error():
    model = tiny_model("llama")
    attn = model.model.layers[1].self_attn
    with pytest.raises(RuntimeError), removed(model, [("block", 1)]):
        assert type(model.model.layers[1].self_attn).__name__ == "DroppedAttention"
        raise RuntimeError("interrupted")
    assert model.model.layers[1].self_attn is attn and type(model.model.layers[1].mlp).__name__ != "DroppedMLP"


def test_a_standin_replaces_the_no_op():
    """The hook a linear patch plugs into: here the stand-in is the module itself, so nothing changes."""
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    layers = model.model.layers
    keep = lambda kind, i, sub: layers[i].self_attn if sub == "attn" else layers[i].mlp  # noqa: E731
    measured = loss_scores(model, ids, [("attn", 1), ("block", 2)], progress=False, standin=keep)
    assert measured.increases == {("attn", 1): 0.0, ("block", 2): 0.0}
    assert loss_scores(model, ids, [("attn", 1)], progress=False).increases[("attn", 1)] != 0.0


class _CountLayerCalls:
    """Counts decoder-layer forward calls that ran to the end (a full pass is layers x batches of them)."""

    def __init__(self, model):
        self.n = 0
        self.handles = [layer.register_forward_hook(self._count) for layer in model.model.layers]

    def _count(self, *_):
        self.n += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def test_candidates_bound_the_work_and_the_cost_says_how_much():
    model = tiny_model("llama")
    ids = random_ids(4, 16)  # 2 batches of 2 chunks
    full_pass = 4 * 2  # layers x batches
    counter = _CountLayerCalls(model)
    full = choose(model, PlanSpec("attn", n=1, criterion="loss"), calibration=ids, batch_size=2, progress=False)
    cost = full.evidence.cost
    assert (cost.evaluations, cost.sweeps, cost.forward_passes) == (4, 6, 2 * 6) and cost.seconds > 0
    # cosine 1 + base loss 1 + the walk: candidates at layers 0..3 run 4 + 3 + 2 + 1 layers, advancing 3
    assert counter.n == cost.passes * full_pass == (1 + 1 + (10 + 3) / 4) * full_pass
    counter.n = 0
    bounded = choose(model, PlanSpec("attn", n=1, criterion="loss", candidates=2), calibration=ids, batch_size=2,
                     progress=False)
    assert counter.n == bounded.evidence.cost.passes * full_pass and bounded.evidence.cost.passes <= 1 + 1 + 2
    top2 = cosine_order(bounded.scores, "attn")[:2]
    assert list(bounded.evidence.steps[0].increases) == top2 and bounded.picks[0] in top2
    # given scores stand in for the cosine measurement: only the loss sweeps remain
    scores = measure(model, ids, batch_size=2, progress=False)
    counter.n = 0
    given = choose(model, PlanSpec("attn", n=1, criterion="loss", candidates=2), calibration=ids, scores=scores,
                   batch_size=2, progress=False)
    assert counter.n == given.evidence.cost.passes * full_pass <= (1 + 2) * full_pass
    counter.remove()


def test_the_walk_gives_the_losses_of_full_sweeps(family):
    """Candidates scored from held hidden states (reuse_prefix) lose what full sweeps say, for attention, MLP and
    block removals and for linear-patch stand-ins, and cost less."""
    model = tiny_model(family)
    ids = random_ids(4, 16)
    modules = [("attn", 3), ("mlp", 1), ("block", 2), ("attn", 0)]
    before = _state(model)
    walk = loss_scores(model, ids, modules, batch_size=2, progress=False)
    full = loss_scores(model, ids, modules, batch_size=2, progress=False, reuse_prefix=False)
    assert list(walk.increases) == modules and walk.base == full.base
    for m in modules:
        assert walk.increases[m] == pytest.approx(full.increases[m], abs=1e-5)
    assert walk.cost.passes < full.cost.passes == 1 + len(modules)
    standin = PATCHES["linear"].implementation().standin(model, ids, 2, [])
    patched = [("attn", 3), ("mlp", 1)]
    walk = loss_scores(model, ids, patched, batch_size=2, progress=False, standin=standin)
    full = loss_scores(model, ids, patched, batch_size=2, progress=False, standin=standin, reuse_prefix=False)
    for m in patched:
        assert walk.increases[m] == pytest.approx(full.increases[m], abs=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_cost_is_logged(caplog):
    model = tiny_model("llama")
    with caplog.at_level("INFO", logger="llmdrop"):
        choice = choose(model, PlanSpec("mlp", n=1, criterion="loss"), calibration=random_ids(2, 8), progress=False)
    assert f"{choice.evidence.cost.forward_passes} forward passes" in caplog.text


def test_iterative_loss_reranks_on_the_pruned_model():
    model = tiny_model("llama")
    ids = random_ids(4, 16)
    reference = copy.deepcopy(model)
    choice = choose(model, PlanSpec("attn", n=2, iterative=True, criterion="loss"), calibration=ids, batch_size=2,
                    progress=False)
    # by hand: the lowest increase on the unpruned model, drop it, then the lowest on the pruned model
    base = calibration_loss(reference, ids, 2)
    first = min((("attn", i) for i in range(4)), key=lambda p: _real_increase(reference, ids, p, base))
    apply_plan(reference, DropPlan.from_picks([first], num_layers=4))
    base2 = calibration_loss(reference, ids, 2)
    rest = [("attn", i) for i in range(4) if ("attn", i) != first]
    again = {p: _real_increase(reference, ids, p, base2) for p in rest}
    second = min(rest, key=again.get)
    assert choice.picks == [first, second] and choice.plan.method == "iterative"
    assert len(choice.evidence.steps) == 2 and choice.evidence.steps[1].base == pytest.approx(base2, abs=1e-6)
    assert choice.evidence.steps[1].increases == pytest.approx(again, abs=1e-6)  # re-ranked, not the one-shot values
    assert already_dropped(model).attn == sorted([first[1], second[1]])  # greedy drops for real as it goes
    # cosine once, base loss once, 4 then 3 candidates (the base of step 2 is the loss of step 1's pick)
    assert choice.evidence.cost.sweeps == 1 + 1 + 4 + 3 and len(choice.history) == 1
    assert plan_table(choice).splitlines()[3].split()[-1] == f"{choice.evidence.steps[1].increases[second]:.4f}"


def test_iterative_loss_with_candidates_remeasures_the_cosine():
    model = tiny_model("qwen3")
    ids = random_ids(2, 16)
    counter = _CountLayerCalls(model)
    choice = choose(model, PlanSpec("block", n=2, iterative=True, criterion="loss", candidates=2), calibration=ids,
                    batch_size=2, progress=False)
    assert len(choice.history) == 2 and [len(s.increases) for s in choice.evidence.steps] == [2, 2]
    # one batch per sweep: cosine, base loss, 2 candidates, cosine again, 2 candidates (base reused)
    cost = choice.evidence.cost
    assert cost.forward_passes == cost.sweeps == 1 + 1 + 2 + 1 + 2
    # the candidates' sweeps start at their layers: less than a pass each (a removed block's layer does not count)
    assert counter.n <= cost.passes * 4 and cost.passes < 1 + 1 + 2 + 1 + 2
    assert choice.picks[1] in cosine_order(choice.history[1], "block", exclude=DropPlan(blocks=[choice.picks[0][1]]))[:2]
    counter.remove()


def test_loss_choice_is_recorded_in_the_checkpoint(saved_tiny, text_file, tmp_path):
    result = llmdrop.drop(llmdrop.RunConfig(str(saved_tiny("llama")), calibration=str(text_file), samples=4,
                                            seq_len=16, progress=False, output=tmp_path / "o",
                                            plan=PlanSpec("attn", n=2, criterion="loss", candidates=3)))
    record = llmdrop.load(tmp_path / "o")[0].config.llmdrop
    assert record["criterion"] == "loss" and record["plan"]["criterion"] == "loss"
    assert record["loss"]["candidates"] == 3 and len(record["loss"]["steps"][0]["increases"]) == 3
    assert record["loss"]["cost"]["forward_passes"] == result.choice.evidence.cost.forward_passes
    assert record["plan"]["chosen_scores"] == result.choice.plan.chosen_scores
    model = tiny_model("llama")
    cosine = choose_from_scores(measure(model, random_ids(2, 8), progress=False), PlanSpec("attn", n=1))
    prune(model, cosine)
    assert model.config.llmdrop["criterion"] == "cosine" and "loss" not in model.config.llmdrop


def test_loss_drops_from_python_leave_a_one_shot_model_untouched():
    model = tiny_model("gemma3")
    ids = random_ids(2, 12)
    choice = loss_drops(model, ids, "mlp", 2, protect=[0], progress=False)
    assert 0 not in choice.plan.mlp and len(choice.picks) == 2 and not already_dropped(model).size


@pytest.mark.parametrize("kwargs,pattern,params", [
    (dict(criterion="foo"), r"^criterion must be one of cosine, loss \(got 'foo'\)$", ["criterion"]),
    (dict(criterion="loss", candidates=0), r"^candidates must be a number of modules of at least 1 \(got 0\)$",
     ["candidates"]),
    (dict(criterion="loss", candidates=True), "candidates must be a number", ["candidates"]),
    (dict(candidates=3), "candidates bounds how many modules the loss criterion measures: use it with criterion loss",
     ["candidates", "criterion"]),
    (dict(n=4, criterion="loss", candidates=3), "candidates 3 is fewer than the 4 modules to drop",
     ["candidates", "iterative"]),
])
def test_bad_criterion_values_are_one_sentence_errors(kwargs, pattern, params):
    spec = {"target": "attn", "n": 1, **kwargs}
    with pytest.raises(LlmdropError, match=pattern) as err:
        PlanSpec(**spec)
    assert list(err.value.params) == params and "\n" not in str(err.value)
    assert "--" + params[0] in err.value.render()


def test_window_stays_cosine_only():
    with pytest.raises(LlmdropError, match="window ranks runs of blocks by cosine only") as err:
        PlanSpec("block", n=2, window=True, criterion="loss")
    assert err.value.render() == "--window ranks runs of blocks by cosine only; drop --criterion loss or --window"
    assert PlanSpec("attn", n=4, criterion="loss", candidates=3, iterative=True).candidates == 3  # fine greedily


def test_loss_needs_calibration_text():
    model = tiny_model("llama")
    scores = measure(model, random_ids(2, 8), progress=False)
    spec = PlanSpec("attn", n=1, criterion="loss")
    with pytest.raises(LlmdropError) as err:
        choose(model, spec, scores=scores)
    assert str(err.value) == ("criterion loss measures the model on calibration text: give calibration (scores alone "
                              "are not enough)")
    assert "--criterion loss" in err.value.render() and "--calibration" in err.value.render()
    with pytest.raises(LlmdropError, match="criterion loss runs the model on calibration text"):
        choose_from_scores(scores, spec)
    with pytest.raises(LlmdropError, match="candidates 2 is fewer than the 3 modules"):  # from a ratio, at choose
        choose(model, PlanSpec("attn", ratio=0.75, criterion="loss", candidates=2), calibration=random_ids(2, 8))
    assert spec.needs_calibration(scores, 4) and not PlanSpec("attn", n=1).needs_calibration(scores, 4)


def test_study_adds_loss_rows_next_to_the_papers(tmp_path, monkeypatch):
    from tiny import tiny_tokenizer

    from llmdrop import study as study_mod

    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cal = tmp_path / "cal.txt"
    cal.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(80)))
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    config = study_mod.StudyConfig(model_name=str(model_dir), targets=["attn"], counts=[1, 2], iterative=True,
                                   criterion="loss", candidates=3, calibration=str(cal), samples=2, seq_len=16,
                                   ppl_samples=1, speed_new_tokens=2, speed_repeats=1)
    rows = study_mod.run_study(config, tmp_path / "s", progress=False, log=lambda m: None)
    by_key = {r["key"]: r for r in rows}
    assert {r["strategy"] for r in rows} == {"base", "attn", "attn-iterative", "attn-loss", "attn-loss-iterative"}
    for name, method in (("loss-attn.json", "one-shot"), ("iterative-loss-attn.json", "iterative")):
        cache = json.loads((tmp_path / "s" / name).read_text())
        picks = [tuple(p) for p in cache["picks"]]
        assert len(picks) == 2 and cache["loss"]["cost"]["forward_passes"] > 0  # what the criterion measured
        prefix = "loss" if method == "one-shot" else "iterative-loss"
        assert by_key[f"{prefix}:attn:1"]["plan"]["attn"] == [picks[0][1]]
        assert by_key[f"{prefix}:attn:2"]["plan"]["attn"] == sorted(i for _, i in picks)
        assert by_key[f"{prefix}:attn:2"]["plan"]["criterion"] == "loss"
    assert len(json.loads((tmp_path / "s" / "loss-attn.json").read_text())["loss"]["steps"][0]["increases"]) == 3
    assert "attn-loss" in (tmp_path / "s" / "results.md").read_text()
    with pytest.raises(LlmdropError, match="candidates 1 is fewer than the largest count 2"):
        study_mod.StudyConfig(model_name="m", targets=["attn"], counts=[1, 2], criterion="loss", candidates=1)
    with pytest.raises(LlmdropError, match="criterion must be one of"):
        study_mod.StudyConfig(model_name="m", targets=["attn"], counts=[1], criterion="foo")


def test_patched_loss_increases_are_those_of_real_patched_models():
    """With `patch` linear each candidate is scored replaced by its own patch: the increase equals that of a copy
    patched and pruned for real (sublayers and a block), and the model is left exactly as it was."""
    from llmdrop.patches.linear import applied_plan, fit_patches, patch_standin

    model = tiny_model("llama")
    ids = random_ids(8, 16, seed=5)  # 128 tokens >= hidden size 64
    before = _state(model)
    base = calibration_loss(model, ids, 2)
    picks = [("attn", 1), ("mlp", 2), ("block", 3)]
    fits = []
    measured = loss_scores(model, ids, picks, batch_size=2, progress=False,
                           standin=patch_standin(model, ids, 2, fits))
    assert fits == picks
    for kind, i in picks:
        real = copy.deepcopy(model)
        plan = DropPlan(**{"blocks" if kind == "block" else kind: [i]}, num_layers=4)
        fit_patches(real, plan, ids, batch_size=2, progress=False)
        apply_plan(real, applied_plan(plan))
        assert measured.increases[(kind, i)] == pytest.approx(calibration_loss(real, ids, 2) - base, abs=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_patched_loss_scores_a_module_a_patch_replaces_exactly_as_free():
    """An attention that is exactly a linear map: removing it costs loss, patching it costs nothing; the patched
    criterion ranks by the patched cost (and its cost counts the fits too)."""
    from test_patch import _KnownLinearAttention

    model = tiny_model("llama")
    torch.manual_seed(1)
    model.model.layers[1].self_attn = _KnownLinearAttention(torch.randn(64, 64) * 0.3)
    ids = random_ids(8, 16, seed=5)
    spec = PlanSpec("attn", n=1, criterion="loss")
    patched = choose(model, spec, calibration=ids, batch_size=2, progress=False, patch="linear")
    cost = patched.evidence.steps[0].increases
    assert cost[("attn", 1)] == pytest.approx(0.0, abs=1e-3)
    assert patched.picks == [min(cost, key=cost.get)] and patched.plan.chosen_scores == [min(cost.values())]
    removal = choose(model, spec, calibration=ids, batch_size=2, progress=False)
    assert removal.evidence.steps[0].increases[("attn", 1)] > 1e-2
    assert patched.evidence.cost.sweeps == removal.evidence.cost.sweeps + 4  # one fit per candidate
