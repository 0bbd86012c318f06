import math
import re

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from llmdrop.calibration import load_calibration
from llmdrop.errors import LlmdropError
from llmdrop.evaluate import perplexity


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").eval()


def _token_nll(model, context: list[int], target: int) -> float:
    """The NLL of one token given exactly `context`, from a fresh forward pass (no batching, no masks)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
    return -F.log_softmax(logits, -1)[target].item()


def test_non_overlapping_windows_equal_the_models_own_loss(model, tokenizer, text_file):
    cal = load_calibration(tokenizer, text_file, samples=5, seq_len=16)
    got = perplexity(model, cal, batch_size=2, progress=False)
    with torch.inference_mode():  # transformers' loss: mean CE of each chunk's shifted labels
        losses = [model(input_ids=c[None], labels=c[None]).loss.item() for c in cal.input_ids]
    assert got["tokens"] == 5 * 15
    assert got["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))


@pytest.mark.parametrize("bos", [False, True])
def test_strided_windows_score_each_token_once_with_its_window_context(model, tokenizer, text_file, bos):
    window, stride, n = 12, 5, 4
    cal = load_calibration(tokenizer, text_file, samples=n, seq_len=window, bos=bos, stride=stride)
    body = window - bos
    stream = load_calibration(tokenizer, text_file, samples=1, seq_len=body + (n - 1) * stride).input_ids[0].tolist()
    assert cal.describe()["stride"] == stride
    assert cal.input_ids[1, bos:].tolist() == stream[stride:stride + body]  # chunks overlap by body - stride
    prefix = [tokenizer.bos_token_id] if bos else []
    expected = []
    for t in range(0 if bos else 1, len(stream)):  # each text token, scored in the last window that ends at or after it
        start = 0 if t < body else ((t - body) // stride + 1) * stride
        expected.append(_token_nll(model, prefix + stream[start:t], stream[t]))
    got = perplexity(model, cal, batch_size=3, progress=False)  # batches that split the windows unevenly
    assert got["tokens"] == len(expected) == (body - (not bos)) + (n - 1) * stride
    assert got["nll"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_stride_equal_to_the_window_is_the_plain_split(model, tokenizer, text_file):
    plain = load_calibration(tokenizer, text_file, samples=3, seq_len=10)
    same = load_calibration(tokenizer, text_file, samples=3, seq_len=10, stride=10)
    assert torch.equal(plain.input_ids, same.input_ids) and "stride" not in same.describe()
    with pytest.raises(LlmdropError, match="stride must be between 1 and"):
        load_calibration(tokenizer, text_file, samples=3, seq_len=10, stride=11)


# ---- the library checks of evaluate / tasks / bench / plots (the CLI's own checks are in test_bad_input.py) -------

def test_counts_must_be_whole_numbers(model, tokenizer, text_file):
    """E3-E5: a limit below 1 used to reach lm-eval, which reads 0.5 as half of every task; batch 0 split forever."""
    from llmdrop.evaluate import evaluate_tasks

    for limit in (0, -5, 0.5):
        with pytest.raises(LlmdropError, match="limit must be a whole number of at least 1"):
            evaluate_tasks(model, tokenizer, ["piqa"], limit=limit)
    cal = load_calibration(tokenizer, text_file, samples=2, seq_len=8)
    with pytest.raises(LlmdropError, match="batch_size must be a whole number"):
        perplexity(model, cal, batch_size=0, progress=False)


def test_logger_level_is_restored():
    import logging

    from llmdrop.evaluate import logger_level

    logger = logging.getLogger("lm_eval")
    logger.setLevel(logging.DEBUG)
    with logger_level("lm_eval", logging.ERROR):
        assert logger.level == logging.ERROR
    assert logger.level == logging.DEBUG


def test_offline_flag_needs_no_network_probe(monkeypatch):
    import socket

    from llmdrop import tasks

    def no_socket(*args, **kwargs):
        raise AssertionError("probed the network although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tasks.hub_reachable() is False


def test_bench_settings_are_checked_and_decode_ratio_uses_run_bench(model):
    from llmdrop.bench import decode_speed_ratio, run_bench

    for kwargs, flag in [({"contexts": [0]}, "contexts"), ({"batches": []}, "batches"), ({"new_tokens": 0}, "new_tokens"),
                         ({"repeats": 0}, "repeats")]:
        args = {"contexts": [4], "batches": [1], "new_tokens": 2, "repeats": 1, **kwargs}
        with pytest.raises(LlmdropError, match=f"{flag} must be whole numbers of at least 1"):
            run_bench([("m", model)], progress=False, **args)
    ratio, kv_model, kv_base = decode_speed_ratio(model, model, 6, 2, 1)
    assert ratio > 0 and kv_model == kv_base > 0


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path):
    """No matplotlib.use() and no pyplot figures: a notebook's backend and open figures are untouched."""
    import subprocess
    import sys

    code = f"""
import matplotlib
backend = matplotlib.get_backend()
from llmdrop.measure import Scores
from llmdrop.plots import plot_similarity, plot_quality
s = Scores(attn=[0.9, 0.8], mlp=[0.5, 0.4], block=[0.3, 0.2], tokens=10)
plot_similarity(s, {str(tmp_path / "s.png")!r})
plot_quality([{{"k": 0, "strategy": "base", "average": 0.5, "perplexity": 9.0}},
              {{"k": 1, "strategy": "attn", "average": 0.4, "perplexity": 10.0}}], {str(tmp_path / "q.png")!r})
import matplotlib.pyplot as plt
assert matplotlib.get_backend() == backend == "svg" and plt.get_fignums() == []
"""
    import os

    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MPLBACKEND": "svg"})
    for name in ("s.png", "q.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.png", "s.png"]  # no partial file left


