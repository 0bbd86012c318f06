"""One forward pass over the calibration chunks yields every redundancy score at once.

Hooks see the residual stream at ``h_in`` (layer input), ``h_mid`` (input of the module that first reads it) and
``h_out`` (layer output). Per token, in float32: attention ``cos(h_in, h_mid)``, MLP ``cos(h_mid, h_out)``, block
``cos(h_in, h_out)``; summed in float64 and divided by the token count at the end. Hidden states are never kept
beyond the layer that made them, so memory does not grow with the number of calibration tokens.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Arch, arch_for
from .calibration import Calibration
from .errors import LlmdropError
from .files import write_json

KINDS = ("attn", "mlp", "block")
_EPS = 1e-8


@dataclass
class Scores:
    """Mean cosine similarity per layer (higher = more redundant). Indices are the model's layer indices."""

    attn: list[float]
    mlp: list[float]
    block: list[float]
    tokens: int
    model: str = ""
    calibration: dict = field(default_factory=dict)
    residual: bool = True
    window: dict | None = None  # {"n": n, "scores": [cos(h_s, h_{s+n}) for each start s]}

    @property
    def num_layers(self) -> int:
        return len(self.block)

    def of(self, kind: str) -> list[float]:
        return getattr(self, kind)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scores:
        missing = [k for k in (*KINDS, "tokens") if k not in d]
        if missing:
            raise LlmdropError(f"scores file lacks {', '.join(missing)}; produce it with `llmdrop measure`")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise LlmdropError(f"scores file {path} does not exist; run `llmdrop measure ... -o {path}` first") from None
        except json.JSONDecodeError as err:
            raise LlmdropError(f"scores file {path} is not valid JSON ({err.msg})") from None


