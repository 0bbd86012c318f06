"""Closed-form linear patches: a dropped sublayer replaced by the least-squares d x d map of what it read to what it returned.

For each attention (or MLP) sublayer to remove, ``x`` is the input the module receives (the normed residual stream:
``input_layernorm(h)`` for attention, the MLP's pre-norm output for an MLP) and ``y`` what the module returns, before
any post-norm of sandwich-norm families such as Gemma: the family's norms stay and only the module is replaced, so a
patched Gemma layer computes ``h + post_norm(W x)``. ``W`` minimises ``sum ||W x - y||^2 + lam ||W||^2`` over the
calibration tokens, from running sums ``X^T X`` and ``X^T Y`` in float64 (memory O(d^2), never O(tokens)), with
``lam`` = 1e-4 of the mean diagonal of ``X^T X``. No bias: measured on SmolLM2 it does not help, and llama.cpp's
linear attention has none.

A dropped block gets one map for the whole layer: ``x`` is the block's normed input (what its attention reads) and
``y`` everything the block added to the residual stream (its output minus its input). It is installed as a patched
attention with the block's MLP dropped, so the layer computes ``h + W input_layernorm(h)`` and holds no KV cache;
checkpoints, llama.cpp's linear attention and vLLM's ``replace_with_linear`` express it as they express any patched
attention. `applied_plan` turns the plan into the one to apply after the fit (such a block is a patched attention and
a dropped MLP, not a removed layer). Families that normalise the attention output again before adding it (Gemma's
sandwich norms) cannot carry a block map this way: an error says so.

The fit is sequential, in layer order (a layer's attention before its MLP): module i's statistics come from the model
with the patches of the modules before it already in place, so each patch corrects for the error of the ones before
(ReplaceMe arXiv 2505.02819, LinearPatch 2505.24680). It runs layer-wise, as GPTQ-style tools do (llm-compressor's
sequential pipeline): every chunk's hidden state is run up to the first layer with a patch and held there
(stream.LayerWalk); at a layer with patches, one pass of that layer alone gathers a module's statistics, its patch
goes in, and the states then go on through the patched layer. Any number of patches costs about one forward pass
(stats passes of the patched layers on top), not one pass per patch, and the patches are those of the per-module
passes (`layerwise=False`, kept as the reference) within float rounding. Streamed (`fit_streamed`), the same walk
reads one layer's weights at a time from the checkpoint, so a model larger than memory can be patched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import Arch, arch_for
from ..calibration import Calibration
from ..checkpoint import torch_dtype
from ..errors import LlmdropError
from ..plan import DropPlan
from ..pruned_model import PatchedAttention, PatchedMLP, drop_sublayers, new_patch, patch_sublayer
from ..stream import CheckpointReader, Cut, LayerWalk, check_walk, empty_model

log = logging.getLogger("llmdrop")

RIDGE = 1e-4  # lam as a fraction of the mean diagonal of X^T X


def _ids(calibration: Calibration | torch.Tensor) -> torch.Tensor:
    ids = calibration.input_ids if isinstance(calibration, Calibration) else calibration
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise LlmdropError("calibration must be a Calibration or a [samples, seq_len] tensor of token ids")
    return ids


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.get_text_config(decoder=True).hidden_size)


def check_tokens(model: nn.Module, tokens: int) -> None:
    """A d x d patch needs at least d calibration tokens (fewer leaves the map undetermined): an error otherwise."""
    d = _hidden_size(model)
    if tokens < d:
        raise LlmdropError(f"a linear patch fits a {d} x {d} map from the calibration tokens, so it needs at least {d} "
                           f"of them, but the calibration has {tokens}; raise {{samples}} or {{seq_len}} so that "
                           f"samples x seq_len >= {d}", params=["samples", "seq_len"])


_ORDER = {"block": 0, "attn": 0, "mlp": 1}


def _targets(plan: DropPlan) -> list[tuple[str, int]]:
    """The (kind, layer) modules to patch, in the order they are fitted: layer order, attention before MLP; a dropped
    block is one "block" target."""
    blocks = set(plan.blocks)
    return sorted([("attn", i) for i in plan.attn if i not in blocks] + [("mlp", i) for i in plan.mlp if i not in blocks]
                  + [("block", i) for i in blocks], key=lambda m: (m[1], _ORDER[m[0]]))


def block_patch_fits(arch) -> bool:
    """A block map is added to the residual stream as a patched attention; where the family norms attention's output
    again (more than the one input norm serves attention), it would be normed too."""
    return len(arch.attn_norms) == 1


def check_block_patch(arch) -> None:
    """An error for a family whose blocks cannot carry a linear patch (block_patch_fits)."""
    if not block_patch_fits(arch):
        raise LlmdropError("a linear block patch is installed as the layer's attention, and this family normalises "
                           "attention's output again before adding it (sandwich norms), which would distort the map; "
                           "patch sublayers instead ({target} attn, mlp or joint) or use {patch} zero for blocks",
                           params=["target", "patch"])


def applied_plan(plan: DropPlan) -> DropPlan:
    """The plan to apply once `fit_patches` has run: every dropped block becomes a dropped attention (now its patch)
    and a dropped MLP; the layer stays. A plan without blocks is returned as it is."""
    if not plan.blocks:
        return plan
    return dataclasses.replace(plan, attn=sorted({*plan.attn, *plan.blocks}), mlp=sorted({*plan.mlp, *plan.blocks}),
                               blocks=[])


class _Stats:
    """Running float64 sums over tokens: X^T X, X^T Y, sum ||y||^2, token count."""

    def __init__(self, d: int, device: torch.device):
        self.xtx = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.xty = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.yy = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float64)
        y = y.reshape(-1, y.shape[-1]).to(self.xtx.device, torch.float64)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yy += float((y * y).sum())
        self.tokens += x.shape[0]

    def solve(self, ridge: float = RIDGE) -> tuple[torch.Tensor, float]:
        """(W as nn.Linear holds it, out x in; the fraction of sum ||y||^2 the map explains on these tokens)."""
        d = self.xtx.shape[0]
        lam = ridge * float(self.xtx.diagonal().mean())
        a = self.xtx + lam * torch.eye(d, dtype=torch.float64, device=self.xtx.device)
        w = torch.linalg.solve(a, self.xty)  # in x out: y ~ x @ w
        residual = self.yy - 2 * float((w * self.xty).sum()) + float((w * (self.xtx @ w)).sum())
        explained = 1.0 - residual / self.yy if self.yy > 0 else 1.0
        return w.T.contiguous(), explained


def _stat_hooks(kind: str, layer: nn.Module, module: nn.Module, stats: _Stats) -> list:
    """Hooks that add what `module` (an "attn" / "mlp" target) or the whole `layer` (a "block": x = what its
    attention reads, y = its output minus its input) reads and returns to `stats`, then cut the pass short."""
    if kind != "block":

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = output[0] if isinstance(output, tuple) else output
            stats.add(x.detach(), y.detach())
            raise Cut

        return [module.register_forward_hook(hook, with_kwargs=True)]
    seen: dict[str, torch.Tensor] = {}

    def read(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["x"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()

    def added(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = output[0] if isinstance(output, tuple) else output
        stats.add(seen.pop("x"), (out - h).detach())
        raise Cut

    return [module.register_forward_pre_hook(read, with_kwargs=True), layer.register_forward_hook(added, with_kwargs=True)]


def _cut_short_passes(model: nn.Module, ids: torch.Tensor, batch_size: int, handles: list) -> None:
    """One pass over the chunks of `ids`, each stopped when a hook in `handles` raises Cut; the hooks go after."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                with contextlib.suppress(Cut):
                    model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _pass_stats(model: nn.Module, kind: str, layer: nn.Module, module: nn.Module, ids: torch.Tensor, batch_size: int,
                d: int) -> _Stats:
    """X^T X and X^T Y of one target over every chunk of `ids`: a pass of the whole model, cut short after it."""
    stats = _Stats(d, next(model.parameters()).device)
    _cut_short_passes(model, ids, batch_size, _stat_hooks(kind, layer, module, stats))
    return stats


