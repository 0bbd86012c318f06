import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny llama checkpoint directory with its tokenizer, as a user would have on disk."""

    def make(family="llama"):
        path = tmp_path / f"tiny-{family}"
        tiny_model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        return path

    return make


@pytest.fixture
def text_file(tmp_path):
    lines = [f"Document {i}: the quick brown fox jumps over the lazy dog while counting to {i * 7}." for i in range(60)]
    path = tmp_path / "cal.txt"
    path.write_text("\n\n".join(lines))
    return path
