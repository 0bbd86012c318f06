"""Peak memory per rank of a heal, in one run: SmolLM2-135M (attention 8 dropped) healed by one process vs by two
FSDP2 ranks (`torchrun --nproc-per-node 2 -m llmdrop heal`, gloo), and Gemma-3-270M (attention 6 dropped; a
vocabulary of 262,144, so the logits dominate) healed with the whole KL vs the chunked KL (`kl_chunk`), and the
chunked KL with activation checkpointing.

Every heal runs in a fresh process (two under torchrun) that reports its own peak RSS (getrusage) and wall time;
the configurations are interleaved, repeated, and reported as the median with the spread (min-max) over repeats.
The same few steps everywhere (float32, 512 tokens per chunk, `--grad-accum 2`: one chunk per rank on two ranks).
The healed weights of 1 and 2 ranks are compared, and each row's KL of the last step, to show the memory is saved
without changing the result.

python benchmarks/heal_memory.py [--repeats 3] [--steps 3] [--seq-len 512] [--kl-chunk 128] [--name heal_memory]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, write_section  # noqa: E402

CAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "c4_validation_2k.jsonl"
SKIP = 65536  # past the text that `llmdrop run` calibrates and reports on, as heal's default
MODELS = {"smollm2-135m": 8, "gemma3-270m": 6}  # model -> attention layers dropped
# glibc's dynamic mmap threshold rises to the size of the largest block freed, so FSDP's per-layer gather buffers,
# freed every layer, move later allocations into heap arenas it seldom returns; a fixed threshold keeps them mapped.
MMAP_THRESHOLD = 1 << 20


def _child(out: str, spec: dict) -> None:
    """One heal in this process (a torchrun rank when RANK is set): the CLI's argv, or a HealConfig's fields for the
    options the command line does not offer; then this process's peak RSS."""
    started = time.perf_counter()
    if "argv" in spec:
        from llmdrop import cli

        code = cli.main(spec["argv"])
    else:
        from llmdrop.heal import HealConfig, heal

        heal(HealConfig(**spec["config"]))
        code = 0
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "code": code, "seconds": time.perf_counter() - started,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _student(model: str, k: int, work: Path) -> Path:
    """The model with its k most redundant attention layers dropped (cosine, 16 x 256 tokens), saved in float32."""
    import llmdrop
    from llmdrop.configs import PlanSpec, RunConfig

    out = work / f"{model}-attn{k}"
    if not (out / "config.json").exists():
        llmdrop.drop(RunConfig(model=model, plan=PlanSpec("attn", n=k), output=str(out), overwrite=True,
                               calibration=str(CAL), samples=16, seq_len=256, save_dtype="float32", progress=False))
    return out