def fit_patch_weight(model: nn.Module, kind: str, layer: int, calibration: Calibration | torch.Tensor,
                     batch_size: int = 4, ridge: float = RIDGE) -> tuple[torch.Tensor, float]:
    """The least-squares patch of one module ("attn" / "mlp" of `layer`, or the whole "block") on the model as it is,
    without installing it: (weight, out x in as nn.Linear holds it; the fraction of the module's output energy it
    explains). One pass over the chunks, cut short after the module (for a criterion that scores "patched" instead
    of "removed")."""
    if kind not in ("attn", "mlp", "block"):
        raise LlmdropError(f"a patch replaces an attention or MLP sublayer or a block, not {kind!r}")
    arch = arch_for(model)
    if kind == "block":
        check_block_patch(arch)
    ids = _ids(calibration)
    check_tokens(model, ids.numel())
    block = model.get_submodule(arch.layers)[layer]
    module = block.get_submodule(arch.modules()["attn" if kind == "block" else kind])
    d = _hidden_size(model)
    was_training = model.training
    model.eval()
    try:
        return _pass_stats(model, kind, block, module, ids, batch_size, d).solve(ridge)
    finally:
        model.train(was_training)


def patch_standin(model: nn.Module, calibration: Calibration | torch.Tensor, batch_size: int = 4,
                  fitted: list | None = None):
    """A stand-in for criteria.loss.removed / loss_scores that puts each candidate's own least-squares patch where it
    was (fitted on the model as it is, one partial pass each), so the loss criterion scores "patched" instead of
    "removed". A block's map stands as its attention, with its MLP a no-op. `fitted` collects (kind, layer) per fit.
    """
    d = _hidden_size(model)

    def standin(kind: str, layer: int, sub: str) -> nn.Module | None:
        if kind == "block" and sub == "mlp":
            return None
        weight, _ = fit_patch_weight(model, kind, layer, calibration, batch_size)
        ref = next(model.parameters())
        patch = new_patch(sub, d, weight, dtype=ref.dtype, device=ref.device)
        if fitted is not None:
            fitted.append((kind, layer))
        return patch

    return standin


