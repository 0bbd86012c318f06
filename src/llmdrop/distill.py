"""The training engine of healing: what trains, the loss, the schedule, the data order, the resumable state and the
loop. heal.py is the job around it (the config, the healing text, the teacher checks, the record, the output).

One process trains with plain autograd: AdamW (fused) with a linear warm-up then cosine decay to zero, gradient
accumulation, gradient clipping. The teacher runs without gradients; the student stays in eval mode (no dropout), so
training draws no random numbers and the data order is a function of `seed` and the step alone: a run resumed from a
saved step ends with the same weights as one that never stopped.

Several processes (``shard=(rank, world)`` inside an initialised torch.distributed group, e.g. under torchrun) train
with FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder layer and the root of the student and of the
teacher are sharded, so each rank holds 1/world of every parameter, gradient and AdamW moment (the teacher runs
forward only). Each rank takes its slice of every global batch and FSDP reduces the gradients; the weights equal one
process's within float tolerance. At the end the trained weights are gathered into an unsharded copy of the model.

The resumable state is a torch.distributed.checkpoint (DCP) of the trained weights and the optimizer, keyed by
parameter name rather than by rank, so a heal stopped on N processes resumes on M; heal-state.json beside it holds the
step, the settings' fingerprint, the schedule and the KL so far.

``kl_chunk`` computes the KL a chunk of positions at a time: the models' bodies run once, then the LM head and
log-softmax of both run per chunk (the student's backward through each chunk at once), so the ``[tokens, vocab]``
logits of both models never exist whole. ``activation_checkpointing`` recomputes each decoder layer of the student
in the backward pass instead of keeping its activations.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import arch_for, text_config
from .configs import HEAL_FINGERPRINT, TRAIN_MODES, HealConfig
from .errors import LlmdropError
from .files import literal, write_json
from .options import is_number
from .pruned_model import record_of
from .surgery import dropped_sublayers

__all__ = ["HealResult", "distill", "kl_divergence", "trainable_parameters", "chosen_parameters", "check_shard",
           "check_engine", "check_state", "check_weights", "saved_weights", "say_state_kept", "STATE_JSON", "ENGINE_SINGLE",
           "ENGINE_FSDP"]

log = logging.getLogger("llmdrop")

STATE_JSON = "heal-state.json"
_STEP_DIR = re.compile(r"step-\d+")
ENGINE_SINGLE = "single process"
ENGINE_FSDP = "fsdp2"
# The process-group backend FSDP2's collectives need for the tensors of each device type.
_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass
class HealResult:
    """What a heal did. `steps` / `tokens` are the whole run's (resumed ones included); `seconds` and `tokens_per_s`
    are this call's training loop (without loading); `first_kl` / `last_kl` the mean per-token KL of the first and
    last step's global batch, each measured before that step's update; `kl` every step's, in order. `engine` is
    ENGINE_SINGLE or ENGINE_FSDP, `world_size` the number of processes of this call."""

    output: Path | None
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    first_kl: float
    last_kl: float
    resumed_from: int = 0
    kl: list[float] = field(default_factory=list)
    # The KL to the teacher on `check_tokens` tokens read right after the healing text (never trained on), before and
    # after healing; None when heal had no check text (check_tokens 0, or the text ended with the healing text).
    check_kl_before: float | None = None
    check_kl_after: float | None = None
    check_tokens: int = 0
    engine: str = ENGINE_SINGLE
    world_size: int = 1

    def summary(self) -> str:
        """What healing did, in two or three lines."""
        where = f" on {self.world_size} ranks ({self.engine})" if self.world_size > 1 else ""
        lines = [f"healed {self.steps} steps, {self.tokens:,} tokens in {self.seconds:.0f}s ({self.tokens_per_s:.0f} "
                 f"tokens/s){where}; KL to the teacher {self.first_kl:.4f} -> {self.last_kl:.4f}"]
        if self.check_kl_after is not None:
            lines.append(f"KL to the teacher on {self.check_tokens:,} tokens never trained on: "
                         f"{self.check_kl_before:.4f} -> {self.check_kl_after:.4f}")
        return "\n".join([*lines, f"saved to {self.output}"])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["output"] = str(self.output) if self.output else None
        return out


# --- parameters -----------------------------------------------------------------------------------------------------


def _embedding_ids(model: nn.Module) -> set[int]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {id(emb.weight)} if emb is not None and getattr(emb, "weight", None) is not None else set()


def trainable_parameters(model: nn.Module, train: str, train_embeddings: bool = False) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what `train` trains, each parameter once (tied ones under their first name).

    "all": every parameter but the input embedding (a head tied to it is the same parameter); "norms": those of
    norm modules; "patches": those of modules whose class name starts with "Patched"; "near": those of the decoder
    layers next to the changes (near_layers). `train_embeddings` adds the input embedding. ("lora" trains adapters
    that peft adds; see distill.)
    """
    skip = set() if train_embeddings else _embedding_ids(model)
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    if train == "all":
        for name, p in model.named_parameters():
            if id(p) not in skip:
                chosen.setdefault(id(p), (name, p))
    elif train == "near":
        path = arch_for(model).layers
        layers = model.get_submodule(path)
        for i in sorted(near_layers(model, len(layers))):
            for pname, p in layers[i].named_parameters(prefix=f"{path}.{i}"):
                chosen.setdefault(id(p), (pname, p))
    elif train in ("norms", "patches"):
        for mname, module in model.named_modules():
            kind = type(module).__name__
            if (train == "norms" and "norm" in kind.lower()) or (train == "patches" and kind.startswith("Patched")):
                for pname, p in module.named_parameters(prefix=mname):
                    if id(p) not in skip:
                        chosen.setdefault(id(p), (pname, p))
    else:
        raise ValueError(f"train must be one of all, norms, patches, near here, not {train!r}")
    if train_embeddings:
        for name, p in model.named_parameters():
            if id(p) in _embedding_ids(model):
                chosen.setdefault(id(p), (name, p))
    return list(chosen.values())


