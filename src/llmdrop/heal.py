"""Healing: distil the unpruned model (teacher) into the pruned one (student) for a token budget.

    from llmdrop.heal import HealConfig, heal
    result = heal(HealConfig("smollm2-attn12/", teacher="smollm2-135m", output="smollm2-attn12-healed/", tokens=2_000_000))

The loss is ``KL(p_teacher || p_student)`` of the next-token distributions at every position (temperature 1), the
mean over tokens, on calibration-like text: by default the offline passages, read after `skip_tokens` tokens of the
source so that text used to report quality (the held-out chunks of `llmdrop run`) is never trained on. The training
itself (AdamW, schedule, data order, resumable state, FSDP2 across ranks, chunked KL) is distill.py's; this module
is the job: the config, the text, the checks of the teacher and of a saved state before any weights load, the record
and the output.

Tied embeddings stay tied: parameters are chosen by identity, and the input embedding (with the head tied to it) is
trained only with ``train_embeddings=True``. Every `save_every` steps the trainable weights, optimizer, scheduler and
data position go to ``<output>.heal-state/``; ``resume=True`` continues from there, on any number of processes. The
healed model is written with checkpoint.save (atomic: an interrupted heal leaves no output), with what healing did
appended to the ``heal`` list of config.json's ``llmdrop`` record (the engine and world size among it).

Data parallel: inside an initialised torch.distributed group, ``shard=(rank, world)`` (explicit, never implied: the
CLI sets it under torchrun) shards student and teacher with FSDP2 and each rank takes its slice of every global
batch; the weights equal one process's with the same global batch. Only rank 0 writes the output.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import arch_for_config, check_positions, text_config
from .calibration import documents, token_stream
from .checkpoint import load_checkpoint, read_config, save
from .configs import DEFAULT_SKIP_TOKENS, TRAIN_MODES, HealConfig
from .distill import (
    HealResult,
    check_shard,
    check_state,
    check_weights,
    chosen_parameters,
    distill,
    kl_divergence,
    say_state_kept,
    trainable_parameters,
)
from .errors import LlmdropError
from .files import check_output, literal
from .models import hub_reachable, load_model, resolve
from .pruned_model import CONFIG_KEY, record_of

__all__ = ["HealConfig", "HealResult", "heal", "distill", "healing_text", "record_heal", "kl_divergence",
           "trainable_parameters", "state_dir", "TRAIN_MODES", "DEFAULT_SKIP_TOKENS"]

log = logging.getLogger("llmdrop")

STATE_SUFFIX = ".heal-state"


def state_dir(output: str | Path) -> Path:
    """Where the resumable state of a heal into `output` lives: ``<output>.heal-state`` beside it."""
    out = Path(output).expanduser()
    return out.with_name(out.name + STATE_SUFFIX)


# --- data -----------------------------------------------------------------------------------------------------------


def healing_text(config: HealConfig, tokenizer, bos: bool) -> torch.Tensor:
    """The healing text as [n, seq_len] chunks: at most what the budget needs, read after `skip_tokens` tokens of
    `config.calibration`. `bos` (the family needs it: arch.needs_bos) starts every chunk with BOS."""
    return _healing_and_check_text(config, tokenizer, bos)[0]


def _healing_and_check_text(config: HealConfig, tokenizer, bos: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(healing chunks, check chunks): the check chunks hold up to `config.check_tokens` tokens read right after the
    whole healing text, which healing never trains on; None when there are none (the text ends first)."""

    if bos and tokenizer.bos_token_id is None:
        raise LlmdropError("this model family needs a BOS token at the start of each sequence, but the tokenizer has none")
    body = config.seq_len - 1 if bos else config.seq_len
    wanted = config.steps * config.chunks_per_step
    checks = math.ceil(config.check_tokens / config.seq_len)
    ids, n_docs = token_stream(tokenizer, documents(config.calibration),
                               config.skip_tokens + (wanted + checks) * body)
    ids = ids[config.skip_tokens:]
    n = min(len(ids) // body, wanted)
    if n < config.chunks_per_step:
        raise LlmdropError(f"the healing text has {len(ids):,} tokens after the first {config.skip_tokens:,} "
                           f"({{skip_tokens}}), fewer than one step's {config.chunks_per_step} chunks of {body}; give more "
                           "text with {calibration} or lower {batch_size}, {grad_accum} or {seq_len}",
                           params=["skip_tokens", "calibration", "batch_size", "grad_accum", "seq_len"])
    n_check = min(len(ids) // body - n, checks)
    all_chunks = torch.tensor(ids[: (n + n_check) * body], dtype=torch.long).view(n + n_check, body)
    if bos:
        all_chunks = torch.cat([torch.full((n + n_check, 1), tokenizer.bos_token_id, dtype=torch.long), all_chunks], 1)
    if n < wanted:
        log.info("the healing text holds %d chunks of %d tokens (%d documents); the %d steps go over it %.1f times",
                 n, config.seq_len, n_docs, config.steps, wanted / n)
    return all_chunks[:n], (all_chunks[n:] if n_check else None)


# --- checks ---------------------------------------------------------------------------------------------------------


def _teacher_config(config: HealConfig):

    where = resolve(config.teacher, config.progress, config.cache_dir)
    if isinstance(where, Path):
        _check_not_the_student(config, where)
        return read_config(where)
    from transformers import AutoConfig


    try:
        return AutoConfig.from_pretrained(where, **({} if hub_reachable() else {"local_files_only": True}))
    except (OSError, ValueError) as err:
        raise LlmdropError(f"could not read the config of {{teacher}} {literal(config.teacher)} "
                           f"({literal(str(err).splitlines()[0][:200] if str(err) else type(err).__name__)})",
                           params=["teacher"]) from None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _same_file(a: Path, b: Path) -> bool:
    if os.path.samefile(a, b):
        return True
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return hashlib.file_digest(fa, "sha256").digest() == hashlib.file_digest(fb, "sha256").digest()


def _check_not_the_student(config: HealConfig, teacher: Path) -> None:
    """A model learns nothing from itself: AdamW turns float-noise gradients into lr-sized steps and it gets worse."""
    student = Path(config.student).expanduser()
    if not student.is_dir():
        return
    if teacher.resolve() == student.resolve() or os.path.samefile(teacher, student):
        raise LlmdropError(f"{{teacher}} {literal(config.teacher)} is the student {literal(config.student)} itself, "
                           "and a model cannot learn from itself; give the unpruned model the student was made from "
                           "as {teacher}", params=["teacher"])
    mine, theirs = _weight_files(student), _weight_files(teacher)
    # Hashed only when every file name and size agree, which a pruned student and its teacher never do.
    if mine and [(p.name, p.stat().st_size) for p in mine] == [(p.name, p.stat().st_size) for p in theirs] \
            and all(_same_file(a, b) for a, b in zip(mine, theirs)):
        raise LlmdropError(f"{{teacher}} {literal(config.teacher)} holds the same weights as the student "
                           f"{literal(config.student)}, and a model cannot learn from itself; give the unpruned model "
                           "the student was made from as {teacher}", params=["teacher"])


def _check_pair(config: HealConfig, student_config: Any, teacher_config: Any) -> None:
    s, t = text_config(student_config), text_config(teacher_config)
    for attr, what in (("vocab_size", "a vocabulary of {} tokens"), ("hidden_size", "a hidden size of {}")):
        sv, tv = getattr(s, attr, None), getattr(t, attr, None)
        if sv != tv:
            raise LlmdropError(f"{{teacher}} {literal(config.teacher)} has {what.format(tv)} but the student "
                               f"{literal(config.student)} {what.format(sv)}; give the unpruned model the student was "
                               "made from as {teacher}", params=["teacher"])
    check_positions(student_config, config.seq_len, "seq_len")


def record_heal(model: nn.Module, config: HealConfig, result: HealResult) -> dict:
    """Append what healing did to the ``heal`` list of the model's ``llmdrop`` record (saved with its config)."""

    record = dict(record_of(model.config))
    entry = {"teacher": config.teacher, "tokens": result.tokens, "steps": result.steps, "seq_len": config.seq_len,
             "chunks_per_step": config.chunks_per_step, "lr": config.lr, "final_lr": config.final_lr, "warmup": config.warmup,
             "weight_decay": config.weight_decay, "train": config.train, "train_embeddings": config.train_embeddings,
             **({"lora_rank": config.lora_rank} if config.train == "lora" else {}),
             "calibration": config.calibration or "builtin", "skip_tokens": config.skip_tokens, "seed": config.seed,
             "first_kl": result.first_kl, "final_kl": result.last_kl, "engine": result.engine,
             "world_size": result.world_size,
             **({"check_tokens": result.check_tokens, "check_kl_before": result.check_kl_before,
                 "check_kl_after": result.check_kl_after} if result.check_kl_after is not None else {})}
    record["heal"] = [*record.get("heal", []), entry]
    setattr(model.config, CONFIG_KEY, record)
    return entry


def _warn_if_worse(result: HealResult, config: HealConfig) -> None:
    """A heal that leaves the student further from the teacher on text it never trained on has failed: say so."""
    if result.check_kl_after < result.check_kl_before:
        return
    log.warning("healing did not bring the student closer to the teacher on %d tokens it never trained on (KL %.4f "
                "-> %.4f): the learning rate %g is likely too high for this model; heal again with a lower --lr (e.g. "
                "%g) or --train norms / lora", result.check_tokens, result.check_kl_before, result.check_kl_after,
                config.lr, config.lr / 5)


def heal(config: HealConfig) -> HealResult:
    """Distil `config.teacher` into `config.student` for `config.tokens` tokens and save the result to `config.output`.

    Returns the HealResult on every rank; only rank 0 writes the state and the output.
    """

    if not isinstance(config, HealConfig):
        raise LlmdropError(f"heal takes a HealConfig, not {type(config).__name__}")
    rank, world = check_shard(config)
    # Cheap checks first: the output, a saved state, the two configs, the text; then the teacher's weights.
    out = check_output(config.output, config.overwrite, kind="dir")
    folder = state_dir(out)
    saved = check_state(config, folder)
    student_config = read_config(config.student)
    _check_pair(config, student_config, _teacher_config(config))
    model, tokenizer = load_checkpoint(config.student, dtype=config.dtype, device=config.device)
    if tokenizer is None:
        raise LlmdropError(f"{literal(config.student)} has no tokenizer files; save the tokenizer next to the weights "
                           "({student})", params=["student"])
    if config.train != "lora":  # nothing to train, or a state saved for another model: found before the teacher loads
        shapes = {name: tuple(p.shape) for name, p in chosen_parameters(model, config)}
        if saved is not None:
            check_weights(folder, saved, shapes)
    chunks, check = _healing_and_check_text(config, tokenizer, arch_for_config(student_config).needs_bos)
    try:
        teacher, _ = load_model(config.teacher, dtype=config.dtype, device=config.device, progress=config.progress,
                                cache_dir=config.cache_dir)
        before = kl_divergence(model, teacher, check, config.batch_size, config.kl_chunk) if check is not None else None
        model, result = distill(model, teacher, chunks, config, state=folder)
        result.output = out
        if check is not None:
            result.check_kl_before, result.check_tokens = before, int(check.numel())
            result.check_kl_after = kl_divergence(model, teacher, check, config.batch_size, config.kl_chunk)
            if rank == 0:
                _warn_if_worse(result, config)
        record_heal(model, config, result)
        if rank == 0:
            save(model, tokenizer, out, overwrite=config.overwrite, dtype=config.save_dtype or config.dtype)
    except KeyboardInterrupt as stop:  # a state saved by this run or the one it resumed stays for --resume
        if rank == 0:
            say_state_kept(stop, folder, config)
        raise
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("healed in %.0fs (%.0f tokens/s): KL %.4f -> %.4f; saved %s", result.seconds, result.tokens_per_s,
                 result.first_kl, result.last_kl, out)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result