_WHAT = {"attn": "attention", "mlp": "MLP"}


def _plan_of(plan_or_choice: Any) -> DropPlan:
    plan = getattr(plan_or_choice, "plan", plan_or_choice)
    if not isinstance(plan, DropPlan):
        raise LlmdropError(f"fit_patches takes a DropPlan or a Choice, not {type(plan_or_choice).__name__}")
    return plan


def _is_patch(module: nn.Module) -> bool:
    return isinstance(module, (PatchedAttention, PatchedMLP))


def _checked_targets(model: nn.Module, arch: Arch, plan: DropPlan) -> list[tuple[str, int]]:
    """The plan's targets, after the checks every fit shares (the model the plan was made for, blocks the family
    can carry, modules still there to fit)."""
    layers = model.get_submodule(arch.layers)
    if plan.num_layers and plan.num_layers != len(layers):
        raise LlmdropError(f"the plan was made for {plan.num_layers} layers but the model has {len(layers)}; fit "
                           "patches on the model the plan was measured on")
    plan.validate(len(layers))
    if plan.blocks:
        check_block_patch(arch)
    targets = _targets(plan)
    modules = arch.modules()
    for kind, i in targets:
        for part in ("attn", "mlp") if kind == "block" else (kind,):
            module = layers[i].get_submodule(modules[part])
            if _is_patch(module):
                continue
            if not any(True for _ in module.parameters()):
                raise LlmdropError(f"layer {i}'s {_WHAT[part]} is already dropped, so there is nothing left to fit a "
                                   "patch to; fit patches on the model before dropping")
    return targets


def _install(model: nn.Module, modules: dict, kind: str, i: int, weight: torch.Tensor) -> None:
    patch_sublayer(model, modules, "attn" if kind == "block" else kind, i, weight)  # a block's map: its attention
    if kind == "block":  # the map stands for the whole layer: its MLP goes now, before the next fit
        drop_sublayers(model, modules, [], [i])


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)


