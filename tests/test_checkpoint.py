import json

import pytest
import torch
from safetensors import safe_open
from tiny import random_ids, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import llmdrop
from llmdrop.checkpoint import save
from llmdrop.errors import LlmdropError
from llmdrop.plan import DropPlan
from llmdrop.report import dir_bytes
from llmdrop.surgery import apply_plan


def _tensor_names(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("plan", [DropPlan(attn=[0, 2], num_layers=4), DropPlan(mlp=[1], num_layers=4),
                                  DropPlan(attn=[3], mlp=[0, 3], num_layers=4)])
def test_sublayer_checkpoint_reloads_identically(family, plan, tmp_path):
    base_dir, out = tmp_path / "base", tmp_path / "pruned"
    model = tiny_model(family)
    save(model, tiny_tokenizer(), base_dir)
    apply_plan(model, plan)
    save(model, tiny_tokenizer(), out)
    ids = random_ids(2, 12)
    expected = _logits(model, ids)

    loaded, tok = llmdrop.load(out)
    assert torch.equal(_logits(loaded, ids), expected)
    assert tok is not None and tok.eos_token == "<eos>"
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(_logits(remote, ids), expected)

    names = _tensor_names(out)
    for i in plan.attn:
        assert not any(f"layers.{i}.self_attn." in n or f"layers.{i}.input_layernorm" in n for n in names)
    for i in plan.mlp:
        assert not any(f"layers.{i}.mlp." in n for n in names)
    removed = len(_tensor_names(base_dir) - names)
    assert removed > 0 and not names - _tensor_names(base_dir)
    dropped_bytes = sum(p.numel() * 4 for p in tiny_model(family).parameters()) - \
        sum(p.numel() * 4 for p in {id(p): p for p in loaded.parameters()}.values())
    shrink = dir_bytes(base_dir) - dir_bytes(out)
    assert abs(shrink - dropped_bytes) < 4096  # only the safetensors header differs
    config = json.loads((out / "config.json").read_text())
    assert config["llmdrop"]["attn"] == plan.attn and config["llmdrop"]["mlp"] == plan.mlp
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llmdrop.LlmdropForCausalLM"


def test_block_drop_is_a_native_checkpoint(family, tmp_path):
    model = tiny_model(family)
    apply_plan(model, DropPlan(blocks=[1, 2], num_layers=4))
    save(model, tiny_tokenizer(), tmp_path / "blocks")
    ids = random_ids(2, 12)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "blocks")
    assert type(native).__module__.startswith("transformers.models.")
    assert native.config.num_hidden_layers == 2
    assert torch.equal(_logits(native, ids), _logits(model, ids))
    assert not (tmp_path / "blocks" / "modeling_llmdrop.py").exists()
    assert torch.equal(_logits(llmdrop.load(tmp_path / "blocks")[0], ids), _logits(model, ids))


def test_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LlmdropError, match="already exists"):
        save(tiny_model("llama"), None, out)
    assert (out / "keep.txt").read_text() == "mine"
    save(tiny_model("llama"), None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_save_leaves_nothing(tmp_path):
    def boom(_tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save(tiny_model("llama"), None, tmp_path / "out", finish=boom)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(LlmdropError, match="does not exist"):
        llmdrop.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmdropError, match="no config.json"):
        llmdrop.load(tmp_path / "empty")
    save(tiny_model("llama"), None, tmp_path / "bad")
    weights = tmp_path / "bad" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LlmdropError, match="corrupt"):
        llmdrop.load(tmp_path / "bad")


def test_device_auto_uses_accelerate_placement(tmp_path):
    model = tiny_model("qwen2")
    apply_plan(model, DropPlan(attn=[1], num_layers=4))
    save(model, tiny_tokenizer(), tmp_path / "p")
    placed, _ = llmdrop.load(tmp_path / "p", device="auto")
    assert {p.device.type for p in placed.parameters()} == {"cpu"}  # no GPU here: accelerate keeps it all on CPU
    ids = random_ids(1, 10)
    assert torch.equal(_logits(placed, ids), _logits(model, ids))
