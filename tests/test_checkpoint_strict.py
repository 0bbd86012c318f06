"""Strict checkpoint loading (M8), pruned checkpoints that plain transformers refuses (L2), read_config, precision."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import random_ids, tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from llmdrop.checkpoint import SOURCE_DTYPE, load_checkpoint, read_config, save
from llmdrop.errors import LlmdropError
from llmdrop.plan import DropPlan
from llmdrop.pruned_model import MODEL_TYPE, base_class, record_of
from llmdrop.surgery import apply_plan


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _pruned(tmp_path, family="llama", plan=None):
    model = tiny_model(family)
    apply_plan(model, plan or DropPlan(attn=[1], mlp=[2], num_layers=4))
    return model, save(model, tiny_tokenizer(), tmp_path / f"pruned-{family}")


def _rename_in_header(path, old: str, new: str):
    """What reliability.md's M8 did: the header stays valid, one key gets another name of the same length."""
    assert len(old) == len(new)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n).decode()
        assert f'"{old}"' in header
        f.seek(8)
        f.write(header.replace(f'"{old}"', f'"{new}"').encode())


def test_missing_tensor_is_refused(tmp_path):
    """M8: a renamed tensor used to load as a freshly random one, silently."""
    _, out = _pruned(tmp_path)
    _rename_in_header(out / "model.safetensors", "model.layers.3.mlp.down_proj.weight",
                      "model.layers.3.mlp.down_proj.wexght")
    with pytest.raises(LlmdropError, match=r"lacks 1 weight\(s\) the model needs \(model.layers.3.mlp.down_proj.weight"
                       r"\) and holds 1 weight\(s\) the model does not have") as err:
        load_checkpoint(out)
    assert "\n" not in str(err.value) and "write it again" in str(err.value)


def test_removed_tensor_of_a_native_checkpoint_is_refused(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmdropError, match="lacks 1 weight"):
        load_checkpoint(tmp_path / "m")


def test_tied_heads_and_dropped_modules_are_not_misses(tmp_path):
    from tiny import CONFIGS

    config = CONFIGS["llama"]()
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    apply_plan(model, DropPlan(attn=[0, 3], mlp=[1], num_layers=4))
    save(model, None, tmp_path / "tied")
    loaded, _ = load_checkpoint(tmp_path / "tied")
    ids = random_ids(1, 10)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_plain_from_pretrained_of_a_sublayer_pruned_checkpoint_fails_loudly(tmp_path, family):
    """L2: without trust_remote_code, transformers refuses (it used to build the unpruned model with random weights)."""
    model, out = _pruned(tmp_path, family)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == MODEL_TYPE and raw["llmdrop"]["base_model_type"] == model.config.model_type
    assert set(raw["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoConfig.from_pretrained(out)
    ids = random_ids(2, 12)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ours, _ = load_checkpoint(out)
    assert torch.equal(_logits(remote, ids), _logits(ours, ids))
    assert torch.equal(_logits(ours, ids), _logits(model, ids))
    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)) is type(model.config)


def test_read_config_gives_the_family_config(tmp_path):
    model, out = _pruned(tmp_path)
    config = read_config(out)
    assert type(config) is LlamaConfig and config.model_type == "llama"
    assert record_of(config)["attn"] == [1] and "base_model_type" not in record_of(config)
    assert base_class(config).__name__ == "LlamaForCausalLM"
    # re-saving a loaded pruned checkpoint gives the same config.json (no double rewrite of model_type)
    loaded, tok = load_checkpoint(out)
    again = save(loaded, tok, tmp_path / "again")
    first, second = (json.loads((d / "config.json").read_text()) for d in (out, again))
    assert first["model_type"] == second["model_type"] == MODEL_TYPE
    assert first["llmdrop"] == second["llmdrop"] and second["auto_map"] == first["auto_map"]


