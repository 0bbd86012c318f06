"""Cost of fitting linear patches: the one-pass layer-wise fit against one measurement pass (`measure`) of the same
chunks, in the same run, for K = 1, 4, 8, 15 attention patches on SmolLM2-135M; the per-module fit (one pass per
patch, the algorithm before the walk) for K = 8; and held-out perplexity of the two fits' models (the same patches,
so the same perplexity), on text after the calibration chunks. With --stream-8b instead: `llmdrop drop --stream
--patch linear` on a Llama-3-8B-shaped checkpoint (stream_bench.write_8b_shaped, ~15 GiB of bf16) against `llmdrop
measure --stream` of the same checkpoint, wall time and peak RSS of each in its own process.

python benchmarks/patch_cost.py [--repeats 5] [--old-repeats 2] [--ks 1,4,8,15] [--samples 16] [--seq-len 512]
python benchmarks/patch_cost.py --stream-8b [--k 8] [--stream-samples 16] [--stream-seq-len 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, write_section  # noqa: E402

from llmdrop.calibration import load_calibration  # noqa: E402
from llmdrop.configs import PlanSpec  # noqa: E402
from llmdrop.criteria.cosine import choose_from_scores  # noqa: E402
from llmdrop.evaluate import perplexity  # noqa: E402
from llmdrop.measure import measure  # noqa: E402
from llmdrop.models import load_model  # noqa: E402
from llmdrop.patches.linear import applied_plan, fit_patches  # noqa: E402
from llmdrop.report import dir_bytes, human_bytes, table  # noqa: E402
from llmdrop.surgery import apply_plan  # noqa: E402

CAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "c4_validation_2k.jsonl"
BATCH = 4


def _spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _patch_weights(model) -> dict[int, torch.Tensor]:
    return {i: layer.self_attn.linear_attn.weight.detach().clone() for i, layer in enumerate(model.model.layers)
            if hasattr(layer.self_attn, "linear_attn")}


def _cli_child(argv: list[str], queue) -> None:
    from llmdrop.bench import peak_rss_bytes
    from llmdrop.cli import main as cli

    t = time.perf_counter()
    code = cli(argv)
    queue.put({"code": code, "seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes()})


def _cli(argv: list[str]) -> dict:
    """`llmdrop ARGV` in a fresh process: its exit code, seconds and peak RSS."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cli_child, args=(argv, queue))
    proc.start()
    proc.join()  # the child's one small message fits the queue's pipe, so joining first cannot block it
    result = queue.get(timeout=10) if proc.exitcode == 0 else {"code": proc.exitcode}
    if result["code"] != 0:
        raise SystemExit(f"llmdrop {' '.join(argv)} failed (exit code {result['code']})")
    return result


