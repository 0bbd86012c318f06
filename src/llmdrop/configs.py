"""What each job takes, declared once: the job configs, whose fields are Options (options.py).

A config checks every field when it is built (each by its Option) and then the rules between fields; the command
line builds its flags from the same fields (cli.py). Torch-free, so `llmdrop --help` stays fast.

    from llmdrop.configs import PlanSpec, RunConfig
    RunConfig("smollm2-135m", plan=PlanSpec("attn", n=8), output="out/")
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any

from . import options as o
from .criteria import CRITERIA, check_spec
from .errors import LlmdropError
from .export.families import OUTTYPES
from .files import literal
from .options import Checked, Option, opt
from .patches import PATCHES, check_options, patch_help
from .plan import KV_TARGETS, OBJECTIVES, count_for, parse_protect

# The context (tokens) at which KV savings are computed when none is given, or the model's own limit if shorter.
KV_CONTEXT = 8192
# The trade-off `objective` kv uses when none is given: similarity lost per KV byte freed (see plan.kv_cost).
KV_WEIGHT = 1.0


# ---- options that read the tables (criteria, patches) ----------------------------------------------------------------

CRITERION = Option("how modules are ranked: " + "; ".join(f"{name}: {row.help}" for name, row in CRITERIA.items()),
                   choices=tuple(CRITERIA), group="what to drop")
CANDIDATES = Option("with --criterion loss: score only the M modules with the highest cosine (bounds the cost)",
                    check=lambda v, p: o.count(v, p, optional=True, what="a number of modules"), parse=o.whole(1),
                    metavar="M", group="what to drop", default_help="every module")
PATCH = Option(patch_help(), choices=tuple(PATCHES), group="what to drop")
ITERATIVE = Option("re-measure after each drop (slower, n passes)", group="what to drop")


# ---- what to drop ------------------------------------------------------------------------------------------------------

def _n(value: Any, param: str) -> int | None:
    if value is not None and (not o.is_int(value) or value < 1):
        raise LlmdropError(f"nothing to drop: {{{param}}} must be at least 1 (got {literal(repr(value))})", params=[param])
    return value


def _ratio(value: Any, param: str) -> float | None:
    if value is not None and (not o.is_number(value) or not 0 < value < 1):
        raise LlmdropError(f"{{{param}}} must be between 0 and 1, got {literal(repr(value))}", params=[param])
    return value


def _protect(value: Any, param: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = parse_protect(value)
    try:
        layers = tuple(value)
    except TypeError:  # one index alone: a list of one is what was meant, but say so rather than guess
        layers = None
    if layers is None or not all(o.is_int(p) and p >= 0 for p in layers):
        shown = literal(repr(value) if layers is None else list(layers))
        raise LlmdropError(f"{{{param}}} takes layer indices (non-negative integers), not {shown}", params=[param])
    return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class PlanSpec(Checked):
    """What to drop: `target`, exactly one of `n` (modules) or `ratio` (a fraction of the target's modules), layers
    to `protect`, and the strategy: one-shot (default), `iterative` (re-measure after each drop) or `window` (the
    best run of n consecutive blocks). `criterion` is a row of criteria.CRITERIA: cosine similarity (the paper) or
    `loss`, the calibration loss increase when the module alone is removed (iterative: greedy, SLEB-style), whose
    `candidates` bounds its cost to the M most similar modules by cosine.

    `objective` "quality" ranks by the criterion alone; "kv" trades cosine against the KV-cache bytes each removal
    frees at `kv_context` tokens: modules go lowest ``(1 - cos) / kv_bytes_saved ** kv_weight`` first (plan.kv_cost;
    weight 0 is the quality ranking exactly, 1 the similarity lost per byte freed). It matters where layers hold
    different caches: Gemma's full-attention layers hold the whole context, its sliding-window layers at most a
    window. Attention and block targets only (an MLP holds no cache). Validated when built."""

    target: str = Option("attention sublayers, MLP sublayers, whole blocks, or attention and MLP pooled (joint)",
                         choices=o.TARGETS, group="what to drop")()
    n: int | None = opt(None, "how many modules to drop", check=_n, parse=o.whole(1), metavar="N", group="what to drop",
                        one_of="count")
    ratio: float | None = opt(None, "fraction of the target's modules to drop, 0 < R < 1 (joint: of 2 x layers)",
                              check=_ratio, parse=o.real, metavar="R", group="what to drop", one_of="count")
    protect: tuple[int, ...] = opt((), "layer indices never to drop, e.g. 0,1,29 or 0-3 (low-high)", check=_protect,
                                   metavar="LAYERS", group="what to drop")
    iterative: bool = ITERATIVE(False)
    window: bool = opt(False, "drop the best run of n consecutive blocks (max cos(h_i, h_i+n)); needs --target block",
                       group="what to drop")
    criterion: str = CRITERION("cosine")
    candidates: int | None = CANDIDATES(None)
    objective: str = opt("quality", "quality: rank by similarity alone; kv: trade similarity against the KV cache each "
                         "drop frees at --kv-context tokens, lowest (1 - cos) / bytes^W first (Gemma's full-attention "
                         "layers free far more than its sliding-window ones); attn or block targets",
                         choices=OBJECTIVES, group="what to drop")
    kv_context: int | None = opt(None, "context at which KV bytes are counted",
                                 check=lambda v, p: o.count(v, p, optional=True, what="a number of tokens"),
                                 parse=o.whole(1), metavar="TOKENS", group="what to drop",
                                 default_help=f"{KV_CONTEXT}, or the model's limit if shorter")
    kv_weight: float | None = opt(None, "with --objective kv: 0 = the quality ranking, 1 = similarity lost per byte "
                                  "freed", check=lambda v, p: o.number(v, p, low=0, optional=True), parse=o.real,
                                  metavar="W", group="what to drop", default_help=f"{KV_WEIGHT:g}")

    def _check(self) -> None:
        if (self.n is None) == (self.ratio is None):
            raise LlmdropError("give exactly one of {n} (how many modules) or {ratio} (which fraction)",
                               params=["n", "ratio"])
        if self.window and self.target != "block":
            raise LlmdropError("{window} drops consecutive blocks: use it with {target} block", params=["window", "target"])
        if self.iterative and self.window:
            raise LlmdropError("choose one of {iterative} and {window}", params=["iterative", "window"])
        check_spec(self, self.n)
        if self.objective == "quality":
            if self.kv_weight is not None:
                raise LlmdropError("{kv_weight} trades similarity against KV bytes: use it with {objective} kv",
                                   params=["kv_weight", "objective"])
            return
        if self.target not in KV_TARGETS:
            raise LlmdropError(f"{{objective}} kv ranks modules by the KV cache their removal frees and MLP sublayers "
                               f"hold none: use {{target}} attn or block, not {self.target}", params=["objective", "target"])
        if self.window:
            raise LlmdropError("{window} ranks runs of blocks by cosine only: drop {window} or {objective} kv",
                               params=["window", "objective"])
        object.__setattr__(self, "kv_weight", float(KV_WEIGHT if self.kv_weight is None else self.kv_weight))

    @property
    def weight(self) -> float:
        """The KV weight the ranking uses: 0 for the quality objective."""
        return self.kv_weight if self.objective == "kv" and self.kv_weight is not None else 0.0

    @property
    def method(self) -> str:
        return "iterative" if self.iterative else "window" if self.window else "one-shot"

    def count(self, num_layers: int) -> int:
        """How many modules this spec drops from a model with `num_layers` layers."""
        return count_for(self.target, num_layers, self.n, self.ratio)

    def check_candidates(self, k: int) -> None:
        """The criterion's rules for dropping k modules (a one-shot loss plan must measure at least k)."""
        check_spec(self, k)

    def needs_calibration(self, scores: Any, num_layers: int) -> bool:
        """Whether choosing needs calibration text: no scores, iterative, a criterion that runs the model, or a
        window that the given scores do not hold."""
        if scores is None or self.iterative or CRITERIA[self.criterion].needs_text:
            return True
        k = self.count(num_layers)
        return self.window and not (scores.window is not None and scores.window["n"] == k)


def _plan(value: Any, param: str) -> PlanSpec | None:
    if value is not None and not isinstance(value, PlanSpec):
        raise LlmdropError(f"{{{param}}} must be a PlanSpec, not {type(value).__name__}", params=[param])
    return value


# ---- measure, drop, run ------------------------------------------------------------------------------------------------

@dataclass
class RunConfig(Checked):
    """Everything one measure / drop / run job needs; each field's help says what it does. Checked when built.

    `plan` says what to drop (drop and run). `output` is the scores JSON (measure) or the checkpoint directory (drop,
    run; required unless `dry_run`). `stream` holds one layer at a time (measure, and drop from a scores file or a
    streamed measurement). `ppl_samples`, `tasks`, `limit`, `data` and `bench` shape the before/after evidence of
    `run`; `heal` (run only) distils the pruned model from the unpruned one afterwards (heal.py). `shard=(rank,
    world)` measures data-parallel inside an initialised process group.
    """

    model: str = o.MODEL()
    plan: PlanSpec | None = opt(None, "what to drop", check=_plan, cli=False, error_name="--target")
    output: str | None = o.OUTPUT(None, help="directory for the pruned checkpoint (created; its parent too)",
                                  metavar="DIR")
    overwrite: bool = o.OVERWRITE(False, help="replace the output directory if it exists")
    dry_run: bool = opt(False, "print the plan and stop; nothing is written", group="what to drop")
    scores: str | None = opt(None, "scores JSON from `llmdrop measure`", check=o.path, metavar="FILE",
                             group="what to drop", default_help="measured now")
    calibration: str | None = o.CALIBRATION(None)
    samples: int = o.SAMPLES(32)
    seq_len: int = o.SEQ_LEN(512)
    batch_size: int = o.BATCH_SIZE(4)
    residual: bool = o.RESIDUAL(True)
    dtype: str = o.DTYPE("float32")
    device: str = o.DEVICE("cpu")
    save_dtype: str | None = o.SAVE_DTYPE(None, default_help="the source's own precision; a .gguf source: bfloat16")
    cache_dir: str | None = o.CACHE_DIR(None)
    stream: bool = o.STREAM(False, help="never hold the model: measure layer by layer (unless --scores) and write the "
                            "pruned checkpoint tensor by tensor, shard by shard")
    max_memory: int | None = o.MAX_MEMORY(None)
    window_size: int | None = opt(None, "also score every run of N consecutive blocks", check=o.optional_count,
                                  parse=o.whole(1), flags=("--window",), metavar="N")
    ppl_samples: int = o.PPL_SAMPLES(8, group="evaluation before and after")
    tasks: tuple[str, ...] = o.TASKS((), group="evaluation before and after")
    limit: int | None = o.LIMIT(None, group="evaluation before and after")
    data: str = o.DATA_SOURCE("auto", help="task data (see `llmdrop eval --help`)", group="evaluation before and after")
    bench: bool = opt(True, "compare decode speed before and after (--no-bench skips it)", flags=("--no-bench",),
                      group="evaluation before and after")
    compare: bool = opt(True, "also prune a copy with each other patch kind (zero: the paper's drop, nothing stands in; "
                        "linear: least-squares patches) and show it beside the chosen one: parameters, KV cache, "
                        "held-out perplexity and decode speed; the checkpoint saved is the --patch chosen "
                        "(--no-compare skips it)", flags=("--no-compare",), group="evaluation before and after")
    progress: bool = o.PROGRESS(True)
    shard: tuple[int, int] | None = o.SHARD(None)
    patch: str = PATCH("zero")
    heal: int | None = opt(None, "after the drop, distil the pruned model from the unpruned one for this many tokens "
                           "(e.g. 200k, 1M) of the calibration text after the calibration and held-out chunks, then "
                           "report perplexity (and tasks) again; saved in --dtype unless --save-dtype (see `llmdrop "
                           "heal`)", check=lambda v, p: _heal_budget(v, p), parse=o.tokens_text, metavar="TOKENS",
                           group="evaluation before and after")

    def _check(self) -> None:
        if self.plan is not None and not self.dry_run and not self.output:
            raise LlmdropError("give an output directory with {output} (or {dry_run} to only print the plan)",
                               params=["output", "dry_run"])
        if self.stream and self.window_size:
            raise LlmdropError("{stream} measures one layer at a time: it does not combine with {window_size}",
                               params=["stream", "window_size"])
        if self.stream and self.shard is not None and self.shard[1] > 1:
            raise LlmdropError("{stream} measures one layer at a time in one process: it does not combine with a "
                               "data-parallel {shard} (torchrun)", params=["stream", "shard"])
        check_options(self.patch, self.stream)
        self._check_heal()
        if self.stream and self.plan is not None and self.plan.iterative:
            raise LlmdropError("{iterative} re-measures a pruned model after each drop; it does not combine with "
                               "{stream}", params=["iterative", "stream"])

    def _check_heal(self) -> None:
        if self.heal is None:
            return
        if self.heal < self.seq_len:
            raise LlmdropError(f"{{heal}} {self.heal:,} is less than one training step (one chunk of {self.seq_len} "
                               "tokens); raise {heal} or lower {seq_len}", params=["heal", "seq_len"])
        if self.device == "auto":
            raise LlmdropError("{heal} trains on one device: give {device} cpu, cuda or cuda:N", params=["heal", "device"])
        if self.stream:
            raise LlmdropError("{heal} trains the pruned model in memory; it does not combine with {stream}",
                               params=["heal", "stream"])

    @property
    def rank(self) -> int:
        return self.shard[0] if self.shard else 0


def _heal_budget(value: Any, param: str) -> int | None:
    """A token budget: a count, or text such as "1M"."""
    if isinstance(value, str):
        return o.token_count(value, param)
    if value is not None and (not o.is_int(value) or value < 1):
        raise LlmdropError(f"{{{param}}} must be a token budget of at least 1 (got {literal(repr(value))})",
                           params=[param])
    return value


# ---- heal ------------------------------------------------------------------------------------------------------------

TRAIN_MODES = ("all", "norms", "patches", "near", "lora")
# Tokens of the text source passed over before the healing text by default: more than the text the default `llmdrop
# run` (32 calibration + 8 held-out chunks of 512) and `llmdrop eval --ppl` (16 x 512) read, so a model healed with
# defaults is never reported on text it was trained on.
DEFAULT_SKIP_TOKENS = 1 << 16
# Settings that change the trained weights: a saved state resumes only under the same ones.
HEAL_FINGERPRINT = ("student", "teacher", "tokens", "seq_len", "batch_size", "grad_accum", "lr", "final_lr", "warmup",
                    "weight_decay", "max_grad_norm", "train", "train_embeddings", "lora_rank", "calibration",
                    "skip_tokens", "seed", "dtype")


def _train(value: Any, param: str) -> str:
    import importlib.util

    o.choice(value, param, TRAIN_MODES)
    if value == "lora" and importlib.util.find_spec("peft") is None:
        raise LlmdropError(f"{{{param}}} lora needs the peft package, which is not installed: pip install peft (or "
                           f"choose another {{{param}}})", params=[param])
    return value


@dataclass
class HealConfig(Checked):
    """One healing job (heal.py), checked when built; each field's help says what it does.

    steps = tokens // (seq_len x batch_size x grad_accum); one step is one global batch, under data parallelism
    shared by the ranks. `save_dtype` None saves in `dtype`, not the student's stored precision: rounding to bfloat16
    undoes most of a short heal (measured on SmolLM2-135M with 8 attention layers dropped, 8k tokens, the KL on
    untrained text went 0.451 -> 0.348 in float32 but 0.403 once rounded to bfloat16). `shard=(rank, world)` trains
    data-parallel inside an initialised torch.distributed group, sharded with FSDP2 (distill.py); the global batch
    must split evenly over the ranks. `kl_chunk` and `activation_checkpointing` trade compute for memory and leave
    the result equal within float rounding.
    """

    student: str = Option("the pruned checkpoint directory (what `llmdrop drop` wrote)", check=o.model_spec,
                          positional=True, metavar="DIR")()
    teacher: str = Option("the unpruned model: alias, checkpoint directory, .gguf or hub id", check=o.model_spec,
                          metavar="MODEL")()
    output: str = o.OUTPUT(help="the healed checkpoint directory", metavar="DIR", check=o.model_spec)
    tokens: int = Option("training budget in tokens, e.g. 200000, 500k, 2M", check=o.token_count, parse=o.tokens_text,
                         metavar="N")()
    overwrite: bool = o.OVERWRITE(False, help="replace the output directory if it exists")
    seq_len: int = o.SEQ_LEN(512, help="tokens per chunk", group="training")
    batch_size: int = o.BATCH_SIZE(1, help="chunks per forward pass", group="training")
    grad_accum: int = opt(1, "forward passes per optimizer step", check=o.count, parse=o.whole(1), metavar="N",
                          group="training")
    lr: float = opt(2e-5, "peak learning rate", check=lambda v, p: o.number(v, p, low=0, low_open=True),
                    parse=o.real, metavar="LR", group="training")
    final_lr: float = opt(0.0, "learning rate at the last step as a fraction of the peak: the cosine decay ends there",
                          check=lambda v, p: o.number(v, p, low=0, high=1), parse=o.real, metavar="F", group="training")
    warmup: float = opt(0.05, "warm-up fraction of the steps", check=lambda v, p: o.number(v, p, low=0, high=1,
                                                                                          high_open=True),
                        parse=o.real, metavar="F", group="training")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices", check=lambda v, p: o.number(v, p, low=0),
                              parse=o.real, metavar="W", group="training")
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm (None: no clipping)",
                                      check=lambda v, p: o.number(v, p, low=0, low_open=True, optional=True), cli=False)
    train: str = opt("all", "what trains: all weights (but the tied embeddings), norms, patches (linear patches only), "
                     "near (the decoder layers next to each drop or patch, patches included) or lora (adapters merged "
                     "back; needs peft)", check=_train, choices=TRAIN_MODES, group="training")
    train_embeddings: bool = opt(False, "with --train all: the embeddings train too (and a head tied to them)",
                                 group="training")
    lora_rank: int = opt(16, "with --train lora: the adapters' rank", check=o.count, parse=o.whole(1), metavar="R",
                         group="training")
    calibration: str | None = o.CALIBRATION(None, help="training text, same forms as measure's --calibration; never "
                                            "the text you report quality on", group="training",
                                            default_help="the bundled passages")
    skip_tokens: int = opt(DEFAULT_SKIP_TOKENS, "tokens of that text to skip first, so healing does not train on the "
                           "chunks `run` and `eval --ppl` report on by default", check=o.non_negative,
                           parse=o.whole(0), metavar="N", group="training")
    save_every: int | None = opt(100, "resumable state every this many steps, in OUT.heal-state/ (None: never)",
                                 check=lambda v, p: o.count(v, p, optional=True, what="a whole number of steps"),
                                 parse=o.whole(1), metavar="STEPS", group="output")
    resume: bool = opt(False, "continue from the state a stopped heal left", group="output")
    seed: int = o.SEED(0, help="data order", group="training")
    dtype: str = o.DTYPE("float32")
    save_dtype: str | None = o.SAVE_DTYPE(None, default_help="--dtype")
    device: str = o.DEVICE("cpu")
    cache_dir: str | None = o.CACHE_DIR(None)
    progress: bool = o.PROGRESS(True)
    shard: tuple[int, int] | None = o.SHARD(None)
    check_tokens: int = opt(4096, "tokens read right after the healing text, never trained on: the KL to the teacher "
                            "on them before and after healing is printed, with a warning when healing did not lower "
                            "it (0 = no check)", check=o.non_negative, parse=o.whole(0), metavar="N", group="training")
    kl_chunk: int | None = opt(None, "tokens per chunk of the KL: the LM head and softmax of both models run on this "
                               "many positions at a time, so the [tokens, vocabulary] logits never exist whole (a large "
                               "vocabulary such as Gemma's 262k); the same loss within float rounding",
                               check=lambda v, p: o.count(v, p, optional=True, what="a whole number of tokens"),
                               parse=o.whole(1), metavar="TOKENS", group="training",
                               default_help="the whole forward pass at once")
    activation_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward pass "
                                         "instead of keeping them: less memory for about one more forward pass of "
                                         "compute", group="training")

    def _check(self) -> None:
        if self.device == "auto":
            raise LlmdropError("heal trains on one device per process: give {device} cpu, cuda or cuda:N (several "
                               "GPUs: one process each under torchrun, with shard)", params=["device"])
        if self.tokens < self.step_tokens:
            raise LlmdropError(f"{{tokens}} {self.tokens:,} is less than one optimizer step's {self.step_tokens:,} "
                               f"tokens ({self.batch_size} x {self.grad_accum} chunks of {self.seq_len}); raise "
                               "{tokens} or lower {batch_size}, {grad_accum} or {seq_len}",
                               params=["tokens", "batch_size", "grad_accum", "seq_len"])
        world = self.shard[1] if self.shard else 1
        if self.chunks_per_step % world:
            # FSDP runs its collectives in every forward and backward: every rank must take as many chunks per step.
            raise LlmdropError(f"one step's {self.chunks_per_step} chunks ({{batch_size}} x {{grad_accum}}) cannot be "
                               f"split evenly over {world} ranks; make {{batch_size}} x {{grad_accum}} a multiple of "
                               f"{world}", params=["batch_size", "grad_accum"])

    @property
    def chunks_per_step(self) -> int:
        """Chunks in one global batch (one optimizer step), whatever the number of ranks."""
        return self.batch_size * self.grad_accum

    @property
    def step_tokens(self) -> int:
        return self.chunks_per_step * self.seq_len

    @property
    def steps(self) -> int:
        return self.tokens // self.step_tokens

    def fingerprint(self) -> dict:
        from pathlib import Path

        values = {k: getattr(self, k) for k in HEAL_FINGERPRINT}
        values["student"] = str(Path(self.student).expanduser().resolve())
        return values


