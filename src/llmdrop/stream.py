"""Measure and drop without holding the model: one decoder layer's weights in memory at a time.

The model is built with empty (meta) parameters; real buffers (rotary frequencies, embedding scales) stay, so the
family's own forward computes positions, masks and sliding windows exactly as in normal use. Every calibration
chunk's hidden state is pushed through layer 0, then layer 1, and so on; each layer's weights are read from the
safetensors files just before and released just after. The hidden states live in memory, or on disk past a budget.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import FAMILIES, arch_for, arch_for_config
from .calibration import Calibration
from .checkpoint import torch_dtype
from .errors import LlmdropError
from .files import atomic_dir, literal
from .measure import Scores, _first_tensor, _register_hooks, _Sums, scores_from_sums

_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the one layer of interest has run."""


def _unreadable(path: Path, err: Exception) -> LlmdropError:
    return LlmdropError(f"could not read the weights in {literal(path)} ({type(err).__name__}: {literal(str(err)[:200])}); "
                        "the checkpoint may be incomplete or corrupt: write it again")


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        try:
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {k: self.path / v for k, v in weight_map.items()}
            elif (self.path / "model.safetensors").exists():
                with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                    self.files = dict.fromkeys(f.keys(), self.path / "model.safetensors")
            else:
                raise LlmdropError(f"{self.path} has no safetensors weights (model.safetensors or an index); "
                                   "streaming needs them")
        except LlmdropError:
            raise
        except Exception as err:  # safetensors, json and the OS each raise their own types for a bad file
            raise _unreadable(self.path, err) from None

    def names(self) -> list[str]:
        return list(self.files)

    def _open(self, name: str):
        if name not in self.files:
            raise LlmdropError(f"checkpoint {self.path} lacks tensor {name}; it may be incomplete")
        return safe_open(str(self.files[name]), "pt")

    def nbytes(self, name: str) -> int:
        try:
            with self._open(name) as f:
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                return numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        except LlmdropError:
            raise
        except Exception as err:
            raise _unreadable(self.path, err) from None

    def get(self, name: str) -> torch.Tensor:
        try:
            with self._open(name) as f:
                return f.get_tensor(name)
        except LlmdropError:
            raise
        except Exception as err:
            raise _unreadable(self.path, err) from None


def empty_model(path: str | Path) -> nn.Module:
    """The checkpoint's model with parameters on the meta device and real buffers (sublayer drops applied)."""
    from accelerate import init_empty_weights

    from .checkpoint import read_config
    from .pruned_model import base_class, pruned_class, record_of

    config = read_config(path)
    try:
        base = base_class(config)
    except (KeyError, ValueError):
        raise LlmdropError(f"unsupported model family '{arch_for_config(config).family}' in {literal(path)}: "
                           f"transformers has no causal LM class for it; supported families: "
                           f"{', '.join(sorted(FAMILIES))}") from None
    record = record_of(config)
    cls = pruned_class(base) if record.get("attn") or record.get("mlp") else base
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config)
    arch_for(model)  # an unsupported layout fails here, with the family named, before any tensor is read
    return model.eval()


def _load_module(model: nn.Module, prefix: str, module: nn.Module, reader: CheckpointReader, dtype) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        # dtype given explicitly: accelerate would otherwise cast back to the checkpoint's dtype (bf16 for most)
        set_module_tensor_to_device(model, f"{prefix}.{name}", "cpu", value=reader.get(f"{prefix}.{name}"), dtype=dtype)


def _free_module(model: nn.Module, prefix: str, module: nn.Module) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(model, f"{prefix}.{name}", "meta")


