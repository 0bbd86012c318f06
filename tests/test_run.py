"""The jobs of `llmdrop measure / drop / run` called from Python (llmdrop.run), on tiny checkpoints."""

import json
import re

import pytest
import torch
from tiny import random_ids

import llmdrop
from llmdrop import models
from llmdrop.configs import PlanSpec, RunConfig
from llmdrop.errors import LlmdropError
from llmdrop.run import RunResult, drop, measure_model, run

FAST = dict(samples=4, seq_len=16, progress=False)


def _config(model, text_file, **kwargs):
    return RunConfig(str(model), calibration=str(text_file), **{**FAST, **kwargs})


def _no_load(monkeypatch):
    """Make any model load fail loudly: the checks under test must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(models, "load_model", refuse)


def test_run_reports_before_and_after(saved_tiny, text_file, tmp_path):
    result = run(_config(saved_tiny("qwen3"), text_file, plan=PlanSpec("joint", n=3), ppl_samples=2,
                         output=tmp_path / "o"))
    assert isinstance(result, RunResult) and result.output == tmp_path / "o"
    labels = [row[0] for row in result.rows]
    assert labels[:3] == ["layers", "parameters", "KV-cache layers"]
    assert any(label.startswith("perplexity") for label in labels) and "checkpoint size" in labels
    assert any(label.startswith("decode tokens/s") for label in labels)
    assert result.choice.plan.size == 3 and len(result.choice.picks) == 3
    for name in ("report.md", "similarity.png", "scores.json", "plan.json", "config.json"):
        assert (tmp_path / "o" / name).exists(), name
    assert "## Before and after" in (tmp_path / "o" / "report.md").read_text()
    assert "| before " in result.table(markdown=True)
    assert llmdrop.load(tmp_path / "o")[0].config.llmdrop["plan"]["chosen_scores"] == result.choice.plan.chosen_scores


def test_measure_then_drop_from_the_scores_file(saved_tiny, text_file, tmp_path):
    model = saved_tiny("llama")
    scores = measure_model(_config(model, text_file, output=tmp_path / "s.json"))
    assert json.loads((tmp_path / "s.json").read_text())["attn"] == scores.attn
    result = drop(RunConfig(str(model), plan=PlanSpec("attn", n=2), scores=str(tmp_path / "s.json"),
                            output=str(tmp_path / "pruned"), progress=False))
    expected = sorted(sorted(range(4), key=lambda i: scores.attn[i], reverse=True)[:2])
    assert llmdrop.load(tmp_path / "pruned")[0].config.llmdrop["attn"] == expected == result.choice.plan.attn
    assert result.rows[2] == ["KV-cache layers", 4, 2]
    saved = json.loads((tmp_path / "pruned" / "plan.json").read_text())
    assert llmdrop.DropPlan.from_dict(saved) == result.choice.plan


def test_measure_window_and_best_window(saved_tiny, text_file):
    scores = measure_model(_config(saved_tiny("phi3"), text_file, window_size=2))
    first, last, cos = scores.best_window()
    assert last == first + 1 and cos == max(scores.window["scores"])


def test_streamed_measure_equals_in_memory(saved_tiny, text_file):
    model = saved_tiny("gemma3")
    a = measure_model(_config(model, text_file))
    b = measure_model(_config(model, text_file, stream=True, max_memory=1000))
    assert b.attn == pytest.approx(a.attn, abs=1e-5) and b.block == pytest.approx(a.block, abs=1e-5)


def test_dry_run_writes_nothing(saved_tiny, text_file, tmp_path):
    result = drop(_config(saved_tiny("phi3"), text_file, plan=PlanSpec("block", n=2, window=True), dry_run=True,
                          output=tmp_path / "x"))
    assert result.output is None and result.choice.plan.method == "window" and len(result.choice.plan.blocks) == 2
    assert not (tmp_path / "x").exists()
    assert run(_config(saved_tiny("llama"), text_file, plan=PlanSpec("attn", n=1), dry_run=True)).output is None


def test_iterative_drop_keeps_the_pick_order(saved_tiny, text_file, tmp_path):
    result = drop(_config(saved_tiny("mistral"), text_file, plan=PlanSpec("mlp", n=2, iterative=True),
                          output=tmp_path / "it"))
    assert len(llmdrop.load(tmp_path / "it")[0].config.llmdrop["mlp"]) == 2
    history = result.choice.history
    assert len(history) == 2 and [kind for kind, _ in result.choice.picks] == ["mlp", "mlp"]
    first = result.choice.picks[0][1]
    assert history[0].mlp[first] == max(history[0].mlp)  # the first pick is the top one-shot score


def test_streamed_drop_equals_in_memory_drop(saved_tiny, text_file, tmp_path):
    model = saved_tiny("qwen2")
    measure_model(_config(model, text_file, output=tmp_path / "s.json"))
    common = dict(plan=PlanSpec("joint", n=3), scores=str(tmp_path / "s.json"), progress=False)
    mem = drop(RunConfig(str(model), output=str(tmp_path / "mem"), **common))
    streamed = drop(RunConfig(str(model), output=str(tmp_path / "stream"), stream=True, **common))
    assert streamed.choice.plan == mem.choice.plan
    assert (tmp_path / "stream" / "scores.json").exists() and (tmp_path / "stream" / "plan.json").exists()
    ids = random_ids(1, 10)
    with torch.no_grad():
        a = llmdrop.load(tmp_path / "mem")[0](input_ids=ids).logits
        b = llmdrop.load(tmp_path / "stream")[0](input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("stream", [False, True])
def test_repruning_drops_new_modules(saved_tiny, text_file, tmp_path, stream):
    """D26: a pruned checkpoint's dropped sublayers score cos 1.0; they must not be picked again."""
    first = drop(_config(saved_tiny("llama"), text_file, plan=PlanSpec("attn", n=2), output=tmp_path / "p1"))
    scores = {"scores": str(tmp_path / "p1" / "scores.json")} if stream else {}  # the first drop's scores
    again = drop(_config(tmp_path / "p1", text_file, plan=PlanSpec("attn", n=2), output=tmp_path / "p2",
                         stream=stream, **scores))
    assert not set(again.choice.plan.attn) & set(first.choice.plan.attn)
    assert sorted(llmdrop.load(tmp_path / "p2")[0].config.llmdrop["attn"]) == [0, 1, 2, 3]
    with pytest.raises(LlmdropError, match="only 0 can go .*4 already dropped"):
        drop(_config(tmp_path / "p2", text_file, plan=PlanSpec("attn", n=1), output=tmp_path / "p3", stream=stream,
                     **({"scores": str(tmp_path / "p2" / "scores.json")} if stream else {})))
    assert not (tmp_path / "p3").exists()


