"""The KV objective (`PlanSpec(objective="kv")`, `--objective kv`): trade cosine similarity against the KV-cache
bytes each drop frees at a stated context, for Gemma-style models whose full-attention layers hold far more cache
than their sliding-window ones."""

import copy
import math
import re

import pytest
import torch
from tiny import random_ids, tiny_model

from llmdrop.arch import kv_bytes_per_layer, kv_tokens_per_layer, layer_types
from llmdrop.bench import kv_bytes, prefill
from llmdrop.cli import main
from llmdrop.configs import PlanSpec, RunConfig
from llmdrop.criteria.cosine import choose_from_scores
from llmdrop.errors import LlmdropError
from llmdrop.measure import Scores, measure
from llmdrop.pipeline import choose, prune
from llmdrop.plan import DropPlan, kv_cost, plan_drops
from llmdrop.report import describe, kv_rows, plan_table
from llmdrop.run import drop as run_drop
from llmdrop.run import run

# tests/tiny.py's Gemma-3: layers 0, 2, 3 slide over a window of 6 tokens, layer 1 attends to everything.
FULL, WINDOW = 1, 6


def _gemma():
    model = tiny_model("gemma3")
    assert layer_types(model.config) == ["sliding_attention", "full_attention", "sliding_attention",
                                         "sliding_attention"]
    return model


def _scores(attn, block=None):
    return Scores(attn=list(attn), mlp=[0.2] * len(attn), block=list(block or attn), tokens=1)


def _same(a, b):
    assert (a.plan.attn, a.plan.mlp, a.plan.blocks, a.plan.chosen_scores) == \
        (b.plan.attn, b.plan.mlp, b.plan.blocks, b.plan.chosen_scores)
    assert a.picks == b.picks


# ---- the KV bytes a layer holds -------------------------------------------------------------------------------------


def test_kv_tokens_follow_the_layer_types():
    config = _gemma().config
    assert kv_tokens_per_layer(config, 100) == [WINDOW - 1, 100, WINDOW - 1, WINDOW - 1]
    assert kv_tokens_per_layer(config, 3) == [3, 3, 3, 3]  # shorter than the window: every layer holds it all
    # 2 (K and V) x 2 KV heads x head dim 16 x 4 bytes x tokens
    assert kv_bytes_per_layer(config, 100, 4) == [2 * 2 * 16 * 4 * t for t in (5, 100, 5, 5)]
    assert kv_bytes_per_layer(tiny_model("llama").config, 100, 2) == [2 * 2 * 16 * 2 * 100] * 4


@pytest.mark.parametrize("plan", [DropPlan(attn=[FULL], num_layers=4), DropPlan(attn=[0, 2], num_layers=4),
                                  DropPlan(blocks=[FULL, 3], num_layers=4)], ids=["full", "sliding", "blocks"])
def test_kv_bytes_saved_equal_what_the_cache_holds(plan):
    """The bytes the helper says a drop frees are what transformers' cache (read by bench.kv_bytes) loses."""
    context = 24  # > the window, so sliding and full layers differ
    base = _gemma()
    ids = random_ids(1, context)
    with torch.no_grad():
        held_before = kv_bytes(prefill(base, ids)[1])
        per_layer = kv_bytes_per_layer(base.config, context, 4)
        assert held_before == sum(per_layer)
        pruned = copy.deepcopy(base)
        spec = PlanSpec(plan.target or "attn", n=1, objective="kv", kv_context=context)
        choice = choose_from_scores(measure(base, random_ids(2, 16), progress=False), spec, config=base.config,
                                    dtype_bytes=4)
        choice.plan = plan
        prune(pruned, choice)
        held_after = kv_bytes(prefill(pruned, ids)[1])
    assert held_before - held_after == sum(per_layer[i] for i in plan.attn + plan.blocks) == choice.kv_freed()
    assert choice.kv_total() == held_before


# ---- the ranking ----------------------------------------------------------------------------------------------------


def test_weight_zero_and_quality_give_the_cosine_plan_exactly():
    model = _gemma()
    scores = measure(model, random_ids(2, 16), progress=False)
    for target, n in (("attn", 1), ("attn", 3), ("block", 2)):
        quality = choose_from_scores(scores, PlanSpec(target, n=n))
        for spec in (PlanSpec(target, n=n, objective="kv", kv_weight=0, kv_context=512),
                     PlanSpec(target, n=n, kv_context=512)):
            _same(choose_from_scores(scores, spec, config=model.config), quality)
            _same(choose(model, spec, scores=scores), quality)
    # Ties and near-ties break as the cosine ranking does (by cosine, then the deeper layer).
    tied = _scores([0.9, 0.9, 1e-20, 2e-20])
    spec = PlanSpec("attn", n=4, objective="kv", kv_weight=0)
    _same(choose_from_scores(tied, spec, config=model.config), choose_from_scores(tied, PlanSpec("attn", n=4)))


