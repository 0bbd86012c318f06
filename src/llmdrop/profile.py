"""Where decode time goes: the share of each module kind per decode step, and the ideal speedup of a drop.

How it is measured (transformers): after a prefill of `context` random tokens (not timed), `steps` greedy decode
steps run one token at a time with the KV cache, as generation does. Every attention sublayer, MLP sublayer, norm of
a decoder layer, the final norm and the LM head get a forward pre-hook and a forward hook that read
``time.perf_counter()`` (after ``torch.cuda.synchronize()`` on a GPU, so kernels are counted where they run); the
difference is added to that module's time. The whole decode loop is timed the same way; "other" is what the hooks
did not see (embedding, rotary tables, residual adds, the cache update outside attention, the argmax, Python
between modules, and the hooks' own few microseconds). The hooked modules never nest, so the five kinds' times add
up to the loop's time and the shares to 1. Each decoder layer as a whole is timed too (not a kind: it holds the
sublayers), which is what a dropped block saves.

The ideal speedup of a drop is ``1 / (1 - s)``, where ``s`` is the share of decode time, measured on the BASE
model, of the modules the pruned model no longer runs: a dropped attention with its input norm(s), a dropped MLP
with its norm(s), a removed block whole. It is what decoding would gain if the dropped modules' time vanished and
nothing else changed; the achieved speedup is the benchmark's measured decode ratio, and achieved / ideal says how
much of the ideal the runtime delivers. llama.cpp has its own profile (llama_cpp.py: the graph evaluation
callback at sublayer boundaries), which returns the same Profile.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .arch import arch_for, text_config
from .decoding import cache_kwarg, decode, prefill
from .errors import LlmdropError
from .pruned_model import record_of
from .surgery import dropped_flags

KINDS = ("attention", "mlp", "norms", "lm_head", "other")


@dataclass
class Profile:
    """Seconds spent in each module kind over `steps` decode steps after a prompt of `context` tokens.

    `layers`: per decoder layer, seconds in its attention, attention norms, MLP, MLP norms, and the whole layer.
    """

    context: int
    batch: int
    steps: int
    total_s: float
    seconds: dict[str, float]
    layers: dict[str, list[float]] = field(default_factory=dict)

    def shares(self) -> dict[str, float]:
        """Fraction of decode time per kind (attention, mlp, norms, lm_head, other); they add up to 1."""
        return {k: self.seconds[k] / self.total_s for k in KINDS}

    def step_ms(self) -> float:
        return 1000 * self.total_s / self.steps

    def to_dict(self) -> dict:
        return {**asdict(self), "shares": self.shares(), "step_ms": self.step_ms()}


def shares_from_seconds(seconds: dict[str, float], total_s: float) -> dict[str, float]:
    """Shares of `total_s` per kind; "other" is the time no hooked module accounts for (`seconds` may omit it)."""
    if total_s <= 0:
        raise ValueError("the total time must be positive")
    hooked = {k: seconds.get(k, 0.0) for k in KINDS if k != "other"}
    out = {k: v / total_s for k, v in hooked.items()}
    out["other"] = (total_s - sum(hooked.values())) / total_s
    return out


def ideal_speedup(dropped_share: float) -> float:
    """``1 / (1 - s)``: the decode speedup if modules taking a share `s` of the base model's time cost nothing."""
    if not 0.0 <= dropped_share < 1.0:
        raise ValueError(f"the dropped share must be in [0, 1), got {dropped_share}")
    return 1.0 / (1.0 - dropped_share)


def _timed_modules(model: nn.Module) -> list[tuple[str, int | None, nn.Module]]:
    """(slot, layer index or None, module) for every module the profile hooks."""
    arch = arch_for(model)
    layers = model.get_submodule(arch.layers)
    out: list[tuple[str, int | None, nn.Module]] = []
    for i, layer in enumerate(layers):
        out.append(("layer", i, layer))
        out.append(("attention", i, layer.get_submodule(arch.attn)))
        out.append(("mlp", i, layer.get_submodule(arch.mlp)))
        out += [("attn_norms", i, layer.get_submodule(p)) for p in arch.attn_norms]
        out += [("mlp_norms", i, layer.get_submodule(p)) for p in arch.mlp_norms]
    parent = model.get_submodule(arch.layers.rpartition(".")[0]) if "." in arch.layers else model
    final = getattr(parent, "norm", None)
    if isinstance(final, nn.Module):
        out.append(("final_norm", None, final))
    head = model.get_output_embeddings()
    if head is not None:
        out.append(("lm_head", None, head))
    return out


