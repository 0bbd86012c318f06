"""Save and load pruned checkpoints. Writes are atomic (files.atomic_dir); loads are strict.

Block-only drops are native checkpoints (fewer layers) that plain transformers loads. Sublayer drops keep only the
kept weights and record the drops under config.json's ``llmdrop`` key, with ``model_type: "llmdrop"`` so that plain
transformers refuses them instead of building the unpruned model with random weights. ``llmdrop.load`` rebuilds them
without remote code, and ``trust_remote_code=True`` users get the same through the generic ``modeling_llmdrop.py``
saved alongside.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import options, pruned_model
from .arch import FAMILIES
from .errors import LlmdropError
from .files import atomic_dir, literal

__all__ = ["DTYPES", "torch_dtype", "read_config", "load_checkpoint", "save", "atomic_dir", "source_dtype",
           "stored_dtype", "add_remote_code", "placement"]

log = logging.getLogger("llmdrop")

DTYPES = {name: getattr(torch, name) for name in options.DTYPES}  # the working precisions, as torch types
# The attribute load_model / load_checkpoint set on a model: the precision of what it was loaded from, which save()
# keeps by default (a bf16 checkpoint loaded in float32 for measuring is saved as bf16 again).
SOURCE_DTYPE = "llmdrop_source_dtype"
_MODULE = Path(pruned_model.REMOTE_CODE_FILE).stem
AUTO_MAP = {"AutoConfig": f"{_MODULE}.{pruned_model.REMOTE_CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{_MODULE}.{pruned_model.REMOTE_CODE_CLASS}"}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of DTYPES' names."""
    if name not in DTYPES:
        raise LlmdropError(f"unknown dtype '{literal(name)}'; {{dtype}} must be one of {', '.join(DTYPES)}",
                           params=["dtype"])
    return DTYPES[name]


def dtype_name(dtype: torch.dtype | str) -> str:
    """The DTYPES name of a torch dtype or dtype name (float32 for any other: the precision llmdrop computes in)."""
    if isinstance(dtype, str):
        return dtype if dtype in DTYPES else "float32"
    return next((name for name, d in DTYPES.items() if d == dtype), "float32")


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's text for a one-sentence message: at most about `limit` characters, cut between
    words with " ..." (a cut word reads as a wrong one: "your version of Tra")."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    cut = head.rsplit(None, 1)[0] if " " in head.strip() else text[:limit]
    return cut.rstrip(" ,;:(") + " ..."


# --- reading --------------------------------------------------------------------------------------------------------


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def _vllm_llama_config(raw: dict):
    """The Llama config inside our Nemotron-NAS (vLLM) export: block_configs hold nothing the pruned class needs."""
    from transformers import LlamaConfig

    raw = dict(raw)
    for key in ("block_configs", "auto_map", "model_type", "architectures"):
        raw.pop(key, None)
    record = dict(raw.get(pruned_model.CONFIG_KEY) or {})
    record.pop(pruned_model.BASE_TYPE, None)
    if record:
        raw[pruned_model.CONFIG_KEY] = record
    return LlamaConfig(**raw, architectures=["LlamaForCausalLM"])


def read_config(path: str | Path):
    """The config of the checkpoint directory `path`, the one way llmdrop reads one.

    Handles llmdrop's own model_type (sublayer-pruned checkpoints) and its vLLM (Nemotron-NAS) export; raises
    LlmdropError for a missing or invalid config.json and for a family transformers has no causal LM class for.
    """
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    path = Path(path).expanduser()
    if not path.is_dir():
        raise LlmdropError(f"checkpoint directory {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise LlmdropError(f"{path} is not a model checkpoint (no config.json); point at the directory `llmdrop drop` wrote")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LlmdropError(f"{file} is not valid JSON ({type(err).__name__}: {first_line(err)}); the checkpoint may be "
                           "incomplete or corrupt: write it again") from None
    if not isinstance(raw, dict):
        raise LlmdropError(f"{file} does not hold a JSON object; the checkpoint may be corrupt: write it again")
    model_type = raw.get("model_type")
    try:
        if "block_configs" in raw:
            config = _vllm_llama_config(raw)
        elif model_type == pruned_model.MODEL_TYPE:
            problem = pruned_model.family_problem(raw, str(file))
            if problem:  # the family picks the class built over the weights: a wrong one would load silently
                raise LlmdropError(problem)
            config = pruned_model.config_from_dict(raw)
        elif not model_type:
            raise LlmdropError(f"{file} names no model_type, so its model family is unknown; llmdrop supports "
                               f"{_supported()}")
        elif model_type not in CONFIG_MAPPING:
            raise LlmdropError(f"unsupported model family '{model_type}': this transformers version does not know it "
                               f"(llmdrop supports {_supported()})")
        else:
            config = AutoConfig.from_pretrained(path)
    except LlmdropError:
        raise
    except Exception as err:  # transformers raises ValueError / TypeError / KeyError for values it cannot use
        raise LlmdropError(f"{file} is not a config transformers can read ({type(err).__name__}: "
                           f"{first_line(err)}); the checkpoint may be corrupt") \
            from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise LlmdropError(f"unsupported model family '{config.model_type}': it is not a decoder-only causal language "
                           f"model (llmdrop supports {_supported()})")
    return config


