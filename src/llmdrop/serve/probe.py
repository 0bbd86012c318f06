"""Serve checkpoints in vLLM one after another and write what vLLM did as JSON: the tests' and the benchmark's probe.

    python -m llmdrop.serve.probe JOB.json OUT.json

runs in the environment that has vLLM (.venv-vllm); the caller, in llmdrop's own environment, compares. JOB.json:

    {"kv_cache_gib": 1, "engine": {"max_model_len": 128, ...},       # vllm.LLM keywords, the same for every model
     "models": [{"name": "llama-attn", "path": "DIR", "prompts": [[1, 5, 9], ...], "max_tokens": 8}, ...]}

For each model OUT.json gets the class vLLM built, the greedy tokens of every prompt, their log-probabilities, the
prompt tokens' log-probabilities, the KV cache vLLM allocated (tokens, blocks, the concurrency it reports for
``max_model_len``, the layers that hold it) and its start-up time; or the one-line error it failed with. OUT.json is
rewritten after each model, and a model already in it is not served again (a probe that was stopped resumes).

The engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless JOB.json's ``env`` says otherwise:
several small engines in turn start in seconds each, where vLLM's spawned engine process costs half a minute.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# What a test or benchmark compares needs the same engine every time: no prefix cache (a prompt's log-probabilities
# are then computed, never served from a cached block), no compilation (minutes on a CPU), float32.
DEFAULT_ENGINE = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": False}


def _kv(llm: Any) -> dict:
    """The KV cache vLLM allocated: blocks x block size tokens, the capacity and concurrency vLLM reported, and
    (when the engine runs in this process) which layers hold cache, each with its kind of cache."""
    cache = llm.llm_engine.vllm_config.cache_config
    blocks, size = cache.num_gpu_blocks, cache.block_size
    out = {"blocks": blocks, "block_size": size,
           "tokens": getattr(cache, "kv_cache_size_tokens", None) or (blocks or 0) * size,
           "max_concurrency": getattr(cache, "kv_cache_max_concurrency", None)}
    scheduler = getattr(getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None), "scheduler", None)
    config = getattr(scheduler, "kv_cache_config", None)
    if config is not None:
        out["layers"] = {name: _layer_need(group.kv_cache_spec, llm.llm_engine.vllm_config)
                         for group in config.kv_cache_groups for name in group.layer_names}
    return out


def _layer_need(spec: Any, vllm_config: Any) -> dict:
    """One cache layer's kind (vLLM's spec class: full or sliding window) and the bytes of cache one request of
    max_model_len takes in it, in whole blocks as vLLM allocates them (its concurrency is the KV memory over the sum
    of these over the cache layers)."""
    page = spec.page_size_bytes
    return {"kind": type(spec).__name__, "bytes_per_request": -(-spec.max_memory_usage_bytes(vllm_config) // page) * page}


def serve(spec: dict, engine: dict) -> dict:
    """Start vLLM on one checkpoint, generate greedily from each prompt, shut it down; what it did."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(spec["path"]), **{**DEFAULT_ENGINE, **engine})
    started = time.perf_counter() - start
    try:
        # ignore_eos: the reference greedy loop does not stop at EOS either; logprobs=0: the chosen token's only
        params = SamplingParams(temperature=0.0, max_tokens=int(spec.get("max_tokens", 8)), ignore_eos=True,
                                logprobs=0, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in spec["prompts"]], params, use_tqdm=False)
        results = []
        for prompt, out in zip(spec["prompts"], outs):
            gen = out.outputs[0]
            results.append({
                "tokens": list(gen.token_ids),
                "logprobs": [step[t].logprob for step, t in zip(gen.logprobs, gen.token_ids)],
                # vLLM has none for the first prompt token (nothing predicts it)
                "prompt_logprobs": [None if step is None else step[t].logprob
                                    for step, t in zip(out.prompt_logprobs, prompt)],
            })
        arch = llm.llm_engine.vllm_config.model_config.architectures
        return {"path": str(spec["path"]), "start_s": round(started, 2), "architecture": arch[0] if arch else None,
                "kv": _kv(llm), "outputs": results}
    finally:
        _shut_down(llm)


def _shut_down(llm: Any) -> None:
    # One engine at a time: the next one sizes its KV cache from the memory this one frees.
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0]}"


def run(job: dict, out: Path) -> dict:
    """Serve every model of `job` not already in `out`, writing `out` after each."""
    done = json.loads(out.read_text()) if out.exists() else {}
    results = done.get("models", {})
    import vllm

    for spec in job["models"]:
        if spec["name"] in results:
            continue
        try:
            results[spec["name"]] = serve(spec, job.get("engine", {}))
        except Exception as err:  # one model that vLLM refuses must not hide the others' results
            results[spec["name"]] = {"error": _first_line(err)}
        out.write_text(json.dumps({"vllm": vllm.__version__, "models": results}, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m llmdrop.serve.probe JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    # vLLM reads these when it starts an engine: set them before it is imported.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(job.get("kv_cache_gib", 1))
    for key, value in job.get("env", {}).items():
        os.environ[key] = str(value)
    run(job, Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
