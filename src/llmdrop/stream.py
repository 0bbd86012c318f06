"""Measure, fit and drop without holding the model: one decoder layer's weights in memory at a time.

The model is built with empty (meta) parameters; real buffers (rotary frequencies, embedding scales) stay, so the
family's own forward computes positions, masks and sliding windows exactly as in normal use. Every calibration
chunk's hidden state is pushed through layer 0, then layer 1, and so on (`LayerWalk`); each layer's weights are read
from the safetensors files just before and released just after. The hidden states live in memory, or on disk past
a budget. The same walk runs on a model in memory, where it costs one pass for work that needs every chunk's state
at a layer before the next layer may run (patches/linear.py fits a layer's patch, then propagates through it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import FAMILIES, arch_for, arch_for_config
from .calibration import Calibration, next_token_nll
from .checkpoint import torch_dtype
from .errors import LlmdropError
from .files import atomic_dir, literal
from .measure import Scores, _first_tensor, _register_hooks, _Sums, scores_from_sums

_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


class Cut(Exception):
    """Raise from a hook to end one chunk's forward pass early: what came after is not needed."""


class _Stop(Cut):
    """Raised from a hook to end a forward pass once the one layer of interest has run (args[0]: its output)."""


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
            # A new file replaces the old one: the state read from it may still be memory-mapped, and truncating
            # a mapped file in place would fault on the next read of it.
            tmp = self.dir / f"{i}.pt.tmp"
            torch.save(h.contiguous(), tmp)
            os.replace(tmp, self.dir / f"{i}.pt")

    def get(self, i: int) -> torch.Tensor:
        if self.dir is None:
            return self.mem[i]
        return torch.load(self.dir / f"{i}.pt", mmap=True)

    def close(self) -> None:
        self.mem.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def _only_layers(decoder: nn.Module, layers_attr: str, layers: list[nn.Module], layer_types: list[str | None]):
    """Make the decoder hold just `layers` (with their own layer types) for one pass; restore it afterwards."""
    config = decoder.config
    saved = (getattr(decoder, layers_attr), config.num_hidden_layers, getattr(config, "layer_types", None))
    setattr(decoder, layers_attr, nn.ModuleList(layers))
    config.num_hidden_layers = len(layers)
    if saved[2] is not None:
        config.layer_types = list(layer_types)
    try:
        yield
    finally:
        setattr(decoder, layers_attr, saved[0])
        config.num_hidden_layers = saved[1]
        if saved[2] is not None:
            config.layer_types = saved[2]