@pytest.mark.parametrize("job", [drop, run, measure_model])
def test_output_is_checked_before_the_model_loads(job, saved_tiny, text_file, tmp_path, monkeypatch):
    """O5-O7 / O13: a bad output location fails in seconds, before the model or any text is read."""
    model = saved_tiny("llama")
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "sub"  # the parent is a file
    _no_load(monkeypatch)
    plan = {} if job is measure_model else {"plan": PlanSpec("attn", n=1)}
    with pytest.raises(LlmdropError, match="is a file, not a directory"):
        job(_config(model, text_file, output=bad, **plan))
    if job is not measure_model:
        (tmp_path / "taken").mkdir()
        with pytest.raises(LlmdropError, match="already exists"):
            job(_config(model, text_file, output=tmp_path / "taken", **plan))
    else:
        (tmp_path / "adir").mkdir()
        with pytest.raises(LlmdropError, match="is a directory, not a file"):
            job(_config(model, text_file, output=tmp_path / "adir"))


def test_a_bad_scores_file_fails_before_the_model_loads(saved_tiny, text_file, tmp_path, monkeypatch):
    (tmp_path / "s.json").write_text(json.dumps({"attn": [0.1] * 4, "mlp": [0.2] * 4, "block": [0.3] * 3,
                                                 "tokens": 10}))
    _no_load(monkeypatch)
    with pytest.raises(LlmdropError, match="'attn' must be a list of 3 values"):
        drop(_config(saved_tiny("llama"), text_file, plan=PlanSpec("attn", n=1), scores=str(tmp_path / "s.json"),
                     output=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_seq_len_beyond_the_positions_is_an_error(saved_tiny, text_file, monkeypatch, stream):
    """C17 / C18: the tiny models have 512 positions."""
    model = saved_tiny("llama")
    _no_load(monkeypatch)
    with pytest.raises(LlmdropError, match="seq_len 600 is beyond the 512 positions"):
        measure_model(RunConfig(str(model), calibration=str(text_file), samples=1, seq_len=600, stream=stream,
                                progress=False))


def test_wrong_scores_for_the_model(saved_tiny, text_file, tmp_path, caplog):
    model = saved_tiny("llama")
    scores = measure_model(_config(model, text_file))
    scores.model_name = "someone/else-7b"
    scores.save(tmp_path / "other.json")
    with caplog.at_level("WARNING", logger="llmdrop"):  # D25: the same depth, another model: a warning
        drop(RunConfig(str(model), plan=PlanSpec("attn", n=1), scores=str(tmp_path / "other.json"), dry_run=True,
                       progress=False))
    assert "someone/else-7b" in caplog.text
    short = scores.to_dict()
    for kind in ("attn", "mlp", "block"):
        short[kind] = short[kind][:3]
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(LlmdropError, match="3-layer model but this model has 4"):  # D13
        drop(RunConfig(str(model), plan=PlanSpec("attn", n=1), scores=str(tmp_path / "short.json"), dry_run=True,
                       progress=False))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(samples=0), "samples must be a whole number of at least 1"),
    (dict(batch_size=-1), "batch_size must be"),  # C15 / C16
    (dict(seq_len=1), "seq_len must be at least 2"),
    (dict(ppl_samples=0), "ppl_samples must be"),
    (dict(limit=0), "limit must be"),
    (dict(limit=0.5), "limit must be"),
    (dict(dtype="float8"), "dtype must be one of"),
    (dict(save_dtype="int4"), "save_dtype must be one of"),
    (dict(data="web"), "data must be one of"),
    (dict(device="bogus"), "device 'bogus' is not a torch device"),  # V2
    (dict(plan=PlanSpec("attn", n=1)), "give an output directory with output"),  # D28
    (dict(stream=True, window_size=2), "stream measures one layer at a time"),
    (dict(stream=True, plan=PlanSpec("attn", n=1, iterative=True), dry_run=True), "iterative re-measures"),
    (dict(shard=(2, 2)), "shard must be"),
    (dict(model=""), "model must name"),
])
def test_run_config_is_validated_when_built(kwargs, pattern):
    with pytest.raises(LlmdropError, match=pattern):
        RunConfig(**{"model": "m", **kwargs})