def profile_decode(model: nn.Module, context: int, batch: int = 1, steps: int = 16, seed: int = 0) -> Profile:
    """Time `steps` decode steps after a `context`-token random prompt, per module kind (see the module docstring)."""
    if steps < 1 or context < 1 or batch < 1:
        raise LlmdropError("profile settings (context, batch, steps) must be whole numbers of at least 1")
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter
    modules = _timed_modules(model)
    n_layers = max(i for _, i, _ in modules if i is not None) + 1
    per_layer = {slot: [0.0] * n_layers for slot in ("layer", "attention", "attn_norms", "mlp", "mlp_norms")}
    single = {"final_norm": 0.0, "lm_head": 0.0}
    starts: dict[int, float] = {}
    handles = []

    def pre(key):
        def hook(module, args):
            sync()
            starts[key] = clock()
        return hook

    def post(key, slot, index):
        def hook(module, args, output):
            sync()
            elapsed = clock() - starts.pop(key)
            if index is None:
                single[slot] += elapsed
            else:
                per_layer[slot][index] += elapsed
        return hook

    g = torch.Generator().manual_seed(seed + context + batch)
    vocab = text_config(model.config).vocab_size
    ids = torch.randint(10, vocab, (batch, context), generator=g).to(device)
    with torch.inference_mode():
        logits, cache = prefill(model, ids)
        logits, cache = _warm(model, logits, cache)
        try:
            for n, (slot, index, module) in enumerate(modules):
                handles.append(module.register_forward_pre_hook(pre(n)))
                handles.append(module.register_forward_hook(post(n, slot, index)))
            sync()
            t0 = clock()
            decode(model, logits, cache, steps)
            sync()
            total = clock() - t0
        finally:
            for h in handles:
                h.remove()
    seconds = {"attention": sum(per_layer["attention"]), "mlp": sum(per_layer["mlp"]),
               "norms": sum(per_layer["attn_norms"]) + sum(per_layer["mlp_norms"]) + single["final_norm"],
               "lm_head": single["lm_head"]}
    seconds["other"] = total - sum(seconds.values())
    return Profile(context, batch, steps, total, seconds, per_layer)


def _warm(model, logits, cache):
    # One untimed step first: the first decode call pays one-off costs (allocator growth, kernel selection).
    nxt = logits.argmax(-1, keepdim=True)
    out = model(input_ids=nxt, use_cache=True, **{cache_kwarg(model): cache})
    return out.logits[:, -1], cache


@dataclass
class DroppedSet:
    """What a pruned model no longer runs, in the base model's layer numbering."""

    attn: list[int]
    mlp: list[int]
    blocks: list[int]

    def describe(self) -> str:
        parts = [f"{kind} {vals}" for kind, vals in (("attn", self.attn), ("mlp", self.mlp), ("blocks", self.blocks))
                 if vals]
        return ", ".join(parts) or "nothing"


def dropped_set(base: nn.Module, pruned: nn.Module) -> DroppedSet | None:
    """The attention / MLP sublayers that are no-ops (or patches) in `pruned` but not in `base`, and the blocks it
    lacks, in `base`'s numbering; None when the pruned model's layers cannot be matched to the base's (blocks removed
    over several rounds, or a model of another shape)."""
    base_attn, base_mlp = dropped_flags(base)
    attn, mlp = dropped_flags(pruned)
    n, kept_n = len(base_attn), len(attn)
    blocks: list[int] = []
    if kept_n == n:
        kept = list(range(n))
    else:
        plan = record_of(pruned.config).get("plan") or {}
        blocks = sorted(set(plan.get("blocks") or []))
        if plan.get("num_layers") != n or n - len(blocks) != kept_n:
            return None
        kept = [i for i in range(n) if i not in set(blocks)]
    return DroppedSet(attn=[kept[j] for j, gone in enumerate(attn) if gone and not base_attn[kept[j]]],
                      mlp=[kept[j] for j, gone in enumerate(mlp) if gone and not base_mlp[kept[j]]], blocks=blocks)


def dropped_share(profile: Profile, dropped: DroppedSet) -> float:
    """Share of the base profile's decode time in the modules of `dropped` (a sublayer with its own norms, a block
    whole)."""
    lay = profile.layers
    blocks = set(dropped.blocks)
    seconds = sum(lay["layer"][b] for b in blocks)
    seconds += sum(lay["attention"][i] + lay["attn_norms"][i] for i in dropped.attn if i not in blocks)
    seconds += sum(lay["mlp"][i] + lay["mlp_norms"][i] for i in dropped.mlp if i not in blocks)
    return seconds / profile.total_s


def ideal_for(profile: Profile, dropped: DroppedSet | None) -> dict:
    """{"dropped": description, "dropped_share", "ideal_speedup"} of a dropped set on a base profile (None values
    when the set is unknown)."""
    if dropped is None:
        return {"dropped": None, "dropped_share": None, "ideal_speedup": None}
    share = dropped_share(profile, dropped)
    return {"dropped": dropped.describe(), "dropped_share": share, "ideal_speedup": ideal_speedup(share)}
