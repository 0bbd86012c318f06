"""Long contexts: bench's spread, thread pinning, profile and llama.cpp runtime; passkey and position perplexity
through `llmdrop eval`; and the bad inputs of the issue (a context beyond the model's limit, a runtime that is not
installed, an unknown task): one line and exit status 2 each."""

from __future__ import annotations

import copy
import importlib.util
import json
import re

import pytest
import torch
from tiny import llama_cpp_ready, tiny_model, tiny_tokenizer

from llmdrop import bench
from llmdrop.checkpoint import save
from llmdrop.cli import main
from llmdrop.errors import LlmdropError
from llmdrop.models import load_model
from llmdrop.plan import DropPlan
from llmdrop.surgery import apply_plan

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    """A base checkpoint and the same with attention 1 and 2 dropped."""
    root = tmp_path_factory.mktemp("pair")
    base = llama_cpp_ready(root / "base")
    model, tok = load_model(str(base), progress=False)
    apply_plan(model, DropPlan(attn=[1, 2], num_layers=4))
    save(model, tok, root / "attn2", overwrite=True)
    return str(base), str(root / "attn2")


def _main(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def _one_line_error(capsys, argv: list, pattern: str) -> str:
    capsys.readouterr()
    code = _main([*argv, "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("llmdrop"), err
    assert re.search(pattern, err), err
    return err


# ---- bench: spread, threads, profile --------------------------------------------------------------------------------

def test_rows_carry_medians_spread_threads_and_the_profile(pair, tmp_path):
    before = torch.get_num_threads()
    rows = bench.compare(list(pair), [16, 32], [1, 2], new_tokens=3, repeats=2, memory=False, profile=True,
                         profile_steps=2, threads=1, output=tmp_path / "b.json", progress=False)
    assert torch.get_num_threads() == before  # pinned for the run only
    assert len(rows) == 8 and {r["runtime"] for r in rows} == {"transformers"}
    for r in rows:
        assert r["prefill_min"] <= r["prefill_tok_s"] <= r["prefill_max"]
        assert r["decode_min"] <= r["decode_tok_s"] <= r["decode_max"]
        assert r["decode_ratio_min"] <= r["decode_ratio_max"] and len(r["decode_runs"]) == 2
        assert r["threads"] == 1
        assert sum(r["profile"].values()) == pytest.approx(1.0)
    base_rows = [r for r in rows if r["model"] == pair[0]]
    pruned_rows = [r for r in rows if r["model"] == pair[1]]
    assert all(r["ideal_speedup"] == 1.0 and r["dropped"] == "nothing" for r in base_rows)
    for r in pruned_rows:
        assert r["dropped"] == "attn [1, 2]" and r["ideal_speedup"] > 1.0
        assert r["achieved_over_ideal"] == pytest.approx(r["decode_ratio"] / r["ideal_speedup"])
        assert r["kv_ratio"] == 0.5
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["threads"] == 1 and "torch.set_num_threads(1)" in saved["threads_how"]
    assert len(saved["profiles"]) == 8 and saved["runtimes"] == ["transformers"]
    table = bench.profile_table_rows(rows)
    assert len(table) == 8 and len(table[0]) == len(bench.PROFILE_HEADERS)
    for r, cells in zip(rows, table):  # both step columns time one step of the whole batch
        assert cells[-1] == pytest.approx(1000 * r["batch"] / r["decode_tok_s"])
    assert len(bench.bench_table_rows(rows)[0]) == len(bench.BENCH_HEADERS)


def test_cli_bench_prints_spread_and_profile(pair, capsys):
    assert _main(["bench", *pair, "--context", "16", "--new-tokens", "2", "--repeats", "2", "--no-memory", "--profile",
                  "--profile-steps", "2", "--threads", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "min-max" in out and "x min-max" in out and "achieved/ideal" in out and "ideal x" in out
    # B7: --no-memory measured no peak RSS, which is n/a rather than a 0.0000 that reads as measured
    assert [line.split()[-1] for line in out.splitlines() if line.startswith(pair[0])][0] == "n/a"
    assert "from transformers (timed forward hooks);" in out


def test_the_tables_say_what_was_not_measured_and_where_the_profile_came_from():
    """B6: the profile header said "transformers, timed forward hooks" above llama.cpp rows; B7: a peak RSS that was
    not measured printed as 0.0000."""
    row = {"model": "m", "runtime": "llama.cpp", "context": 8, "batch": 1, "prefill_tok_s": 1.0, "prefill_min": 1.0,
           "prefill_max": 1.0, "prefill_ratio": 1.0, "decode_tok_s": 1.0, "decode_min": 1.0, "decode_max": 1.0,
           "decode_ratio": 1.0, "decode_ratio_min": 1.0, "decode_ratio_max": 1.0, "kv_bytes": 2**20, "kv_ratio": 1.0,
           "params_ratio": 1.0, "profile_source": bench.PROFILE_SOURCES["llama.cpp"]}
    assert bench.bench_table_rows([row])[0][-1] == "n/a"
    assert bench.bench_table_rows([{**row, "peak_rss_bytes": 3 * 2**20}])[0][-1] == 3.0
    header = bench.profile_header([row])
    assert "transformers" not in header and bench.PROFILE_SOURCES["llama.cpp"] in header
    both = bench.profile_header([{**row, "runtime": "transformers", "profile_source": bench.PROFILE_SOURCES[
        "transformers"]}, row, row])
    assert both.startswith("share of decode time per module kind, from transformers (timed forward hooks) and "
                           "llama.cpp (graph eval callback at sublayer boundaries); ideal x = 1 / (1 - share")


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (setup.sh --test builds it)")
def test_llama_cpp_runtime_runs_the_gguf_exports_interleaved(pair, tmp_path):
    rows = bench.compare(list(pair), [16, 48], [1, 2], new_tokens=3, repeats=2, memory=True,
                         runtimes=["transformers", "llama.cpp"], profile=True, profile_steps=2, threads=2,
                         output=tmp_path / "b.json", progress=False)
    cpp = [r for r in rows if r["runtime"] == "llama.cpp"]
    assert len(cpp) == 4 and {r["batch"] for r in cpp} == {1}  # one sequence per Llama
    assert len([r for r in rows if r["runtime"] == "transformers"]) == 8
    for r in cpp:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and len(r["decode_runs"]) == 2
        assert r["peak_rss_bytes"] > 0 and r["threads"] == 2
    base = {r["context"]: r for r in cpp if r["model"] == pair[0]}
    for r in (r for r in cpp if r["model"] == pair[1]):
        assert r["kv_ratio"] == 0.5 and r["kv_bytes"] == base[r["context"]]["kv_bytes"] // 2
        assert r["ideal_speedup"] > 1 and r["profile_source"].startswith("llama.cpp")
    # f16 K and V: 2 x tokens x 2 KV heads x head dim 16 x 2 bytes x 4 layers
    assert base[16]["kv_bytes"] == 2 * 16 * 2 * 16 * 2 * 4
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["llama_cpp"] == {"gguf_outtype": "f16", "flash_attn": True, "batch": 1}


def test_a_family_llama_cpp_cannot_run_is_a_clear_error(tmp_path):
    if not HAS_LLAMA_CPP:
        pytest.skip("llama-cpp-python is not installed")
    path = tmp_path / "qwen3"
    tiny_model("qwen3").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(LlmdropError, match=r"llama.cpp runtime runs each model's GGUF export, and .*qwen3 cannot be "
                                           r"exported .*leave llama.cpp out of runtimes"):
        bench.compare([str(path)], [8], new_tokens=2, repeats=1, memory=False, runtimes=["llama.cpp"],
                      progress=False)


def test_missing_llama_cpp_is_a_clear_error(monkeypatch, pair):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(LlmdropError, match="needs llama-cpp-python, which is not installed: pip install "
                                           "llama-cpp-python \\(bash scripts/setup.sh --test builds it\\)"):
        bench.compare(list(pair), [8], runtimes=["transformers", "llama.cpp"], memory=False, progress=False)
    with pytest.raises(LlmdropError, match="runtimes takes transformers and/or llama.cpp, not 'vllm'"):
        bench.compare(list(pair), [8], runtimes=["vllm"], memory=False, progress=False)
    with pytest.raises(LlmdropError, match="threads must be a whole number"):
        bench.compare(list(pair), [8], threads=0, memory=False, progress=False)


def test_context_beyond_the_models_limit_names_the_limit(pair):
    with pytest.raises(LlmdropError, match=r"contexts 600 is beyond the 512 positions .* choose contexts 512 "
                                           r"or less"):
        bench.compare(list(pair), [512, 600], memory=False, progress=False)


def test_a_model_given_twice_is_measured_twice():
    """A30: timings were keyed by the model's name, so both rows of `bench m m` held the pooled runs of the two."""
    model = tiny_model("llama")
    rows = bench.run_bench([("m", model), ("m", model)], [8], [1], new_tokens=2, repeats=3, warmup=0, progress=False)
    assert len(rows) == 2 and all(len(r.prefill_runs) == len(r.decode_runs) == 3 for r in rows)
    assert rows[0].prefill_runs != rows[1].prefill_runs  # two measurements, not one pooled twice
    first, second = bench.ratios(rows)
    assert first["prefill_ratio"] == first["decode_ratio"] == 1.0  # against its own row, not the repeat's
    assert second["decode_ratio"] == pytest.approx(rows[1].decode_tok_s / rows[0].decode_tok_s)


# ---- eval: passkey and position perplexity -------------------------------------------------------------------------

def test_eval_passkey_mixes_with_perplexity_and_writes_json(pair, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(80)))
    out = tmp_path / "e.json"
    assert _main(["eval", pair[1], "--tasks", "passkey", "--context", "300,400", "--depths", "0,1", "--trials", "2",
                  "--ppl", "--ppl-text", text, "--seq-len", "64", "--ppl-samples", "2", "--by-position", "-q",
                  "-o", out]) == 0
    printed = capsys.readouterr().out
    assert "passkey@300" in printed and "passkey context" in printed and "positions" in printed
    res = json.loads(out.read_text())
    assert res["passkey"]["contexts"] == [300, 400] and res["passkey"]["depths"] == [0.0, 1.0]
    assert len(res["passkey"]["rows"]) == 4 and res["passkey"]["trials"] == 2
    assert sum(b["tokens"] for b in res["perplexity"]["by_position"]) == res["perplexity"]["tokens"]


BAD = [
    ("eval-context", lambda p, o: ["eval", p[0], "--tasks", "passkey", "--context", "1024"],
     r"--context 1024 is beyond the 512 positions"),
    ("eval-short", lambda p, o: ["eval", p[0], "--tasks", "passkey", "--context", "50"],
     r"--context 50 is too short for the passkey prompt"),
    ("eval-depth", lambda p, o: ["eval", p[0], "--tasks", "passkey", "--depths", "0.5,2"], r"argument --depths"),
    ("eval-unknown-local", lambda p, o: ["eval", p[0], "--tasks", "passkey,bogus", "--data", "local"],
     r"no offline copy of task\(s\) bogus; offline tasks: .*lambada, passkey"),
    ("eval-by-position", lambda p, o: ["eval", p[0], "--tasks", "passkey", "--by-position"],
     r"--by-position reports perplexity by position: add --ppl"),
    ("bench-context", lambda p, o: ["bench", *p, "--context", "512,4096", "--no-memory"],
     r"--context 4096 is beyond the 512 positions .* was trained for"),
    ("bench-runtime", lambda p, o: ["bench", *p, "--runtime", "vllm"],
     r"--runtime takes transformers and/or llama.cpp, not 'vllm'"),
    ("bench-threads", lambda p, o: ["bench", *p, "--threads", "0"], r"argument --threads: expected a whole"),
    ("bench-out", lambda p, o: ["bench", *p, "--context", "8", "-o", o], r"is a directory, not a file"),
]


@pytest.mark.parametrize("case,build,pattern", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line(case, build, pattern, pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    _one_line_error(capsys, build(pair, out), pattern)
    assert list(out.iterdir()) == []


def test_unknown_task_online_lists_passkey(pair, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    _one_line_error(capsys, ["eval", pair[0], "--tasks", "passkey,no_such_task", "--data", "hub"],
                    r"unknown task\(s\) no_such_task; --tasks takes lm-eval task names .* and the built-in passkey")


def test_missing_llama_cpp_from_the_cli(pair, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    _one_line_error(capsys, ["bench", *pair, "--runtime", "transformers,llama.cpp", "--no-memory"],
                    r"the llama.cpp runtime needs llama-cpp-python, which is not installed")


def test_passkey_on_a_pruned_model_is_deterministic(pair):
    from llmdrop.passkey import passkey_eval

    model, tok = load_model(pair[1], progress=False)
    base, _ = load_model(pair[0], progress=False)
    a = passkey_eval(model, tok, [300], depths=[0.5], trials=2, seed=3, progress=False)
    b = passkey_eval(copy.deepcopy(model), tok, [300], depths=[0.5], trials=2, seed=3, progress=False)
    assert a == b
    passkey_eval(base, tok, [300], depths=[0.5], trials=1, progress=False)


def test_the_memory_probe_measures_the_child_alone(pair):
    """ru_maxrss survives fork + exec on Linux: a child spawned by a big parent read at least the parent's size."""
    import numpy as np

    ballast = np.ones(2**27)  # 1 GiB resident in this process
    child = bench.peak_rss_of(pair[0], "float32", 16, 1, 2)
    assert ballast.sum() > 0 and 0 < child < ballast.nbytes


def test_long_context_plot_gives_each_model_one_colour_in_both_panels(tmp_path):
    from llmdrop.plots import model_colours, plot_long_context

    rows = [{"model": m, "runtime": rt, "batch": 1, "context": c, "decode_ratio": 1.0 + 0.1 * i,
             "decode_ratio_min": 0.95 + 0.1 * i, "decode_ratio_max": 1.05 + 0.1 * i}
            for i, m in enumerate(["base", "attn-3", "attn-6"]) for rt in ("transformers", "llama.cpp")
            for c in (512, 2048)]
    passkey = {m: {"by_context": {"512": 1.0, "2048": 0.5}} for m in ("base", "attn-6", "attn-3")}
    colours = model_colours(rows, passkey, {})
    assert colours == {"base": "C0", "attn-3": "C1", "attn-6": "C2"}  # passkey's own order does not reshuffle them
    path = plot_long_context(rows, passkey, tmp_path / "lc.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
