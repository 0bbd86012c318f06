import json

import pytest
from tiny import tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

import llmdrop
from llmdrop.cli import main


def _run(capsys, *argv):
    capsys.readouterr()  # only what this command prints (fixtures that save models print transformers' bars)
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
    for cmd in ([], ["measure"], ["drop"], ["run"], ["eval"], ["bench"], ["export"], ["study"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: llmdrop" in capsys.readouterr().out


@pytest.mark.parametrize("cmd,present,absent", [
    ("drop", ["--save-dtype", "--batch-size", "--protect LAYERS", "--stream", "-q", "-v"], ["--eval-batch-size"]),
    ("run", ["--save-dtype", "--ppl-samples", "--limit N", "--no-bench"], ["--stream"]),
    ("eval", ["--eval-batch-size", "--batch-size", "--limit N", "--device"], []),
    ("bench", ["--context TOKENS", "--new-tokens", "--cache-dir"], ["--device"]),
    ("study", ["--eval-batch-size", "--batch-size", "--shard I/N"], ["--device"]),
])
def test_each_command_lists_its_own_flags(cmd, present, absent, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in present), out
    assert not any(flag in out for flag in absent), out


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["measure", "m", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("llmdrop measure: error: argument --batch-size: expected a whole number of at least 1")


def test_library_errors_name_flags_not_parameters():
    from llmdrop.cli import flag_for
    from llmdrop.errors import LlmdropError

    err = LlmdropError("a window of 9 blocks does not fit; choose {window_size} between 1 and 4", params=["window_size"])
    assert err.render(flag_for).endswith("choose --window between 1 and 4") and "window_size" in str(err)
    assert flag_for("ppl_samples") == "--ppl-samples" and flag_for("counts") == "--n" and flag_for("output") == "-o"


def test_flags_reach_the_library_config(saved_tiny, tmp_path, monkeypatch, capsys):
    """LLMDROP_CACHE is read by the CLI only, and passed on; --cache-dir wins; --protect reaches the PlanSpec."""
    from llmdrop import run as run_mod

    seen = []

    def fake_drop(config):
        seen.append(config)
        raise run_mod.LlmdropError("stop here")

    monkeypatch.setattr(run_mod, "drop", fake_drop)
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "env-cache"))
    args = ["drop", str(saved_tiny("llama")), "--target", "attn", "--n", "2", "--protect", "0-1,3", "--dry-run",
            "--save-dtype", "bfloat16", "-q"]
    assert _run(capsys, *args)[0] == 2
    assert _run(capsys, *args, "--cache-dir", tmp_path / "flag-cache")[0] == 2
    assert [c.cache_dir for c in seen] == [str(tmp_path / "env-cache"), str(tmp_path / "flag-cache")]
    assert seen[0].plan.protect == (0, 1, 3) and seen[0].save_dtype == "bfloat16" and seen[0].progress is False


def test_save_dtype_is_the_checkpoints_dtype(saved_tiny, text_file, tmp_path, capsys):
    code, out, _ = _run(capsys, "drop", saved_tiny("llama"), "--calibration", text_file, "--samples", 2, "--seq-len",
                        16, "--target", "attn", "--n", 1, "--save-dtype", "bfloat16", "-o", tmp_path / "bf", "-q")
    assert code == 0 and "saved to" in out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}


def test_status_lines_follow_quiet_and_verbose(saved_tiny, text_file, tmp_path, capsys):
    base = ["measure", saved_tiny("llama"), "--calibration", text_file, "--samples", 2, "--seq-len", 16,
            "-o", tmp_path / "s.json"]
    code, out, err = _run(capsys, *base)
    assert code == 0 and "loaded" in err and "scores written to" in err and "loaded" not in out
    code, out, err = _run(capsys, *base, "-q")
    assert code == 0 and err == "" and "attn cos" in out