def near_layers(model: nn.Module, layers: int) -> set[int]:
    """Indices (current numbering) of the decoder layers next to what the drop changed: a layer whose attention or
    MLP is gone or patched and the layers either side of it, and the kept layers either side of a removed block.
    These are the layers whose outputs the change shifted first, the ones that healing only there adapts."""
    attn, mlp = dropped_sublayers(model)
    near: set[int] = set()
    for i in set(attn) | set(mlp):
        near |= {i - 1, i, i + 1}
    removed = sorted(record_of(model.config).get("plan", {}).get("blocks", []))
    for n, block in enumerate(removed):
        after = block - n  # the kept layer that now follows it (n removed blocks come before it)
        near |= {after - 1, after}
    return {i for i in near if 0 <= i < layers}


def _ties(model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and emb is not None and out.weight is emb.weight


def _train_only(model: nn.Module, chosen: list[tuple[str, nn.Parameter]]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)


def _add_lora(model: nn.Module, config: HealConfig):
    from peft import LoraConfig, get_peft_model

    # Adapter init is seeded without touching the caller's RNG; peft calls a transformers method deprecated in v5.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(config.seed)
        return get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                                                target_modules="all-linear", bias="none"))


def _decoder_layers(base: nn.Module) -> list[nn.Module]:
    return list(base.get_submodule(arch_for(base).layers))


# --- loss -----------------------------------------------------------------------------------------------------------


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(p_teacher || p_student), computed in float32."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return torch.nn.functional.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="sum")


