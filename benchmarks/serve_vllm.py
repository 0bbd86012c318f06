"""Serving in vLLM: SmolLM2-135M base vs 8 and 15 of 30 attention layers dropped (15 also with linear patches),
served by vLLM's CPU build through llmdrop's plugin, the same KV memory for every model.

    python benchmarks/serve_vllm.py [--cycles 3] [--prompt-len 2048] [--new-tokens 32] [--concurrency 1,16]

Runs in llmdrop's environment: builds the checkpoints (benchmarks/results/ckpt/serve/, not committed) and the prompts,
then runs its own ``--worker`` part in .venv-vllm (``bash scripts/setup.sh --vllm``), which serves the models in turn,
``--cycles`` times round (each cycle in another order, so that a slow spell of this shared machine does not fall on
one model), and writes benchmarks/results/serve_vllm.json after every model. Re-running resumes: what is in that file
is not measured again (``--fresh`` starts over). Then the "Serving in vLLM" section of BENCHMARKS.md is written.

Per model and number of concurrent requests N (distinct prompts of --prompt-len tokens of C4 text):
- prefill: ``generate(N prompts, max_tokens=1)``, N x prompt-len / its wall time;
- decode: the same prompts again with ``max_tokens=1 + new-tokens``; their prompts now come from vLLM's prefix
  cache (the worker records how many prompt tokens did), so this is N x new-tokens decode steps over a
  prompt-len-token context, N x new-tokens / its wall time.
The KV cache vLLM allocated, and the concurrency it reports for prompt-len + new-tokens, come from the engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, header, write_section

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CAL = ROOT.parent / "shared" / "data" / "calibration" / "c4_validation_2k.jsonl"
SECTION = "serve_vllm"
TITLE = "Serving in vLLM"
# What the numbers say, and what this machine cannot: kept to what holds whatever the noise of a given run.
READING = """\
Reading. The KV cache is the part that carries over to a GPU unchanged: vLLM's allocator is the same, the pruned
models get exactly the cache of their kept attention layers (x30/22 and x2 the base's tokens in the same memory,
rounded to vLLM's blocks), and the concurrency vLLM reports grows by the same factor; a patched attention holds no
cache either. The timings show what a GPU would not: on 2 cores shared with other jobs, a decode step costs about a
second whether it serves 1 request or 16. That points to vLLM's CPU kernels waiting for cores (not profiled here)
rather than to arithmetic or memory traffic: SmolLM2-135M's weights and 16 x 2,048 tokens of its KV cache are
under 1 GB a step. The decode ratios are therefore noise-dominated (see the spread); prefill, where the work per
call is large, shows the compute a dropped attention saves. On a GPU, decoding 16 long requests at once is bound by
reading the KV cache and the weights, which dropped attention layers shrink, and the larger cache admits more
concurrent requests once the KV memory, not the 16 requests here, is the limit; measuring that needs a GPU."""
MODELS = [("base", None, "zero"), ("attn-8", 8, "zero"), ("attn-15", 15, "zero"), ("attn-15-linear", 15, "linear")]


# ---- the vLLM side (.venv-vllm): stdlib and vllm only ----

def worker(job_path: Path, out_path: Path) -> None:
    job = json.loads(job_path.read_text())
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(job["kv_gib"])
    # the engine in this process: one engine at a time, no second busy process on a 2-core machine
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import gc

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    done = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    have = {(r["cycle"], r["model"]) for r in done["runs"]}
    names = [m["name"] for m in job["models"]]
    for cycle in range(job["cycles"]):
        order = names[cycle % len(names):] + names[:cycle % len(names)]
        for name in order:
            if (cycle, name) in have:
                continue
            spec = next(m for m in job["models"] if m["name"] == name)
            start = time.perf_counter()
            llm = LLM(model=spec["path"], dtype=job["dtype"], enforce_eager=True, enable_prefix_caching=True,
                      max_model_len=job["prompt_len"] + job["new_tokens"], max_num_seqs=max(job["concurrency"]),
                      seed=0)
            run = {"cycle": cycle, "model": name, "vllm": vllm.__version__, "start_s": time.perf_counter() - start}
            cache = llm.llm_engine.vllm_config.cache_config
            run["kv_tokens"] = cache.kv_cache_size_tokens
            run["max_concurrency"] = cache.kv_cache_max_concurrency
            run["architecture"] = llm.llm_engine.vllm_config.model_config.architectures[0]
            for n in job["concurrency"]:
                prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"][:n]]
                first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
                more = SamplingParams(temperature=0.0, max_tokens=1 + job["new_tokens"], ignore_eos=True,
                                      detokenize=False)
                llm.reset_prefix_cache()  # what an earlier N left cached must not shorten this prefill
                t = time.perf_counter()
                llm.generate(prompts, first, use_tqdm=False)
                prefill = time.perf_counter() - t
                t = time.perf_counter()
                outs = llm.generate(prompts, more, use_tqdm=False)
                decode = time.perf_counter() - t
                run[f"n{n}"] = {"prefill_s": prefill, "decode_s": decode,
                                "cached_prompt_tokens": min(o.num_cached_tokens or 0 for o in outs),
                                "prefill_tok_s": n * job["prompt_len"] / prefill,
                                "decode_tok_s": n * job["new_tokens"] / decode}
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            gc.collect()
            run["load_avg"] = os.getloadavg()[0]  # how busy the shared machine was
            done["runs"].append(run)
            out_path.write_text(json.dumps(done, indent=1) + "\n")
            print(f"cycle {cycle} {name}: " + ", ".join(
                f"N={n} prefill {run[f'n{n}']['prefill_tok_s']:.0f} tok/s decode {run[f'n{n}']['decode_tok_s']:.1f} tok/s"
                for n in job["concurrency"]), flush=True)


# ---- llmdrop's side ----

def build(work: Path, n_cal: int) -> dict[str, Path]:
    """The four checkpoints (kept between runs): one set of cosine scores, the plans on it, patches fitted on it."""
    from llmdrop.calibration import load_calibration
    from llmdrop.checkpoint import save
    from llmdrop.choice import Choice
    from llmdrop.measure import measure
    from llmdrop.models import load_model
    from llmdrop.pipeline import prune
    from llmdrop.plan import plan_drops

    paths = {name: work / name for name, _, _ in MODELS}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    model, tok = load_model("smollm2-135m", progress=False)
    cal = load_calibration(tok, CAL if CAL.exists() else None, n_cal, 512)
    scores = measure(model, cal, progress=False)
    for name, n, patch in MODELS:
        if (paths[name] / "config.json").exists():
            continue
        model, _ = load_model("smollm2-135m", progress=False)
        if n:
            prune(model, Choice(plan_drops(scores, "attn", n), scores), "smollm2-135m", patch=patch,
                  calibration=cal, progress=False)
        save(model, tok, paths[name], overwrite=True)
    return paths


def prompts(count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of `length` tokens of C4 text."""
    from llmdrop.calibration import load_calibration
    from llmdrop.models import load_model

    _, tok = load_model("smollm2-135m", progress=False)
    chunks = load_calibration(tok, CAL if CAL.exists() else None, count, length, skip=0)
    return chunks.input_ids.tolist()


def summarize(job: dict, done: dict) -> str:
    runs = done["runs"]
    names = [m["name"] for m in job["models"]]
    cycles = sorted({r["cycle"] for r in runs})

    def values(name: str, key: str, n: int | None = None) -> list[float]:
        return [r[f"n{n}"][key] if n else r[key] for r in runs if r["model"] == name]

    def cell(vals: list[float], base: list[float] | None = None) -> str:
        if not vals:
            return "-"
        med = statistics.median(vals)
        text = f"{med:.1f} ({min(vals):.1f}-{max(vals):.1f})"
        if base:
            text += f", x{med / statistics.median(base):.2f}"
        return text

    def decode_s(name: str, n: int) -> list[float]:
        # vLLM recomputes the prompt's last block even when the rest comes from the prefix cache: that prefill,
        # at this run's measured prefill rate, is taken out of the decode time
        return [r[f"n{n}"]["decode_s"] - n * (job["prompt_len"] - r[f"n{n}"]["cached_prompt_tokens"])
                / r[f"n{n}"]["prefill_tok_s"] for r in runs if r["model"] == name]

    def decode_tok_s(name: str, n: int) -> list[float]:
        return [n * job["new_tokens"] / d for d in decode_s(name, n)]

    kept = {"base": 30, "attn-8": 22, "attn-15": 15, "attn-15-linear": 15}
    lines = [header(TITLE, "python benchmarks/serve_vllm.py " + " ".join(sys.argv[1:])).rstrip(), "",
             f"vLLM {runs[0]['vllm'] if runs else '?'} (CPU build, `vllm-cpu`) in .venv-vllm, llmdrop's plugin serving "
             f"the pruned checkpoints as saved; {job['dtype']}, eager mode (no compilation), "
             f"`VLLM_CPU_KVCACHE_SPACE={job['kv_gib']:g}` GiB for every model, prompts of {job['prompt_len']} tokens "
             f"(C4 text, distinct), {job['new_tokens']} new tokens, greedy. {len(cycles)} cycle(s) of every model, "
             "each cycle in another order; cells are median (min-max) over the cycles, and x the ratio to the base's "
             "median.", "",
             f"| model | attention layers with KV cache | KV cache (tokens) | concurrency vLLM reports at "
             f"{job['prompt_len'] + job['new_tokens']} tokens | ideal (30 / kept) |",
             "|---|---|---|---|---|"]
    base_kv = statistics.median(values("base", "kv_tokens")) if values("base", "kv_tokens") else None
    for name in names:
        kv = values(name, "kv_tokens")
        if not kv:
            continue
        ratio = f", x{statistics.median(kv) / base_kv:.3f}" if base_kv else ""
        lines.append(f"| {name} | {kept[name]} | {int(statistics.median(kv)):,}{ratio} | "
                     f"{statistics.median(values(name, 'max_concurrency')):.2f} | x{30 / kept[name]:.3f} |")
    load = [r["load_avg"] for r in runs if "load_avg" in r]
    lines += ["", "Decode excludes the prefill of the prompt's last block, which vLLM recomputes although the rest "
              "comes from the prefix cache (last column)" + (f"; load average of the machine after each model, "
              f"median {statistics.median(load):.1f} ({min(load):.1f}-{max(load):.1f})" if load else "") + ".", "",
              "| model | N | prefill tok/s | decode tok/s | s per decode step | prompt tokens from the prefix "
              "cache in decode |", "|---|---|---|---|---|---|"]
    for n in job["concurrency"]:
        for name in names:
            if not values(name, "start_s"):
                continue
            steps = [d / job["new_tokens"] for d in decode_s(name, n)]
            lines.append(f"| {name} | {n} | {cell(values(name, 'prefill_tok_s', n), values('base', 'prefill_tok_s', n))}"
                         f" | {cell(decode_tok_s(name, n), decode_tok_s('base', n))} | "
                         f"{statistics.median(steps):.2f} | {min(values(name, 'cached_prompt_tokens', n))} of "
                         f"{job['prompt_len']} |")
    return "\n".join(lines + ["", READING]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE: whole GiB")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} does not exist: make it with bash scripts/setup.sh --vllm")
    paths = build(RESULTS / "ckpt" / "serve", args.calibration_samples)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    job = {"cycles": args.cycles, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "concurrency": concurrency, "kv_gib": args.kv_gib, "dtype": args.dtype,
           "models": [{"name": name, "path": str(paths[name])} for name, _, _ in MODELS],
           "prompts": prompts(max(concurrency), args.prompt_len)}
    job_path, out = RESULTS / f"{SECTION}_job.json", RESULTS / f"{SECTION}.json"
    # what the numbers depend on (the prompts by their hash), so that a change of settings starts over
    settings = {k: v for k, v in job.items() if k not in ("cycles", "prompts")}
    settings["prompts_sha256"] = hashlib.sha256(json.dumps(job["prompts"]).encode()).hexdigest()
    if out.exists() and (args.fresh or json.loads(out.read_text()).get("settings") != settings):
        out.unlink()  # measured with other settings: start over
    if not out.exists():
        out.write_text(json.dumps({"settings": settings, "runs": []}) + "\n")
    job_path.write_text(json.dumps(job) + "\n")
    subprocess.run([str(VLLM_PYTHON), str(Path(__file__).resolve()), "--worker", str(job_path), str(out)], check=True)
    write_section(SECTION, summarize(job, json.loads(out.read_text())))
    job_path.unlink()


if __name__ == "__main__":
    main()
