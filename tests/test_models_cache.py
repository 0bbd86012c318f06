"""The GGUF conversion cache (M21-M25), model resolution errors (M2, M12, M13) and the source precision."""

import contextlib
import json
import os
import shutil
import stat
import time

import pytest
import torch
from safetensors import safe_open
from tiny import random_ids, tiny_model, tiny_tokenizer
from transformers import GPT2Config, T5Config, T5ForConditionalGeneration

from llmdrop import models
from llmdrop.checkpoint import SOURCE_DTYPE, load_checkpoint, save
from llmdrop.errors import LlmdropError
from llmdrop.export.gguf import export_gguf


def _bpe_tokenizer():
    from test_export_gguf import _bpe_tokenizer as make

    return make()


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny llama GGUF written by llmdrop's own export (f32: the conversion gives back exactly its weights)."""

    def make(name="model.gguf", seed=0, folder="src"):
        path = tmp_path / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(tiny_model("llama", seed=seed), _bpe_tokenizer(), path)
        return path

    return make


def _entries(cache):
    return sorted(p for p in (cache / "converted").iterdir())


def _logits(model, ids):
    """Logits of the tokens the GGUF's tokenizer has: its export keeps one embedding row per token (llama.cpp's
    rule), so a converted model's vocabulary is that long."""
    with torch.no_grad():
        return model(input_ids=ids).logits[..., :len(_bpe_tokenizer())]


def test_conversion_is_cached_and_keyed_on_the_whole_file(tiny_gguf, tmp_path):
    """M21: the same file edited in place (same size) is converted again, never served from the stale entry."""
    cache = tmp_path / "cache"
    path = tiny_gguf()
    first = models.convert_gguf(path, progress=False, cache_dir=cache)
    assert models.convert_gguf(path, progress=False, cache_dir=cache) == first
    record = json.loads((first / models.SOURCE_RECORD).read_text())
    assert len(record["sha256"]) == 64 and record["file"] == str(path.resolve())
    ids = random_ids(1, 8)
    before = _logits(models.load_model(str(path), cache_dir=cache, progress=False)[0], ids)
    size = path.stat().st_size
    with path.open("r+b") as fh:  # zero the last 64 KiB: tensor data, not metadata (lm_head / last layer)
        fh.seek(size - (64 << 10))
        fh.write(bytes(64 << 10))
    assert path.stat().st_size == size
    second = models.convert_gguf(path, progress=False, cache_dir=cache)
    assert second != first and len(_entries(cache)) == 2
    after = _logits(models.load_model(str(path), cache_dir=cache, progress=False)[0], ids)
    assert not torch.equal(before, after)


def test_same_name_and_size_in_two_directories_are_two_entries(tiny_gguf, tmp_path):
    """M22: a/model.gguf and b/model.gguf with other weights each give their own model."""
    cache = tmp_path / "cache"
    a, b = tiny_gguf(folder="a", seed=0), tiny_gguf(folder="b", seed=1)
    assert a.stat().st_size == b.stat().st_size
    ids = random_ids(1, 8)
    got_a = _logits(models.load_model(str(a), cache_dir=cache, progress=False)[0], ids)
    got_b = _logits(models.load_model(str(b), cache_dir=cache, progress=False)[0], ids)
    assert torch.allclose(got_a, _logits(tiny_model("llama", seed=0), ids), atol=1e-5)
    assert torch.allclose(got_b, _logits(tiny_model("llama", seed=1), ids), atol=1e-5)
    assert len(_entries(cache)) == 2


@pytest.mark.parametrize("poison", ["tokenizer_only", "config_no_weights", "no_record", "other_file"])
def test_poisoned_entry_is_replaced(tiny_gguf, tmp_path, poison):
    """M24 / M25: an entry holding only tokenizer files (what torchrun left) is never trusted, and replaced."""
    cache = tmp_path / "cache"
    path = tiny_gguf()
    good = models.convert_gguf(path, progress=False, cache_dir=cache)
    if poison == "tokenizer_only":
        for f in good.iterdir():
            if not f.name.startswith("tokenizer"):
                f.unlink()
    elif poison == "config_no_weights":
        (good / "model.safetensors").unlink()
    elif poison == "no_record":
        (good / models.SOURCE_RECORD).unlink()
    else:
        (good / models.SOURCE_RECORD).write_text(json.dumps({"sha256": "0" * 64}))
    again = models.convert_gguf(path, progress=False, cache_dir=cache)
    assert again == good and (again / "config.json").is_file() and (again / "model.safetensors").is_file()
    assert [p.name for p in (cache / "converted").iterdir()] == [good.name]  # nothing left beside it
    model, _ = load_checkpoint(again)
    ids = random_ids(1, 8)
    assert torch.allclose(_logits(model, ids), _logits(tiny_model("llama"), ids), atol=1e-5)


