#!/usr/bin/env bash
# The paper's comparison on SmolLM2-135M (BENCHMARKS.md). Hours on 2 cores; resumable: re-run to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/llmdrop study smollm2-135m \
  --calibration ../shared/data/calibration/c4_validation_2k.jsonl --samples 64 --seq-len 1024 \
  --targets attn,mlp,block,joint --n 4,8,12,15 --random-baseline 3 --random-targets attn \
  --tasks piqa,hellaswag,winogrande,arc_easy --limit 300 --data local --ppl-samples 8 \
  -o benchmarks/results/smollm2-study "$@"
