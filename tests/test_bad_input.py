"""The error promise as a whole: for every bad input a user can fix, the CLI prints one line on stderr (no traceback),
exits with status 2, and leaves nothing at or beside the output path. Case ids are those of the reliability review
(shared/reviews/reliability.md); SIGTERM during a save runs in a subprocess, as `timeout` or Slurm would send it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

from llmdrop.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


class Inputs:
    """Every bad (and good) input file the cases need, made once per module in its own directory."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "tiny"
        tiny_model("llama").save_pretrained(self.model)
        tiny_tokenizer().save_pretrained(self.model)
        self.text = root / "cal.txt"
        self.text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog while counting "
                                         f"to {i * 7}." for i in range(60)))
        self.short = self._write("short.txt", "too short")
        self.rand_txt = self._write("rand.txt", os.urandom(20_000))
        self.rand_jsonl = self._write("rand.jsonl", os.urandom(20_000))
        self.latin1 = self._write("latin1.jsonl", "".join(json.dumps({"text": f"café crème {i} " * 20},
                                                                     ensure_ascii=False) + "\n"
                                                          for i in range(40)).encode("latin-1"))
        self.not_gzip = self._write("notgz.jsonl.gz", '{"text": "plain text, not gzip"}\n')
        good = {"attn": [0.9, 0.8, 0.7, 0.6], "mlp": [0.5, 0.4, 0.3, 0.2], "block": [0.3, 0.2, 0.1, 0.0], "tokens": 64}
        self.scores = self._write("scores.json", json.dumps(good))
        self.scores_nan = self._write("nan.json", json.dumps({**good, "attn": [float("nan"), 0.8, float("nan"), 0.6]}))
        self.scores_inf = self._write("inf.json", json.dumps({**good, "attn": [float("inf")] * 4}))
        self.scores_short = self._write("three.json", json.dumps({**good, "attn": [0.9, 0.8, 0.7]}))
        self.scores_long = self._write("five.json", json.dumps({**good, "attn": [0.9, 0.8, 0.7, 0.6, 0.5]}))
        self.scores_str = self._write("str.json", json.dumps({**good, "attn": ["x"] * 4}))
        self.scores_num = self._write("five_number.json", "5")
        self.scores_null = self._write("null.json", json.dumps({**good, "attn": None}))
        self.scores_bin = self._write("bin.json", os.urandom(300))
        self.scores_dir = root / "scores_dir"
        self.scores_dir.mkdir()
        self.empty_dir = root / "empty"
        self.empty_dir.mkdir()
        self.gpt2 = root / "gpt2"
        AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=112)).save_pretrained(
            self.gpt2)
        tiny_tokenizer().save_pretrained(self.gpt2)
        self.no_weights = self._copy_without(self.model, "no_weights", "model.safetensors")
        self.bad_config = self._copy_without(self.model, "bad_config", None)
        (self.bad_config / "config.json").write_text("{not json")
        self.truncated = self._copy_without(self.model, "truncated", None)
        data = (self.truncated / "model.safetensors").read_bytes()
        (self.truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
        self.missing_tensor = self._copy_without(self.model, "missing_tensor", None)
        _rename_tensor(self.missing_tensor / "model.safetensors", "model.layers.1.mlp.down_proj.weight",
                       "model.layers.1.mlp.down_proj.wexght")
        self.rand_gguf = self._write("random.gguf", os.urandom(4096))
        self.empty_gguf = self._write("empty.gguf", b"")
        self.dir_gguf = root / "dir.gguf"
        self.dir_gguf.mkdir()
        self.script = self._write("script.sh", "#!/bin/sh\necho hi\n")
        self.study_dir = root / "study"
        self.study_dir.mkdir()
        (self.study_dir / "study.json").write_text("{truncated")
        self.cache = root / "cache"

    def _write(self, name: str, data: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def _copy_without(self, src: Path, name: str, skip: str | None) -> Path:
        dst = self.root / name
        dst.mkdir()
        for f in src.iterdir():
            if f.name != skip:
                (dst / f.name).write_bytes(f.read_bytes())
        return dst


def _rename_tensor(path: Path, old: str, new: str) -> None:
    """Rename one tensor in a safetensors header in place (same length: the file stays valid, the tensor is gone)."""
    assert len(old) == len(new)
    with path.open("r+b") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = fh.read(n).decode()
        assert f'"{old}"' in header
        fh.seek(8)
        fh.write(header.replace(f'"{old}"', f'"{new}"').encode())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"))


CAL = ["--samples", "2", "--seq-len", "16"]


def _measure(w, out, *extra):
    return ["measure", w.model, "--calibration", w.text, *CAL, "-o", out / "s.json", *extra]


def _drop(w, out, *extra, model=None):
    return ["drop", model or w.model, "--calibration", w.text, *CAL, "--target", "attn", *extra, "-o", out / "pruned"]


def _cal(w, out, source):
    return ["measure", w.model, "--calibration", source, *CAL, "-o", out / "s.json"]


# (case id, argv builder, what the one line must say). Builders get the inputs and the test's output folder.
CASES = [
    # model specifications
    ("M1", lambda w, o: _measure(w, o)[:1] + [o / "nope"] + _measure(w, o)[2:], r"does not exist"),
    ("M3", lambda w, o: ["measure", w.empty_dir, *CAL], r"no config\.json|not a model checkpoint"),
    ("M4", lambda w, o: _measure(w, o)[:1] + [w.no_weights] + _measure(w, o)[2:], r"no_weights"),
    ("M5", lambda w, o: _measure(w, o)[:1] + [w.bad_config] + _measure(w, o)[2:], r"bad_config"),
    ("M6", lambda w, o: _measure(w, o)[:1] + [w.truncated] + _measure(w, o)[2:], r"truncated"),
    ("M8", lambda w, o: _measure(w, o)[:1] + [w.missing_tensor] + _measure(w, o)[2:], r"down_proj|missing|lacks"),
    ("M10", lambda w, o: _drop(w, o, "--n", "1", model=w.gpt2), r"unsupported model family 'gpt2'"),
    ("M14", lambda w, o: ["measure", w.rand_gguf, *CAL], r"random\.gguf"),
    ("M16", lambda w, o: ["measure", w.empty_gguf, *CAL], r"empty\.gguf"),
    ("M17", lambda w, o: ["measure", w.dir_gguf, *CAL], r"dir\.gguf"),
    ("M18", lambda w, o: ["measure", w.script, *CAL], r"not a \.gguf"),
    # calibration text
    ("C1", lambda w, o: _cal(w, o, w.short), r"calibration text has"),
    ("C8", lambda w, o: _cal(w, o, w.rand_txt), r"rand\.txt"),
    ("C9", lambda w, o: _cal(w, o, w.rand_jsonl), r"rand\.jsonl"),
    ("C10", lambda w, o: _cal(w, o, w.latin1), r"latin1\.jsonl"),
    ("C11", lambda w, o: _cal(w, o, w.not_gzip), r"notgz\.jsonl\.gz"),
    ("C13", lambda w, o: _measure(w, o, "--samples", "0"), r"argument --samples: expected a whole number"),
    ("C14", lambda w, o: _measure(w, o, "--seq-len", "-5"), r"argument --seq-len: expected a whole number"),
    ("C15", lambda w, o: _measure(w, o, "--batch-size", "0"), r"argument --batch-size: expected a whole number"),
    ("C16", lambda w, o: _measure(w, o, "--batch-size", "-1"), r"argument --batch-size: expected a whole number"),
    ("C17", lambda w, o: _measure(w, o, "--seq-len", "1024"), r"--seq-len 1024 is beyond the 512 positions"),
    ("C20", lambda w, o: _cal(w, o, w.root / "c4_validation.jsonl"), r"does not exist"),
    # drops and scores files
    ("D1", lambda w, o: _drop(w, o, "--n", "0"), r"argument --n: expected a whole number"),
    ("D2", lambda w, o: _drop(w, o, "--n", "9"), r"cannot drop 9 attention layers"),
    ("D4", lambda w, o: _drop(w, o, "--ratio", "1.5"), r"--ratio must be between 0 and 1"),
    ("D4-nan", lambda w, o: _drop(w, o, "--ratio", "nan"), r"--ratio must be between 0 and 1"),
    ("D6", lambda w, o: _drop(w, o, "--n", "2", "--ratio", "0.1"), r"not allowed with argument"),
    ("D7", lambda w, o: _drop(w, o, "--n", "2", "--protect", "45"), r"--protect"),
    ("D8", lambda w, o: _drop(w, o, "--n", "2", "--protect", "1-x"), r"--protect takes layer indices"),
    ("D9", lambda w, o: _drop(w, o, "--n", "2", "--protect", "3-0", "--dry-run"), r"--protect range '3-0' runs backwards"),
    ("D12", lambda w, o: _drop(w, o, "--n", "2", "--target", "bogus"), r"invalid choice: 'bogus'"),
    ("D14", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_nan), r"nan\.json"),
    ("D15", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_inf), r"inf\.json"),
    ("D16", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_short), r"three\.json"),
    ("D17", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_long, "--dry-run"), r"five\.json"),
    ("D18", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_str), r"str\.json"),
    ("D19", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_num), r"five_number\.json"),
    ("D21", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_null), r"null\.json"),
    ("D22", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_bin), r"bin\.json"),
    ("D23", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.scores_dir), r"scores_dir"),
    ("D24", lambda w, o: _drop(w, o, "--n", "2", "--scores", w.root / "none.json"), r"scores file .* does not exist"),
    ("D27", lambda w, o: _drop(w, o, "--n", "2", "--window"), r"--window drops consecutive blocks"),
    ("D27-size", lambda w, o: _measure(w, o, "--window", "9"), r"--window"),
    ("D28", lambda w, o: _drop(w, o, "--n", "2")[:-2], r"give an output directory"),
    ("save-dtype", lambda w, o: _drop(w, o, "--n", "2", "--save-dtype", "int8"), r"argument --save-dtype"),
    # output paths
    ("O1", lambda w, o: _drop(w, o, "--n", "2") if (o / "pruned").mkdir() is None else [], r"already exists"),
    ("O3", lambda w, o: _drop(w, o, "--n", "2") if (o / "pruned").write_text("x") else [], r"pruned"),
    ("O7", lambda w, o: _drop(w, o, "--n", "2")[:-2] + ["-o", o / "file" / "sub"] if (o / "file").write_text("x")
     else [], r"is a file, not a directory"),
    ("O13", lambda w, o: _measure(w, o)[:-2] + ["-o", o] if True else [], r"is a directory, not a file"),
    # eval, bench, export
    ("E2", lambda w, o: ["eval", w.model], r"nothing to evaluate"),
    ("E3", lambda w, o: ["eval", w.model, "--tasks", "piqa", "--limit", "0"], r"argument --limit: expected a whole"),
    ("E4", lambda w, o: ["eval", w.model, "--tasks", "piqa", "--limit", "-5"], r"argument --limit: expected a whole"),
    ("E5", lambda w, o: ["eval", w.model, "--tasks", "piqa", "--limit", "0.002"], r"argument --limit: expected a whole"),
    ("E6", lambda w, o: ["eval", w.model, "--ppl", "--stride", "0"], r"argument --stride: expected a whole"),
    ("E7", lambda w, o: ["eval", w.model, "--tasks", "piqa", "--num-fewshot", "-1"], r"argument --num-fewshot"),
    ("E-out", lambda w, o: ["eval", w.model, "--ppl", "--ppl-text", w.text, "--ppl-samples", "1", "--seq-len", "16",
                            "-o", o], r"is a directory, not a file"),
    ("B2", lambda w, o: ["bench", w.model, "--repeats", "0"], r"argument --repeats: expected a whole"),
    ("B3", lambda w, o: ["bench", w.model, "--context", "0"], r"argument --context: expected comma-separated"),
    ("B4", lambda w, o: ["bench", w.model, "--new-tokens", "0"], r"argument --new-tokens: expected a whole"),
    ("B5", lambda w, o: ["bench", w.model, "--batch", "0"], r"argument --batch: expected comma-separated"),
    ("B6", lambda w, o: ["bench", w.model, "--context", "abc"], r"argument --context: expected comma-separated"),
    ("X4", lambda w, o: ["export", w.model, "--format", "onnx", "-o", o / "x"], r"invalid choice: 'onnx'"),
    ("X5", lambda w, o: ["export", w.model, "-o", o / "x.gguf"] if (o / "x.gguf").write_text("x") else [],
     r"already exists"),
    ("X6", lambda w, o: ["export", w.model, "-o", o / "x.gguf", "--overwrite"] if (o / "x.gguf").mkdir() is None
     else [], r"is a directory, not a file"),
    # device, stream, study, memory sizes
    ("V1", lambda w, o: _measure(w, o, "--device", "cuda"), r"--device cuda needs a GPU"),
    ("V2", lambda w, o: _measure(w, o, "--device", "bogus"), r"argument --device: expected cpu, cuda"),
    ("S2", lambda w, o: _measure(w, o, "--stream")[:1] + [w.truncated] + _measure(w, o, "--stream")[2:],
     r"truncated"),
    ("S5", lambda w, o: _measure(w, o, "--stream")[:1] + [w.bad_config] + _measure(w, o, "--stream")[2:],
     r"bad_config"),
    ("max-memory", lambda w, o: _measure(w, o, "--stream", "--max-memory", "lots"), r"argument --max-memory"),
    ("T4", lambda w, o: ["study", w.model, "--targets", "attn", "--n", "1", *CAL, "--ppl-samples", "1",
                         "-o", w.study_dir], r"study\.json|study"),
    ("study-target", lambda w, o: ["study", w.model, "--targets", "attn,bogus", "-o", o / "st"], r"--targets bogus"),
    ("study-shard", lambda w, o: ["study", w.model, "--shard", "2/2", "-o", o / "st"], r"argument --shard"),
    ("T1", lambda w, o: ["run", w.model, "--calibration", w.short, *CAL, "--target", "attn", "--n", "1",
                         "-o", o / "run"], r"calibration"),
]

