import math

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
    with pytest.raises(LlmdropError, match="--stride must be between 1 and"):
        load_calibration(tokenizer, text_file, samples=3, seq_len=10, stride=11)