def test_cuda_on_a_machine_without_it_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # V1
    with pytest.raises(LlmdropError, match="device cuda needs a GPU"):
        RunConfig("m", device="cuda")


def test_errors_name_parameters_not_flags(saved_tiny, text_file):
    with pytest.raises(LlmdropError) as err:
        RunConfig("m", batch_size=0)
    assert "batch_size" in str(err.value) and err.value.render().startswith("--batch-size")


# ---------------------------------------------------------------- run --heal


def test_run_heal_reports_the_healed_model(saved_tiny, text_file, tmp_path):
    """`run --heal`: after the drop, a distillation from the unpruned model, measured again and recorded."""
    result = run(_config(saved_tiny("llama"), text_file, plan=PlanSpec("attn", n=2), ppl_samples=2, heal=64,
                         bench=False, output=tmp_path / "o"))
    labels = [row[0] for row in result.rows]
    assert "perplexity after healing" in labels and "healing" in labels
    healed = next(row for row in result.rows if row[0] == "perplexity after healing")
    after = next(row for row in result.rows if row[0].startswith("perplexity ("))
    assert healed[1] == after[1] and healed[2] > 0  # the same unpruned "before", the healed model "after"
    assert "64 tokens" in next(row for row in result.rows if row[0] == "healing")[2]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| perplexity after healing" in report and "| healing " in report and "Healed: distilled" in report
    record = json.loads((tmp_path / "o" / "config.json").read_text())["llmdrop"]
    (entry,) = record["heal"]
    assert entry["tokens"] == 64 and entry["steps"] == 4 and entry["skip_tokens"] == (4 + 2) * 16
    assert entry["teacher"] == str(saved_tiny("llama")) and record["attn"] == result.choice.plan.attn
    model, _ = llmdrop.load(tmp_path / "o")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # a heal is saved in its training precision