class _Sums:
    """Running float64 sums of per-token cosines, one slot per layer and kind."""

    def __init__(self, num_layers: int, window: int | None):
        self.sums = {k: torch.zeros(num_layers, dtype=torch.float64) for k in KINDS}
        self.window = torch.zeros(num_layers - window + 1, dtype=torch.float64) if window else None
        self.tokens = 0
        # Per-token norms by tensor: h_mid and h_out appear in two cosines each, and a layer's h_out is the next
        # layer's h_in, so each norm is computed once. The tensor is kept with its norm so its id stays unique.
        self._norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def norm(self, t: torch.Tensor) -> torch.Tensor:
        hit = self._norms.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, torch.linalg.vector_norm(t.float(), dim=-1))
            self._norms[id(t)] = hit
        return hit[1]

    def keep_norms_of(self, *tensors: torch.Tensor) -> None:
        """Forget every cached norm but these (called as each layer finishes)."""
        self._norms = {id(t): self._norms[id(t)] for t in tensors if id(t) in self._norms}

    def add(self, kind: str, index: int, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        # cos = <a, b> / (|a| |b|) per token in float32, as F.cosine_similarity (same eps), without recomputing norms.
        dot = torch.linalg.vecdot(a.float(), b.float(), dim=-1)
        cos = dot / torch.clamp(self.norm(a) * self.norm(b), min=_EPS)
        total = cos.sum(dtype=torch.float64)
        if not torch.isfinite(total):
            raise LlmdropError(
                f"non-finite activations (NaN or inf) at layer {index} ({where}); the model overflows in this dtype "
                "or its weights are broken: try --dtype float32"
            )
        target = self.window if kind == "window" else self.sums[kind]
        target[index] += total.cpu()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _register_hooks(layers: nn.ModuleList, arch: Arch, sums: _Sums, residual: bool, window: int | None,
                    offset: int = 0) -> list:
    """Hooks that add every layer's cosines to `sums`; `offset` is the model index of layers[0] (streaming)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    boundaries: deque = deque(maxlen=(window or 0) + 1)
    handles = []

    for i, layer in enumerate(layers, offset):

        def layer_in(_m, args, kwargs, i=i):
            h_in = _first_tensor(args, kwargs)
            state[i] = {"in": h_in}
            if window and i == offset:
                boundaries.clear()
                boundaries.append(h_in)

        def mid_in(_m, args, kwargs, i=i):
            state[i]["mid"] = _first_tensor(args, kwargs)

        def layer_out(_m, _args, _kwargs, out, i=i):
            s = state.pop(i)
            h_out = _output_tensor(out)
            if residual:
                sums.add("attn", i, s["in"], s["mid"], "attention output h_mid")
                sums.add("mlp", i, s["mid"], h_out, "MLP output h_out")
            else:
                sums.add("attn", i, s["attn_in"], s["attn_out"], "attention branch")
                sums.add("mlp", i, s["mlp_in"], s["mlp_out"], "MLP branch")
            sums.add("block", i, s["in"], h_out, "layer output h_out")
            if window:
                boundaries.append(h_out)
                if len(boundaries) == window + 1:
                    sums.add("window", i + 1 - window, boundaries[0], h_out, "window end")
            sums.keep_norms_of(h_out, *boundaries)

        handles.append(layer.register_forward_pre_hook(layer_in, with_kwargs=True))
        handles.append(layer.get_submodule(arch.mid).register_forward_pre_hook(mid_in, with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_out, with_kwargs=True))
        if not residual:
            # "w/o residual" ablation: the branch input after its norm against the branch's raw output.
            for name, path in (("attn", arch.attn), ("mlp", arch.mlp)):

                def branch_in(_m, args, kwargs, i=i, name=name):
                    state[i][f"{name}_in"] = _first_tensor(args, kwargs)

                def branch_out(_m, _args, out, i=i, name=name):
                    state[i][f"{name}_out"] = _output_tensor(out)

                module = layer.get_submodule(path)
                handles.append(module.register_forward_pre_hook(branch_in, with_kwargs=True))
                handles.append(module.register_forward_hook(branch_out))
    return handles


def measure(
    model: nn.Module,
    calibration: Calibration | torch.Tensor,
    batch_size: int = 4,
    residual: bool = True,
    window: int | None = None,
    progress: bool = True,
    model_name: str = "",
) -> Scores:
    """Score every layer's attention, MLP and whole block on the calibration chunks in one pass.

    `residual=False` gives the paper's "w/o residual" ablation for attention and MLP. `window=n` also scores every
    run of n consecutive blocks by cos(h_s, h_{s+n}).
    """
    arch = arch_for(model)
    layers = model.get_submodule(arch.layers)
    num_layers = len(layers)
    if window is not None and not 1 <= window <= num_layers:
        raise LlmdropError(f"window of {window} blocks does not fit a model with {num_layers} layers")
    input_ids = calibration.input_ids if isinstance(calibration, Calibration) else calibration
    rank, world = _distributed()
    if world > 1:  # data parallel: each rank takes every world-th chunk; the sums are added up below
        input_ids = input_ids[rank::world]
    sums = _Sums(num_layers, window)
    decoder = model.get_submodule(arch.layers.rpartition(".")[0])
    device = next(model.parameters()).device
    handles = _register_hooks(layers, arch, sums, residual, window)
    try:
        with torch.inference_mode():
            batches = input_ids.split(batch_size)
            for batch in tqdm(batches, desc="measuring", unit="batch", disable=not progress):
                decoder(input_ids=batch.to(device), use_cache=False)
                sums.tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    if world > 1:
        _all_reduce(sums)
    return scores_from_sums(sums, model_name, calibration, residual, window)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(sums: _Sums) -> None:
    """Add every rank's float64 sums and token count, so each rank ends with the single-process totals."""
    import torch.distributed as dist

    tensors = [*sums.sums.values(), *([sums.window] if sums.window is not None else [])]
    flat = torch.cat([t.flatten() for t in tensors] + [torch.tensor([float(sums.tokens)], dtype=torch.float64)])
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    sums.tokens = int(flat[-1].item())


def scores_from_sums(sums: _Sums, model_name: str, calibration: Any, residual: bool, window: int | None) -> Scores:
    means = {k: (v / sums.tokens).tolist() for k, v in sums.sums.items()}
    info = calibration.describe() if isinstance(calibration, Calibration) else {}
    win = {"n": window, "scores": (sums.window / sums.tokens).tolist()} if window else None
    return Scores(**means, tokens=sums.tokens, model=model_name, calibration=info, residual=residual, window=win)
