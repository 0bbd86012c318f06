"""The jobs behind `llmdrop measure`, `llmdrop drop` and `llmdrop run`, callable from Python.

    from llmdrop.pipeline import PlanSpec
    from llmdrop.run import RunConfig, run
    result = run(RunConfig("smollm2-135m", plan=PlanSpec("attn", n=8), output="out/"))
    print(result.table())

A RunConfig is validated when built, and every job checks its output location and its inputs (scores file, sequence
length against the model's positions) before the slow work, so a mistake costs seconds, not a measurement.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .configs import PlanSpec, RunConfig
from .errors import LlmdropError
from .measure import Scores
from .pipeline import (
    Choice,
    Footprint,
    choose,
    choose_from_scores,
    describe,
    footprint,
    kv_rows,
    provenance,
    prune,
    write_provenance,
)
from .plan import DropPlan

log = logging.getLogger("llmdrop")

def _no_heal(config: RunConfig, job: str) -> None:
    if config.heal is not None:
        raise LlmdropError(f"{{heal}} is part of `run`, not `{job}`: heal the checkpoint {job} writes with `llmdrop "
                           "heal`, or use `run`", params=["heal"])


@dataclass
class RunResult:
    """What a drop or run did: the choice, the before/after rows (see `HEADERS`) and where the checkpoint went
    (None for a dry run)."""

    HEADERS: ClassVar[tuple[str, str, str]] = ("", "before", "after")

    choice: Choice
    rows: list[list] = field(default_factory=list)
    output: Path | None = None

    def table(self, markdown: bool = False) -> str:
        from .report import table

        return table(list(self.HEADERS), self.rows, markdown=markdown)


# ---------------------------------------------------------------- shared steps


def _need_plan(config: RunConfig) -> PlanSpec:
    if config.plan is None:
        raise LlmdropError("say what to drop: {target} and {n} or {ratio}", params=["target", "n", "ratio"])
    return config.plan


def _check_output(config: RunConfig, kind: str, overwrite: bool | None = None) -> Path | None:
    from .files import check_output

    if not config.output:
        return None
    return check_output(config.output, config.overwrite if overwrite is None else overwrite, kind=kind)


def _resolve(config: RunConfig) -> Path | str:
    from .models import resolve

    return resolve(config.model, progress=config.progress, cache_dir=config.cache_dir)


def _local(config: RunConfig, where: Path | str) -> Path:
    """The checkpoint directory the streamed jobs read tensor by tensor."""
    from .files import literal

    if not isinstance(where, Path):
        raise LlmdropError(f"{{stream}} reads a local checkpoint directory (or an alias / .gguf, converted first), "
                           f"not the hub id {literal(config.model)}; download it first", params=["stream"])
    return where


def _check_seq_len(model_config: Any, config: RunConfig) -> None:
    """Positions past the trained range are measured as if valid, silently: refuse them (C17, C18)."""
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and config.seq_len > limit:
        raise LlmdropError(f"{{seq_len}} {config.seq_len} is beyond the {limit} positions this model was trained for "
                           f"(max_position_embeddings); choose {{seq_len}} {limit} or less", params=["seq_len"])


def _num_layers(model_config: Any) -> int:
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    return int(text.num_hidden_layers)


def _load(config: RunConfig, where: Path | str):
    """(model, tokenizer, arch), with the sequence length checked against the config before the weights load."""
    from .arch import arch_for
    from .models import load_model

    if isinstance(where, Path):
        from .checkpoint import read_config

        _check_seq_len(read_config(where), config)
    started = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device, progress=config.progress,
                                  cache_dir=config.cache_dir)
    _check_seq_len(model.config, config)  # a hub model's config is known only now
    arch = arch_for(model)
    if tokenizer is None:
        raise LlmdropError(f"{config.model} has no tokenizer files; save the tokenizer next to the weights")
    log.info("loaded %s (%s, %d layers) in %.1fs", config.model, arch.family, len(model.get_submodule(arch.layers)),
             time.perf_counter() - started)
    return model, tokenizer, arch


def _tokenizer(where: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as err:  # transformers raises OSError, ValueError or its own types for missing files
        from .files import literal

        raise LlmdropError(f"could not load the tokenizer in {literal(where)} ({type(err).__name__}); save the "
                           "tokenizer next to the weights") from None


def _calibration(config: RunConfig, tokenizer, needs_bos: bool, skip: int = 0, samples: int | None = None):
    from .calibration import load_calibration

    return load_calibration(tokenizer, config.calibration, samples or config.samples, config.seq_len, bos=needs_bos,
                            skip=skip)


def _load_scores(config: RunConfig) -> Scores | None:
    return Scores.load(config.scores) if config.scores else None


def _size_rows(before: Footprint, after: Footprint) -> list[list]:
    return [["layers", before.layers, after.layers], ["parameters", before.params, after.params],
            ["KV-cache layers", before.kv_layers, after.kv_layers]]


def _source_bytes(where: Path | str) -> int:
    from .report import dir_bytes

    return dir_bytes(where) if isinstance(where, Path) else 0


def _size_row(base_bytes: int, folder: Path) -> list:
    from .report import dir_bytes, human_bytes

    return ["checkpoint size", human_bytes(base_bytes) if base_bytes else "n/a", human_bytes(dir_bytes(folder))]


def _save(model, tokenizer, choice: Choice, config: RunConfig, out: Path, rows: list[list], base_bytes: int,
          extra=None, dtype: str | None = None) -> Path:
    """Save the pruned model with scores.json and plan.json (and `extra(tmp)`'s files) into `out`, atomically, in
    `dtype` (None: `config.save_dtype`)."""
    from .checkpoint import save

    def finish(tmp: Path) -> None:
        rows.append(_size_row(base_bytes, tmp))
        write_provenance(tmp, choice)
        if extra is not None:
            extra(tmp)

    return save(model, tokenizer, out, overwrite=config.overwrite, finish=finish, dtype=dtype or config.save_dtype)


def _check_patch_tokens(config: RunConfig, model) -> None:
    """A linear patch needs at least hidden-size calibration tokens: checked before measuring, not after."""
    if config.patch == "linear":
        from .arch import arch_for
        from .patch import check_block_patch, check_tokens

        check_tokens(model, config.samples * config.seq_len)
        if config.plan is not None and config.plan.target == "block":
            check_block_patch(arch_for(model))


def _fit_patches(config: RunConfig, where: Path | str, model, tokenizer, arch, choice: Choice, cal):
    """With `patch` "linear": fit the choice's patches into the model about to be pruned; (model, fit info or None).

    An iterative choice has pruned `model` as it went, so then the patches are fitted on a fresh load of the model.
    """
    if config.patch != "linear":
        return model, None
    from .patch import applied_plan, fit_patches
    from .surgery import already_dropped

    gone = already_dropped(model, arch)
    plan = choice.plan
    if (set(plan.attn + plan.blocks) & set(gone.attn) or set(plan.mlp + plan.blocks) & set(gone.mlp)
            or plan.num_layers and len(model.get_submodule(arch.layers)) != plan.num_layers):
        model, tokenizer, arch = _load(config, where)
    if cal is None:
        cal = _calibration(config, tokenizer, arch.needs_bos)
    info = fit_patches(model, choice, cal, batch_size=config.batch_size, progress=config.progress)
    choice.plan = applied_plan(plan)  # patched blocks stay as layers: a patched attention and a dropped MLP
    return model, info


def _record_patches(model, info: dict | None, rows: list[list]) -> None:
    """The fit of the patches in the checkpoint's llmdrop record (which modules are patches is there already) and
    one report row."""
    if info is None:
        return
    from .patch import describe_patches
    from .pruned_model import CONFIG_KEY, PATCH_FITS

    record = getattr(model.config, CONFIG_KEY)
    record[PATCH_FITS] = [*record.get(PATCH_FITS, []), info]
    rows.append(["dropped modules replaced by", "", describe_patches(info)])


# ---------------------------------------------------------------- measure


def _measure_streamed(config: RunConfig, where: Path) -> Scores:
    from .arch import arch_for_config
    from .checkpoint import read_config
    from .stream import measure_streamed

    model_config = read_config(where)
    _check_seq_len(model_config, config)
    tokenizer = _tokenizer(where)
    cal = _calibration(config, tokenizer, arch_for_config(model_config).needs_bos)
    return measure_streamed(where, cal, dtype=config.dtype, batch_size=config.batch_size, residual=config.residual,
                            max_memory=config.max_memory, progress=config.progress, model_name=config.model)


def measure_model(config: RunConfig) -> Scores:
    """`llmdrop measure`: score every layer of `config.model` (in memory, or streamed with `config.stream`).

    With `window_size` the scores also hold every run of that many consecutive blocks (`Scores.best_window()`).
    With `shard` each rank measures its share and all get the same scores; only rank 0 writes `output`.
    An existing scores file at `output` is replaced, as any result JSON (a directory there is an error).
    """
    from .measure import measure

    _no_heal(config, "measure")
    out = _check_output(config, "file", overwrite=True)
    where = _resolve(config)
    if config.stream:
        scores = _measure_streamed(config, _local(config, where))
    else:
        model, tokenizer, arch = _load(config, where)
        cal = _calibration(config, tokenizer, arch.needs_bos)
        scores = measure(model, cal, batch_size=config.batch_size, residual=config.residual,
                         progress=config.progress and config.rank == 0, window_size=config.window_size,
                         model_name=config.model, shard=config.shard)
    if out is not None and config.rank == 0:
        scores.save(out)
        log.info("scores written to %s (%s tokens)", out, f"{scores.tokens:,}")
    return scores


# ---------------------------------------------------------------- drop


def _drop_streamed(config: RunConfig, spec: PlanSpec, scores: Scores | None, out: Path | None) -> RunResult:
    from .arch import dtype_bytes
    from .checkpoint import read_config
    from .pruned_model import record_of
    from .stream import drop_streamed

    src = _local(config, _resolve(config))
    model_config = read_config(src)
    num_layers = _num_layers(model_config)
    record = record_of(model_config)
    # A pruned checkpoint's dropped sublayers score cos 1.0: without this they would be picked again, a no-op (D26).
    gone = DropPlan(attn=list(record.get("attn", [])), mlp=list(record.get("mlp", [])), num_layers=num_layers)
    if scores is None:
        if spec.window:
            raise LlmdropError("{window} with {stream} plans from window scores: measure them with `llmdrop measure "
                               "--window N` and pass {scores}", params=["window", "stream", "scores"])
        scores = _measure_streamed(config, src)
    else:
        scores.check_model(num_layers, config.model)
    choice = choose_from_scores(scores, spec, gone if gone.size else None, model_config, dtype_bytes(config.dtype))
    log.info(describe(choice))
    if out is None:
        return RunResult(choice)
    rows = [["layers", num_layers, num_layers - len(choice.plan.blocks)]]
    base_bytes = _source_bytes(src)

    def finish(tmp: Path) -> None:
        rows.append(_size_row(base_bytes, tmp))
        write_provenance(tmp, choice)

    written = drop_streamed(src, choice.plan, out, overwrite=config.overwrite,
                            provenance=provenance(choice, config.model), finish=finish)
    return RunResult(choice, rows, written)


def drop(config: RunConfig) -> RunResult:
    """`llmdrop drop`: choose what `config.plan` asks for, remove it, save the smaller checkpoint to `output`.

    From a scores file or by measuring now (one-shot, iterative, window); with `stream` the checkpoint is written
    tensor by tensor and the model is never in memory. `dry_run` stops after the choice (RunResult.output None).
    """
    spec = _need_plan(config)
    _no_heal(config, "drop")
    out = None if config.dry_run else _check_output(config, "dir")
    scores = _load_scores(config)
    if config.stream:
        return _drop_streamed(config, spec, scores, out)
    where = _resolve(config)
    model, tokenizer, arch = _load(config, where)
    num_layers = len(model.get_submodule(arch.layers))
    if out is not None:
        _check_patch_tokens(config, model)
    cal = _calibration(config, tokenizer, arch.needs_bos) if spec.needs_calibration(scores, num_layers) else None
    before = footprint(model)
    choice = choose(model, spec, calibration=cal, scores=scores, batch_size=config.batch_size, patch=config.patch,
                    residual=config.residual, progress=config.progress, model_name=config.model)
    log.info(describe(choice))
    if out is None:
        return RunResult(choice)
    model, patches = _fit_patches(config, where, model, tokenizer, arch, choice, cal)
    rows = _size_rows(before, prune(model, choice, model_name=config.model))
    _record_patches(model, patches, rows)
    written = _save(model, tokenizer, choice, config, out, rows, _source_bytes(where))
    return RunResult(choice, rows, written)


# ---------------------------------------------------------------- run


def _heal_skip(config: RunConfig, bos: bool) -> int:
    """Tokens of the text source that the calibration and held-out chunks of `run` read: healing starts after them."""
    body = config.seq_len - 1 if bos else config.seq_len
    return (config.samples + config.ppl_samples) * body


def _heal_config(config: RunConfig, out: Path):
    """The HealConfig of `run --heal`: the pruned model (saved to `out`) learns from the unpruned `config.model` on
    the calibration text after what calibration and perplexity read; nothing is written before the end."""
    from .heal import HealConfig

    return HealConfig(student=str(out), teacher=config.model, output=str(out), tokens=config.heal,
                      overwrite=config.overwrite, seq_len=config.seq_len, calibration=config.calibration,
                      skip_tokens=_heal_skip(config, bos=False), save_every=None, dtype=config.dtype,
                      device=config.device, cache_dir=config.cache_dir, progress=config.progress)


def _healing_text(config: RunConfig, heal_config, tokenizer, bos: bool):
    """(heal_config with the exact skip for this family, the healing chunks), or a one-sentence error in `run`'s
    terms when the text ends before one chunk past the calibration and held-out chunks."""
    import dataclasses

    from .heal import healing_text

    heal_config = dataclasses.replace(heal_config, skip_tokens=_heal_skip(config, bos))
    try:
        return heal_config, healing_text(heal_config, tokenizer, bos)
    except LlmdropError as err:
        if "skip_tokens" not in err.params:
            raise
        from .files import literal

        raise LlmdropError(f"{{heal}} trains on the calibration text after the {heal_config.skip_tokens:,} tokens that "
                           f"the calibration and held-out chunks read, and {literal(config.calibration or 'builtin')} "
                           f"has less than one chunk of {config.seq_len} tokens beyond them; give more text with "
                           "{calibration} or lower {samples} or {ppl_samples}",
                           params=["heal", "calibration", "samples", "ppl_samples"]) from None


def run(config: RunConfig) -> RunResult:
    """`llmdrop run`: drop as `drop` does, with evidence before and after, and a report.

    Perplexity on `ppl_samples` held-out chunks (the text right after the calibration chunks), the `tasks` with
    lm-eval (first `limit` items), KV-cache bytes and decode speed (`bench`, the same run as a ratio to the unpruned
    model). With `heal`, the pruned model is then distilled from the unpruned one for that many tokens of the text
    after the calibration and held-out chunks (never on them), and perplexity and tasks are measured again. The
    output directory holds the checkpoint, scores.json, plan.json, eval.json (with tasks), report.md and
    similarity.png.
    """
    from .evaluate import evaluate_tasks, perplexity, primary_metric
    from .report import human_bytes

    spec = _need_plan(config)
    if config.stream:
        raise LlmdropError("`run` evaluates the model in memory before and after; use `drop` with {stream} for models "
                           "larger than memory", params=["stream"])
    out = None if config.dry_run else _check_output(config, "dir")
    heal_config = _heal_config(config, out) if out is not None and config.heal else None
    scores = _load_scores(config)
    where = _resolve(config)
    model, tokenizer, arch = _load(config, where)
    num_layers = len(model.get_submodule(arch.layers))
    if not config.dry_run:
        _check_patch_tokens(config, model)
    cal = _calibration(config, tokenizer, arch.needs_bos) if spec.needs_calibration(scores, num_layers) else None
    choose_args = dict(calibration=cal, scores=scores, batch_size=config.batch_size, residual=config.residual,
                       progress=config.progress, model_name=config.model, patch=config.patch)
    if config.dry_run:
        choice = choose(model, spec, **choose_args)
        log.info(describe(choice))
        return RunResult(choice)
    # All text is read before any slow pass: too little for the held-out chunks (or the healing text after them)
    # fails now, not after measuring.
    heldout = _calibration(config, tokenizer, arch.needs_bos, skip=config.samples, samples=config.ppl_samples)
    heal_chunks = None
    if heal_config is not None:
        heal_config, heal_chunks = _healing_text(config, heal_config, tokenizer, arch.needs_bos)
    before = footprint(model)
    ppl_before = perplexity(model, heldout, config.batch_size, progress=config.progress)
    evals: dict = {}
    task_args = dict(limit=config.limit, data=config.data, bos=arch.needs_bos, progress=config.progress)
    if config.tasks:
        evals["before"] = evaluate_tasks(model, tokenizer, list(config.tasks), **task_args)
    # The unpruned model: the teacher of healing, and the reference for speed in the same run.
    base_copy = copy.deepcopy(model) if config.bench or heal_config is not None else None
    choice = choose(model, spec, **choose_args)  # iterative choices prune `model` as they go: evaluate before
    log.info(describe(choice))
    model, patches = _fit_patches(config, where, model, tokenizer, arch, choice, cal)
    rows = _size_rows(before, prune(model, choice, model_name=config.model))
    _record_patches(model, patches, rows)
    ppl_after = perplexity(model, heldout, config.batch_size, progress=config.progress)
    rows.append([f"perplexity ({ppl_after['tokens']:,} held-out tokens)", ppl_before["perplexity"],
                 ppl_after["perplexity"]])

    def task_rows(after: str, suffix: str = "") -> None:
        for name, result in evals["before"]["tasks"].items():
            metric = primary_metric(result["metrics"])
            rows.append([f"{name} {metric} ({result['n']} items){suffix}", result["metrics"][metric],
                         evals[after]["tasks"][name]["metrics"][metric]])

    if config.tasks:
        evals["after"] = evaluate_tasks(model, tokenizer, list(config.tasks), **task_args)
        task_rows("after")
    rows += kv_rows(choice, ppl_before["perplexity"], ppl_after["perplexity"], evals)  # KV freed, per quality lost
    healed = heal_entry = None
    if heal_config is not None:
        from .heal import distill, record_heal

        model, healed = distill(model, base_copy, heal_chunks, heal_config)
        healed.output = out
        heal_entry = record_heal(model, heal_config, healed)
        ppl_healed = perplexity(model, heldout, config.batch_size, progress=config.progress)
        rows.append(["perplexity after healing", ppl_before["perplexity"], ppl_healed["perplexity"]])
        if config.tasks:
            evals["healed"] = evaluate_tasks(model, tokenizer, list(config.tasks), **task_args)
            task_rows("healed", " after healing")
        rows.append(["healing", "", f"{healed.tokens:,} tokens, {healed.seconds:.0f}s, "
                                    f"{healed.tokens_per_s:.0f} tokens/s"])
        log.info("healed in %.0fs (%.0f tokens/s): KL to the unpruned model %.4f -> %.4f; perplexity %.3f -> %.3f",
                 healed.seconds, healed.tokens_per_s, healed.first_kl, healed.last_kl, ppl_after["perplexity"],
                 ppl_healed["perplexity"])
    if config.bench:
        from .bench import decode_speed_ratio

        context = min(config.seq_len, 512)
        ratio, kv_after, kv_before = decode_speed_ratio(model, base_copy, context, 32, 3)
        rows.append([f"KV cache at {context} tokens", human_bytes(kv_before), human_bytes(kv_after)])
        rows.append(["decode tokens/s (x base, median of 3)", 1.0, ratio])
    del base_copy

    def report(tmp: Path) -> None:
        from .files import write_json
        from .plots import plot_similarity
        from .report import run_report, table

        plot_similarity(choice.scores, tmp / "similarity.png")
        if evals:
            write_json(tmp / "eval.json", evals)
        (tmp / "report.md").write_text(run_report(config.model, choice,
                                                  table(list(RunResult.HEADERS), rows, markdown=True),
                                                  heal=heal_entry))

    # A heal is saved in its training precision unless asked otherwise: rounding to bfloat16 undoes most of a short
    # heal (heal.HealConfig).
    dtype = (config.save_dtype or heal_config.dtype) if heal_config is not None else None
    written = _save(model, tokenizer, choice, config, out, rows, _source_bytes(where), extra=report, dtype=dtype)
    return RunResult(choice, rows, written)