def stream_8b(k: int, samples: int, seq_len: int) -> None:
    from stream_bench import write_8b_shaped
    from transformers import AutoTokenizer

    from llmdrop.models import resolve
    from llmdrop.stream import CheckpointReader

    work = RESULTS / "ckpt"
    src, out, scores = work / "llama3-8b-shaped", work / "llama3-8b-shaped-patched", work / "llama3-8b-scores.json"
    t = time.perf_counter()
    existed = (src / "config.json").exists()
    write_8b_shaped(src)
    written = "reused from an earlier run" if existed else f"written in {time.perf_counter() - t:.0f} s"
    # The random checkpoint has no tokenizer: SmolLM2's (49,152 ids, all within the 128,256-row embedding) reads the
    # calibration text, for measure and drop alike.
    AutoTokenizer.from_pretrained(resolve("smollm2-135m", progress=False)).save_pretrained(src)
    size = dir_bytes(src)
    cal = ["--calibration", str(CAL), "--seq-len", str(seq_len), "-q"]
    try:
        measured = _cli(["measure", str(src), "--stream", *cal, "--samples", "2", "-o", str(scores)])
        dropped = _cli(["drop", str(src), "--stream", "--patch", "linear", "--scores", str(scores), "--target", "attn",
                        "--n", str(k), *cal, "--samples", str(samples), "--overwrite", "-o", str(out)])
        record = json.loads((out / "config.json").read_text())["llmdrop"]
        names = set(CheckpointReader(out).names())
        patched = record["patched_attn"]
        assert len(patched) == k and all(f"model.layers.{i}.self_attn.linear_attn.weight" in names for i in patched)
        assert not any(f"model.layers.{i}.self_attn.q_proj.weight" in names for i in patched)
        fit = record["patch_fits"][-1]
        out_size = dir_bytes(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    text = header("Patching a Llama-3-8B-shaped model, streamed")
    text += (
        "Random bf16 weights with Llama-3-8B's shapes (32 layers, hidden 4096, FFN 14336, 8 KV heads, vocab 128256), "
        f"one shard per layer ({written}); C4 text through the SmolLM2 tokenizer. `measure --stream` (2 x {seq_len} "
        f"tokens) writes the scores; `drop --stream --patch linear --scores` then picks {k} attention layers (random "
        f"weights: the picks mean nothing, the cost does) and fits their d x d patches on {samples} x {seq_len} = "
        f"{samples * seq_len:,} tokens (a 4096 x 4096 map needs at least 4,096), one decoder layer in memory at a "
        "time, and writes the patched checkpoint tensor by tensor. Each command in its own process, in float32; peak "
        "RSS of that process. The output was checked (patch tensors present, the patched layers' q/k/v/o gone, the "
        "record's patched_attn) and deleted.\n\n")
    rows = [[f"measure --stream (2 x {seq_len})", human_bytes(size), f"{measured['seconds']:.0f}",
             human_bytes(measured["peak_rss"]), f"{measured['peak_rss'] / size:.3f}", "-"],
            [f"drop --stream --patch linear, attention {k} ({samples} x {seq_len})", human_bytes(out_size),
             f"{dropped['seconds']:.0f}", human_bytes(dropped["peak_rss"]), f"{dropped['peak_rss'] / size:.3f}",
             f"{fit['forward_passes']:.2f}"]]
    text += table(["command", "checkpoint", "seconds", "peak RSS", "peak RSS / source", "fit: layer passes"], rows,
                  markdown=True) + "\n\n"
    text += (f"Patched layers {', '.join(map(str, patched))}; fit {fit['seconds']:.0f} s of the drop's "
             f"{dropped['seconds']:.0f} s (the rest: choosing, reading and writing ~{human_bytes(out_size)}).\n")
    write_section("patch_cost_stream_8b", text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of the measurement pass and the new fits")
    ap.add_argument("--old-repeats", type=int, default=2, help="rounds (of the first ones) that also time the old fit")
    ap.add_argument("--ks", default="1,4,8,15")
    ap.add_argument("--old-k", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heldout", type=int, default=8, help="held-out chunks for perplexity (after the calibration)")
    ap.add_argument("--stream-8b", action="store_true", help="the streamed 8B-shaped drop instead (see above)")
    ap.add_argument("--k", type=int, default=8, help="with --stream-8b: attention layers to patch")
    ap.add_argument("--stream-samples", type=int, default=16, help="with --stream-8b: chunks the patches are fit on")
    ap.add_argument("--stream-seq-len", type=int, default=256)
    args = ap.parse_args()
    if args.stream_8b:
        stream_8b(args.k, args.stream_samples, args.stream_seq_len)
        return
    ks = [int(k) for k in args.ks.split(",")]
    started, load = time.perf_counter(), os.getloadavg()
    base, tok = load_model("smollm2-135m", progress=False)
    cal = load_calibration(tok, CAL, args.samples, args.seq_len)
    heldout = load_calibration(tok, CAL, args.heldout, args.seq_len, skip=args.samples)
    scores = measure(base, cal, batch_size=BATCH, progress=False)  # also the warm-up of the timed passes
    plans = {k: choose_from_scores(scores, PlanSpec("attn", n=k)).plan for k in ks}

    # Each round: measurement passes between the fits, M K1 K4 M K8 K15 M [old M]; a fit's ratio is its seconds
    # over the mean of the passes just before and after it, so load from other jobs on the shared cores, which
    # drifts over minutes, weighs on both sides of a ratio alike.
    # CPU seconds (time.process_time, both threads) beside wall seconds: what other jobs take of the cores leaves
    # them mostly as they are.
    measure_s: list[float] = []
    measure_cpu: list[float] = []
    fit_s: dict[str, list[float]] = {str(k): [] for k in ks} | {"old": []}
    ratios: dict[str, list[float]] = {key: [] for key in fit_s}
    cpu_ratios: dict[str, list[float]] = {key: [] for key in fit_s}
    infos: dict[str, dict] = {}
    models: dict[str, torch.nn.Module] = {}

    def measured() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        measure(base, cal, batch_size=BATCH, progress=False)
        measure_s.append(time.perf_counter() - t)
        measure_cpu.append(time.process_time() - c)
        return measure_s[-1], measure_cpu[-1]

    for rnd in range(args.repeats):
        jobs = [(str(k), plans[k], True) for k in ks]
        if rnd < args.old_repeats:
            jobs.append(("old", plans[args.old_k], False))
        before = measured()
        pending: list[tuple[str, float, float]] = []
        for n, (key, plan, layerwise) in enumerate(jobs, 1):
            model = copy.deepcopy(base)
            t, c = time.perf_counter(), time.process_time()
            info = fit_patches(model, plan, cal, batch_size=BATCH, progress=False, layerwise=layerwise)
            fit_s[key].append(time.perf_counter() - t)
            pending.append((key, fit_s[key][-1], time.process_time() - c))
            if rnd == 0:
                infos[key] = info
                if key in ("old", str(args.old_k)):
                    models[key] = model
            print(f"round {rnd}: measure {before[0]:.1f}s, {key} {fit_s[key][-1]:.1f}s", flush=True)
            if n % 2 == 0 or n == len(jobs) or key == "old":
                after = measured()
                for k, wall, cpu in pending:
                    ratios[k].append(wall / ((before[0] + after[0]) / 2))
                    cpu_ratios[k].append(cpu / ((before[1] + after[1]) / 2))
                before, pending = after, []
    ratios = {key: values for key, values in ratios.items() if values}

    ppl_rows = []
    base_ppl = perplexity(base, heldout, BATCH, progress=False)
    ppl_rows.append(["unpruned", "-", f"{base_ppl['perplexity']:.4f}", ""])
    old_w, new_w = _patch_weights(models["old"]), _patch_weights(models[str(args.old_k)])
    diff = max(float((old_w[i] - new_w[i]).abs().max()) for i in old_w)
    ppls = {}
    for key, label in ((str(args.old_k), "layer-wise walk (new)"), ("old", "one pass per module (old)")):
        model = models[key]
        apply_plan(model, applied_plan(plans[args.old_k]))
        ppls[key] = perplexity(model, heldout, BATCH, progress=False)["perplexity"]
        ppl_rows.append([f"attention {args.old_k}, linear", label, f"{ppls[key]:.4f}",
                         f"{ppls[key] / base_ppl['perplexity']:.4f}"])

    rows = [["measure (one pass, all scores)", "-", _spread(measure_s, 1), "1.00", "1.00", "1.00"]]
    for k in ks:
        rows.append([f"attention {k}: layer-wise fit (new)", ", ".join(map(str, plans[k].attn)),
                     _spread(fit_s[str(k)], 1), _spread(ratios[str(k)]), _spread(cpu_ratios[str(k)]),
                     f"{infos[str(k)]['forward_passes']:.2f}"])
    rows.append([f"attention {args.old_k}: one pass per module (old)", ", ".join(map(str, plans[args.old_k].attn)),
                 _spread(fit_s["old"], 1), _spread(ratios["old"]), _spread(cpu_ratios["old"]),
                 f"{infos['old']['forward_passes']:.2f}"])
    speedup = [o / n for o, n in zip(fit_s["old"], fit_s[str(args.old_k)])]
    worst = max(statistics.median(ratios[str(k)]) for k in ks)
    worst_cpu = max(statistics.median(cpu_ratios[str(k)]) for k in ks)

    text = header("Cost of fitting linear patches")
    text += (
        f"SmolLM2-135M (float32), {args.samples} x {args.seq_len} calibration tokens of "
        f"`../shared/data/calibration/c4_validation_2k.jsonl`, batches of {BATCH} chunks; attention drops chosen by "
        "the one-shot cosine scores of those chunks. Each round times one measurement pass (`llmdrop.measure`: "
        "attention, MLP and block scores in one pass of the decoder) before, between and after the fits, each fit on "
        "a fresh copy of the unpruned model; x measure is a fit's seconds over the mean of the measurement passes "
        f"just before and after it. {args.repeats} rounds (the old fit in the first {args.old_repeats}), after one "
        "untimed measurement pass; median (min-max) over rounds. "
        "Layer passes: decoder-layer calls over layers x batches, a cut-short statistics call counted whole "
        "(`forward_passes` in the fit's record). Total wall time of the benchmark: "
        f"{(time.perf_counter() - started) / 60:.0f} min.\n\n"
    )
    text += table(["job", "layers patched", "seconds", "x measure", "x measure (CPU s)", "layer passes"], rows,
                  markdown=True) + "\n\n"
    text += (f"Worst median ratio over K = {', '.join(map(str, ks))}: {worst:.2f}x one measurement pass in wall "
             f"seconds, {worst_cpu:.2f}x in CPU seconds (target <= 1.3x). At K = {args.old_k} the layer-wise fit is "
             f"{_spread(speedup, 1)}x faster than one pass per module. Load average (1 min) of the shared machine: "
             f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n\n")
    text += (f"Held-out perplexity ({args.heldout} x {args.seq_len} tokens of the same file after the calibration "
             f"chunks, never fitted on). Largest difference of a patch weight between the two fits: {diff:.1e}.\n\n")
    text += table(["model", "fit", "perplexity", "x unpruned"], ppl_rows, markdown=True) + "\n"
    write_section("patch_cost", text)
    print(text)


if __name__ == "__main__":
    main()
