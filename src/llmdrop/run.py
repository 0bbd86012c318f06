"""The jobs behind `llmdrop measure`, `llmdrop drop` and `llmdrop run`, callable from Python.

    from llmdrop.configs import PlanSpec, RunConfig
    from llmdrop.run import run
    result = run(RunConfig("smollm2-135m", plan=PlanSpec("attn", n=8), output="out/"))
    print(result.table())

A RunConfig is validated when built, and every job checks its output location and its inputs (scores file, sequence
length against the model's positions) before the slow work, so a mistake costs seconds, not a measurement.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers import AutoTokenizer

from .arch import Arch, arch_for, arch_for_config, check_positions, dtype_bytes, text_config
from .bench import decode_speed_ratios
from .calibration import Calibration, load_calibration
from .checkpoint import read_config, save
from .choice import Choice
from .configs import HealConfig, PlanSpec, RunConfig
from .criteria.cosine import choose_from_scores
from .errors import LlmdropError
from .evaluate import evaluate_tasks, perplexity
from .files import check_output, literal, write_json
from .heal import distill, healing_text, record_heal
from .measure import Scores, measure
from .models import load_model, resolve
from .patches import PATCHES
from .pipeline import Footprint, choose, footprint, provenance, prune, write_provenance
from .plan import DropPlan
from .plots import plot_similarity
from .pruned_model import PATCH_FITS, record_of
from .report import describe, dir_bytes, human_bytes, kv_rows, plan_table, primary_metric, run_report, table
from .stream import drop_streamed, empty_model, measure_streamed
from .surgery import already_dropped

log = logging.getLogger("llmdrop")

NOTHING = "nothing (the paper)"  # what stands where a module was dropped with patch zero


@dataclass
class RunResult:
    """What a drop or run did: the choice, the before/after rows (under `headers`: a label, before, after, and with
    `run`'s comparison one column per other patch kind) and where the checkpoint went (None for a dry run)."""

    HEADERS: ClassVar[tuple[str, str, str]] = ("", "before", "after")

    choice: Choice
    rows: list[list] = field(default_factory=list)
    output: Path | None = None
    headers: tuple[str, ...] = HEADERS

    def table(self, markdown: bool = False) -> str:
        return table(list(self.headers), self.rows, markdown=markdown)

    def summary(self) -> str:
        """The plan, its table and, once saved, the before / after rows and where the checkpoint went."""
        lines = [describe(self.choice), plan_table(self.choice)]
        if self.output is not None:  # a dry run: the plan is all there is
            lines += [self.table()] if self.rows else []
            report = self.output / "report.md"
            lines.append(f"saved to {self.output}" + (f" (report: {report})" if report.exists() else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------- shared steps


def _checked(config: Any, job: str, needs_plan: bool = False) -> RunConfig:
    if not isinstance(config, RunConfig):
        raise LlmdropError(f"{job} takes a RunConfig (llmdrop.RunConfig(model, plan=PlanSpec(...), ...)), not "
                           f"{literal(type(config).__name__)}")
    if needs_plan and config.plan is None:
        raise LlmdropError("say what to drop: {target} and {n} or {ratio}", params=["target", "n", "ratio"])
    if job != "run" and config.heal is not None:
        raise LlmdropError(f"{{heal}} is part of `run`, not `{job}`: heal the checkpoint {job} writes with `llmdrop "
                           "heal`, or use `run`", params=["heal"])
    return config


def _check_output(config: RunConfig, kind: str, overwrite: bool | None = None) -> Path | None:
    if not config.output:
        return None
    return check_output(config.output, config.overwrite if overwrite is None else overwrite, kind=kind)


def _resolve(config: RunConfig) -> Path | str:
    return resolve(config.model, progress=config.progress, cache_dir=config.cache_dir)


def _local(config: RunConfig, where: Path | str) -> Path:
    """The checkpoint directory the streamed jobs read tensor by tensor."""
    if not isinstance(where, Path):
        raise LlmdropError(f"{{stream}} reads a local checkpoint directory (or an alias / .gguf, converted first), "
                           f"not the hub id {literal(config.model)}; download it first", params=["stream"])
    return where


def _load(config: RunConfig, where: Path | str) -> tuple[Any, Any, Arch]:
    """(model, tokenizer, arch), with the sequence length checked against the config before the weights load."""
    if isinstance(where, Path):
        # Positions past the trained range are measured as if valid, silently: refuse them before loading.
        check_positions(read_config(where), config.seq_len, "seq_len")
    started = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device, progress=config.progress,
                                  cache_dir=config.cache_dir)
    check_positions(model.config, config.seq_len, "seq_len")  # a hub model's config is known only now
    arch = arch_for(model)
    if tokenizer is None:
        raise LlmdropError(f"{literal(config.model)} has no tokenizer files; save the tokenizer next to the weights")
    log.info("loaded %s (%s, %d layers) in %.1fs", config.model, arch.family, len(model.get_submodule(arch.layers)),
             time.perf_counter() - started)
    return model, tokenizer, arch


def _tokenizer(where: Path):
    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as err:  # transformers raises OSError, ValueError or its own types for missing files
        raise LlmdropError(f"could not load the tokenizer in {literal(where)} ({type(err).__name__}); save the "
                           "tokenizer next to the weights") from None


def _calibration(config: RunConfig, tokenizer, needs_bos: bool, skip: int = 0,
                 samples: int | None = None) -> Calibration:
    return load_calibration(tokenizer, config.calibration, samples or config.samples, config.seq_len, bos=needs_bos,
                            skip=skip)


def _load_scores(config: RunConfig) -> Scores | None:
    return Scores.load(config.scores) if config.scores else None


def _size_rows(before: Footprint, after: Footprint) -> list[list]:
    return [["layers", before.layers, after.layers], ["parameters", before.params, after.params],
            ["KV-cache layers", before.kv_layers, after.kv_layers]]


def _source_bytes(where: Path | str) -> int:
    return dir_bytes(where) if isinstance(where, Path) else 0


def _size_row(base_bytes: int, folder: Path) -> list:
    return ["checkpoint size", human_bytes(base_bytes) if base_bytes else "n/a", human_bytes(dir_bytes(folder))]


def _save(model, tokenizer, choice: Choice, config: RunConfig, out: Path, rows: list[list], base_bytes: int,
          extra=None, dtype: str | None = None) -> Path:
    """Save the pruned model with scores.json and plan.json (and `extra(tmp)`'s files) into `out`, atomically, in
    `dtype` (None: `config.save_dtype`)."""

    def finish(tmp: Path) -> None:
        row = _size_row(base_bytes, tmp)
        rows.append(row + [""] * (len(rows[0]) - len(row) if rows else 0))  # no size for the models compared
        write_provenance(tmp, choice)
        if extra is not None:
            extra(tmp)

    return save(model, tokenizer, out, overwrite=config.overwrite, finish=finish, dtype=dtype or config.save_dtype)


def _check_patch(config: RunConfig, model, arch: Arch) -> None:
    """What the patch kind needs of the model and the text (a linear patch: at least hidden-size calibration tokens),
    checked before measuring, not after."""
    kind = PATCHES[config.patch]
    if kind.fits:
        kind.implementation().check_model(model, arch, config.plan.target if config.plan else None,
                                          config.samples * config.seq_len)


def _prune(config: RunConfig, where: Path | str, model, tokenizer, arch: Arch, choice: Choice,
           cal: Calibration | None) -> tuple[Any, list[list]]:
    """Prune `model` as the choice says, with `config.patch` standing in (pipeline.prune); (the pruned model, report
    rows). A patch is fitted on the model with the chosen modules in place: an iterative choice has pruned `model`
    as it went, so then a fresh load is pruned instead."""
    if PATCHES[config.patch].fits:
        gone, plan = already_dropped(model, arch), choice.plan
        if (set(plan.attn + plan.blocks) & set(gone.attn) or set(plan.mlp + plan.blocks) & set(gone.mlp)
                or plan.num_layers and len(model.get_submodule(arch.layers)) != plan.num_layers):
            model, tokenizer, arch = _load(config, where)
        if cal is None:
            cal = _calibration(config, tokenizer, arch.needs_bos)
    before = footprint(model, arch)
    after = prune(model, choice, config.model, patch=config.patch, calibration=cal, batch_size=config.batch_size,
                  progress=config.progress, arch=arch)
    rows = _size_rows(before, after)
    if choice.patch_fit is not None:
        rows.append(["dropped modules replaced by", "", PATCHES[config.patch].implementation().describe(choice.patch_fit)])
    return model, rows


# ---------------------------------------------------------------- measure


def _measure_streamed(config: RunConfig, where: Path) -> Scores:
    model_config = read_config(where)
    check_positions(model_config, config.seq_len, "seq_len")
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
    config = _checked(config, "measure")
    out = _check_output(config, "file", overwrite=True)
    where = _resolve(config)
    if config.stream:
        scores = _measure_streamed(config, _local(config, where))
    else:
        model, tokenizer, arch = _load(config, where)
        cal = _calibration(config, tokenizer, arch.needs_bos)
        scores = measure(model, cal, batch_size=config.batch_size, residual=config.residual,
                         progress=config.progress and config.rank == 0, window_size=config.window_size,
                         model_name=config.model, shard=config.shard, arch=arch)
    if out is not None and config.rank == 0:
        scores.save(out)
        log.info("scores written to %s (%s tokens)", out, f"{scores.tokens:,}")
    return scores


# ---------------------------------------------------------------- drop


def _streamed_patches(config: RunConfig, src: Path, choice: Choice, model_config) -> tuple[dict, dict | None]:
    """Fit `config.patch` on the checkpoint at `src`, one layer in memory (patches.linear.fit_streamed): (the
    weights drop_streamed writes, the provenance to record). The choice's plan becomes the plan as applied."""
    impl = PATCHES[config.patch].implementation()
    check_positions(model_config, config.seq_len, "seq_len")
    cal = _calibration(config, _tokenizer(src), arch_for_config(model_config).needs_bos)
    weights, choice.patch_fit = impl.fit_streamed(src, choice.plan, cal, dtype=config.dtype,
                                                  batch_size=config.batch_size, max_memory=config.max_memory,
                                                  progress=config.progress)
    choice.plan = impl.applied_plan(choice.plan)
    record = provenance(choice, config.model)
    # As pipeline.prune records it: this fit after those of the patches the source already carries.
    record[PATCH_FITS] = [*record_of(model_config).get(PATCH_FITS, []), choice.patch_fit]
    return weights, record


def _drop_streamed(config: RunConfig, spec: PlanSpec, scores: Scores | None, out: Path | None) -> RunResult:
    src = _local(config, _resolve(config))
    model_config = read_config(src)
    num_layers = int(text_config(model_config).num_hidden_layers)
    record = record_of(model_config)
    kind = PATCHES[config.patch]
    if kind.fits and out is not None:  # before measuring: enough tokens, a family that can carry the patches
        skeleton = empty_model(src)
        kind.implementation().check_model(skeleton, arch_for(skeleton), spec.target, config.samples * config.seq_len)
    # A pruned checkpoint's dropped sublayers score cos 1.0: without this they would be picked again, a no-op.
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
    weights, made = _streamed_patches(config, src, choice, model_config) if kind.fits else (None, None)
    rows = [["layers", num_layers, num_layers - len(choice.plan.blocks)]]
    if choice.patch_fit is not None:
        rows.append(["dropped modules replaced by", "", kind.implementation().describe(choice.patch_fit)])
    base_bytes = _source_bytes(src)

    def finish(tmp: Path) -> None:
        rows.append(_size_row(base_bytes, tmp))
        write_provenance(tmp, choice)

    written = drop_streamed(src, choice.plan, out, overwrite=config.overwrite,
                            provenance=made or provenance(choice, config.model), finish=finish, patches=weights)
    return RunResult(choice, rows, written)


def drop(config: RunConfig) -> RunResult:
    """`llmdrop drop`: choose what `config.plan` asks for, remove it, save the smaller checkpoint to `output`.

    From a scores file or by measuring now (one-shot, iterative, window); with `stream` the checkpoint is written
    tensor by tensor and the model is never in memory. `dry_run` stops after the choice (RunResult.output None).
    """
    spec = _checked(config, "drop", needs_plan=True).plan
    out = None if config.dry_run else _check_output(config, "dir")
    scores = _load_scores(config)
    if config.stream:
        return _drop_streamed(config, spec, scores, out)
    where = _resolve(config)
    model, tokenizer, arch = _load(config, where)
    num_layers = len(model.get_submodule(arch.layers))
    if out is not None:
        _check_patch(config, model, arch)
    cal = _calibration(config, tokenizer, arch.needs_bos) if spec.needs_calibration(scores, num_layers) else None
    choice = choose(model, spec, calibration=cal, scores=scores, batch_size=config.batch_size, patch=config.patch,
                    residual=config.residual, progress=config.progress, model_name=config.model, arch=arch)
    log.info(describe(choice))
    if out is None:
        return RunResult(choice)
    model, rows = _prune(config, where, model, tokenizer, arch, choice, cal)
    written = _save(model, tokenizer, choice, config, out, rows, _source_bytes(where))
    return RunResult(choice, rows, written)


# ---------------------------------------------------------------- run


def _heal_skip(config: RunConfig, bos: bool) -> int:
    """Tokens of the text source that the calibration and held-out chunks of `run` read: healing starts after them."""
    body = config.seq_len - 1 if bos else config.seq_len
    return (config.samples + config.ppl_samples) * body


def _heal_config(config: RunConfig, out: Path) -> HealConfig:
    """The HealConfig of `run --heal`: the pruned model (saved to `out`) learns from the unpruned `config.model` on
    the calibration text after what calibration and perplexity read; nothing is written before the end."""
    return HealConfig(student=str(out), teacher=config.model, output=str(out), tokens=config.heal,
                      overwrite=config.overwrite, seq_len=config.seq_len, calibration=config.calibration,
                      skip_tokens=_heal_skip(config, bos=False), save_every=None, dtype=config.dtype,
                      device=config.device, cache_dir=config.cache_dir, progress=config.progress)


def _healing_text(config: RunConfig, heal_config: HealConfig, tokenizer, bos: bool):
    """(heal_config with the exact skip for this family, the healing chunks), or a one-sentence error in `run`'s
    terms when the text ends before one chunk past the calibration and held-out chunks."""
    heal_config = dataclasses.replace(heal_config, skip_tokens=_heal_skip(config, bos))
    try:
        return heal_config, healing_text(heal_config, tokenizer, bos)
    except LlmdropError as err:
        if "skip_tokens" not in err.params:
            raise
        raise LlmdropError(f"{{heal}} trains on the calibration text after the {heal_config.skip_tokens:,} tokens that "
                           f"the calibration and held-out chunks read, and {literal(config.calibration or 'builtin')} "
                           f"has less than one chunk of {config.seq_len} tokens beyond them; give more text with "
                           "{calibration} or lower {samples} or {ppl_samples}",
                           params=["heal", "calibration", "samples", "ppl_samples"]) from None


class _Evidence:
    """The before / after rows of `run`: perplexity on the held-out chunks and the tasks, each time the model is
    measured (before, after, after healing)."""

    def __init__(self, config: RunConfig, tokenizer, arch: Arch, heldout: Calibration):
        self.config, self.tokenizer, self.arch, self.heldout = config, tokenizer, arch, heldout
        self.ppl: dict[str, float] = {}
        self.tasks: dict[str, dict] = {}

    def measure(self, model, when: str) -> dict:
        config = self.config
        result = perplexity(model, self.heldout, config.batch_size, progress=config.progress)
        self.ppl[when] = result["perplexity"]
        if config.tasks:
            self.tasks[when] = evaluate_tasks(model, self.tokenizer, list(config.tasks), limit=config.limit,
                                              data=config.data, bos=self.arch.needs_bos, progress=config.progress)
        return result

    def task_rows(self, when: str, suffix: str = "") -> list[list]:
        rows = []
        for name, result in self.tasks.get("before", {}).get("tasks", {}).items():
            metric = primary_metric(result["metrics"])
            rows.append([f"{name} {metric} ({result['n']} items){suffix}", result["metrics"][metric],
                         self.tasks[when]["tasks"][name]["metrics"][metric]])
        return rows


def _heal_rows(model, base, chunks, heal_config: HealConfig, evidence: _Evidence, out: Path):
    """Distil the pruned `model` from the unpruned `base` and measure it again: (healed model, rows, heal record)."""
    model, healed = distill(model, base, chunks, heal_config)
    healed.output = out
    entry = record_heal(model, heal_config, healed)
    evidence.measure(model, "healed")
    rows = [["perplexity after healing", evidence.ppl["before"], evidence.ppl["healed"]],
            *evidence.task_rows("healed", " after healing"),
            ["healing", "", f"{healed.tokens:,} tokens, {healed.seconds:.0f}s, {healed.tokens_per_s:.0f} tokens/s"]]
    log.info("healed in %.0fs (%.0f tokens/s): KL to the unpruned model %.4f -> %.4f; perplexity %.3f -> %.3f",
             healed.seconds, healed.tokens_per_s, healed.first_kl, healed.last_kl, evidence.ppl["after"],
             evidence.ppl["healed"])
    return model, rows, entry


def _speed_rows(models: list, base, config: RunConfig) -> list[list]:
    """KV cache and decode speed of the pruned models (the chosen one, then the others compared) against the unpruned
    one, in the same interleaved run."""
    context = min(config.seq_len, 512)
    measured, kv_before = decode_speed_ratios(models, base, context, 32, 3)
    return [[f"KV cache at {context} tokens", human_bytes(kv_before), *(human_bytes(kv) for _, kv in measured)],
            ["decode tokens/s (x base, median of 3)", 1.0, *(ratio for ratio, _ in measured)]]


def _alternatives(config: RunConfig, model, arch: Arch) -> list[str]:
    """The other patch kinds `run` shows beside the chosen one: those this model and text can carry."""
    kinds = []
    for kind, row in PATCHES.items() if config.compare else ():
        try:
            if kind != config.patch and row.fits:
                row.implementation().check_model(model, arch, config.plan.target, config.samples * config.seq_len)
        except LlmdropError as err:
            log.info("not comparing --patch %s: %s", kind, err.render())
            continue
        if kind != config.patch:
            kinds.append(kind)
    return kinds


def _alternative(config: RunConfig, base, choice: Choice, plan: DropPlan, kind: str, cal: Calibration | None,
                 tokenizer, arch: Arch, evidence: _Evidence) -> tuple[Any, dict]:
    """A copy of the unpruned model pruned by the same plan with patch `kind` instead: (the model, {row label: its
    value}) for the rows it shares with the chosen model."""
    model = copy.deepcopy(base)
    other = dataclasses.replace(choice, plan=plan, patch_fit=None)
    if PATCHES[kind].fits and cal is None:
        cal = _calibration(config, tokenizer, arch.needs_bos)
    after = prune(model, other, config.model, patch=kind, calibration=cal, batch_size=config.batch_size,
                  progress=config.progress, arch=arch)
    ppl = perplexity(model, evidence.heldout, config.batch_size, progress=config.progress)
    replaced = PATCHES[kind].implementation().describe(other.patch_fit) if other.patch_fit is not None else NOTHING
    return model, {"layers": after.layers, "parameters": after.params, "KV-cache layers": after.kv_layers,
                   f"perplexity ({ppl['tokens']:,} held-out tokens)": ppl["perplexity"],
                   "dropped modules replaced by": replaced}


def _report_files(config: RunConfig, choice: Choice, rows: list[list], headers: tuple[str, ...], evals: dict,
                  heal_entry: dict | None):
    """What `run` adds to the checkpoint directory: similarity.png, eval.json (with tasks) and report.md."""

    def write(tmp: Path) -> None:
        plot_similarity(choice.scores, tmp / "similarity.png")
        if evals:
            write_json(tmp / "eval.json", evals)
        (tmp / "report.md").write_text(run_report(config.model, choice,
                                                  table(list(headers), rows, markdown=True),
                                                  heal=heal_entry))

    return write


def run(config: RunConfig) -> RunResult:
    """`llmdrop run`: drop as `drop` does, with evidence before and after, and a report.

    Perplexity on `ppl_samples` held-out chunks (the text right after the calibration chunks), the `tasks` with
    lm-eval (first `limit` items), KV-cache bytes and decode speed (`bench`, the same run as a ratio to the unpruned
    model). With `heal`, the pruned model is then distilled from the unpruned one for that many tokens of the text
    after the calibration and held-out chunks (never on them), and perplexity and tasks are measured again. The
    output directory holds the checkpoint, scores.json, plan.json, eval.json (with tasks), report.md and
    similarity.png.
    """
    spec = _checked(config, "run", needs_plan=True).plan
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
        _check_patch(config, model, arch)
    cal = _calibration(config, tokenizer, arch.needs_bos) if spec.needs_calibration(scores, num_layers) else None
    choose_args = dict(calibration=cal, scores=scores, batch_size=config.batch_size, residual=config.residual,
                       progress=config.progress, model_name=config.model, patch=config.patch, arch=arch)
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
    evidence = _Evidence(config, tokenizer, arch, heldout)
    evidence.measure(model, "before")
    others = _alternatives(config, model, arch)
    # The unpruned model: the teacher of healing, the reference for speed in the same run, and what the other patch
    # kinds are compared on.
    base = copy.deepcopy(model) if config.bench or heal_config is not None or others else None
    choice = choose(model, spec, **choose_args)  # iterative choices prune `model` as they go: evaluate before
    log.info(describe(choice))
    plan = choice.plan  # as chosen: pruning with a patch makes it the plan as applied
    model, rows = _prune(config, where, model, tokenizer, arch, choice, cal)
    if others and choice.patch_fit is None:  # the row the compared patches fill
        rows.append(["dropped modules replaced by", "", NOTHING])
    after = evidence.measure(model, "after")
    rows += [[f"perplexity ({after['tokens']:,} held-out tokens)", evidence.ppl["before"], evidence.ppl["after"]],
             *evidence.task_rows("after"), *kv_rows(choice, evidence.ppl["before"], evidence.ppl["after"],
                                                    evidence.tasks)]
    compared = [_alternative(config, base, choice, plan, kind, cal, tokenizer, arch, evidence) for kind in others]
    heal_entry = None
    if heal_config is not None:
        model, healed_rows, heal_entry = _heal_rows(model, base, heal_chunks, heal_config, evidence, out)
        rows += healed_rows
    if config.bench:
        speed = _speed_rows([model, *(m for m, _ in compared)], base, config)
        for row in speed:  # the compared models' speed goes to their own columns
            for (_, values), value in zip(compared, row[3:]):
                values[row[0]] = value
        rows += [row[:3] for row in speed]
    del base
    headers = RunResult.HEADERS
    if compared:
        headers = ("", "before", f"after (--patch {config.patch}, saved)", *(f"--patch {k}" for k in others))
        rows = [[*row, *(values.get(row[0], "") for _, values in compared)] for row in rows]
    # A heal is saved in its training precision unless asked otherwise: rounding to bfloat16 undoes most of a short
    # heal (configs.HealConfig).
    dtype = (config.save_dtype or heal_config.dtype) if heal_config is not None else None
    written = _save(model, tokenizer, choice, config, out, rows, _source_bytes(where),
                    extra=_report_files(config, choice, rows, headers, evidence.tasks, heal_entry), dtype=dtype)
    return RunResult(choice, rows, written, headers)