def test_healing_text_never_overlaps_the_heldout_chunks(saved_tiny, text_file, tmp_path, monkeypatch):
    """The token ranges: calibration [0, s), held-out [s, s + p), healing from s + p on (BOS family: the chunks
    hold seq_len - 1 text tokens each)."""
    from llmdrop import run as run_mod
    from llmdrop.calibration import documents, token_stream

    seen: dict = {}
    real_ppl, real_distill = run_mod.perplexity, run_mod.distill

    def spy_ppl(model, chunks, *args, **kwargs):
        seen.setdefault("heldout", chunks.input_ids)
        return real_ppl(model, chunks, *args, **kwargs)

    def spy_distill(student, teacher, chunks, config, *args, **kwargs):
        seen["heal"], seen["config"] = chunks, config
        return real_distill(student, teacher, chunks, config, *args, **kwargs)

    monkeypatch.setattr(run_mod, "perplexity", spy_ppl)
    monkeypatch.setattr(run_mod, "distill", spy_distill)
    model = saved_tiny("gemma3")
    run(_config(model, text_file, plan=PlanSpec("attn", n=1), ppl_samples=3, heal=48, bench=False,
                output=tmp_path / "o"))
    body = 16 - 1
    ids, _ = token_stream(llmdrop.load(model)[1], documents(str(text_file)), 10_000)
    ids = torch.tensor(ids)
    heldout, healing = seen["heldout"], seen["heal"]
    assert (heldout[:, 0] == 1).all() and (healing[:, 0] == 1).all()  # BOS, then text
    assert torch.equal(heldout[:, 1:].flatten(), ids[4 * body:(4 + 3) * body])
    skip = seen["config"].skip_tokens
    assert skip == (4 + 3) * body  # healing starts where the held-out text ends
    assert torch.equal(healing[:, 1:].flatten(), ids[skip:skip + healing[:, 1:].numel()])


def test_run_heal_with_too_little_text_fails_before_any_pass(saved_tiny, tmp_path, monkeypatch):
    from llmdrop import evaluate

    short = tmp_path / "short.txt"
    short.write_text("x" * 100)  # 101 tokens: calibration (64) and held-out (32) leave 5, less than one chunk
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    with pytest.raises(LlmdropError, match=r"heal trains on the calibration text after the 96 tokens .* less than one "
                                           r"chunk of 16 tokens beyond them; give more text with calibration"):
        run(_config(saved_tiny("llama"), short, plan=PlanSpec("attn", n=1), ppl_samples=2, heal=16,
                    output=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(heal=0), r"^heal must be a token budget of at least 1 \(got 0\)$"),
    (dict(heal=-5), "heal must be a token budget of at least 1"),
    (dict(heal=True), "heal must be a token budget of at least 1"),
    (dict(heal=2.5), "heal must be a token budget of at least 1"),
    (dict(heal="lots"), r"heal must be a token count such as 500000, 82k or 2M \(got 'lots'\)"),
    (dict(heal="{x}"), r"heal must be a token count .*\(got '\{x\}'\)"),
    (dict(heal=100, seq_len=512), "heal 100 is less than one training step .*; raise heal or lower seq_len"),
    (dict(heal=1000, device="auto"), "heal trains on one device: give device cpu, cuda or cuda:N"),
    (dict(heal=1000, stream=True), "does not combine with stream"),
])
def test_bad_heal_values_are_one_sentence(kwargs, pattern):
    with pytest.raises(LlmdropError, match=pattern) as err:
        RunConfig(**{"model": "m", **kwargs})
    assert "\n" not in str(err.value)