def test_read_config_errors_are_one_sentence(tmp_path):
    with pytest.raises(LlmdropError, match="does not exist"):
        read_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmdropError, match="no config.json"):
        read_config(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(LlmdropError, match="is not valid JSON"):
        read_config(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(LlmdropError, match="is not valid JSON"):
        read_config(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text("[]")
    with pytest.raises(LlmdropError, match="does not hold a JSON object"):
        read_config(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(LlmdropError, match="names no model_type"):
        read_config(tmp_path / "bad")


def test_saved_precision_follows_the_source(tmp_path):
    """Issue §3: a bf16 checkpoint measured in float32 is saved as bf16 again; dtype= chooses otherwise."""
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, _ = load_checkpoint(tmp_path / "bf16")
    assert next(model.parameters()).dtype == torch.float32 and getattr(model, SOURCE_DTYPE) == "bfloat16"
    apply_plan(model, DropPlan(attn=[2], num_layers=4))
    for name, dtype, want in (("keep", None, "BF16"), ("f32", "float32", "F32"), ("f16", "float16", "F16")):
        save(model, None, tmp_path / name, dtype=dtype)
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}  # noqa: SIM118
    reloaded, _ = load_checkpoint(tmp_path / "keep")
    assert getattr(reloaded, SOURCE_DTYPE) == "bfloat16"
    ids = random_ids(1, 10)
    # bf16 -> float32 -> bf16 loses nothing: the saved bf16 checkpoint computes what the in-memory model does
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    with pytest.raises(LlmdropError, match="unknown dtype 'int8'"):
        save(model, None, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_float32_tiny_models_round_trip_exactly(tmp_path, family):
    model, out = _pruned(tmp_path, family, DropPlan(attn=[0], mlp=[3], num_layers=4))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
    ids = random_ids(2, 12)
    assert torch.equal(_logits(load_checkpoint(out)[0], ids), _logits(model, ids))


def test_loading_a_pruned_checkpoint_asks_nothing(tmp_path, capfd):
    """llmdrop's own loader never meets model_type "llmdrop" through transformers: no remote-code prompt, no
    model-type warning (in a terminal the prompt would wait for an answer)."""
    _, path = _pruned(tmp_path)
    capfd.readouterr()
    model, tokenizer = load_checkpoint(path)
    out, err = capfd.readouterr()
    assert tokenizer is not None and record_of(model.config)["attn"]
    assert "custom code" not in out + err and "model of type" not in out + err


def _edit_config(out, edit):
    path = out / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_a_recorded_family_other_than_the_weights_is_refused(tmp_path):
    """S9: base_model_type "mistral" on a llama checkpoint built MistralForCausalLM (a 4,096-token sliding window by
    default) over llama weights, silently: families share tensor names, so strict loading cannot see it."""
    from llmdrop.pruned_model import family_problem

    _, out = _pruned(tmp_path)
    assert family_problem(json.loads((out / "config.json").read_text())) is None
    _edit_config(out, lambda raw: raw["llmdrop"].update(base_model_type="mistral"))
    with pytest.raises(LlmdropError, match=r"records the family 'mistral' under llmdrop.base_model_type, but its weights "
                                           r"were saved by LlamaForCausalLM \(family 'llama'\).*set base_model_type back "
                                           r"to 'llama'") as err:
        load_checkpoint(out)
    assert str(err.value).count(". ") == 0 and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="records the family 'mistral'"):  # the remote code refuses it too
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    _edit_config(out, lambda raw: raw.update(architectures=["MistralForCausalLM"]))  # both edited: nothing to compare
    assert family_problem(json.loads((out / "config.json").read_text())) is None


@pytest.mark.parametrize("edit,pattern", [
    (lambda raw: raw.pop("architectures"), "names no class in 'architectures'"),
    (lambda raw: raw.update(architectures=["NoSuchForCausalLM"]), "NoSuchForCausalLM, which is no model class"),
    (lambda raw: raw["llmdrop"].pop("base_model_type"), "no llmdrop.base_model_type naming the model family"),
])
def test_a_pruned_config_whose_family_cannot_be_checked_is_refused(tmp_path, edit, pattern):
    _, out = _pruned(tmp_path)
    _edit_config(out, edit)
    with pytest.raises(LlmdropError, match=pattern):
        read_config(out)


def test_every_family_loads_with_its_recorded_family(tmp_path, family):
    """The check accepts what save writes for each supported family (Gemma-3's text class included)."""
    model, out = _pruned(tmp_path, family)
    ids = random_ids(1, 10)
    assert torch.equal(_logits(load_checkpoint(out)[0], ids), _logits(model, ids))