def test_cli_choices_come_from_the_library_tables():
    """The command line reads its choices from the tables and vocabularies the library checks against."""
    from llmdrop import options
    from llmdrop.checkpoint import DTYPES
    from llmdrop.cli import build_parser
    from llmdrop.criteria import CRITERIA
    from llmdrop.export import FORMATS
    from llmdrop.patches import PATCHES

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    choices = {a.option_strings[-1]: tuple(a.choices) for a in sub["drop"]._actions if a.choices}
    assert choices["--criterion"] == tuple(CRITERIA) and choices["--patch"] == tuple(PATCHES)
    assert choices["--target"] == options.TARGETS and choices["--dtype"] == options.DTYPES == tuple(DTYPES)
    assert tuple(next(a for a in sub["export"]._actions if "--format" in a.option_strings).choices) == tuple(FORMATS)


def test_every_flag_is_one_option_of_the_jobs_config():
    """A flag is generated from one config field (or one extra job argument): nothing is declared twice."""
    import dataclasses

    from llmdrop.cli import COMMANDS, build_parser
    from llmdrop.configs import PlanSpec

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in COMMANDS:
        declared = {f.name for f in dataclasses.fields(command.config)} | set(command.extra)
        declared |= {f.name for f in dataclasses.fields(PlanSpec)} if command.plan else set()
        dests = {a.dest for a in sub[command.name]._actions} - {"help", "quiet", "verbose", "command"}
        assert dests <= declared, (command.name, dests - declared)


def test_every_bool_option_is_checked_as_a_bool():
    """"no", "false", None or 1 for a True/False option is an error, never truthiness (overwrite="no" once replaced
    a checkpoint)."""
    import dataclasses

    from llmdrop.configs import BenchConfig, EvalConfig, HealConfig, PlanSpec, RunConfig, StudyConfig
    from llmdrop.errors import LlmdropError
    from llmdrop.export import ExportConfig

    valid = {RunConfig: dict(model="m"), PlanSpec: dict(target="attn", n=1), HealConfig: dict(student="s", teacher="t",
             output="o", tokens=1024), StudyConfig: dict(model_name="m"), EvalConfig: dict(model="m", ppl=True),
             BenchConfig: dict(models=["m"]), ExportConfig: dict(model="m", output="o")}
    checked = 0
    for config, required in valid.items():
        for f in dataclasses.fields(config):
            if isinstance(f.default, bool):
                for bad in ("no", "false", None, 1):
                    with pytest.raises(LlmdropError, match=f"{f.name} must be True or False"):
                        config(**{**required, f.name: bad})
                checked += 1
    assert checked >= 15

def test_patch_and_criterion_flags_reach_the_checkpoint(saved_tiny, text_file, tmp_path, capsys):
    """--patch linear and --criterion loss end to end: the saved record says what stands in and how it was chosen."""
    out = tmp_path / "lin"
    code, stdout, err = _run(capsys, "drop", saved_tiny("llama"), "--calibration", text_file, "--samples", 8,
                             "--seq-len", 16, "--target", "attn", "--n", 1, "--criterion", "loss", "--candidates", 2,
                             "--patch", "linear", "-o", out, "-q")
    assert code == 0, err
    assert "criterion loss" in stdout and "saved to" in stdout
    record = json.loads((out / "config.json").read_text())["llmdrop"]
    assert record["criterion"] == "loss" and record["patched_attn"] == record["attn"] and len(record["attn"]) == 1
    model, _ = llmdrop.load(out)
    assert sum(type(m).__name__ == "PatchedAttention" for m in model.modules()) == 1


def test_heal_command_writes_a_healed_checkpoint(saved_tiny, text_file, tmp_path, capsys):
    base = saved_tiny("llama")
    code, _, err = _run(capsys, "drop", base, "--calibration", text_file, "--samples", 2, "--seq-len", 16,
                        "--target", "attn", "--n", 1, "-o", tmp_path / "pruned", "-q")
    assert code == 0, err
    code, out, err = _run(capsys, "heal", tmp_path / "pruned", "--teacher", base, "--tokens", "0.1k", "--seq-len", 16,
                          "--calibration", text_file, "--skip-tokens", 0, "--lr", 1e-3, "--check-tokens", 32, "-o",
                          tmp_path / "healed", "-q")
    assert code == 0, err
    assert "KL to the teacher" in out and "saved to" in out and "on 32 tokens never trained on" in out
    record = json.loads((tmp_path / "healed" / "config.json").read_text())["llmdrop"]
    assert record["attn"] and record["heal"][0]["tokens"] >= 96
    with pytest.raises(SystemExit) as stop:
        main(["heal", str(tmp_path / "pruned"), "--teacher", str(base), "--tokens", "lots", "-o", str(tmp_path / "h2")])
    assert stop.value.code == 2 and "argument --tokens: expected a token count" in capsys.readouterr().err
    assert not (tmp_path / "h2").exists()