def test_heal_budgets_read_like_counts_and_belong_to_run():
    assert RunConfig("m", heal="2M").heal == 2_000_000 and RunConfig("m", heal="82k").heal == 82_000
    with pytest.raises(LlmdropError, match="heal is part of `run`, not `drop`"):
        drop(RunConfig("m", plan=PlanSpec("attn", n=1), heal=1000, dry_run=True))
    with pytest.raises(LlmdropError, match="heal is part of `run`, not `measure`"):
        measure_model(RunConfig("m", heal=1000))


@pytest.mark.parametrize("job", [run, drop, measure_model])
def test_a_job_given_no_runconfig_says_what_it_takes(job):
    """T14: llmdrop.run("smollm2-135m") was an AttributeError deep inside; it is one sentence naming the config."""
    with pytest.raises(LlmdropError, match="takes a RunConfig .*not str"):
        job("smollm2-135m")


@pytest.mark.parametrize("protect", [5, "0,x", [1, -1], [0.5]])
def test_protect_takes_layer_indices_only(protect):
    """T6: PlanSpec(protect=5) was a TypeError; one index alone, a bad range or a negative index is one sentence."""
    with pytest.raises(LlmdropError, match="protect takes layer indices"):
        PlanSpec("attn", n=1, protect=protect)
    assert PlanSpec("attn", n=1, protect="3,0-1").protect == (0, 1, 3)


def test_run_shows_the_other_patch_kind_beside_the_chosen_one(saved_tiny, text_file, tmp_path):
    """The paper's zero drop and the linear patches side by side: the extra column holds what `drop --patch linear`
    of the same plan gives (its perplexity on the same held-out chunks), and the checkpoint saved is the chosen one."""
    model = saved_tiny("llama")
    common = dict(samples=8, seq_len=16, ppl_samples=2, bench=False)  # 128 calibration tokens >= hidden 64
    result = run(_config(model, text_file, plan=PlanSpec("attn", n=2), output=tmp_path / "o", **common))
    assert result.headers == ("", "before", "after (--patch zero, saved)", "--patch linear")
    rows = {row[0]: row for row in result.rows}
    ppl_label = next(label for label in rows if label.startswith("perplexity ("))
    linear = run(_config(model, text_file, plan=PlanSpec("attn", n=2), output=tmp_path / "l", patch="linear",
                         compare=False, **common))
    assert rows[ppl_label][3] == pytest.approx({r[0]: r for r in linear.rows}[ppl_label][2], rel=1e-5)
    assert rows["dropped modules replaced by"][3].startswith("linear: 2 module(s)")
    assert rows["checkpoint size"][3] == "" and not llmdrop.load(tmp_path / "o")[0].config.llmdrop.get("patched_attn")
    assert re.search(r"\| --patch linear +\|", (tmp_path / "o" / "report.md").read_text())
    without = run(_config(model, text_file, plan=PlanSpec("attn", n=2), output=tmp_path / "n", compare=False, **common))
    assert without.headers == RunResult.HEADERS and all(len(r) == 3 for r in without.rows)
