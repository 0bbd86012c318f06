import gzip
import json

import pytest

from llmdrop.calibration import builtin_documents, load_calibration
from llmdrop.errors import LlmdropError


def test_documents_are_joined_with_eos_and_chunked(tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["abc", "de", "fghij", "klmnopqrstu"]))
    cal = load_calibration(tokenizer, path, samples=2, seq_len=5)
    eos = tokenizer.eos_token_id
    ids = [tokenizer.convert_tokens_to_ids(c) for c in "abc"] + [eos] + \
        [tokenizer.convert_tokens_to_ids(c) for c in "de"] + [eos] + [tokenizer.convert_tokens_to_ids(c) for c in "fgh"]
    assert cal.input_ids.flatten().tolist() == ids
    assert cal.describe()["tokens"] == 10 and cal.documents == 3


def test_bos_starts_every_chunk(tokenizer, text_file):
    cal = load_calibration(tokenizer, text_file, samples=3, seq_len=8, bos=True)
    assert cal.input_ids.shape == (3, 8)
    assert (cal.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert (cal.input_ids[:, 1:] != tokenizer.bos_token_id).all()


def test_skip_gives_the_following_chunks(tokenizer, text_file):
    both = load_calibration(tokenizer, text_file, samples=4, seq_len=8)
    held = load_calibration(tokenizer, text_file, samples=2, seq_len=8, skip=2)
    assert held.input_ids.tolist() == both.input_ids[2:].tolist()


def test_directory_and_gzip_sources(tokenizer, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello world " * 20)
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "gzip text " * 20}) + "\n")
    cal = load_calibration(tokenizer, tmp_path / "d", samples=6, seq_len=50)  # more than the first file
    assert cal.documents == 2


def test_too_little_text_says_how_much(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(LlmdropError, match=r"has 5 tokens in 1 documents, but 2 chunks of 16 need 32"):
        load_calibration(tokenizer, path, samples=2, seq_len=16)
    path.write_text("")
    with pytest.raises(LlmdropError, match="has 0 tokens"):
        load_calibration(tokenizer, path, samples=1, seq_len=4)


def test_bad_sources(tokenizer, tmp_path):
    with pytest.raises(LlmdropError, match="does not exist"):
        load_calibration(tokenizer, tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(LlmdropError, match="line 1 has no string 'text' field"):
        load_calibration(tokenizer, bad)
    bad.write_text("{not json\n")
    with pytest.raises(LlmdropError, match="not valid JSON"):
        load_calibration(tokenizer, bad)


def test_builtin_default_is_real_text():
    docs = []
    for doc in builtin_documents():
        docs.append(doc)
        if len(docs) == 50:
            break
    assert len(set(docs)) == 50
    assert all(len(d) > 200 and "Question:" not in d for d in docs)


def test_shared_c4_file(tokenizer):
    from conftest import SHARED_DATA

    path = SHARED_DATA / "calibration" / "c4_validation_2k.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is not beside this checkout")
    cal = load_calibration(tokenizer, path, samples=4, seq_len=64)
    assert cal.input_ids.shape == (4, 64)


@pytest.mark.parametrize("case,name,content,pattern", [
    ("C8 random bytes as .txt", "r.txt", bytes(range(128, 256)) * 50, r"r.txt is not UTF-8 text: line 1 has byte 0x80"),
    ("C9 random bytes as .jsonl", "r.jsonl", b'{"text": "ok"}\n' + bytes(range(200, 256)) * 10,
     r"r.jsonl is not UTF-8 text: line 2 has byte 0xc8"),
    ("C10 Latin-1 JSONL", "l1.jsonl", '{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1"),
     r"l1.jsonl is not UTF-8 text: line 1 has byte 0xe9; save it as UTF-8"),
    ("C11 not gzip", "p.jsonl.gz", b'{"text": "plain"}\n', r"p.jsonl.gz is not a complete gzip file"),
    ("truncated gzip", "t.jsonl.gz", gzip.compress(b'{"text": "cut"}\n' * 50)[:40], r"is not a complete gzip file"),
    ("binary with NUL", "n.txt", b"text\x00\x00more", r"holds NUL bytes"),
])
def test_undecodable_calibration_is_one_sentence(case, name, content, pattern, tokenizer, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LlmdropError, match=pattern):
        load_calibration(tokenizer, path, samples=1, seq_len=4)


def test_gzip_and_utf8_text_still_read(tokenizer, tmp_path):
    path = tmp_path / "u.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(json.dumps({"text": "caf\u00e9 " * 20}) for _ in range(3))).encode()))
    assert load_calibration(tokenizer, path, samples=2, seq_len=8).documents >= 1


def test_counts_name_their_parameters(tokenizer, text_file):
    with pytest.raises(LlmdropError) as err:
        load_calibration(tokenizer, text_file, samples=0, seq_len=8)
    assert "(got samples 0, seq_len 8)" in str(err.value) and "--samples 0" in err.value.render()


def _lf_and_crlf(tmp_path, name, text, newline):
    """The same text saved with LF and with `newline` line endings (and gzipped when `name` ends with .gz)."""
    paths = []
    for tag, ending in (("lf", "\n"), ("other", newline)):
        path = tmp_path / tag / name
        path.parent.mkdir(exist_ok=True)
        data = text.replace("\n", ending).encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        paths.append(path)
    return paths


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
@pytest.mark.parametrize("name", ["c.txt", "c.jsonl", "c.jsonl.gz"])
def test_windows_line_endings_read_as_in_text_mode(name, newline, tokenizer, tmp_path):
    """Issue 22: a CRLF file gave documents ending in \\r and, in .txt, one document where blank lines separate many;
    text is read as Python's text mode reads it, so the documents and the chunks are those of the LF file."""
    from llmdrop.calibration import documents

    docs = [f"Document {i} line one,\nand line two of document {i}: the quick brown fox." for i in range(12)]
    text = "\n\n".join(docs) + "\n" if name.endswith(".txt") else "".join(json.dumps({"text": d}) + "\n" for d in docs)
    lf, other = _lf_and_crlf(tmp_path, name, text, newline)
    assert list(documents(other)) == list(documents(lf)) == docs
    for path in (lf, other):  # a directory of them reads the same, and so does the held-out text of --ppl-text
        assert load_calibration(tokenizer, path.parent, samples=4, seq_len=32, skip=1).input_ids.tolist() == \
            load_calibration(tokenizer, lf, samples=4, seq_len=32, skip=1).input_ids.tolist()


def test_utf8_bom_is_not_text(tokenizer, tmp_path):
    """Notepad writes UTF-8 with a BOM: it is no token of the first document, and JSONL line 1 still parses."""
    from llmdrop.calibration import documents

    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfFirst doc\r\n\r\nSecond doc\r\n")
    assert list(documents(tmp_path / "b.txt")) == ["First doc", "Second doc"]
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')
    assert list(documents(tmp_path / "b.jsonl")) == ["one", "two"]