def test_iterative_weight_zero_equals_iterative_quality():
    ids = random_ids(2, 16)
    quality = choose(_gemma(), PlanSpec("attn", n=2, iterative=True), calibration=ids, progress=False)
    kv = choose(_gemma(), PlanSpec("attn", n=2, iterative=True, objective="kv", kv_weight=0), calibration=ids,
                progress=False)
    _same(kv, quality)


def test_kv_prefers_a_full_layer_with_slightly_lower_cosine_at_long_contexts():
    config = _gemma().config
    scores = _scores([0.5, 0.93, 0.95, 0.90])  # the full layer (1) is a little less redundant than sliding layer 2
    assert choose_from_scores(scores, PlanSpec("attn", n=1)).plan.attn == [2]
    long = choose_from_scores(scores, PlanSpec("attn", n=1, objective="kv", kv_context=512), config=config)
    assert long.plan.attn == [FULL] and long.objective == "kv" and long.kv_weight == 1.0
    assert long.kv_freed() == kv_bytes_per_layer(config, 512, 2)[FULL]
    # At a context within the window every layer holds the same cache: the cosine ranking stands.
    short = choose_from_scores(scores, PlanSpec("attn", n=1, objective="kv", kv_context=WINDOW - 1), config=config)
    assert short.plan.attn == [2]
    # A tiny weight barely moves the ranking; the same for blocks.
    faint = choose_from_scores(scores, PlanSpec("attn", n=1, objective="kv", kv_context=512, kv_weight=0.001),
                               config=config)
    assert faint.plan.attn == [2]
    blocks = choose_from_scores(scores, PlanSpec("block", n=1, objective="kv", kv_context=512), config=config)
    assert blocks.plan.blocks == [FULL]
    # A model whose layers all hold the same cache keeps its quality ranking at any weight.
    llama = tiny_model("llama").config
    assert choose_from_scores(scores, PlanSpec("attn", n=2, objective="kv", kv_weight=3), config=llama).plan.attn == \
        choose_from_scores(scores, PlanSpec("attn", n=2)).plan.attn


def test_kv_cost_formula():
    assert kv_cost(0.9, 100, 0) == pytest.approx(0.1)
    assert kv_cost(0.9, 100, 1) == pytest.approx(0.001)
    assert kv_cost(0.9, 100, 0.5) == pytest.approx(0.01)
    assert kv_cost(0.9, 0, 1) == math.inf  # frees nothing: last
    # A block whose attention is already gone frees no cache, so it goes last under kv.
    s = _scores([0.5, 0.93, 0.95, 0.90])
    plan = plan_drops(s, "block", 1, exclude=DropPlan(attn=[FULL]), kv_saved=[10, 1000, 10, 10], kv_weight=1)
    assert plan.blocks == [2]


def test_kv_plan_is_shown_and_recorded():
    model = _gemma()
    scores = _scores([0.5, 0.93, 0.95, 0.90])
    choice = choose(model, PlanSpec("attn", n=2, objective="kv", kv_context=256), scores=scores)
    assert describe(choice).startswith("plan (one-shot, target attn, objective kv at 256 tokens, weight 1): drop "
                                       "attention [1, 2] (frees ")
    lines = plan_table(choice).splitlines()
    assert "KV saved at 256 tokens" in lines[0] and lines[2].split()[:2] == ["attn", "1"]
    assert lines[2].split()[-2:] == ["64.0", "KiB"]  # 2 x 2 KV heads x 16 x 4 bytes x 256 tokens
    quality = choose(model, PlanSpec("attn", n=1, kv_context=256), scores=scores)  # reported, not ranked by
    assert quality.plan.attn == [2] and quality.kv_freed() == 2 * 2 * 16 * 4 * (WINDOW - 1)
    assert quality.objective == "quality" and "KV saved" not in plan_table(quality)


def test_kv_rows_report_bytes_per_quality_lost():
    model = _gemma()
    choice = choose(model, PlanSpec("attn", n=1, objective="kv", kv_context=512), scores=_scores([0.5, 0.93, 0.95,
                                                                                                   0.9]))
    freed = choice.kv_freed()
    evals = {"before": {"tasks": {"piqa": {"metrics": {"acc": 0.60}}, "arc_easy": {"metrics": {"acc": 0.50}}}},
             "after": {"tasks": {"piqa": {"metrics": {"acc": 0.58}}, "arc_easy": {"metrics": {"acc": 0.48}}}}}
    rows = {r[0]: r for r in kv_rows(choice, 10.0, 12.0, evals)}
    assert rows["KV saved at 512 tokens"][2].startswith("128.0 KiB (")
    assert rows["KV saved at 512 tokens per 1% perplexity rise"][2] == "6.4 KiB"  # 128 KiB / 20%
    assert rows["KV saved at 512 tokens per accuracy point lost (mean of 2 tasks)"][2] == "64.0 KiB"  # 2 points
    assert freed == 128 * 1024
    flat = {r[0]: r for r in kv_rows(choice, 10.0, 9.0)}
    assert flat["KV saved at 512 tokens per 1% perplexity rise"][2] == "perplexity did not rise"
    assert kv_rows(choose_from_scores(_scores([0.5] * 4), PlanSpec("attn", n=1)), 10.0, 12.0) == []  # no config