def _passthrough(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


class _DeferredHead:
    """One model's LM head, run outside its forward. While `on`, the model's forward returns its final hidden states
    in place of logits: the head passes them through and a final soft-cap (Gemma's) is switched off, as the forward
    would apply it to what the head returns; `logits` then makes the logits of a slice of them exactly as the forward
    would. The head module stays where it is, so parameter names, tied embeddings and FSDP's units are unchanged."""

    def __init__(self, model: nn.Module):
        self.head = model.get_output_embeddings()
        config = model.config
        self.config = config if hasattr(config, "final_logit_softcapping") else text_config(config)
        self.cap = getattr(self.config, "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The head's weight is looked up at each call: under FSDP it is the unsharded parameter only while the root
        # is gathered.
        out = type(self.head).forward(self.head, hidden)
        return torch.tanh(out / self.cap) * self.cap if self.cap else out

    def on(self) -> None:
        self.head.forward = _passthrough
        if self.cap:
            self.config.final_logit_softcapping = None

    def off(self) -> None:
        self.head.__dict__.pop("forward", None)
        if self.cap:
            self.config.final_logit_softcapping = self.cap


@contextlib.contextmanager
def _deferred_heads(*models: nn.Module) -> Iterator[list[_DeferredHead]]:
    """The models' LM heads deferred (see _DeferredHead) while inside; put back after, whatever happens."""
    heads = [_DeferredHead(m) for m in models]
    try:
        for head in heads:
            head.on()
        with warnings.catch_warnings():
            # FSDP warns that the root now returns a view (the hidden states, sliced as the head would read them):
            # an in-place op on it would skip FSDP's hook, and none is made here (it is detached, then backed through).
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            yield heads
    finally:
        for head in heads:
            head.off()


def _gathered(model: nn.Module) -> None:
    """Under FSDP, gather the root's parameters (the LM head among them) for use outside its forward."""
    if _is_fsdp(model):
        model.unshard()


def _release(model: nn.Module) -> None:
    if _is_fsdp(model):
        model.reshard()


def _chunk_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, heads, chunk: int,
              scale: float | None = None) -> torch.Tensor:
    """Sum over positions of KL(p_teacher || p_student) from the final hidden states, `chunk` positions at a time, in
    float64. With `scale`, each chunk's KL / scale is back-propagated into the student's head and into
    `student_hidden`'s .grad (a leaf) at once, so no chunk's logits outlive it."""
    student_head, teacher_head = heads
    total = torch.zeros((), dtype=torch.float64)
    pieces = student_hidden.flatten(0, -2).split(chunk)
    for start, piece in zip(range(0, teacher_hidden.shape[0], chunk), pieces):
        with torch.no_grad():
            target = teacher_head.logits(teacher_hidden[start:start + chunk].to(piece.device))
        kl = _kl_sum(student_head.logits(piece), target)
        if scale is not None:
            kl = kl / scale
            kl.backward()
        total += kl.detach().double().cpu()
        del target, kl
    return total


def _step_kl(trained: nn.Module, teacher: nn.Module, ids: torch.Tensor, scale: float, chunk: int | None,
             heads) -> torch.Tensor:
    """The KL summed over the positions of `ids`, divided by `scale` and back-propagated into the student."""
    if chunk is None:
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        _release(teacher)
        logits = trained(input_ids=ids, use_cache=False).logits
        loss = _kl_sum(logits, target) / scale
        loss.backward()
        return loss.detach().double().cpu()
    with torch.no_grad():
        teacher_hidden = teacher(input_ids=ids, use_cache=False).logits.flatten(0, -2)
    _release(teacher)  # not held through the student's forward: gathered again for the chunks (Gemma's head: 0.7 GB)
    hidden = trained(input_ids=ids, use_cache=False).logits
    # The head's backward runs chunk by chunk into a detached copy of the hidden states; their gradient then goes
    # through the body in one backward, as an unchunked loss would send it.
    leaf = hidden.detach().requires_grad_(True)
    _gathered(teacher)
    try:
        total = _chunk_kl(leaf, teacher_hidden, heads, chunk, scale)
    finally:
        _release(teacher)
    hidden.backward(leaf.grad)
    return total


def kl_divergence(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, batch_size: int = 1,
                  chunk: int | None = None) -> float:
    """Mean per-token KL(p_teacher || p_student) over `input_ids` ([chunks, seq_len]), without gradients; with
    `chunk`, the logits are made `chunk` positions at a time."""
    device = next(student.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), (_deferred_heads(student, teacher) if chunk else contextlib.nullcontext()) as heads:
        for batch in input_ids.split(batch_size):
            batch = batch.to(device)
            t = teacher(input_ids=batch.to(next(teacher.parameters()).device), use_cache=False).logits
            s = student(input_ids=batch, use_cache=False).logits
            if heads is None:
                total += float(_kl_sum(s, t.to(s.device)))
            else:
                _gathered(student)
                _gathered(teacher)
                total += float(_chunk_kl(s, t.flatten(0, -2), heads, chunk))
            _release(teacher)
            _release(student)
            count += batch.numel()
    return total / max(count, 1)


def _check_heads(trained: nn.Module, teacher: nn.Module, ids: torch.Tensor, heads) -> None:
    """The chunked KL makes logits as `_DeferredHead.logits` says; a family whose forward does more to them (a scale, a
    cap it does not name in its config) is found here, on a few positions, rather than trained on a wrong loss."""
    for model, head in zip((trained, teacher), heads):
        with torch.no_grad():
            head.off()
            try:
                full = model(input_ids=ids, use_cache=False).logits
            finally:
                head.on()
            _gathered(model)
            ours = head.logits(model(input_ids=ids, use_cache=False).logits)
            _release(model)
        if not torch.allclose(full.float(), ours.float(), rtol=1e-4, atol=1e-4):
            raise LlmdropError("this model's logits are not its LM head applied to its last hidden states, so {kl_chunk} "
                               "cannot make them a chunk at a time; heal without {kl_chunk}", params=["kl_chunk"])


def _schedule(steps: int, warmup: float, final: float = 0.0):
    """The learning rate's factor of the peak: a linear warm-up, then a cosine decay from 1 to `final`."""
    warm = int(round(warmup * steps))

    def factor(step: int) -> float:  # step = optimizer steps taken so far; lr of the next one
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, steps - warm)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@contextlib.contextmanager
def _checkpointed(layers: list[nn.Module]) -> Iterator[None]:
    """torch.utils.checkpoint around each layer's forward: its activations are recomputed in the backward pass.
    Non-reentrant, so keyword arguments pass and FSDP's hooks (on the module call, outside) are untouched."""
    from torch.utils.checkpoint import checkpoint

    try:
        for layer in layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