class _HiddenStore:
    """Per-chunk hidden states: in memory while under `budget` bytes, else as files in a temporary directory."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.mem: dict[int, torch.Tensor] = {}
        self.dir: Path | None = None

    def put(self, i: int, h: torch.Tensor) -> None:
        if self.dir is None and self.budget is not None:
            used = sum(t.numel() * t.element_size() for k, t in self.mem.items() if k != i)
            if used + h.numel() * h.element_size() > self.budget:
                self.dir = Path(tempfile.mkdtemp(prefix="llmdrop-hidden-"))
                for k, t in self.mem.items():
                    torch.save(t, self.dir / f"{k}.pt")
                self.mem.clear()
        if self.dir is None:
            self.mem[i] = h
        else:
            torch.save(h.contiguous(), self.dir / f"{i}.pt")

    def get(self, i: int) -> torch.Tensor:
        if self.dir is None:
            return self.mem[i]
        return torch.load(self.dir / f"{i}.pt", mmap=True)

    def close(self) -> None:
        self.mem.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def _single_layer(decoder: nn.Module, layers_attr: str, layer: nn.Module, layer_type: str | None):
    """Make the decoder hold just `layer` (with its own layer type) for one pass; restore it afterwards."""
    config = decoder.config
    saved = (getattr(decoder, layers_attr), config.num_hidden_layers, getattr(config, "layer_types", None))
    setattr(decoder, layers_attr, nn.ModuleList([layer]))
    config.num_hidden_layers = 1
    if saved[2] is not None:
        config.layer_types = [layer_type]
    try:
        yield
    finally:
        setattr(decoder, layers_attr, saved[0])
        config.num_hidden_layers = saved[1]
        if saved[2] is not None:
            config.layer_types = saved[2]


def measure_streamed(
    path: str | Path,
    calibration: Calibration | torch.Tensor,
    dtype: str = "float32",
    batch_size: int = 4,
    residual: bool = True,
    max_memory: int | None = None,
    progress: bool = True,
    model_name: str = "",
) -> Scores:
    """The same scores as `measure`, reading one layer's weights at a time from the checkpoint at `path`.

    `max_memory` (bytes) bounds the hidden states kept in memory; past it they go to a temporary directory.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LlmdropError(f"{{batch_size}} must be a positive number of chunks (got {batch_size})", params=["batch_size"])
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise LlmdropError(f"{{max_memory}} must be a positive number of bytes (got {max_memory!r})",
                           params=["max_memory"])
    torch_type = torch_dtype(dtype)
    reader = CheckpointReader(path)
    model = empty_model(path)
    arch = arch_for(model)
    decoder_path, _, layers_attr = arch.layers.rpartition(".")
    decoder = model.get_submodule(decoder_path)
    layers = model.get_submodule(arch.layers)
    types = list(getattr(decoder.config, "layer_types", None) or [None] * len(layers))
    input_ids = calibration.input_ids if isinstance(calibration, Calibration) else calibration
    batches = list(input_ids.split(batch_size))
    store = _HiddenStore(max_memory)
    sums = _Sums(len(layers), None)
    sums.tokens = input_ids.numel()
    embed_prefix = f"{decoder_path}.{_child_name(decoder, decoder.get_input_embeddings())}"
    try:
        with torch.inference_mode():
            # h_0 = the input of layer 0, as the family's own forward computes it (embedding scale included).
            embed = decoder.get_input_embeddings()
            _load_module(model, embed_prefix, embed, reader, torch_type)
            first = layers[0]

            def grab(_m, args, kwargs):
                raise _Stop(_first_tensor(args, kwargs))

            handle = first.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for b, batch in enumerate(batches):
                    try:
                        decoder(input_ids=batch, use_cache=False)
                    except _Stop as stop:
                        store.put(b, stop.args[0].to(torch_type))
            finally:
                handle.remove()
            _free_module(model, embed_prefix, embed)

            bar = tqdm(total=len(layers) * len(batches), desc="measuring (streamed)", unit="batch",
                       disable=not progress)
            for i, layer in enumerate(layers):
                prefix = f"{arch.layers}.{i}"
                _load_module(model, prefix, layer, reader, torch_type)
                current: dict[str, torch.Tensor] = {}

                def feed(_m, args, kwargs, current=current):
                    # Replace whatever the decoder computed from the stand-in embeddings with the real state.
                    if args:
                        return (current["h"], *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": current["h"]}

                def stop(_m, _args, _kwargs, out):
                    raise _Stop(out[0] if isinstance(out, tuple) else out)

                hooks = [layer.register_forward_pre_hook(feed, with_kwargs=True)]
                hooks += _register_hooks(nn.ModuleList([layer]), arch, sums, residual, None, offset=i)
                hooks.append(layer.register_forward_hook(stop, with_kwargs=True))
                try:
                    with _single_layer(decoder, layers_attr, layer, types[i]):
                        for b in range(len(batches)):
                            current["h"] = store.get(b)
                            try:
                                decoder(inputs_embeds=current["h"], use_cache=False)
                            except _Stop as out:
                                store.put(b, out.args[0])
                            bar.update()
                finally:
                    for h in hooks:
                        h.remove()
                _free_module(model, prefix, layer)
            bar.close()
    finally:
        store.close()
    return scores_from_sums(sums, model_name, calibration, residual, None)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, m in parent.named_children() if m is child)


def drop_streamed(src: str | Path, plan, out: str | Path, overwrite: bool = False, provenance: dict | None = None,
                  shard_bytes: int = 2 << 30, finish: Callable[[Path], None] | None = None) -> Path:
    """Write the pruned checkpoint of `src` tensor by tensor, shard by shard: the model is never in memory.

    The result equals what `apply_plan` + `save` produce on the loaded model (same tensors, same config).
    `finish(tmpdir)` may add files (scores.json, plan.json) before the directory appears under its final name.
    """
    from .checkpoint import add_remote_code
    from .pruned_model import REMOTE_CODE_FILE, record_of
    from .surgery import apply_plan

    src = Path(src)
    reader = CheckpointReader(src)
    model = empty_model(src)  # meta parameters: surgery on it costs nothing and yields the exact new config
    # Surgery keeps the surviving parameter objects, so identity maps each old tensor name to its new one.
    old_names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        old_names.setdefault(id(p), []).append(name)
    apply_plan(model, plan, provenance)
    new_names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        new_names.setdefault(id(p), []).append(name)
    stored = set(reader.names())
    keep = [(old, new) for pid, news in new_names.items() for old, new in zip(old_names[pid], news) if old in stored]
    if not any(old.startswith(f"{arch_for(model).layers}.") for old, _ in keep):
        raise LlmdropError(f"checkpoint {src} holds no tensor of its layers; it may be incomplete")
    with atomic_dir(out, overwrite) as tmp:
        shards: list[list[tuple[str, str]]] = [[]]
        size = 0
        for old, new in keep:
            nbytes = reader.nbytes(old)
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((old, new))
            size += nbytes
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({new: reader.get(old).contiguous() for old, new in shard}, str(tmp / fname),
                      metadata={"format": "pt"})
            weight_map.update({new: fname for _, new in shard})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                         indent=2))
        model.config.save_pretrained(tmp)
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(("model", "config.json", REMOTE_CODE_FILE)):
                shutil.copyfile(f, tmp / f.name)  # tokenizer and generation config travel unchanged
        record = record_of(model.config)
        if record.get("attn") or record.get("mlp"):
            add_remote_code(tmp)
        if finish is not None:
            finish(tmp)
    return Path(out).expanduser()
