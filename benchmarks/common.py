"""Shared by the benchmark scripts: machine description and BENCHMARKS.md assembly.

Each script writes its section to benchmarks/results/<name>.md (with the command, machine and date); render()
rebuilds BENCHMARKS.md from every section, so re-running one benchmark updates only its part.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ["speed_smollm2", "measure_cost", "study_smollm2", "study_gemma3", "recover_quality", "recover_quality_cal64",
         "recover_quality_cal128", "recover_quality_loss", "recover_quality_loss_patched", "recover_quality_gemma3",
         "recover_quality_gemma3_cal64", "recover_quality_blocks",
         "recover_quality_blocks_loss", "heal_quality", "heal_quality_cal128", "heal_quality_gemma3",
         "heal_quality_gemma3_cal64", "tasks_quality", "tasks_quality_cal128", "tasks_quality_blocks",
         "tasks_quality_blocks_loss", "tasks_quality_gemma3", "tasks_quality_gemma3_cal64",
         "long_context", "long_context_gemma3", "stream", "stream_8b"]


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def header(title: str, command: str | None = None) -> str:
    command = command or " ".join(["python", *sys.argv])
    today = datetime.date.today().isoformat()
    return f"## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \nDate: {today}\n\n"


def write_section(name: str, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text.rstrip() + "\n")
    render()


def render() -> None:
    parts = ["# llmdrop benchmarks", "",
             "Figures from the scripts in `benchmarks/`; each section names its command, machine and date. The "
             "machines are shared and noisy: timings are medians of repeated, interleaved runs, and comparisons are "
             "ratios measured in the same run.", ""]
    names = [n for n in ORDER if (RESULTS / f"{n}.md").exists()]
    names += sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in ORDER)
    for name in names:
        parts += [(RESULTS / f"{name}.md").read_text().rstrip(), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