def test_lost_rename_race_uses_the_complete_winner(tiny_gguf, tmp_path, monkeypatch):
    """M23: two processes convert at once; the one that finishes second uses the winner's entry, no traceback."""
    path = tiny_gguf()
    winner = models.convert_gguf(path, progress=False, cache_dir=tmp_path / "other-cache")
    cache = tmp_path / "cache"
    real = models.atomic_dir

    @contextlib.contextmanager
    def racing(target, overwrite=False):
        with real(target, overwrite) as tmp:
            yield tmp
            shutil.copytree(winner, target)  # the other process renames its complete entry into place first

    monkeypatch.setattr(models, "atomic_dir", racing)
    got = models.convert_gguf(path, progress=False, cache_dir=cache)
    assert got.name == winner.name and models._complete(got, json.loads((got / "source.json").read_text())["sha256"])
    assert [p.name for p in (cache / "converted").iterdir()] == [winner.name]  # our temporary entry is gone


def test_incomplete_conversion_is_never_published(tiny_gguf, tmp_path, monkeypatch):
    """M24: under torch.distributed, transformers writes no weights on rank != 0; such a directory never goes live."""
    from transformers import PreTrainedModel

    def rank1_save(self, folder, *args, **kwargs):  # what save_pretrained does on a non-zero rank
        pass

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", rank1_save)
    with pytest.raises(LlmdropError, match="wrote no complete checkpoint"):
        models.convert_gguf(tiny_gguf(), progress=False, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "converted").iterdir()) == []