def _fit_layerwise(model: nn.Module, arch: Arch, targets: list[tuple[str, int]], ids: torch.Tensor, batch_size: int,
                   ridge: float, max_memory: int | None, progress: bool, reader: CheckpointReader | None = None,
                   dtype: torch.dtype | None = None) -> tuple[list[dict], dict[tuple[str, int], torch.Tensor], int]:
    """Fit and install every target's patch in one walk over the layers: (the fitted modules, {(slot, layer):
    float32 weight on the CPU} when streaming (a model in memory keeps its patches), decoder-layer calls). A patch
    goes in as soon as it is solved, so the layers after it (and the layer's MLP after its attention) are fitted on
    what the patched model feeds them."""
    layers = model.get_submodule(arch.layers)
    modules = arch.modules()
    d = _hidden_size(model)
    todo: dict[int, list[str]] = {}
    for kind, i in targets:
        if not _is_patch(layers[i].get_submodule(modules["attn" if kind == "block" else kind])):  # a reloaded patch
            todo.setdefault(i, []).append(kind)
    if not todo:
        return [], {}, 0
    first, last = min(todo), max(todo)
    fitted: list[dict] = []
    weights: dict[tuple[str, int], torch.Tensor] = {}
    with LayerWalk(model, arch, ids, batch_size, max_memory, reader, dtype) as walk:
        bar = _progress(progress, (last + 1 + sum(map(len, todo.values()))) * len(walk.batches),
                        "fitting linear patches" + (" (streamed)" if reader is not None else ""))
        try:
            walk.start(first, bar=bar if reader is not None else None)
            if bar is not None and reader is None:
                bar.update(first * len(walk.batches))
            for i in range(first, last + 1):
                with walk.loaded(i) as layer:
                    for kind in todo.get(i, ()):
                        module = layer.get_submodule(modules["attn" if kind == "block" else kind])
                        stats = _Stats(d, walk.device)
                        hooks = _stat_hooks(kind, layer, module, stats)
                        try:
                            walk.run(i, keep=False, bar=bar)
                        finally:
                            for h in hooks:
                                h.remove()
                        weight, explained = stats.solve(ridge)
                        _install(model, modules, kind, i, weight)
                        if reader is not None:  # streaming: the layer and its patch leave memory next
                            weights[("attn" if kind == "block" else kind, i)] = weight.float().cpu()
                        fitted.append({"module": kind, "layer": i, "explained": round(explained, 6)})
                        log.debug("patched %s %d: explains %.4f of its output", kind, i, explained)
                        if bar is not None:
                            bar.set_postfix(explained=f"{explained:.3f}")
                    if i < last:  # nothing after the last patch needs its inputs
                        walk.run(i, bar=bar)
        finally:
            if bar is not None:
                bar.close()
        return fitted, weights, walk.layer_calls