if torch.cuda.is_available():  # V1 is about a machine without CUDA
    CASES = [c for c in CASES if c[0] != "V1"]


def _main(argv: list) -> int:
    """main()'s exit status; argparse's own errors leave through SystemExit, as they do from the console script."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case,build,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, build, pattern, inputs, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("LLMDROP_CACHE", str(inputs.cache))
    out = tmp_path / "out"
    out.mkdir()
    argv = [str(a) for a in build(inputs, out)]
    assert argv, case
    before, inputs_before = _tree(tmp_path), _tree(inputs.root)
    capsys.readouterr()
    code = _main([*argv, "-q"])
    _, err = capsys.readouterr()
    assert code == 2, (case, err)
    assert err.count("\n") == 1 and err.endswith("\n"), (case, err)  # one line
    assert "Traceback" not in err and err.startswith("llmdrop"), (case, err)
    assert re.search(pattern, err), (case, err)
    assert _tree(tmp_path) == before, case  # nothing at or beside the output path
    assert [p for p in _tree(inputs.root) if not p.startswith("cache")] == \
        [p for p in inputs_before if not p.startswith("cache")], case  # and the inputs untouched


def test_hub_data_offline_is_one_sentence(inputs, tmp_path, capsys, monkeypatch):
    """E8: --data hub without the hub is a sentence pointing at --data local, not a ConnectionError traceback."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LLMDROP_CACHE", str(inputs.cache))
    code = _main(["eval", inputs.model, "--tasks", "piqa", "--data", "hub", "--limit", "2", "-q",
                  "-o", tmp_path / "e.json"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--data local" in err
    assert not list(tmp_path.iterdir())


# ---- SIGTERM: the signal `timeout`, Slurm, systemd and `docker stop` send (O10, X11) -------------------------------

_DRIVER = textwrap.dedent("""
    # Runs the CLI with the atomic writers paused once their temporary output is complete, so the test can send
    # SIGTERM exactly while a partial output exists beside the final path.
    import contextlib, sys, time
    from pathlib import Path
    import llmdrop.files as files

    marker = Path(sys.argv[1])

    def paused(writer):
        @contextlib.contextmanager
        def wrapped(*args, **kwargs):
            with writer(*args, **kwargs) as tmp:
                yield tmp
                marker.write_text(str(tmp))
                time.sleep(120)
        return wrapped

    files.atomic_dir, files.atomic_file = paused(files.atomic_dir), paused(files.atomic_file)
    from llmdrop.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _bpe_checkpoint(path: Path) -> Path:
    """A tiny llama with a BPE tokenizer: what GGUF export can write."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(VOCAB)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tiny_model("llama").save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["drop", "export"])
def test_sigterm_during_a_save_leaves_nothing(command, inputs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    if command == "drop":
        argv = _drop(inputs, work, "--n", "2", "--scores", inputs.scores)
    else:
        argv = ["export", _bpe_checkpoint(tmp_path / "bpe"), "--format", "gguf", "-o", work / "m.gguf"]
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    marker = tmp_path / "saving"
    env = {**os.environ, "PYTHONPATH": str(SRC), "LLMDROP_CACHE": str(inputs.cache)}
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), *map(str, argv), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.1)
        partial = Path(marker.read_text())
        assert partial.exists() and work in partial.parents, partial  # a partial output beside the final path
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines() == ["llmdrop: terminated; nothing was written"], err
    assert list(work.iterdir()) == []  # neither the output nor its partial


def test_sigterm_handler_is_restored_after_main(inputs, capsys):
    """main() installs its SIGTERM handler for the command only: a Python caller's own handling is left alone."""
    before = signal.getsignal(signal.SIGTERM)
    assert _main(["eval", inputs.model]) == 2  # "nothing to evaluate", after the handler was installed
    assert signal.getsignal(signal.SIGTERM) is before
    capsys.readouterr()