def test_non_zero_rank_waits_for_rank_0(tiny_gguf, tmp_path, monkeypatch):
    path = tiny_gguf()
    monkeypatch.setattr(models, "_distributed_rank", lambda: 1)
    monkeypatch.setattr(models, "_RANK_WAIT_S", 0.5)
    with pytest.raises(LlmdropError, match="rank 0 did not finish converting"):
        models.convert_gguf(path, progress=False, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(models, "_distributed_rank", lambda: 0)
    done = models.convert_gguf(path, progress=False, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(models, "_distributed_rank", lambda: 1)
    assert models.convert_gguf(path, progress=False, cache_dir=tmp_path / "cache") == done


def test_cache_entries_have_normal_modes(tiny_gguf, tmp_path):
    """O15: converted entries were 0700 and their weights 0600."""
    old = os.umask(0o022)
    try:
        entry = models.convert_gguf(tiny_gguf(), progress=False, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert stat.S_IMODE((entry / "model.safetensors").stat().st_mode) == 0o644


def test_cache_dir_is_an_argument_not_the_environment(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "llmdrop"
    models.convert_gguf(tiny_gguf(), progress=False, cache_dir=tmp_path / "arg-cache")
    assert (tmp_path / "arg-cache" / "converted").is_dir() and not (tmp_path / "env-cache").exists()


def test_gguf_source_is_saved_as_bfloat16_by_default(tiny_gguf, tmp_path):
    """Issue §3: a GGUF source keeps a checkpoint of modest size (bf16), unless another dtype is asked for."""
    model, tok = models.load_model(str(tiny_gguf()), cache_dir=tmp_path / "cache", progress=False)
    assert getattr(model, SOURCE_DTYPE) == "bfloat16" and next(model.parameters()).dtype == torch.float32
    save(model, tok, tmp_path / "bf16")
    save(model, tok, tmp_path / "f32", dtype="float32")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # saving did not touch the model in memory
    ids = random_ids(1, 8)
    assert torch.equal(_logits(load_checkpoint(tmp_path / "f32")[0], ids), _logits(model, ids))


def test_typo_of_an_alias_fails_fast_offline(monkeypatch):
    """M2: no minute of hub retries, one sentence that suggests the alias."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(LlmdropError, match="did you mean the built-in alias 'smollm2-135m'") as err:
        models.load_model("smollm2-135x")
    assert time.monotonic() - start < 10 and "\n" not in str(err.value)
    with pytest.raises(LlmdropError, match="built-in aliases are smollm2-135m, gemma3-270m"):
        models.load_model("nope-model-xyz")


def test_unreachable_hub_counts_as_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_answers", lambda host, port, timeout: False)
    with pytest.raises(LlmdropError, match="the hub is unreachable"):
        models.load_model("nope-model-xyz")


def test_encoder_decoder_is_an_unsupported_family(tmp_path):
    """M12: T5 is said to be unsupported, not 'incomplete or corrupt'."""
    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=112))
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(LlmdropError, match="unsupported model family 't5': it is not a decoder-only") as err:
        models.load_model(str(tmp_path / "t5"))
    assert "corrupt" not in str(err.value)


def test_unknown_model_type_is_an_unsupported_family(tmp_path):
    """M13: a model_type transformers does not know."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "foo"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=112)).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "foobarnet"}))
    with pytest.raises(LlmdropError, match="unsupported model family 'foobarnet'") as err:
        models.load_model(str(path))
    assert "corrupt" not in str(err.value) and "\n" not in str(err.value)


def test_directory_named_like_a_gguf_is_a_checkpoint(saved_tiny, tmp_path):
    """M17: a directory named x.gguf is not reported as a missing file."""
    where = saved_tiny("llama").rename(tmp_path / "x.gguf")
    assert models.resolve(str(where)) == where


def test_checkpoint_source_precision_is_recorded(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    save(model, tiny_tokenizer(), tmp_path / "bf")
    loaded, _ = models.load_model(str(tmp_path / "bf"))
    assert next(loaded.parameters()).dtype == torch.float32 and getattr(loaded, SOURCE_DTYPE) == "bfloat16"


def test_unwritable_cache_fails_before_converting(tiny_gguf, tmp_path, monkeypatch):
    from llmdrop import files

    path = tiny_gguf()
    cache = tmp_path / "cache"
    (cache / "converted").mkdir(parents=True)
    real = files.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(cache / "converted")):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("converted before checking the cache")))
    with pytest.raises(LlmdropError, match="set cache_dir to a writable directory"):
        models.convert_gguf(path, progress=False, cache_dir=cache)


def test_llmdrops_own_deci_gguf_is_refused_in_one_sentence(tmp_path, monkeypatch):
    """X6: `llmdrop eval P4.gguf` on the deci GGUF that `export --format gguf` writes for attention / MLP drops failed
    with transformers' message cut mid-word ("... your version of Tra); is it a complete GGUF?")."""
    from llmdrop.plan import DropPlan
    from llmdrop.surgery import apply_plan

    model = tiny_model("llama")
    apply_plan(model, DropPlan(attn=[1], mlp=[2], num_layers=4))
    path = export_gguf(model, _bpe_tokenizer(), tmp_path / "P4.gguf")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("handed to transformers")))
    with pytest.raises(LlmdropError) as err:
        models.load_model(str(path), cache_dir=tmp_path / "cache", progress=False)
    assert str(err.value) == (
        f"GGUF file {path} has llama.cpp's deci architecture (what `llmdrop export --format gguf` writes for attention "
        "/ MLP drops), which is for llama.cpp only, as transformers cannot load it; give the pruned checkpoint "
        "directory it was exported from instead")
    assert not (tmp_path / "cache" / "converted").exists() or not list((tmp_path / "cache" / "converted").iterdir())


def test_gguf_of_an_architecture_transformers_cannot_load(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_gguf_architecture", lambda path: "rwkv7")
    with pytest.raises(LlmdropError, match=r"has the architecture 'rwkv7', which this transformers \(.*\) cannot load "
                                           "from a GGUF; give the model's checkpoint directory or hub id instead"):
        models.convert_gguf(tiny_gguf(), progress=False, cache_dir=tmp_path / "cache")
    assert all(models._transformers_reads(a) for a in ("llama", "gemma3", "qwen2", "qwen2moe", "phi3"))
    assert not models._transformers_reads("deci")


def test_a_cut_gguf_is_one_sentence(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(LlmdropError, match=r"could not read GGUF file .*cut.gguf \(.*\); is it a complete GGUF\?"):
        models.convert_gguf(path, progress=False, cache_dir=tmp_path / "cache")


def test_error_text_is_cut_between_words():
    from llmdrop.checkpoint import first_line

    text = ("The checkpoint you are trying to load has model type `deci` but Transformers does not recognize this "
            "architecture. This could be because of an issue with the checkpoint, or because your version of "
            "Transformers is out of date.\nSecond line")
    short = first_line(ValueError(text))
    assert short.endswith("your version of ...") and len(short) <= 204 and "Tra " not in short + " "
    assert first_line(ValueError("short\nmore")) == "short" and first_line(ValueError("")) == ""
    assert first_line("x" * 300, 10) == "x" * 10 + " ..."  # one long word (a path): nothing better than a cut