def stored_dtype(path: str | Path) -> str | None:
    """The precision of a checkpoint's weights (its first floating tensor), from the safetensors header alone."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    for file in files[:1]:
        try:
            with file.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(size, 100 << 20)))
        except (OSError, struct.error, ValueError):
            break
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    named = raw.get("dtype") or raw.get("torch_dtype") if isinstance(raw, dict) else None
    return named if named in DTYPES else None


def source_dtype(model: nn.Module) -> str:
    """The precision `model` was loaded from (set by load_model / load_checkpoint), else its current one."""
    recorded = getattr(model, SOURCE_DTYPE, None)
    if recorded in DTYPES:
        return recorded
    return dtype_name(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))


def placement(device: str) -> dict:
    """from_pretrained arguments for `device`: "auto" spreads the model over every GPU (and CPU) with accelerate."""
    return {"device_map": "auto"} if device == "auto" else {}


def check_loading_info(where: str | Path, info: dict) -> None:
    """Refuse a load whose weights did not all come from the checkpoint (transformers only warns and fills them
    with random values). Dropped modules of a pruned class have no parameters and tied heads are not reported, so
    whatever is listed is a real miss."""
    missing, unexpected = list(info.get("missing_keys") or ()), list(info.get("unexpected_keys") or ())
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()]
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} weight(s) the model needs ({', '.join(sorted(missing)[:3])}"
                        f"{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"holds {len(unexpected)} weight(s) the model does not have "
                        f"({', '.join(sorted(unexpected)[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if mismatched:
        problems.append(f"has {len(mismatched)} weight(s) of the wrong shape ({', '.join(sorted(mismatched)[:3])})")
    if problems:
        raise LlmdropError(f"checkpoint {where} {' and '.join(problems)}; it is incomplete or corrupt: write it again")


def load_checkpoint(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a directory written by llmdrop (or any HF checkpoint directory), without remote code.

    Strict: a weight missing from the files, or one the model has no place for, is an LlmdropError. `device` is a
    torch device, or "auto" for accelerate's multi-device placement.
    """
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    config = read_config(path)
    cls = pruned_model.base_class(config)
    if pruned_model.has_sublayer_drops(config):
        cls = pruned_model.pruned_class(cls)
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=torch_dtype(dtype), output_loading_info=True,
                                          **placement(device))
    except LlmdropError:
        raise
    except Exception as err:  # safetensors, json and transformers each raise their own types for a bad file
        first = first_line(err, 300)
        raise LlmdropError(f"could not load the checkpoint in {path} ({type(err).__name__}: {first}); it may be "
                           "incomplete or corrupt: write it again") from None
    check_loading_info(path, info)
    setattr(model, SOURCE_DTYPE, stored_dtype(path) or dtype)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        # The family config, given: reading config.json would meet model_type "llmdrop" and ask to run remote code.
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    if device != "auto":
        model = model.to(device)
    return model.eval(), tokenizer


# --- writing --------------------------------------------------------------------------------------------------------


def add_remote_code(folder: Path) -> None:
    """Make a saved sublayer-pruned config refuse plain loading and point trust_remote_code at the generic loader.

    The family's model_type moves into the record and config.json's becomes "llmdrop", which plain transformers does
    not know; auto_map names the config and model classes of ``modeling_llmdrop.py``, copied beside it.
    """
    shutil.copyfile(pruned_model.__file__, folder / pruned_model.REMOTE_CODE_FILE)
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text())
    record = dict(raw.get(pruned_model.CONFIG_KEY) or {})
    if raw.get("model_type") != pruned_model.MODEL_TYPE:
        record[pruned_model.BASE_TYPE] = raw["model_type"]
        raw["model_type"] = pruned_model.MODEL_TYPE
    raw[pruned_model.CONFIG_KEY] = record
    raw["auto_map"] = AUTO_MAP
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _cast_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors in `dtype`, tied tensors still one tensor (the model is not
    touched: it may be evaluated after saving)."""
    out, seen = {}, {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in seen:
            seen[key] = tensor.to(dtype)
        out[name] = seen[key]
    return out


def save(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False,
         finish: Callable[[Path], None] | None = None, dtype: str | None = None) -> Path:
    """Write `model` (and `tokenizer`) to `out` atomically; returns the final path.

    `dtype` None keeps the precision of what the model was loaded from (see source_dtype: a GGUF source is saved as
    bfloat16); "float32", "bfloat16" or "float16" choose. `finish(tmpdir)` may add files (scores, report) before the
    directory appears under its final name.
    """
    name = dtype or source_dtype(model)
    target = torch_dtype(name)
    with atomic_dir(out, overwrite) as tmp:
        floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
        state = _cast_state(model, target) if floating - {target} else None
        model.save_pretrained(tmp, state_dict=state)
        config_path = tmp / "config.json"
        if state is not None:  # save_pretrained records the in-memory dtype; the files hold `target`
            raw = json.loads(config_path.read_text())
            raw["dtype"] = name
            config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if pruned_model.has_sublayer_drops(model.config):
            add_remote_code(tmp)
        if finish is not None:
            finish(tmp)
    return Path(out).expanduser()