def test_run_heal_reports_healing(saved_tiny, text_file, tmp_path, capsys):
    """`run --heal TOKENS`: the whole path, with the healed rows in the printout and in report.md."""
    common = ["run", saved_tiny("llama"), "--calibration", text_file, "--samples", 4, "--seq-len", 16,
              "--ppl-samples", 2, "--target", "attn", "--n", 2, "--no-bench", "-q"]
    code, out, err = _run(capsys, *common, "--heal", "0.064k", "-o", tmp_path / "o")
    assert code == 0, err
    assert "perplexity after healing" in out and "64 tokens" in out
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| perplexity after healing" in report and "| healing " in report
    assert json.loads((tmp_path / "o" / "config.json").read_text())["llmdrop"]["heal"][0]["tokens"] == 64
    code, _, err = _run(capsys, *common, "--heal", "8", "-o", tmp_path / "short")
    assert code == 2 and err.strip() == ("llmdrop: error: --heal 8 is less than one training step (one chunk of 16 "
                                         "tokens); raise --heal or lower --seq-len")
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in [*common, "--heal", "0", "-o", tmp_path / "zero"]])
    assert stop.value.code == 2 and "argument --heal: expected a token count" in capsys.readouterr().err
    assert not (tmp_path / "short").exists() and not (tmp_path / "zero").exists()


def test_study_patch_linear_adds_patched_rows(saved_tiny, text_file, tmp_path, capsys):
    code, out, err = _run(capsys, "study", saved_tiny("llama"), "--calibration", text_file, "--samples", 8,
                          "--seq-len", 16, "--ppl-samples", 1, "--targets", "attn", "--n", 1, "--patch", "linear",
                          "-o", tmp_path / "s", "-q")
    assert code == 0, err
    assert "attn+linear" in out
    rows = [json.loads(line) for line in (tmp_path / "s" / "rows.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["base", "one-shot:attn:1", "one-shot+linear:attn:1"]
    assert rows[2]["patch"]["modules"][0]["layer"] == rows[1]["plan"]["attn"][0]
    assert "| attn+linear |" in (tmp_path / "s" / "results.md").read_text()
    code, out, err = _run(capsys, "study", saved_tiny("llama"), "--calibration", text_file, "--samples", 8,
                          "--seq-len", 16, "--ppl-samples", 1, "--targets", "block", "--n", 1, "--patch", "linear",
                          "-o", tmp_path / "b", "-q")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "b" / "rows.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["base", "one-shot:block:1", "one-shot+linear:block:1"]
    assert rows[2]["patch"]["modules"] == [{"module": "block", "layer": rows[1]["plan"]["blocks"][0],
                                           "explained": rows[2]["patch"]["modules"][0]["explained"]}]


def _flags() -> dict:
    """Every subcommand's flags as a user sees them: the flag names, kind, default, choices, required."""
    from llmdrop.cli import build_parser

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    return {name: {(a.option_strings[-1] if a.option_strings else a.metavar): {
        "flags": a.option_strings, "kind": type(a).__name__.strip("_"), "default": plain(a.default),
        "choices": plain(a.choices), "required": a.required, "nargs": a.nargs}
        for a in parser._actions if a.dest != "help"} for name, parser in sub.items()}


def test_flags_and_defaults_are_those_users_rely_on():
    """A golden copy of every flag, default and choice (tests/data/cli_flags.json): generating the parser from the
    configs must not change what a user typed yesterday. Change the file on purpose, with the flag."""
    import pathlib

    golden = json.loads((pathlib.Path(__file__).parent / "data" / "cli_flags.json").read_text())
    assert _flags() == golden