def _fit_per_module(model: nn.Module, arch: Arch, targets: list[tuple[str, int]], ids: torch.Tensor,
                    batch_size: int, ridge: float, progress: bool) -> tuple[list[dict], int]:
    """The reference: one pass of the whole model per target, cut short after it, each on the model with the
    patches before it installed; (the fitted modules, decoder-layer calls)."""
    layers = model.get_submodule(arch.layers)
    modules = arch.modules()
    d = _hidden_size(model)
    batches = -(-ids.shape[0] // batch_size)
    fitted: list[dict] = []
    calls = 0
    bar = _progress(progress, len(targets) * batches, "fitting linear patches (per module)")
    try:
        for kind, i in targets:
            module = layers[i].get_submodule(modules["attn" if kind == "block" else kind])
            if _is_patch(module):
                continue
            weight, explained = _pass_stats(model, kind, layers[i], module, ids, batch_size, d).solve(ridge)
            calls += (i + 1) * batches
            _install(model, modules, kind, i, weight)
            fitted.append({"module": kind, "layer": i, "explained": round(explained, 6)})
            if bar is not None:
                bar.update(batches)
    finally:
        if bar is not None:
            bar.close()
    return fitted, calls


def _summary(method: str, ridge: float, ids: torch.Tensor, calls: int, full_pass: int, started: float,
             fitted: list[dict]) -> dict:
    return {"patch": "linear", "method": method, "ridge": ridge, "tokens": int(ids.numel()),
            "forward_passes": round(calls / full_pass, 3), "layer_calls": calls,
            "seconds": round(time.perf_counter() - started, 3), "modules": fitted}


def fit_patches(model: nn.Module, plan_or_choice: Any, calibration: Calibration | torch.Tensor, batch_size: int = 4,
                progress: bool = True, ridge: float = RIDGE, max_memory: int | None = None,
                layerwise: bool = True) -> dict:
    """Fit a linear patch for every attention / MLP sublayer and block the plan drops and install it in `model`, in
    place (a block: its patch as the attention, its MLP dropped).

    `model` still has those modules (the unpruned model, or a pruned checkpoint whose other drops are done); `plan_or_
    choice` is a DropPlan or a Choice in the model's current numbering. Fitted in layer order, each module on
    the model with the patches before it already active, in one walk over the layers holding every chunk's hidden
    state (`max_memory` bytes of them in memory, the rest in a temporary directory); `layerwise=False` fits with
    one pass of the model per module instead (the reference the walk equals). Apply `applied_plan(plan)` afterwards
    (surgery.apply_plan / pipeline.prune) to drop the rest and record the patches: a sublayer that is already a
    patch stays one. Returns what was done:
    ``{"patch": "linear", "method", "ridge", "tokens", "forward_passes", "layer_calls", "seconds", "modules":
    [{"module", "layer", "explained"}]}`` where ``forward_passes`` is the decoder-layer work in full passes over the
    chunks (``layer_calls`` / (layers x batches)) and ``explained`` the fraction of the module's output energy the
    map reproduces on the calibration tokens.
    """
    plan = _plan_of(plan_or_choice)
    check_walk(batch_size, max_memory)
    arch = arch_for(model)
    targets = _checked_targets(model, arch, plan)
    ids = _ids(calibration)
    check_tokens(model, ids.numel())
    full_pass = len(model.get_submodule(arch.layers)) * -(-ids.shape[0] // batch_size)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        if layerwise:
            fitted, _, calls = _fit_layerwise(model, arch, targets, ids, batch_size, ridge, max_memory, progress)
        else:
            fitted, calls = _fit_per_module(model, arch, targets, ids, batch_size, ridge, progress)
    finally:
        model.train(was_training)
    return _summary("layerwise" if layerwise else "per-module", ridge, ids, calls, full_pass, started, fitted)


def fit_streamed(path: str | Path, plan_or_choice: Any, calibration: Calibration | torch.Tensor,
                 dtype: str = "float32", batch_size: int = 4, max_memory: int | None = None, progress: bool = True,
                 ridge: float = RIDGE) -> tuple[dict[tuple[str, int], torch.Tensor], dict]:
    """`fit_patches` on the checkpoint at `path` without loading it: one layer's weights in memory at a time, read
    in `dtype`; the hidden states as `fit_patches` holds them. Returns ({(slot, layer): weight, out x in, float32},
    the summary `fit_patches` returns) for stream.drop_streamed to write; a block's map is its ("attn", layer)."""
    plan = _plan_of(plan_or_choice)
    check_walk(batch_size, max_memory)
    torch_type = torch_dtype(dtype)
    reader = CheckpointReader(path)
    model = empty_model(path)
    arch = arch_for(model)
    targets = _checked_targets(model, arch, plan)
    ids = _ids(calibration)
    check_tokens(model, ids.numel())
    full_pass = len(model.get_submodule(arch.layers)) * -(-ids.shape[0] // batch_size)
    started = time.perf_counter()
    fitted, weights, calls = _fit_layerwise(model, arch, targets, ids, batch_size, ridge, max_memory, progress,
                                            reader=reader, dtype=torch_type)
    return weights, _summary("layerwise, streamed", ridge, ids, calls, full_pass, started, fitted)


def describe_patches(info: dict) -> str:
    """One line for reports: "linear: 8 module(s), 12.3s (1.08 forward passes) on 8,192 tokens, output explained
    0.912 (mean)"."""
    mods = info.get("modules") or []
    if not mods:
        return "linear: nothing to patch"
    mean = sum(m["explained"] for m in mods) / len(mods)
    passes = f" ({info['forward_passes']:.2f} forward passes)" if "layer_calls" in info else ""
    return (f"linear: {len(mods)} module(s), {info['seconds']:.1f}s{passes} on {info['tokens']:,} tokens, "
            f"output explained {mean:.3f} (mean)")


# ---- the patch kind's interface (the "linear" row of patches.PATCHES) ---------------------------------------------

def check_model(model: nn.Module, arch: Arch, target: str | None, tokens: int) -> None:
    """Before any slow work: enough calibration tokens for a d x d map, and a family that can carry a block map."""
    check_tokens(model, tokens)
    if target == "block":
        check_block_patch(arch)


block_fits = block_patch_fits
fit = fit_patches
standin = patch_standin
describe = describe_patches
