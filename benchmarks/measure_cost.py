"""Cost of measuring: `measure` (all three granularities) vs one plain forward pass over the same tokens, and peak
RSS as the number of calibration chunks grows (it should stay flat: running sums only).

python benchmarks/measure_cost.py [--repeats 3] [--chunks 16,64,256]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import header, write_section  # noqa: E402

from llmdrop.arch import arch_for  # noqa: E402
from llmdrop.bench import peak_rss_bytes  # noqa: E402
from llmdrop.calibration import load_calibration  # noqa: E402
from llmdrop.measure import measure  # noqa: E402
from llmdrop.models import load_model  # noqa: E402
from llmdrop.report import human_bytes, table  # noqa: E402

CAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "c4_validation_2k.jsonl"
SEQ = 512
BATCH = 4


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_child(chunks: int, queue) -> None:
    model, tok = load_model("smollm2-135m", progress=False)
    cal = load_calibration(tok, CAL, chunks, SEQ)
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) so it covers measuring alone
    measure(model, cal, batch_size=BATCH, progress=False)
    queue.put((before, _status_bytes("VmHWM"), peak_rss_bytes()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timing-chunks", type=int, default=16)
    ap.add_argument("--chunks", default="16,64,256")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", progress=False)
    cal = load_calibration(tok, CAL, args.timing_chunks, SEQ)
    decoder = model.get_submodule(arch_for(model).layers.rpartition(".")[0])

    def plain_decoder():
        with torch.inference_mode():
            for batch in cal.input_ids.split(BATCH):
                decoder(input_ids=batch, use_cache=False)

    def plain_model():
        with torch.inference_mode():
            for batch in cal.input_ids.split(BATCH):
                model(input_ids=batch, use_cache=False)

    runs = {"decoder": plain_decoder, "model": plain_model,
            "measure": lambda: measure(model, cal, batch_size=BATCH, progress=False)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats + 1):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            if rep:  # first round warms up
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ctx = multiprocessing.get_context("spawn")
    rss_rows = []
    for chunks in [int(c) for c in args.chunks.split(",")]:
        q = ctx.Queue()
        p = ctx.Process(target=_rss_child, args=(chunks, q))
        p.start()
        p.join()
        before, peak, process_peak = q.get()
        rss_rows.append([chunks, chunks * SEQ, human_bytes(before), human_bytes(peak), (peak - before) / 2**20,
                         human_bytes(process_peak)])
    text = header("Cost of measuring (SmolLM2-135M)")
    text += (f"{args.timing_chunks} chunks x {SEQ} tokens of the shared C4 text, batch {BATCH}, float32. Median of "
             f"{args.repeats} interleaved runs after a warm-up. `measure` computes attention, MLP and block scores "
             "in one pass; the plain pass runs the same decoder (no LM head), the full pass also the LM head.\n\n")
    text += table(["pass", "seconds", "x plain decoder"],
                  [["plain decoder forward", med["decoder"], 1.0],
                   ["llmdrop measure (attn + mlp + block)", med["measure"], med["measure"] / med["decoder"]],
                   ["full model forward (with logits)", med["model"], med["model"] / med["decoder"]]], markdown=True)
    text += ("\n\nMemory of a fresh process that loads the model and the chunks, then measures (batch 4): RSS "
             "when measuring starts, the peak while measuring (the kernel's high-water mark, reset just before), "
             "their difference, and the peak of the whole process (loading included).\n\n")
    text += table(["chunks", "tokens", "RSS at start", "peak while measuring", "growth MiB", "process peak"],
                  rss_rows, markdown=True)
    write_section("measure_cost", text)
    print(text)


if __name__ == "__main__":
    main()
