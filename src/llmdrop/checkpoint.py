"""Save and load pruned checkpoints. Writes are atomic: a temporary directory beside the target, then a rename.

Block-only drops are native checkpoints (fewer layers) that plain transformers loads. Sublayer drops keep only the
kept weights and record the drops under config.json's ``llmdrop`` key; ``llmdrop.load`` rebuilds them without remote
code, and ``trust_remote_code=True`` users get the same through the generic ``modeling_llmdrop.py`` saved alongside.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from . import pruned_model
from .errors import LlmdropError
from .models import torch_dtype

AUTO_MAP = {"AutoModelForCausalLM": f"{Path(pruned_model.REMOTE_CODE_FILE).stem}.{pruned_model.REMOTE_CODE_CLASS}"}


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any slow work) when the output directory exists and may not be replaced."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LlmdropError(f"output directory {out} already exists; choose another -o or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LlmdropError(f"output path {out} is a file, not a directory")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory that replaces `out` only if the block finishes without error."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory the user makes
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def has_sublayer_drops(config) -> bool:
    record = getattr(config, pruned_model.CONFIG_KEY, None) or {}
    return bool(record.get("attn") or record.get("mlp"))


def add_remote_code(folder: Path) -> None:
    """Put the generic modeling file next to a saved config and point its auto_map at it (trust_remote_code)."""
    shutil.copyfile(pruned_model.__file__, folder / pruned_model.REMOTE_CODE_FILE)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = AUTO_MAP
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save(
    model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False, finish: Callable[[Path], None] | None = None
) -> Path:
    """Write `model` (and `tokenizer`) to `out` atomically; returns the final path.

    `finish(tmpdir)` may add files (scores, report) before the directory appears under its final name.
    """
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if has_sublayer_drops(model.config):
            add_remote_code(tmp)
        if finish is not None:
            finish(tmp)
    return Path(out).expanduser()


def placement(device: str) -> dict:
    """from_pretrained arguments for `device`: "auto" spreads the model over every GPU (and CPU) with accelerate."""
    return {"device_map": "auto"} if device == "auto" else {}


def load(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a directory written by llmdrop (or any HF checkpoint directory), without remote code.

    `device` is a torch device, or "auto" for accelerate's multi-device placement.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise LlmdropError(f"checkpoint directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise LlmdropError(f"{path} is not a model checkpoint (no config.json); point at the directory `llmdrop drop` wrote")
    try:
        if "block_configs" in json.loads((path / "config.json").read_text()):  # our vLLM (Nemotron-NAS) export
            from .export.vllm import llama_config_of

            config = llama_config_of(path)
        else:
            config = AutoConfig.from_pretrained(path)
        if has_sublayer_drops(config):
            base = AutoModelForCausalLM._model_mapping[type(config)]
            model = pruned_model.pruned_class(base).from_pretrained(path, config=config, dtype=torch_dtype(dtype),
                                                                    **placement(device))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype(dtype),
                                                         **placement(device))
    except LlmdropError:
        raise
    except Exception as err:  # safetensors, json and transformers each raise their own types for a bad file
        raise LlmdropError(
            f"could not load the checkpoint in {path} ({type(err).__name__}: {str(err)[:300]}); "
            "it may be incomplete or corrupt: write it again"
        ) from None
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if device != "auto":
        model = model.to(device)
    return model.eval(), tokenizer
