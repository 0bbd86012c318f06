"""One forward pass over the calibration chunks yields every redundancy score at once.

Hooks see the residual stream at ``h_in`` (layer input), ``h_mid`` (input of the module that first reads it) and
``h_out`` (layer output). Per token, in float32: attention ``cos(h_in, h_mid)``, MLP ``cos(h_mid, h_out)``, block
``cos(h_in, h_out)``; summed in float64 and divided by the token count at the end. Hidden states are never kept
beyond the layer that made them, so memory does not grow with the number of calibration tokens.
"""

from __future__ import annotations

import json
import logging
import math
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
log = logging.getLogger("llmdrop")


@dataclass
class Scores:
    """Mean cosine similarity per layer (higher = more redundant). Indices are the model's layer indices."""

    attn: list[float]
    mlp: list[float]
    block: list[float]
    tokens: int
    model_name: str = ""
    calibration: dict = field(default_factory=dict)
    residual: bool = True
    window: dict | None = None  # {"n": n, "scores": [cos(h_s, h_{s+n}) for each start s]}

    @property
    def num_layers(self) -> int:
        return len(self.block)

    @property
    def model(self) -> str:
        """Old name of `model_name` (scores files written before the rename store it as "model")."""
        return self.model_name

    def of(self, kind: str) -> list[float]:
        return getattr(self, kind)

    def best_window(self) -> tuple[int, int, float] | None:
        """(first layer, last layer, cos) of the best run of window["n"] consecutive blocks; None without window scores."""
        if not self.window:
            return None
        values = self.window["scores"]
        start = max(range(len(values)), key=lambda s: (values[s], s))
        return start, start + self.window["n"] - 1, values[start]

    def check_model(self, num_layers: int, model_name: str = "") -> None:
        """Refuse scores measured on a model of another depth; warn when they name another model."""
        if self.num_layers != num_layers:
            raise LlmdropError(f"the scores are for a {self.num_layers}-layer model but this model has {num_layers} "
                               "layers; measure this model")
        if model_name and self.model_name and self.model_name != model_name:
            log.warning("the scores were measured on %s, not on %s; the plan follows them anyway",
                        self.model_name, model_name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object, source: str = "scores") -> Scores:
        """Scores read back from JSON; anything llmdrop cannot rank by (NaN, strings, ragged lists) is an error.

        `source` names where the data came from in messages (a file path).
        """
        fix = "produce it with `llmdrop measure`"
        if not isinstance(d, dict):
            raise LlmdropError(f"{source} holds a JSON {type(d).__name__}, not scores; {fix}")
        d = dict(d)
        if "model" in d and "model_name" not in d:  # files written before the rename
            d["model_name"] = d.pop("model")
        missing = [k for k in (*KINDS, "tokens") if k not in d]
        if missing:
            raise LlmdropError(f"{source} lacks {', '.join(missing)}; {fix}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise LlmdropError(f"{source} has unknown fields {', '.join(map(str, unknown))}; {fix}")
        num_layers = len(d["block"]) if isinstance(d["block"], list) else 0
        for kind in KINDS:
            _check_cosines(d[kind], f"{source}: '{kind}'", num_layers, fix)
        if num_layers == 0:
            raise LlmdropError(f"{source} scores no layer; {fix}")
        if not _is_int(d["tokens"]) or d["tokens"] < 1:
            raise LlmdropError(f"{source}: 'tokens' must be a positive token count (got {d['tokens']!r:.40}); {fix}")
        if not isinstance(d.get("model_name", ""), str) or not isinstance(d.get("calibration", {}), dict) \
                or not isinstance(d.get("residual", True), bool):
            raise LlmdropError(f"{source}: 'model_name' must be a string, 'calibration' an object and 'residual' "
                               f"true or false; {fix}")
        window = d.get("window")
        if window is not None:
            n = window.get("n") if isinstance(window, dict) else None
            if not _is_int(n) or not 1 <= n <= num_layers or set(window) != {"n", "scores"}:
                raise LlmdropError(f"{source}: 'window' must be {{\"n\": blocks, \"scores\": [...]}} with n in "
                                   f"1..{num_layers}; {fix}")
            _check_cosines(window["scores"], f"{source}: window 'scores'", num_layers - n + 1, fix)
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LlmdropError(f"scores file {path} does not exist; run `llmdrop measure ... -o {path}` first") from None
        except IsADirectoryError:
            raise LlmdropError(f"scores file {path} is a directory; give the JSON file `llmdrop measure -o` wrote") \
                from None
        except UnicodeDecodeError:
            raise LlmdropError(f"scores file {path} is not text (not UTF-8); give the JSON file `llmdrop measure -o` "
                               "wrote") from None
        except OSError as err:
            raise LlmdropError(f"could not read scores file {path} ({err.strerror or err})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LlmdropError(f"scores file {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
        return cls.from_dict(data, source=f"scores file {path}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Cosines of float32 vectors can land a rounding error past +-1; anything further out was not measured by llmdrop.
_COS_SLACK = 1e-4


def _check_cosines(values: object, what: str, length: int, fix: str) -> None:
    if not isinstance(values, list) or len(values) != length:
        got = f"{len(values)} values" if isinstance(values, list) else "null" if values is None else repr(values)[:40]
        raise LlmdropError(f"{what} must be a list of {length} values, one per layer (got {got}); {fix}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           or abs(v) > 1 + _COS_SLACK]
    if bad:
        raise LlmdropError(f"{what} holds {bad[0]!r:.40}, but scores are cosine similarities: finite numbers in "
                           f"[-1, 1]; {fix}")


class _Sums:
    """Running float64 sums of per-token cosines, one slot per layer and kind."""

    def __init__(self, num_layers: int, window_size: int | None):
        self.sums = {k: torch.zeros(num_layers, dtype=torch.float64) for k in KINDS}
        self.window = torch.zeros(num_layers - window_size + 1, dtype=torch.float64) if window_size else None
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


def _register_hooks(layers: nn.ModuleList, arch: Arch, sums: _Sums, residual: bool, window_size: int | None,
                    offset: int = 0) -> list:
    """Hooks that add every layer's cosines to `sums`; `offset` is the model index of layers[0] (streaming)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    boundaries: deque = deque(maxlen=(window_size or 0) + 1)
    handles = []

    for i, layer in enumerate(layers, offset):

        def layer_in(_m, args, kwargs, i=i):
            h_in = _first_tensor(args, kwargs)
            state[i] = {"in": h_in}
            if window_size and i == offset:
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
            if window_size:
                boundaries.append(h_out)
                if len(boundaries) == window_size + 1:
                    sums.add("window", i + 1 - window_size, boundaries[0], h_out, "window end")
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
    progress: bool = True,
    window_size: int | None = None,
    model_name: str = "",
    shard: tuple[int, int] | None = None,
    arch: Arch | None = None,
) -> Scores:
    """Score every layer's attention, MLP and whole block on the calibration chunks in one pass.

    `residual=False` gives the paper's "w/o residual" ablation for attention and MLP. `window_size=n` also scores
    every run of n consecutive blocks by cos(h_s, h_{s+n}). `shard=(rank, world)` measures data-parallel: this
    process takes every world-th chunk and the sums are all-reduced over torch.distributed's default group (which
    the caller has initialised), so every rank returns the single-process scores. Without `shard` an initialised
    process group is ignored: it may serve something else. `arch` is the model's Arch when the caller has it.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise LlmdropError(f"{{batch_size}} must be a positive number of chunks (got {batch_size})", params=["batch_size"])
    arch = arch or arch_for(model)
    layers = model.get_submodule(arch.layers)
    num_layers = len(layers)
    if window_size is not None and not (_is_int(window_size) and 1 <= window_size <= num_layers):
        raise LlmdropError(f"a window of {window_size} blocks does not fit a model with {num_layers} layers; choose "
                           f"{{window_size}} between 1 and {num_layers}", params=["window_size"])
    rank, world = _check_shard(shard)
    input_ids = calibration.input_ids if isinstance(calibration, Calibration) else calibration
    if world > 1:  # data parallel: each rank takes every world-th chunk; the sums are added up below
        input_ids = input_ids[rank::world]
    sums = _Sums(num_layers, window_size)
    decoder = model.get_submodule(arch.layers.rpartition(".")[0])
    device = next(model.parameters()).device
    handles = _register_hooks(layers, arch, sums, residual, window_size)
    try:
        with torch.inference_mode():
            # A rank with fewer chunks than ranks gets none: it only contributes zeros to the all-reduce.
            batches = input_ids.split(batch_size) if len(input_ids) else ()
            for batch in tqdm(batches, desc="measuring", unit="batch", disable=not progress):
                decoder(input_ids=batch.to(device), use_cache=False)
                sums.tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    if world > 1:
        _all_reduce(sums)
    scores = scores_from_sums(sums, model_name, calibration, residual, window_size)
    if world > 1:
        scores.calibration["ranks"] = world
    return scores


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """(rank, world) from an explicit shard; (0, 1) without one."""
    if shard is None:
        return 0, 1
    try:
        rank, world = shard
    except (TypeError, ValueError):
        raise LlmdropError(f"{{shard}} must be (rank, world size), got {shard!r}", params=["shard"]) from None
    if not (_is_int(rank) and _is_int(world) and 0 <= rank < world):
        raise LlmdropError(f"{{shard}} ({rank}, {world}) is not a rank of a group of {world}", params=["shard"])
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise LlmdropError(f"{{shard}} ({rank}, {world}) needs an initialised torch.distributed process group "
                               "(run under torchrun)", params=["shard"])
    return rank, world


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


def scores_from_sums(sums: _Sums, model_name: str, calibration: Any, residual: bool,
                     window_size: int | None) -> Scores:
    means = {k: (v / sums.tokens).tolist() for k, v in sums.sums.items()}
    info = calibration.describe() if isinstance(calibration, Calibration) else {}
    win = {"n": window_size, "scores": (sums.window / sums.tokens).tolist()} if window_size else None
    return Scores(**means, tokens=sums.tokens, model_name=model_name, calibration=info, residual=residual, window=win)
