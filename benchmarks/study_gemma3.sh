#!/usr/bin/env bash
# The paper's comparison on Gemma-3-270M (BENCHMARKS.md): another family, sliding-window attention, BOS-prefixed.
# Its 262k vocabulary makes lm-eval ~3x slower than on SmolLM2; batch 2 fits in memory. Resumable: re-run to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/llmdrop study gemma3-270m \
  --calibration ../shared/data/calibration/c4_validation_2k.jsonl --samples 64 --seq-len 1024 --batch-size 2 \
  --targets attn,mlp,block --n 3,6 \
  --tasks piqa,hellaswag,winogrande,arc_easy --limit 200 --eval-batch-size 2 --data local --ppl-samples 8 \
  -o benchmarks/results/gemma3-study "$@"