# --- data -----------------------------------------------------------------------------------------------------------


def _global_batch(chunks: torch.Tensor, step: int, per_step: int, seed: int) -> torch.Tensor:
    """The chunks of optimizer step `step`: positions step*per_step.. of the endless sequence of epochs, each epoch a
    permutation of all chunks drawn from (seed, epoch). A function of the step alone, so resuming needs no RNG."""
    n = len(chunks)
    orders: dict[int, torch.Tensor] = {}
    picks = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        picks.append(orders[epoch][offset])
    return chunks[torch.stack(picks)]


# --- processes ------------------------------------------------------------------------------------------------------


def check_shard(config: HealConfig) -> tuple[int, int]:
    """(rank, world size) of this process; with several, the process group and the device FSDP2 needs."""
    if config.shard is None:
        return 0, 1
    rank, world = config.shard
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise LlmdropError(f"{{shard}} ({rank}, {world}) needs an initialised torch.distributed process group "
                               "(run under torchrun)", params=["shard"])
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise LlmdropError(f"{{shard}} ({rank}, {world}) is not this process: it is rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}", params=["shard"])
        check_engine(config.device, dist.get_backend())
    return rank, world


def check_engine(device: str, backend: str) -> None:
    """FSDP2 shards over the process group's collectives on the training device: gloo for CPU tensors, NCCL for
    CUDA ones. Anything else fails inside FSDP with a traceback; here it is one sentence before any weights load."""
    kind = torch.device(device).type
    need = _BACKENDS.get(kind)
    if need is None:
        raise LlmdropError(f"{{device}} {literal(device)} cannot heal on several ranks: FSDP2 shards here on cpu (gloo) "
                           "or cuda (nccl) only; choose one of those for {device}, or heal in one process",
                           params=["device"])
    if need not in str(backend).lower():
        raise LlmdropError(f"{{device}} {literal(device)} cannot be sharded by FSDP2 over a {literal(backend)} "
                           f"process group, which needs {need} for {kind} tensors; start the group with {need} "
                           "(torchrun -m llmdrop does) or choose the {device} it serves", params=["device"])


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _shard(model: nn.Module, base: nn.Module, mesh) -> None:
    """fully_shard every decoder layer, then the root (embeddings, final norm, head: tied ones stay one parameter in
    one unit). The root is kept gathered after its forward, so the LM head can run outside it (kl_chunk); the
    backward, or _release, frees it."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(base):
        if any(True for _ in layer.parameters()):  # a layer whose every sublayer is dropped has nothing to shard
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` with its parameters on the meta device (no memory), made before FSDP changes the modules it
    shards in place: the trained weights are gathered into it at the end. Buffers (rotary tables) are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _gather(trained: nn.Module, skeleton: nn.Module, device: torch.device) -> nn.Module:
    """The skeleton with the sharded model's weights, gathered one parameter at a time (each rank, same order)."""
    from torch.distributed.tensor import DTensor

    made: dict[int, nn.Parameter] = {}
    for module in skeleton.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in made:  # tied parameters stay one parameter
                made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
            setattr(module, name, made[id(p)])
    target = dict(skeleton.named_parameters())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            target[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)
    return skeleton