# ---- study -----------------------------------------------------------------------------------------------------------

def _targets(value: Any, param: str) -> list[str]:
    names = o.names(value, param)
    bad = [t for t in names if t not in o.TARGETS]
    if bad:
        raise LlmdropError(f"{{{param}}} {literal(', '.join(bad))}: choose from {', '.join(o.TARGETS)}", params=[param])
    return list(dict.fromkeys(names))


def _counts(value: Any, param: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or not all(o.is_int(c) and c >= 1 for c in value):
        raise LlmdropError(f"{{{param}}} must be drop counts of at least 1 (got {literal(repr(value))[:80]})",
                           params=[param])
    return list(dict.fromkeys(value))


def _seeds(value: Any, param: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(o.is_int(s) for s in value):
        raise LlmdropError(f"{{{param}}} must be integer seeds (got {literal(repr(value))[:80]})", params=[param])
    return list(value)


def _seed_count(text: str) -> list[int]:
    return list(range(o.whole(0)(text)))


@dataclass
class StudyConfig(Checked):
    """The grid of one study (study.py): every target x drop count (one-shot; iterative and seeded random rows
    optional), evaluated on `tasks` (first `limit` items) and perplexity. `criterion="loss"` adds rows ranked by the
    calibration loss (one-shot, and iterative with `iterative`), measuring at most `candidates` modules per ranking.
    A `patch` other than zero adds, next to every non-random row, the same plan with that patch (strategy
    `<strategy>+linear`). Checked when built, so a bad target or count fails before any model loads."""

    model_name: str = o.MODEL()
    targets: list[str] = opt(list(o.TARGETS), "comma-separated targets", check=_targets, parse=o.name_list,
                             metavar="TARGETS", group="grid")
    counts: list[int] = opt([4, 8], "drop counts, comma-separated", check=_counts, parse=o.wholes, flags=("--n",),
                            metavar="COUNTS", group="grid")
    tasks: list[str] = o.TASKS([], help="lm-eval tasks, comma-separated", check=lambda v, p: list(o.names(v, p)),
                               group="evaluation", default_help="none: perplexity only")
    limit: int | None = o.LIMIT(None, help="items per task: the first N, the same for every row", group="evaluation")
    iterative: bool = ITERATIVE(False, help="also iterative plans", group="grid")
    random_seeds: list[int] = opt([], "also random drops, averaged over this many seeds", check=_seeds,
                                  parse=_seed_count, flags=("--random-baseline",), metavar="SEEDS", group="grid",
                                  default_help="none")
    random_targets: list[str] = opt(["attn"], "targets that get the random baseline", check=_targets,
                                    parse=o.name_list, metavar="TARGETS", group="grid")
    calibration: str | None = o.CALIBRATION(None)
    samples: int = o.SAMPLES(64)
    seq_len: int = o.SEQ_LEN(1024)
    batch_size: int = o.BATCH_SIZE(4)
    ppl_samples: int = o.PPL_SAMPLES(8, help="held-out chunks for perplexity", group="evaluation")
    eval_batch_size: int = o.EVAL_BATCH_SIZE(8, group="evaluation")
    data: str = o.DATA_SOURCE("auto", help="task data (see `llmdrop eval --help`)", group="evaluation")
    dtype: str = o.DTYPE("float32")
    speed_new_tokens: int = opt(32, "tokens decoded per speed measurement", check=o.count, cli=False)
    speed_repeats: int = opt(3, "speed measurements per row (median)", check=o.count, cli=False)
    criterion: str = CRITERION("cosine", group="grid")
    candidates: int | None = CANDIDATES(None, group="grid")
    patch: str = PATCH("zero", help="next to each row, the same plan with every dropped module replaced by this patch "
                       "(rows attn+linear, ...; block rows only where the family has no sandwich norms): " + "; ".join(
                           f"{name}: {row.help}" for name, row in PATCHES.items()), group="grid")

    def _check(self) -> None:
        if not self.targets:
            raise LlmdropError("{targets} is empty: give at least one of " + ", ".join(o.TARGETS), params=["targets"])
        # The criterion's rules on its options, as a plan of the grid would check them.
        PlanSpec(self.targets[0], n=max(self.counts), criterion=self.criterion, candidates=self.candidates,
                 iterative=True)
        if self.candidates is not None and self.candidates < max(self.counts):
            raise LlmdropError(f"{{candidates}} {self.candidates} is fewer than the largest count {max(self.counts)}: "
                               "the one-shot loss rows measure every pick; raise {candidates}", params=["candidates"])

    # Field names of study.json files written before the renames.
    _OLD_NAMES = {"model": "model_name", "ks": "counts"}

    @classmethod
    def from_dict(cls, d: object, source: str = "study settings") -> StudyConfig:
        """A config read back from study.json or results.json; old field names are accepted."""
        if not isinstance(d, dict):
            raise LlmdropError(f"{source} hold a JSON {type(d).__name__}, not a study's settings")
        d = {cls._OLD_NAMES.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        missing = [k for k in ("model_name", "targets", "counts") if k not in d]
        if unknown or missing:
            what = f"unknown fields {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}"
            raise LlmdropError(f"{source} have {what}; they were not written by this llmdrop")
        return cls(**d)

    def fingerprint(self) -> dict:
        """Settings that change a row's numbers: a resumed study must match them.

        `criterion` and `patch` are not among them: they add rows under keys of their own (`loss:...`,
        `one-shot+linear:...`) and change no other row, so a finished study can be resumed with them to gain those
        rows, reusing its scores and the rows it has."""
        keep = ("model_name", "tasks", "limit", "calibration", "samples", "seq_len", "ppl_samples", "data", "dtype",
                "candidates")
        return {k: getattr(self, k) for k in keep}


# ---- eval ------------------------------------------------------------------------------------------------------------

PASSKEY = "passkey"  # the built-in task name (passkey.py)
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _contexts(value: Any, param: str) -> list[int]:
    """Whole numbers >= 1, each once in the order given (a context listed twice would be scored twice)."""
    values = list(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(o.is_int(c) and c >= 1 for c in values):
        raise LlmdropError(f"{{{param}}} must be whole numbers of at least 1 (got {literal(repr(value))[:80]})",
                           params=[param])
    return list(dict.fromkeys(values))


def _depths(value: Any, param: str) -> list[float] | None:
    """Fractions of the filler from 0 (start) to 1 (end), each once; None: PASSKEY_DEPTHS."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(o.is_number(d) and 0 <= d <= 1 for d in values):
        raise LlmdropError(f"{{{param}}} must be fractions from 0 to 1, like 0,0.5,1 (got {literal(repr(value))[:80]})",
                           params=[param])
    return list(dict.fromkeys(float(d) for d in values))


_PASSKEY_GROUP = "passkey (--tasks passkey: a 5-digit key hidden in filler text, built in, no data needed)"


@dataclass
class EvalConfig(Checked):
    """One `llmdrop eval` job (evaluate.py): lm-eval `tasks` and the built-in passkey, and / or perplexity."""

    model: str = o.MODEL()
    tasks: tuple[str, ...] = o.TASKS((), help="comma-separated lm-eval task names and/or the built-in passkey, e.g. "
                                     "piqa,hellaswag,lambada,passkey", group="tasks")
    limit: int | None = o.LIMIT(None, group="tasks")
    eval_batch_size: int = o.EVAL_BATCH_SIZE(8, group="tasks")
    num_fewshot: int | None = opt(None, "few-shot examples", check=lambda v, p: o.count(v, p, least=0, optional=True),
                                  parse=o.whole(0), metavar="K", group="tasks",
                                  default_help="the task's own, usually 0")
    data: str = o.DATA_SOURCE("auto", group="tasks")
    ppl: bool = opt(False, "also perplexity on held-out text (see --ppl-text)", group="perplexity")
    ppl_text: str | None = o.CALIBRATION(None, help="text for --ppl (same forms as --calibration)", flags=("--ppl-text",),
                                         group="perplexity", default_help="builtin")
    ppl_samples: int = o.PPL_SAMPLES(16, help="windows for --ppl", group="perplexity")
    seq_len: int = o.SEQ_LEN(512, help="window length for --ppl, at most the model's trained positions",
                             group="perplexity")
    stride: int | None = opt(None, "tokens between window starts for --ppl; a smaller stride scores each later token "
                             "with more context, as in sliding-window perplexity", check=o.optional_count,
                             parse=o.whole(1), metavar="TOKENS", group="perplexity",
                             default_help="the window, no overlap")
    batch_size: int = o.BATCH_SIZE(4, help="windows per forward pass for --ppl", group="perplexity")
    by_position: bool = opt(False, "with --ppl: loss and perplexity per token-position bucket (positions 1, 2-3, 4-7, "
                            "... of each window): does long-range context still help? Give a long text (--ppl-text "
                            "book.txt) and a long --seq-len", group="perplexity")
    position_buckets: int | None = opt(None, "with --by-position: N buckets of equal width instead of powers of two",
                                       check=o.optional_count, parse=o.whole(1), metavar="N", group="perplexity")
    contexts: list[int] = opt([1024], "prompt lengths in tokens, comma-separated, up to the model's limit",
                              check=_contexts, parse=o.wholes, flags=("--context",), metavar="TOKENS",
                              group=_PASSKEY_GROUP)
    depths: list[float] | None = opt(None, "where the key sits in the filler, 0 (start) to 1 (end)", check=_depths,
                                     parse=o.fractions, metavar="FRACTIONS", group=_PASSKEY_GROUP,
                                     default_help=",".join(f"{d:g}" for d in PASSKEY_DEPTHS))
    trials: int = opt(5, "prompts per context and depth", check=o.count, parse=o.whole(1), metavar="N",
                      group=_PASSKEY_GROUP)
    seed: int = o.SEED(0, help="seed of the keys and prompts", group=_PASSKEY_GROUP)
    dtype: str = o.DTYPE("float32")
    device: str = o.DEVICE("cpu")
    cache_dir: str | None = o.CACHE_DIR(None)
    output: str | None = o.OUTPUT(None, help="write the results as JSON here (replaced if it exists)", metavar="FILE",
                                  group=None)
    progress: bool = o.PROGRESS(True)

    def _check(self) -> None:
        if not self.tasks and not self.ppl:
            raise LlmdropError("nothing to evaluate: give {tasks} and/or {ppl}", params=["tasks", "ppl"])
        if (self.by_position or self.position_buckets) and not self.ppl:
            raise LlmdropError("{by_position} reports perplexity by position: add {ppl}", params=["by_position", "ppl"])

    @property
    def passkey(self) -> bool:
        return PASSKEY in self.tasks

    @property
    def lm_tasks(self) -> list[str]:
        return [t for t in self.tasks if t != PASSKEY]


# ---- bench -----------------------------------------------------------------------------------------------------------

RUNTIMES = ("transformers", "llama.cpp")


def _runtimes(value: Any, param: str) -> list[str]:
    values = list(o.names(value, param))
    bad = [r for r in values if r not in RUNTIMES]
    if bad or not values:
        raise LlmdropError(f"{{{param}}} takes {' and/or '.join(RUNTIMES)}, not {literal(repr(bad[0]) if bad else 'nothing')}",
                           params=[param])
    return list(dict.fromkeys(values))


def _models(value: Any, param: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not values:
        raise LlmdropError(f"nothing to compare: give at least one model in {{{param}}}", params=[param])
    return [o.model_spec(v, param) for v in values]


def _wholes_list(value: Any, param: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(o.is_int(v) and v >= 1 for v in values):
        raise LlmdropError(f"{{{param}}} must be whole numbers of at least 1 (got {literal(repr(value))[:80]})",
                           params=[param])
    return values


@dataclass
class BenchConfig(Checked):
    """One `llmdrop bench` run (bench.compare): every model in `models`, interleaved, in each of `runtimes`."""

    models: list[str] = opt(MISSING, "models to compare (the first is the reference)", check=_models,
                            positional=True, metavar="MODEL", nargs="+", error_name="MODEL")
    contexts: list[int] = opt([512], "prompt lengths, comma-separated", check=_wholes_list, parse=o.wholes,
                              flags=("--context",), metavar="TOKENS")
    batches: list[int] = opt([1], "batch sizes, comma-separated", check=_wholes_list, parse=o.wholes,
                             flags=("--batch",), metavar="SIZES")
    new_tokens: int = opt(128, "tokens decoded per run", check=o.count, parse=o.whole(1), metavar="N")
    repeats: int = opt(3, "timed runs per setting, after 1 warm-up", check=o.count, parse=o.whole(1), metavar="N")
    memory: bool = opt(True, "the per-model peak-RSS probe, a child process each (--no-memory skips it)",
                       flags=("--no-memory",))
    dtype: str = o.DTYPE("float32")
    runtimes: list[str] = opt(["transformers"], "transformers and/or llama.cpp (the GGUF export through "
                              "llama-cpp-python, flash attention on, batch 1), comma-separated", check=_runtimes,
                              parse=o.name_list, flags=("--runtime",), metavar="NAMES")
    profile: bool = opt(False, "also the share of decode time per module kind (attention, MLP, norms, LM head, other; "
                        "timed forward hooks in transformers, llama.cpp's graph eval callback in llama.cpp) and the "
                        "ideal speedup 1 / (1 - share of the dropped modules) next to the achieved one")
    profile_steps: int = opt(16, "decode steps timed per profile", check=o.count, parse=o.whole(1), metavar="N")
    threads: int | None = opt(None, "pin both runtimes to N threads (torch.set_num_threads; llama.cpp n_threads); "
                              "recorded in the output", check=o.optional_count, parse=o.whole(1), metavar="N",
                              default_help="torch's current count")
    gguf_outtype: str = opt("f16", "tensor type of the GGUF export llama.cpp runs", choices=OUTTYPES)
    cache_dir: str | None = o.CACHE_DIR(None)
    output: str | None = o.OUTPUT(None, help="write the rows as JSON here (replaced if it exists)", metavar="FILE",
                                  group=None)
    progress: bool = o.PROGRESS(True)