def _model_state(student: Path, teacher: str) -> int:
    """Bytes of what FSDP shards, for one process: student and teacher weights, the gradients and the two AdamW
    moments of what trains (every weight but the tied embedding), float32; read from the safetensors headers."""
    from safetensors import safe_open

    from llmdrop.models import resolve

    def sizes(folder: Path) -> dict[str, int]:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()
                for name in names:
                    out[name] = math.prod(f.get_slice(name).get_shape())
        return out

    mine, theirs = sizes(student), sizes(Path(resolve(teacher, False, None)))
    trained = sum(n for name, n in mine.items() if "embed_tokens" not in name and "lm_head" not in name)
    return 4 * (sum(mine.values()) + sum(theirs.values()) + 3 * trained)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--kl-chunk", type=int, default=128)
    ap.add_argument("--name", default="heal_memory")
    ap.add_argument("--child", nargs=2, metavar=("OUT", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], json.loads(args.child[1]))
        return

    work = RESULTS / "ckpt" / args.name
    work.mkdir(parents=True, exist_ok=True)
    students = {m: _student(m, k, work) for m, k in MODELS.items()}
    tokens = args.steps * 2 * args.seq_len  # grad-accum 2, batch 1: 2 chunks per step

    def cli_argv(model: str, out: Path) -> list[str]:
        return ["heal", str(students[model]), "--teacher", model, "--tokens", str(tokens), "--seq-len",
                str(args.seq_len), "--batch-size", "1", "--grad-accum", "2", "--calibration", str(CAL), "--skip-tokens",
                str(SKIP), "--check-tokens", "0", "--save-every", "1000", "-o", str(out), "--overwrite", "-q"]

    def config(model: str, out: Path, **kw) -> dict:
        return dict(student=str(students[model]), teacher=model, output=str(out), tokens=tokens, seq_len=args.seq_len,
                    batch_size=1, grad_accum=2, calibration=str(CAL), skip_tokens=SKIP, check_tokens=0,
                    save_every=None, overwrite=True, progress=False, **kw)

    # (label, model, ranks, spec maker, extra environment)
    fixed = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    rows = [("1 process", "smollm2-135m", 1, lambda out: {"argv": cli_argv("smollm2-135m", out)}, {}),
            ("2 ranks, FSDP2", "smollm2-135m", 2, lambda out: {"argv": cli_argv("smollm2-135m", out)}, {}),
            ("2 ranks, FSDP2, glibc mmap threshold 1 MiB", "smollm2-135m", 2,
             lambda out: {"argv": cli_argv("smollm2-135m", out)}, fixed),
            ("whole KL", "gemma3-270m", 1, lambda out: {"config": config("gemma3-270m", out)}, {}),
            (f"chunked KL ({args.kl_chunk} tokens)", "gemma3-270m", 1,
             lambda out: {"config": config("gemma3-270m", out, kl_chunk=args.kl_chunk)}, {}),
            (f"chunked KL ({args.kl_chunk}) + activation checkpointing", "gemma3-270m", 1,
             lambda out: {"config": config("gemma3-270m", out, kl_chunk=args.kl_chunk,
                                           activation_checkpointing=True)}, {})]
    first = {"smollm2-135m": 0, "gemma3-270m": 3}
    runs: dict[int, list[dict]] = {i: [] for i in range(len(rows))}
    for repeat in range(args.repeats):
        for i, (label, model, ranks, spec, extra) in enumerate(rows):
            out = work / f"row{i}"
            report = work / f"row{i}-report"
            for stale in work.glob(f"row{i}-report.rank*.json"):
                stale.unlink()
            child = [__file__, "--child", str(report), json.dumps(spec(out))]
            if ranks > 1:  # one thread per rank on the 2 cores; one process gets both
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), *child]
            else:
                command = [sys.executable, *child]
            # One intra-op thread per process: two threads per process fight for the 2 shared cores.
            env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
            started = time.perf_counter()
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if proc.returncode:
                raise SystemExit(f"{label} ({model}) failed:\n{proc.stderr[-4000:]}")
            per_rank = [json.loads(p.read_text()) for p in sorted(work.glob(f"row{i}-report.rank*.json"))]
            assert len(per_rank) == ranks and all(r["code"] == 0 for r in per_rank), per_rank
            record = json.loads((out / "config.json").read_text())["llmdrop"]["heal"][-1]
            runs[i].append({"peak": max(r["peak_rss"] for r in per_rank), "ranks": [r["peak_rss"] for r in per_rank],
                            "wall": wall, "final_kl": record["final_kl"], "engine": record["engine"],
                            "world_size": record["world_size"]})
            print(f"repeat {repeat} {model} {label}: peak RSS per rank {[_gib(r) for r in runs[i][-1]['ranks']]}, "
                  f"{wall:.0f}s, final KL {record['final_kl']:.5f}", flush=True)

    # The healed weights of the last repeat: 1 vs 2 ranks (same global batch), whole vs chunked KL.
    from llmdrop.checkpoint import load_checkpoint

    def max_diff(a: Path, b: Path) -> float:
        x, y = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
        return max(float((x[k] - y[k]).abs().max()) for k in x)

    diffs = {i: max_diff(work / f"row{first[rows[i][1]]}", work / f"row{i}") for i in (1, 2, 4, 5)}
    for i in range(len(rows)):
        shutil.rmtree(work / f"row{i}", ignore_errors=True)

    table_rows = []
    base = {m: statistics.median(r["peak"] for r in runs[i]) for m, i in first.items()}
    state = {m: _model_state(students[m], m) for m in MODELS}
    for i, (label, model, ranks, _, _) in enumerate(rows):
        peaks = [r["peak"] for r in runs[i]]
        walls = [r["wall"] for r in runs[i]]
        med = statistics.median(peaks)
        table_rows.append([model, label, runs[i][-1]["engine"], str(ranks), _gib(state[model] / ranks), _gib(med),
                           f"{_gib(min(peaks))} - {_gib(max(peaks))}", f"{med / base[model]:.3f}",
                           f"{statistics.median(walls):.0f} ({min(walls):.0f}-{max(walls):.0f})",
                           f"{runs[i][-1]['final_kl']:.5f}", f"{diffs[i]:.1e}" if i in diffs else ""])
    from llmdrop.report import table

    text = header("Healing: peak memory per rank (FSDP2, chunked KL)")
    text += (f"Each model with its attention layers dropped by `llmdrop.drop` (cosine, 16 x 256 tokens: SmolLM2-135M "
             f"{MODELS['smollm2-135m']}, Gemma-3-270M {MODELS['gemma3-270m']}), healed from the unpruned model for "
             f"{args.steps} steps of 2 x {args.seq_len} tokens (batch 1, gradient accumulation 2: one chunk per rank on "
             f"two ranks), all weights but the tied embeddings, float32, C4 text after the first {SKIP:,} tokens. "
             "SmolLM2 rows run the command line (`llmdrop heal`; 2 ranks: `torchrun --nproc-per-node 2 -m llmdrop "
             "heal`, gloo); Gemma rows call `llmdrop.heal` (kl_chunk and activation checkpointing are HealConfig "
             "fields). One intra-op thread per process. Model state per rank: computed, not measured: the weights of "
             "both models and the gradients and two AdamW moments of what trains, float32, divided by the ranks (what "
             "FSDP2 shards). Peak RSS: the largest rank's own peak resident memory (getrusage), median over "
             f"{args.repeats} interleaved repeats, each a fresh process; `x` is the median peak over the first row of "
             "the same model; wall seconds include start-up and loading (the machine is shared: they are noisy). "
             "Final KL: the mean per-token KL of the last step's batch; weight diff: the largest difference of any "
             "healed weight to the first row of the same model (last repeat). The glibc row sets "
             f"`MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}` for both ranks: by default glibc raises its mmap threshold to "
             "the largest block freed, and FSDP frees a gathered layer after every layer, so later allocations land in "
             "heap arenas that are seldom given back.\n\n")
    text += table(["model", "heal", "engine", "ranks", "model state per rank", "peak RSS per rank", "spread", "x",
                   "wall s (spread)", "final KL", "weight diff"], table_rows, markdown=True)
    text += ("\n\nWhat FSDP2 shards halves per rank; the rest of the peak does not depend on the number of ranks: the "
             "activations and logits of one micro-batch (the same chunk per rank), the unsharded root (embeddings and "
             "head) and one gathered layer at a time, the interpreter and libraries. At 135M parameters that rest is "
             "most of the peak; the model state is what grows with the model (a 7B student with its teacher: about "
             "140 GB in one process, 70 GB per rank on 2).\n")
    write_section(args.name, text)
    print(text)


if __name__ == "__main__":
    main()
