import json

import pytest
from tiny import tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

import llmdrop
from llmdrop.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_measure_writes_scores(saved_tiny, text_file, tmp_path, capsys):
    model = saved_tiny("gemma3")
    code, out, _ = _run(capsys, "measure", model, "--calibration", text_file, "--samples", 4, "--seq-len", 16,
                        "-q", "-o", tmp_path / "s.json")
    assert code == 0 and "attn cos" in out
    scores = json.loads((tmp_path / "s.json").read_text())
    assert len(scores["attn"]) == len(scores["mlp"]) == len(scores["block"]) == 4
    assert scores["tokens"] == 64 and scores["calibration"]["bos"] is True  # gemma needs BOS


def test_drop_from_scores_then_load(saved_tiny, text_file, tmp_path, capsys):
    model = saved_tiny("llama")
    _run(capsys, "measure", model, "--calibration", text_file, "--samples", 4, "--seq-len", 16, "-q",
         "-o", tmp_path / "s.json")
    code, out, _ = _run(capsys, "drop", model, "--scores", tmp_path / "s.json", "--target", "attn", "--n", 2,
                        "-o", tmp_path / "pruned", "-q")
    assert code == 0 and "KV-cache layers" in out and "saved to" in out
    pruned, tok = llmdrop.load(tmp_path / "pruned")
    scores = json.loads((tmp_path / "s.json").read_text())
    expected = sorted(sorted(range(4), key=lambda i: scores["attn"][i], reverse=True)[:2])
    assert pruned.config.llmdrop["attn"] == expected
    assert (tmp_path / "pruned" / "scores.json").exists() and (tmp_path / "pruned" / "plan.json").exists()


def test_run_reports_perplexity(saved_tiny, text_file, tmp_path, capsys):
    code, out, _ = _run(capsys, "run", saved_tiny("qwen3"), "--calibration", text_file, "--samples", 4,
                        "--seq-len", 16, "--ppl-samples", 2, "--target", "joint", "--n", 3, "-o", tmp_path / "o", "-q")
    assert code == 0 and "perplexity" in out and "decode tokens/s" in out
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Before and after" in report and "| layer |" in report and "similarity.png" in report
    assert (tmp_path / "o" / "similarity.png").read_bytes()[:4] == b"\x89PNG"


def test_run_with_tasks_reports_them_before_and_after(saved_tiny, text_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    code, out, _ = _run(capsys, "run", saved_tiny("llama"), "--calibration", text_file, "--samples", 4,
                        "--seq-len", 16, "--ppl-samples", 1, "--target", "attn", "--n", 4, "--tasks", "arc_easy",
                        "--limit", 3, "--data", "local", "--no-bench", "-o", tmp_path / "o", "-q")
    assert code == 0 and "arc_easy acc_norm (3 items)" in out and "decode" not in out
    evals = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert set(evals) == {"before", "after"}


def test_dry_run_writes_nothing(saved_tiny, text_file, tmp_path, capsys):
    code, out, _ = _run(capsys, "drop", saved_tiny("phi3"), "--calibration", text_file, "--samples", 2, "--seq-len",
                        16, "--target", "block", "--n", 2, "--window", "--dry-run", "-o", tmp_path / "x", "-q")
    assert code == 0 and "plan (window" in out
    assert not (tmp_path / "x").exists()


def test_iterative_drop(saved_tiny, text_file, tmp_path, capsys):
    code, out, _ = _run(capsys, "drop", saved_tiny("mistral"), "--calibration", text_file, "--samples", 2,
                        "--seq-len", 16, "--target", "mlp", "--n", 2, "--iterative", "-o", tmp_path / "it", "-q")
    assert code == 0
    assert len(llmdrop.load(tmp_path / "it")[0].config.llmdrop["mlp"]) == 2


def _gpt2_dir(tmp_path):
    path = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=112)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("case,pattern", [
    ("unknown_arch", "unsupported model family 'gpt2': could not find model.layers"),
    ("missing_model", "model path ./no/such/model does not exist"),
    ("too_many", "cannot drop 9 attention layers: only 4 can go"),
    ("short_text", "calibration text has"),
    ("existing_out", "already exists; choose another -o or pass --overwrite"),
    ("bad_scores", "scores file .* does not exist"),
    ("bad_protect", "--protect takes layer indices"),
])
def test_bad_input_is_one_clear_sentence_and_writes_nothing(case, pattern, saved_tiny, text_file, tmp_path, capsys):
    model = saved_tiny("llama")
    out = tmp_path / "out"
    args = {"model": model, "cal": text_file, "n": 2, "extra": []}
    if case == "unknown_arch":
        args["model"] = _gpt2_dir(tmp_path)
    elif case == "missing_model":
        args["model"] = "./no/such/model"
    elif case == "too_many":
        args["n"] = 9
    elif case == "short_text":
        args["cal"] = tmp_path / "short.txt"
        args["cal"].write_text("too short")
    elif case == "existing_out":
        out.mkdir()
        (out / "precious").write_text("x")
    elif case == "bad_scores":
        args["extra"] = ["--scores", tmp_path / "none.json"]
    elif case == "bad_protect":
        args["extra"] = ["--protect", "a,b"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _run(capsys, "drop", args["model"], "--calibration", args["cal"], "--samples", 4, "--seq-len",
                             16, "--target", "attn", "--n", args["n"], "-o", out, "-q", *args["extra"])
    assert code == 2
    import re

    assert re.search(pattern, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "existing_out":
        assert (out / "precious").read_text() == "x"


def test_help_texts(capsys):
    for cmd in ([], ["measure"], ["drop"], ["run"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: llmdrop" in capsys.readouterr().out