def test_run_reports_kv_saved(saved_tiny, text_file, tmp_path):
    result = run(RunConfig(str(saved_tiny("gemma3")), plan=PlanSpec("attn", n=1, objective="kv", kv_context=256),
                           calibration=str(text_file), samples=4, seq_len=16, ppl_samples=1, bench=False,
                           output=str(tmp_path / "o"), progress=False))
    labels = [r[0] for r in result.rows]
    assert "KV saved at 256 tokens" in labels and "KV saved at 256 tokens per 1% perplexity rise" in labels
    assert result.choice.plan.attn == [FULL]
    assert "KV saved at 256 tokens" in (tmp_path / "o" / "report.md").read_text()


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(objective="foo"), "objective must be one of quality, kv"),
    (dict(target="mlp", objective="kv"), "MLP sublayers hold none: use target attn or block, not mlp"),
    (dict(target="joint", objective="kv"), "use target attn or block, not joint"),
    (dict(objective="kv", kv_context=0), "kv_context must be a number of tokens of at least 1"),
    (dict(objective="kv", kv_context=True), "kv_context must be a number of tokens"),
    (dict(objective="kv", kv_weight=-1), "kv_weight must be a finite number of at least 0"),
    (dict(objective="kv", kv_weight=math.nan), "kv_weight must be a finite number"),
    (dict(kv_weight=1), "kv_weight trades similarity against KV bytes: use it with objective kv"),
    (dict(objective="kv", criterion="loss"), "use it with criterion cosine"),
    (dict(target="block", objective="kv", window=True), "window ranks runs of blocks by cosine only"),
])
def test_bad_objective_is_one_sentence(kwargs, pattern):
    with pytest.raises(LlmdropError, match=pattern) as err:
        PlanSpec(**{"target": "attn", "n": 1, **kwargs})
    assert "\n" not in str(err.value)


def test_bad_context_for_the_model_and_missing_config():
    model = _gemma()
    scores = _scores([0.5, 0.93, 0.95, 0.90])
    with pytest.raises(LlmdropError, match="kv_context 4096 is beyond the 512 positions"):
        choose(model, PlanSpec("attn", n=1, objective="kv", kv_context=4096), scores=scores)
    with pytest.raises(LlmdropError, match="objective kv needs the model's config"):
        choose_from_scores(scores, PlanSpec("attn", n=1, objective="kv"))
    assert choose(model, PlanSpec("attn", n=1), scores=scores).kv_context == 512  # default, capped at the limit


def _cli(capsys, *argv):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own errors leave this way, as from the console script
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags, pattern", [
    (["--target", "mlp", "--objective", "kv"], "--objective kv ranks modules by the KV cache .* use --target attn"),
    (["--target", "attn", "--objective", "foo"], "argument --objective: invalid choice: 'foo'"),
    (["--target", "attn", "--objective", "kv", "--kv-context", "0"], "argument --kv-context: expected a whole number"),
    (["--target", "attn", "--kv-weight", "2"], "--kv-weight trades similarity .* use it with --objective kv"),
    (["--target", "attn", "--objective", "kv", "--kv-context", "4096"], "--kv-context 4096 is beyond the 512"),
])
def test_bad_objective_on_the_command_line(saved_tiny, text_file, capsys, flags, pattern):
    code, _, err = _cli(capsys, "drop", saved_tiny("gemma3"), "--calibration", text_file, "--samples", 2,
                        "--seq-len", 16, "--n", 1, *flags, "--dry-run", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(pattern, err), err


def test_cli_objective_kv_prints_the_kv_plan(saved_tiny, text_file, capsys):
    code, out, _ = _cli(capsys, "drop", saved_tiny("gemma3"), "--calibration", text_file, "--samples", 2,
                        "--seq-len", 16, "--target", "attn", "--n", 1, "--objective", "kv", "--kv-context", 300,
                        "--kv-weight", "0.5", "--dry-run", "-q")
    assert code == 0 and "objective kv at 300 tokens, weight 0.5" in out and "KV saved at 300 tokens" in out


def test_streamed_drop_plans_by_kv(saved_tiny, text_file):
    """`drop --stream` never loads the model: the KV bytes come from the checkpoint's config."""
    common = dict(calibration=str(text_file), samples=2, seq_len=16, dry_run=True, stream=True, progress=False)
    model = str(saved_tiny("gemma3"))
    streamed = run_drop(RunConfig(model, plan=PlanSpec("attn", n=1, objective="kv", kv_context=256), **common))
    in_memory = run_drop(RunConfig(model, plan=PlanSpec("attn", n=1, objective="kv", kv_context=256),
                                   **{**common, "stream": False}))
    assert streamed.choice.plan.attn == in_memory.choice.plan.attn
    assert streamed.choice.kv_saved == in_memory.choice.kv_saved == kv_bytes_per_layer(_gemma().config, 256, 4)