def _sum_over_ranks(value: torch.Tensor, mesh) -> torch.Tensor:
    """A per-rank partial sum made whole by DTensor (a Partial placement redistributed to a full tensor)."""
    from torch.distributed.tensor import DTensor, Partial

    local = value.to(mesh.device_type).reshape(1)
    return DTensor.from_local(local, mesh, [Partial()]).full_tensor().reshape(()).cpu()


# --- state ----------------------------------------------------------------------------------------------------------


def _read_state_info(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / STATE_JSON).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None  # valid JSON that is no object was not written by llmdrop


def _state_problem(info: dict) -> str | None:
    """What makes `info` (a loaded heal-state.json) other than what _save_state writes, or None."""
    for key, kind in (("step", int), ("kl", list), ("scheduler", dict), ("state", str), ("world_size", int)):
        if not isinstance(info.get(key), kind):
            return f"{STATE_JSON} has no {key!r} {kind.__name__}"
    if not _STEP_DIR.fullmatch(info["state"]):
        return f"its 'state' {info['state']!r} is not a step directory"
    if not all(is_number(v) for v in info["kl"]):
        return f"the 'kl' of {STATE_JSON} is not a list of numbers"
    return None


def saved_weights(folder: Path, info: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the weights the state in `folder` trains, read from its DCP metadata (no tensor is read)."""
    problem = _state_problem(info)
    if problem is not None:
        raise LlmdropError(f"the heal state in {literal(folder)} is not one llmdrop wrote ({literal(problem)}); remove "
                           "that directory to start over")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(folder / info["state"]).read_metadata()
    except Exception as err:  # a missing, truncated or foreign file: DCP and pickle raise several types
        raise LlmdropError(f"could not read the heal state in {literal(folder)} ({type(err).__name__}); remove that "
                           "directory to start over") from None
    weights = {key.removeprefix("model."): tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not weights:
        raise LlmdropError(f"the heal state in {literal(folder)} is not one llmdrop wrote (it holds no weights); remove "
                           "that directory to start over")
    return weights


def check_state(config: HealConfig, folder: Path) -> dict | None:
    """The saved state to resume from (None: start at step 0), refusing to silently discard or misuse one."""
    info = _read_state_info(folder) if folder.is_dir() else None
    if folder.exists() and info is None:
        raise LlmdropError(f"{literal(folder)} is not a heal state llmdrop wrote ({STATE_JSON} is missing, unreadable "
                           "or not what llmdrop writes); remove it or choose another {output}", params=["output"])
    if info is None:
        if config.resume:
            log.info("no saved heal state in %s: starting at step 0", folder)
        return None
    if not config.resume:
        raise LlmdropError(f"{literal(folder)} holds an interrupted heal at step {literal(info.get('step'))}; pass "
                           "{resume} to continue it, or remove that directory to start over", params=["resume"])
    saved, now = info.get("fingerprint"), config.fingerprint()
    saved = saved if isinstance(saved, dict) else {}
    differ = [k for k in HEAL_FINGERPRINT if saved.get(k) != now[k]]
    if differ:
        what = ", ".join(f"{k} {literal(repr(saved.get(k)))} then, {literal(repr(now[k]))} now" for k in differ[:3])
        raise LlmdropError(f"the heal state in {literal(folder)} was saved with other settings ({what}); resume with "
                           "the same settings, or remove that directory to start over")
    saved_weights(folder, info)  # a foreign or broken state is found now, before any weights load
    return info


def check_weights(folder: Path, info: dict, weights: dict[str, tuple[int, ...]]) -> None:
    """The state in `folder` trains exactly `weights` ({name: shape}): one saved for another model is refused."""
    saved = saved_weights(folder, info)
    if saved == weights:
        return
    name = next((n for n in sorted(saved.keys() | weights.keys()) if saved.get(n) != weights.get(n)), "")
    then = f"{list(saved[name])}" if name in saved else "absent"
    now = f"{list(weights[name])}" if name in weights else "absent"
    raise LlmdropError(f"the heal state in {literal(folder)} was saved for other weights than this heal trains "
                       f"({literal(name)}: {then} then, {now} now), by another model or another {{train}}; remove that "
                       "directory to start over", params=["train"])


def _state_dicts(trained: nn.Module, names: list[str], optimizer) -> dict:
    """{"model": the trained weights, "optim": the optimizer}, keyed by parameter name whatever the world size
    (sharded DTensors under FSDP, plain tensors in one process): what DCP saves and loads in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(trained, optimizer)
    return {"model": {n: model_sd[n] for n in names}, "optim": optim_sd}


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    # DCP warns that it "assumes" one process even when told so (no_dist=True); in one process that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is .*assuming the intent is to")
        yield


def _save_state(folder: Path, config: HealConfig, step: int, trained: nn.Module, names: list[str], optimizer,
                scheduler, kl: list[float], rank: int, world: int) -> None:
    """Everything needed to continue after `step` steps. Every rank writes its shards (a DCP save is collective) into
    a new step directory; rank 0 then points heal-state.json at it (an atomic replace) and removes the older one, so
    an interrupted save leaves the previous state whole."""
    import torch.distributed.checkpoint as dcp

    step_dir = folder / f"step-{step}"
    with _one_process_is_meant():
        dcp.save(_state_dicts(trained, names, optimizer), checkpoint_id=step_dir, no_dist=world == 1)
    if rank:
        return
    info = {"step": step, "steps": config.steps, "position": step * config.chunks_per_step, "seed": config.seed,
            "fingerprint": config.fingerprint(), "state": step_dir.name, "world_size": world,
            "engine": ENGINE_FSDP if world > 1 else ENGINE_SINGLE, "kl": list(kl), "scheduler": scheduler.state_dict()}
    write_json(folder / STATE_JSON, info)
    _tidy_state(folder)


def _tidy_state(folder: Path) -> None:
    """Remove step directories heal-state.json does not name (a save that was interrupted, the previous step), or
    the whole folder when no state was ever completed in it."""
    info = _read_state_info(folder) if folder.is_dir() else None
    if info is None:
        if folder.is_dir() and all(_STEP_DIR.fullmatch(p.name) for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if _STEP_DIR.fullmatch(entry.name) and entry.name != info.get("state"):
            shutil.rmtree(entry, ignore_errors=True)


def _load_state(folder: Path, info: dict, trained: nn.Module, params: list[tuple[str, nn.Parameter]], optimizer,
                scheduler, world: int) -> tuple[int, list[float]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    check_weights(folder, info, {name: tuple(p.shape) for name, p in params})
    state = _state_dicts(trained, [name for name, _ in params], optimizer)
    try:
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=folder / info["state"], no_dist=world == 1)
        set_state_dict(trained, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        scheduler.load_state_dict(info["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        # shapes, groups or files of another heal (DCP's CheckpointException is a RuntimeError)
        raise LlmdropError(f"the heal state in {literal(folder)} does not fit this heal ({type(err).__name__}); remove "
                           "that directory to start over") from None
    return info["step"], [float(v) for v in info["kl"]]


def say_state_kept(stop: KeyboardInterrupt, folder: Path, config: HealConfig) -> None:
    """An interrupted heal writes no output, but a saved state stays for --resume: say so, once, and mark `stop`
    (``stop.kept``) so that the CLI does not claim that nothing was written."""
    if getattr(stop, "kept", None) is not None:
        return
    _tidy_state(folder)
    info = _read_state_info(folder) if folder.is_dir() else None
    if info is None:
        return
    stop.kept = folder
    log.warning("stopped; the heal state at step %s of %s was kept in %s: the same command with --resume continues "
                "from there", info.get("step"), info.get("steps", config.steps), folder)


# --- the loop -------------------------------------------------------------------------------------------------------


def _to_train(student: nn.Module, config: HealConfig) -> tuple[nn.Module, nn.Module, list[str]]:
    """(the model the optimizer trains, its base model, the names of the parameters that train), the rest frozen:
    for "lora" a peft model around the student with adapters, otherwise the student itself."""
    if config.train == "lora":
        trained = _add_lora(student, config)
        return trained, trained.get_base_model(), [n for n, p in trained.named_parameters() if p.requires_grad]
    # Under FSDP the whole parameters must go once sharded, and one tensor left in a variable would hold them (they
    # are views of the safetensors file's single memory map): only the names leave this function.
    chosen = chosen_parameters(student, config)
    _train_only(student, chosen)
    return student, student, [n for n, _ in chosen]


def chosen_parameters(model: nn.Module, config: HealConfig) -> list[tuple[str, nn.Parameter]]:
    """trainable_parameters for `config` (not "lora", whose adapters are made by distill), or one sentence when
    that is nothing: a student without linear patches for "patches", one without drops for "near"."""
    chosen = trainable_parameters(model, config.train, config.train_embeddings)
    if not chosen:
        what = "no linear patches (modules whose class is named Patched...)" if config.train == "patches" else \
            f"nothing to train with {config.train}"
        *others, last = [mode for mode in TRAIN_MODES if mode != config.train]
        raise LlmdropError(f"the student {literal(config.student)} has {what}; choose another {{train}} "
                           f"({', '.join(others)} or {last})", params=["train"])
    return chosen


def _optimizer(params: list[tuple[str, nn.Parameter]], config: HealConfig):
    """AdamW (weight decay on matrices only) and its warm-up + cosine schedule."""
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": rest, "weight_decay": 0.0}) if g["params"]]
    try:  # the fused kernel is several times faster than the default on CPU (measured: 0.9 s vs 6 s per step, 99M)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype it does not cover
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.steps, config.warmup,
                                                                             config.final_lr))


def _shard_pair(trained: nn.Module, base: nn.Module, teacher: nn.Module, device: torch.device, world: int):
    """(mesh, skeleton): student and teacher sharded with FSDP2 over `world` ranks; the skeleton gathers the trained
    model back whole at the end."""
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    skeleton = _skeleton(trained)
    _shard(trained, base, mesh)
    _shard(teacher, teacher, mesh)
    return mesh, skeleton


def _train_step(trained: nn.Module, teacher: nn.Module, mine: torch.Tensor, config: HealConfig, rank_tokens: int,
                heads, optimizer, plist: list[nn.Parameter], mesh) -> float:
    """One optimizer step on this rank's chunks of the global batch, micro-batch by micro-batch; the global batch's
    mean KL (summed over the ranks under FSDP)."""
    optimizer.zero_grad(set_to_none=True)
    kl_sum = torch.zeros((), dtype=torch.float64)
    for micro in mine.split(config.batch_size):
        kl_sum += _step_kl(trained, teacher, micro, rank_tokens, config.kl_chunk, heads)
    if mesh is not None:
        kl_sum = _sum_over_ranks(kl_sum, mesh) / mesh.size()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(plist, config.max_grad_norm)
    optimizer.step()
    return float(kl_sum)


@contextlib.contextmanager
def _memory_savers(trained: nn.Module, base: nn.Module, teacher: nn.Module, config: HealConfig,
                   probe: torch.Tensor | None) -> Iterator[list | None]:
    """For the length of the training loop: the LM heads deferred to the chunked KL (`kl_chunk`, yielded; checked
    on `probe` first) and activation checkpointing of the student's decoder layers."""
    with contextlib.ExitStack() as stack:
        heads = stack.enter_context(_deferred_heads(trained, teacher)) if config.kl_chunk else None
        if config.activation_checkpointing:
            stack.enter_context(_checkpointed(_decoder_layers(base)))
        if heads is not None and probe is not None:
            _check_heads(trained, teacher, probe, heads)
        yield heads


def _frozen(model: nn.Module, tied: bool) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    if tied and not _ties(model):  # never expected: parameters are trained in place, by identity
        raise RuntimeError("healing untied the input and output embeddings")
    return model


def distill(student: nn.Module, teacher: nn.Module, chunks: torch.Tensor, config: HealConfig,
            state: str | Path | None = None) -> tuple[nn.Module, HealResult]:
    """Train `student` towards `teacher` on `chunks` (from heal.healing_text) as `config` says; the in-memory core of
    heal.

    Returns the trained model (in one process the same object, or for "lora" the model with the adapters merged in;
    under FSDP an unsharded copy on every rank, the teacher staying sharded) and the HealResult (its `output` is
    None). With `state`, every `config.save_every` steps the resumable state is written there, and with
    `config.resume` a state found there is continued, whatever the world size that saved it. Under `config.shard`
    every rank calls this with the same chunks. The caller saves the model; heal.record_heal adds what healing did
    to its config.
    """
    from tqdm.auto import tqdm

    rank, world = check_shard(config)
    folder = Path(state).expanduser() if state is not None else None
    info = check_state(config, folder) if folder is not None else None
    if len(chunks) < config.chunks_per_step or chunks.shape[1] != config.seq_len:
        raise ValueError(f"chunks must be [n >= {config.chunks_per_step}, {config.seq_len}], not {list(chunks.shape)}")
    device = next(student.parameters()).device
    tied = _ties(student)
    trained, base, names = _to_train(student, config)
    teacher.eval().requires_grad_(False)

    mesh, skeleton = _shard_pair(trained, base, teacher, device, world) if world > 1 else (None, None)
    by_name = dict(trained.named_parameters())  # under FSDP the sharded parameters, under the same names
    params = [(n, by_name[n]) for n in names]
    del by_name
    optimizer, scheduler = _optimizer(params, config)
    kl_history: list[float] = []
    start = 0
    if info is not None:
        start, kl_history = _load_state(folder, info, trained, params, optimizer, scheduler, world)
        log.info("resuming the heal from step %d of %d (%s, saved by %d process%s)", start, config.steps, folder,
                 info["world_size"], "es" if info["world_size"] > 1 else "")

    plist = [p for _, p in params]
    per_step, steps = config.chunks_per_step, config.steps
    global_tokens = per_step * config.seq_len
    # Each rank's loss is its share of the global mean: FSDP averages the ranks' gradients.
    rank_tokens = global_tokens // world
    log.info("healing %s from %s: %d steps of %d tokens, training %s (%s parameters)%s", config.student, config.teacher,
             steps, global_tokens, config.train, f"{sum(p.numel() for p in plist):,}",
             f" on {world} ranks with FSDP2" if world > 1 else "")
    bar = tqdm(total=steps, initial=start, desc="healing", unit="step", disable=not config.progress or rank != 0)
    started = time.perf_counter()
    try:
        with _memory_savers(trained, base, teacher, config, chunks[:1, :8].to(device) if start < steps else None) \
                as heads:
            for step in range(start, steps):
                mine = _global_batch(chunks, step, per_step, config.seed)[rank::world].to(device)
                kl_history.append(_train_step(trained, teacher, mine, config, rank_tokens, heads, optimizer, plist,
                                              mesh))
                scheduler.step()
                elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(kl=f"{kl_history[-1]:.4f}",
                                tok_s=f"{(step + 1 - start) * global_tokens / elapsed:.0f}")
                if folder is not None and config.save_every and (step + 1) % config.save_every == 0 \
                        and step + 1 < steps:
                    _save_state(folder, config, step + 1, trained, names, optimizer, scheduler, kl_history, rank,
                                world)
    except KeyboardInterrupt as stop:
        if folder is not None and rank == 0:
            say_state_kept(stop, folder, config)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    del optimizer, scheduler, params, plist
    if skeleton is not None:
        trained = _gather(trained, skeleton, device)
    model = _frozen(trained.merge_and_unload() if config.train == "lora" else trained, tied)
    result = HealResult(output=None, steps=steps, tokens=steps * global_tokens, seconds=seconds,
                        tokens_per_s=(steps - start) * global_tokens / seconds if seconds > 0 else 0.0,
                        first_kl=kl_history[0] if kl_history else float("nan"),
                        last_kl=kl_history[-1] if kl_history else float("nan"), resumed_from=start, kl=kl_history,
                        engine=ENGINE_FSDP if world > 1 else ENGINE_SINGLE, world_size=world)
    return model, result