# ---- perplexity by token position ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bos,stride,buckets", [(False, None, None), (True, None, None), (False, 7, None),
                                                (False, None, 3), (True, 5, 4)])
def test_position_buckets_partition_the_tokens_and_keep_the_overall_perplexity(model, tokenizer, text_file, bos,
                                                                               stride, buckets):
    cal = load_calibration(tokenizer, text_file, samples=5, seq_len=40, bos=bos, stride=stride)
    plain = perplexity(model, cal, batch_size=2, progress=False)
    got = perplexity(model, cal, batch_size=2, progress=False, by_position=True, position_buckets=buckets)
    assert got["perplexity"] == plain["perplexity"] and got["tokens"] == plain["tokens"]
    rows = got["by_position"]
    assert sum(r["tokens"] for r in rows) == got["tokens"]
    assert sum(r["tokens"] * r["nll"] for r in rows) / got["tokens"] == pytest.approx(got["nll"], rel=1e-6)
    assert all(a["end"] <= b["start"] for a, b in zip(rows, rows[1:]))  # disjoint, in order
    assert rows[-1]["end"] == 40  # positions 1..39 of a 40-token window
    assert got["buckets"] == ("equal" if buckets else "powers of two")
    if buckets is None and stride is None:  # every window scores every position once: 5 x 1, 5 x 2, 5 x 4 ...
        assert [(r["start"], r["tokens"]) for r in rows][:3] == [(1, 5), (2, 10), (4, 20)]


def test_positions_are_tokens_of_context_before_the_target(model, tokenizer, text_file):
    """Position p of a window is the target that has p tokens before it: bucket [1, 2) is each window's 2nd token."""
    cal = load_calibration(tokenizer, text_file, samples=3, seq_len=16)
    got = perplexity(model, cal, batch_size=3, progress=False, by_position=True)
    expected = sum(_token_nll(model, c[:1].tolist(), c[1].item()) for c in cal.input_ids) / 3
    assert got["by_position"][0]["start"] == 1 and got["by_position"][0]["tokens"] == 3
    assert got["by_position"][0]["nll"] == pytest.approx(expected, rel=1e-5)


def test_bucket_edges():
    from llmdrop.evaluate import bucket_edges

    assert bucket_edges(15) == [1, 2, 4, 8, 16]
    assert bucket_edges(16) == [1, 2, 4, 8, 16, 17]
    assert bucket_edges(12, buckets=3) == [1, 5, 9, 13]
    assert bucket_edges(2, buckets=5) == [1, 2, 3]  # never an empty bucket


def test_eval_by_position_equals_eval_ppl(saved_tiny, text_file, tmp_path):
    import json

    from llmdrop.cli import main

    path = saved_tiny()
    args = ["eval", str(path), "--ppl", "--ppl-text", str(text_file), "--ppl-samples", "3", "--seq-len", "32", "-q"]
    assert main([*args, "-o", str(tmp_path / "plain.json")]) == 0
    assert main([*args, "--by-position", "-o", str(tmp_path / "pos.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())["perplexity"]
    pos = json.loads((tmp_path / "pos.json").read_text())["perplexity"]
    assert pos["perplexity"] == plain["perplexity"] and pos["tokens"] == plain["tokens"] == 3 * 31
    assert sum(b["tokens"] for b in pos["by_position"]) == pos["tokens"]
    with pytest.raises(LlmdropError, match="by_position reports perplexity by position: add ppl"):
        from llmdrop.evaluate import evaluate

        evaluate(str(path), ["passkey"], by_position=True)


def test_eval_refuses_a_window_beyond_the_trained_positions_before_loading(saved_tiny, text_file, monkeypatch,
                                                                           capsys):
    """A27: eval --ppl --seq-len 9000 on an 8,192-position model ran silently; measure, drop, run and heal refuse it."""
    from llmdrop import evaluate as evaluate_mod
    from llmdrop.cli import main
    from llmdrop.evaluate import evaluate

    path = saved_tiny()  # max_position_embeddings 512

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(evaluate_mod, "load_model", refuse)
    sentence = ("seq_len 600 is beyond the 512 positions this model was trained for (max_position_embeddings); "
                "choose seq_len 512 or less")
    with pytest.raises(LlmdropError, match=re.escape(sentence)):
        evaluate(str(path), ppl=True, ppl_text=str(text_file), seq_len=600, progress=False)
    with pytest.raises(LlmdropError, match=re.escape(sentence)):  # a strided window is seq_len tokens too
        evaluate(str(path), ppl=True, ppl_text=str(text_file), seq_len=600, stride=100, progress=False)
    with pytest.raises(LlmdropError, match="contexts 1024 is beyond the 512 positions"):
        evaluate(str(path), ["passkey"], contexts=[256, 1024], progress=False)
    assert main(["eval", str(path), "--ppl", "--ppl-text", str(text_file), "--seq-len", "600", "-q"]) == 2
    assert "--seq-len 600 is beyond the 512 positions" in capsys.readouterr().err