def _feeder(current: dict[str, torch.Tensor]) -> Callable:
    """A forward pre-hook for a walk's first layer: whatever the decoder computed from the stand-in embeddings is
    replaced by the held state in current["h"]."""

    def feed(_m, args, kwargs):
        if args:
            return (current["h"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": current["h"]}

    return feed


def check_walk(batch_size: Any, max_memory: Any) -> None:
    """The chunks per forward call and the budget for held hidden states are usable (before any weight is read)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LlmdropError(f"{{batch_size}} must be a positive number of chunks (got {batch_size!r})",
                           params=["batch_size"])
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise LlmdropError(f"{{max_memory}} must be a positive number of bytes (got {max_memory!r})",
                           params=["max_memory"])


class LayerWalk:
    """Every calibration chunk's hidden state, pushed through the decoder one layer at a time.

    Each layer runs inside the decoder's own forward with that one layer in its list, so positions, masks, rotary
    embeddings and sliding windows are computed as the family computes them; a pre-hook swaps the decoder's stand-in
    input for the held state. With a `reader` the model is `empty_model`'s skeleton and `loaded(i)` reads layer i's
    weights (in `dtype`) for as long as it is open; without one the model holds its weights and the walk starts at
    any layer with one cut-short pass of the whole model. The states (samples x seq_len x hidden) stay in memory up
    to `max_memory` bytes, then go to a temporary directory. `layer_calls` counts decoder-layer forward calls, the
    unit of the walk's cost (a full pass is layers x batches of them).

        with LayerWalk(model, arch, ids, 4) as walk:
            walk.start(first)
            for i in range(first, n):
                with walk.loaded(i):
                    walk.run(i)         # hooks registered on layer i's modules see what it really reads
    """

    def __init__(self, model: nn.Module, arch, input_ids: torch.Tensor, batch_size: int,
                 max_memory: int | None = None, reader: CheckpointReader | None = None,
                 dtype: torch.dtype | None = None):
        check_walk(batch_size, max_memory)
        self.model, self.arch, self.reader = model, arch, reader
        self.dtype = dtype or torch.float32
        decoder_path, _, self.layers_attr = arch.layers.rpartition(".")
        self.decoder_path = decoder_path
        self.decoder = model.get_submodule(decoder_path)
        self.layers = model.get_submodule(arch.layers)
        self.types = list(getattr(self.decoder.config, "layer_types", None) or [None] * len(self.layers))
        self.batches = list(input_ids.split(batch_size))
        self.device = torch.device("cpu") if reader is not None else next(model.parameters()).device
        self.store = _HiddenStore(max_memory)
        self.layer_calls = 0
        self.at: int | None = None  # the layer whose inputs the store holds

    def __enter__(self) -> LayerWalk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def full_pass(self) -> int:
        """Decoder-layer calls of one full pass over the chunks."""
        return len(self.layers) * len(self.batches)

    def _grab(self, layer: nn.Module) -> None:
        """Run the decoder on every chunk's token ids up to `layer` and hold what it would read."""

        def grab(_m, args, kwargs):
            raise _Stop(_first_tensor(args, kwargs))

        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for b, batch in enumerate(self.batches):
                    try:
                        self.decoder(input_ids=batch.to(self.device), use_cache=False)
                    except _Stop as stop:
                        self.store.put(b, stop.args[0].to(self.dtype) if self.reader is not None else stop.args[0])
        finally:
            handle.remove()

    def start(self, layer: int = 0, bar=None) -> None:
        """Hold every chunk's input of `layer` (h_0 as the family's own forward computes it, embedding scale
        included, pushed through the layers before)."""
        if self.reader is None:
            self._grab(self.layers[layer])
            self.layer_calls += layer * len(self.batches)
            self.at = layer
            return
        embed = self.decoder.get_input_embeddings()
        prefix = f"{self.decoder_path}.{_child_name(self.decoder, embed)}"
        _load_module(self.model, prefix, embed, self.reader, self.dtype)
        try:
            self._grab(self.layers[0])
        finally:
            _free_module(self.model, prefix, embed)
        self.at = 0
        for i in range(layer):
            with self.loaded(i):
                self.run(i, bar=bar)

    @contextmanager
    def loaded(self, i: int) -> Iterator[nn.Module]:
        """Layer i with its weights in memory while the block runs (read from the checkpoint when streaming, then
        released: whatever was installed in it meanwhile goes too)."""
        layer = self.layers[i]
        if self.reader is None:
            yield layer
            return
        prefix = f"{self.arch.layers}.{i}"
        _load_module(self.model, prefix, layer, self.reader, self.dtype)
        try:
            yield layer
        finally:
            _free_module(self.model, prefix, self.layers[i])

    def _check_at(self, i: int) -> None:
        if self.at != i:
            raise RuntimeError(f"the walk holds the inputs of layer {self.at}, not of layer {i}")

    def run(self, i: int, keep: bool = True, bar=None) -> None:
        """Every held state through layer i (its weights loaded). With `keep` the outputs replace the states, which
        become the inputs of layer i + 1; without, the pass only feeds hooks on layer i's modules, which may end
        each chunk early by raising `Cut`."""
        self._check_at(i)
        layer = self.layers[i]
        current: dict[str, torch.Tensor] = {}
        feed = _feeder(current)

        def stop(_m, _args, _kwargs, out):
            raise _Stop(out[0] if isinstance(out, tuple) else out)

        # First and last, so that other hooks on the layer read the real state and see its output.
        hooks = [layer.register_forward_pre_hook(feed, with_kwargs=True, prepend=True),
                 layer.register_forward_hook(stop, with_kwargs=True)]
        try:
            with torch.no_grad(), _only_layers(self.decoder, self.layers_attr, [layer], self.types[i:i + 1]):
                for b in range(len(self.batches)):
                    current["h"] = self.store.get(b).to(self.device)
                    try:
                        self.decoder(inputs_embeds=current["h"], use_cache=False)
                    except _Stop as out:
                        if keep:
                            self.store.put(b, out.args[0])
                    except Cut:
                        if keep:
                            raise RuntimeError(f"a hook cut layer {i}'s pass short, so it has no output to keep") \
                                from None
                    self.layer_calls += 1
                    if bar is not None:
                        bar.update()
        finally:
            for h in hooks:
                h.remove()
        if keep:
            self.at = i + 1

    def loss_from(self, i: int) -> tuple[float, int]:
        """Every held state (the inputs of layer i) through layers i, i + 1, ... and the model's head: (the summed
        next-token NLL over every position but each chunk's first, the number of those tokens). What a full pass
        of the model as it is now would give, for the layers from i on only (a model in memory)."""
        if self.reader is not None:
            raise RuntimeError("loss_from needs the model in memory")
        self._check_at(i)
        rest = list(self.layers)[i:]
        current: dict[str, torch.Tensor] = {}
        hook = rest[0].register_forward_pre_hook(_feeder(current), with_kwargs=True, prepend=True)
        total, tokens = 0.0, 0
        try:
            with torch.no_grad(), _only_layers(self.decoder, self.layers_attr, rest, self.types[i:]):
                for b, batch in enumerate(self.batches):
                    current["h"] = self.store.get(b).to(self.device)
                    nll = next_token_nll(self.model(inputs_embeds=current["h"], use_cache=False).logits,
                                         batch.to(self.device))
                    total += nll.sum().item()  # summed as evaluate.perplexity sums
                    tokens += nll.numel()
                    self.layer_calls += len(rest)
        finally:
            hook.remove()
        return total, tokens


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
    check_walk(batch_size, max_memory)
    torch_type = torch_dtype(dtype)
    reader = CheckpointReader(path)
    model = empty_model(path)
    arch = arch_for(model)
    layers = model.get_submodule(arch.layers)
    input_ids = calibration.input_ids if isinstance(calibration, Calibration) else calibration
    sums = _Sums(len(layers), None)
    sums.tokens = input_ids.numel()
    with torch.inference_mode(), LayerWalk(model, arch, input_ids, batch_size, max_memory, reader, torch_type) as walk:
        walk.start(0)
        bar = tqdm(total=walk.full_pass, desc="measuring (streamed)", unit="batch", disable=not progress)
        for i, layer in enumerate(layers):
            with walk.loaded(i):
                hooks = _register_hooks(nn.ModuleList([layer]), arch, sums, residual, None, offset=i)
                try:
                    walk.run(i, bar=bar)
                finally:
                    for h in hooks:
                        h.remove()
        bar.close()
    return scores_from_sums(sums, model_name, calibration, residual, None)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, m in parent.named_children() if m is child)


def drop_streamed(src: str | Path, plan, out: str | Path, overwrite: bool = False, provenance: dict | None = None,
                  shard_bytes: int = 2 << 30, finish: Callable[[Path], None] | None = None,
                  patches: dict[tuple[str, int], torch.Tensor] | None = None) -> Path:
    """Write the pruned checkpoint of `src` tensor by tensor, shard by shard: the model is never in memory.

    The result equals what `apply_plan` + `save` produce on the loaded model (same tensors, same config).
    `patches` ({(slot "attn" / "mlp", layer in `src`'s numbering): weight, out x in}, as patches.linear.fit_streamed
    returns them) stand where those sublayers were, as patches.linear.fit_patches installs them, saved in the
    checkpoint's own precision; `plan` is then the plan as applied (patches.linear.applied_plan).
    `finish(tmpdir)` may add files (scores.json, plan.json) before the directory appears under its final name.
    """
    from .checkpoint import add_remote_code, stored_dtype
    from .pruned_model import REMOTE_CODE_FILE, patch_sublayer, record_of
    from .surgery import apply_plan

    src = Path(src)
    reader = CheckpointReader(src)
    model = empty_model(src)  # meta parameters: surgery on it costs nothing and yields the exact new config
    # Surgery keeps the surviving parameter objects, so identity maps each old tensor name to its new one.
    old_names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        old_names.setdefault(id(p), []).append(name)
    made: dict[int, torch.Tensor] = {}  # patch parameters (on meta) -> the tensor to write for them
    if patches:
        modules = arch_for(model).modules()
        dtype = torch_dtype(stored_dtype(src) or "float32")
        for (slot, i), weight in sorted(patches.items(), key=lambda item: (item[0][1], item[0][0])):
            patch = patch_sublayer(model, modules, slot, i)
            made[id(next(patch.parameters()))] = weight.to(dtype)
    apply_plan(model, plan, provenance)
    new_names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        new_names.setdefault(id(p), []).append(name)
    stored = set(reader.names())
    keep: list[tuple[str | torch.Tensor, str]] = [
        (old, new) for pid, news in new_names.items() if pid in old_names
        for old, new in zip(old_names[pid], news) if old in stored]
    keep += [(made[pid], news[0]) for pid, news in new_names.items() if pid in made]
    if not any(isinstance(old, str) and old.startswith(f"{arch_for(model).layers}.") for old, _ in keep):
        raise LlmdropError(f"checkpoint {src} holds no tensor of its layers; it may be incomplete")

    def nbytes(old: str | torch.Tensor) -> int:
        return reader.nbytes(old) if isinstance(old, str) else old.numel() * old.element_size()

    def tensor(old: str | torch.Tensor) -> torch.Tensor:
        return (reader.get(old) if isinstance(old, str) else old).contiguous()

    with atomic_dir(out, overwrite) as tmp:
        shards: list[list[tuple[str | torch.Tensor, str]]] = [[]]
        size = 0
        for old, new in keep:
            n = nbytes(old)
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((old, new))
            size += n
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({new: tensor(old) for old, new in shard}, str(tmp / fname), metadata={"format": "pt"})
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
