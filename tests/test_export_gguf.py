import importlib.util

import gguf
import numpy as np
import pytest
import torch
from tiny import VOCAB, llama_cpp_logits, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmdrop.errors import LlmdropError
from llmdrop.export.gguf import ZERO_FFN_WIDTH, export_gguf
from llmdrop.plan import DropPlan
from llmdrop.surgery import apply_plan


def _bpe_tokenizer():
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(VOCAB)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {f.name: f.contents() for f in reader.fields.values()}


def test_sublayer_drops_write_deci_with_per_layer_shapes(tmp_path):
    model = tiny_model("llama")
    apply_plan(model, DropPlan(attn=[0, 2], mlp=[2, 3], num_layers=4))
    out = export_gguf(model, _bpe_tokenizer(), tmp_path / "m.gguf")
    reader, f = _fields(out)
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count"] == [4, 4, 0, 4]  # layer 0: zero "linear attention" (llama.cpp needs heads)
    assert f["deci.attention.head_count_kv"] == [0, 2, 0, 2]
    # layer 2 lost both (0), layer 3 keeps attention: a zero-weight FFN stands for its dropped MLP
    assert f["deci.feed_forward_length"] == [96, 96, 0, ZERO_FFN_WIDTH]
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight" not in names and "blk.2.ffn_up.weight" not in names
    assert "blk.0.attn_output.weight" in names and "blk.2.attn_output.weight" not in names
    assert "blk.1.attn_q.weight" in names and "blk.3.ffn_down.weight" in names
    down = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert not np.asarray(down.data).any()
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == len(VOCAB)


def test_rope_permutation_and_plain_llama(tmp_path):
    model = tiny_model("llama")
    apply_plan(model, DropPlan(blocks=[1], num_layers=4))
    out = export_gguf(model, _bpe_tokenizer(), tmp_path / "b.gguf")
    reader, f = _fields(out)
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 3
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    hf = model.model.layers[0].self_attn.q_proj.weight.detach()
    # Undo llama.cpp's interleaving: head h's rows (pairs) go back to two halves.
    n_head, d = 4, hf.shape[0] // 4
    got = torch.from_numpy(np.asarray(q.data).copy()).reshape(hf.shape)
    back = got.reshape(n_head, d // 2, 2, -1).swapaxes(1, 2).reshape(hf.shape)
    assert torch.equal(back, hf)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_outtypes(tmp_path, outtype):
    out = export_gguf(tiny_model("llama"), _bpe_tokenizer(), tmp_path / f"{outtype}.gguf", outtype=outtype)
    reader, _ = _fields(out)
    qtypes = {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")}
    assert qtypes == {outtype.upper()}


def test_unsupported_family_and_tokenizer(tmp_path):
    with pytest.raises(LlmdropError, match="cannot be expressed"):
        export_gguf(tiny_model("phi3"), _bpe_tokenizer(), tmp_path / "g.gguf")
    from tiny import tiny_tokenizer

    with pytest.raises(LlmdropError, match="WordLevel tokenizer is not supported"):
        export_gguf(tiny_model("llama"), tiny_tokenizer(), tmp_path / "w.gguf")
    assert list(tmp_path.iterdir()) == []


def test_vllm_export_has_block_configs_and_reloads(tmp_path):
    import json

    import llmdrop
    from llmdrop.checkpoint import save
    from llmdrop.export.vllm import export_vllm

    model = tiny_model("llama")
    apply_plan(model, DropPlan(attn=[0, 3], mlp=[1], num_layers=4))
    save(model, _bpe_tokenizer(), tmp_path / "p")
    export_vllm(model, tmp_path / "p", tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [True, False, False, True]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, True, False, False]
    assert {b["attention"]["n_heads_in_group"] for b in blocks} == {2}  # 4 heads / 2 KV heads
    # The config class vLLM loads with trust_remote_code gives attribute access, as its loader reads it.
    from transformers import AutoConfig

    remote = AutoConfig.from_pretrained(tmp_path / "v", trust_remote_code=True)
    assert remote.block_configs[0].attention.no_op is True and remote.block_configs[1].ffn.intermediate_size == 96
    ids = torch.randint(4, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(llmdrop.load(tmp_path / "v")[0](input_ids=ids).logits, model(input_ids=ids).logits)


def _vllm_loader_source():
    """nemotron_nas.py from the vllm wheel (downloaded once from PyPI, never installed)."""
    import os
    import subprocess
    import sys
    import tempfile
    import zipfile
    from pathlib import Path

    cache = Path(os.environ.get("LLMDROP_CACHE") or Path.home() / ".cache" / "llmdrop") / "vllm" / "nemotron_nas.py"
    if not cache.exists():
        with tempfile.TemporaryDirectory() as d:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "vllm==0.33.0", "-d", d],
                                 capture_output=True, timeout=600)
            wheels = list(Path(d).glob("vllm-*.whl"))
            if got.returncode or not wheels:
                pytest.skip("the vllm wheel could not be downloaded")
            with zipfile.ZipFile(wheels[0]) as z:
                text = z.read("vllm/model_executor/models/nemotron_nas.py").decode()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(text)
    return cache.read_text()


@pytest.mark.slow
def test_block_configs_hold_every_field_vllm_reads():
    import re

    from llmdrop.export.vllm import block_configs

    source = _vllm_loader_source()
    read = set(re.findall(r"block_config\.(\w+)\.(\w+)", source))
    optional = set(re.findall(r"hasattr\(block_config\.(\w+), \"(\w+)\"\)", source))
    assert ("attention", "no_op") in read and ("ffn", "no_op") in read and ("attention", "n_heads_in_group") in read
    model = tiny_model("llama")
    apply_plan(model, DropPlan(attn=[1], num_layers=4))
    for entry in block_configs(model):
        for section, field in read - optional:
            if field == "ffn_mult" or (section, field) in optional:
                continue
            assert field in entry[section], (section, field)
    # ffn_mult is guarded by hasattr; without it vLLM reads intermediate_size, which every entry has.
    assert ("ffn", "ffn_mult") in optional and all("intermediate_size" in e["ffn"] for e in block_configs(model))


def test_mergekit_yaml_rebuilds_the_block_dropped_model(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open

    from llmdrop.checkpoint import save
    from llmdrop.export.mergekit import export_mergekit, kept_ranges
    from llmdrop.surgery import apply_plan as drop

    exe = Path(sys.executable).with_name("mergekit-yaml")
    if not exe.exists() and not shutil.which("mergekit-yaml"):
        pytest.skip("mergekit is not installed (setup.sh installs it)")
    assert kept_ranges(6, [1, 2, 5]) == [(0, 1), (3, 5)]
    base = tmp_path / "base"
    save(tiny_model("llama"), _bpe_tokenizer(), base)
    model = tiny_model("llama")
    drop(model, DropPlan(blocks=[1, 2], num_layers=4), {"source_model": str(base)})
    save(model, _bpe_tokenizer(), tmp_path / "ours")
    export_mergekit(model.config, base, tmp_path / "merge.yaml")
    run = subprocess.run([str(exe if exe.exists() else shutil.which("mergekit-yaml")), str(tmp_path / "merge.yaml"),
                          str(tmp_path / "merged")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]

    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
        return out

    ours, merged = tensors(tmp_path / "ours"), tensors(tmp_path / "merged")
    assert ours.keys() == merged.keys()
    assert all(torch.equal(ours[k], merged[k]) for k in ours)


def _saved_llama(tmp_path, plan=None):
    from llmdrop.checkpoint import save

    model = tiny_model("llama")
    if plan is not None:
        apply_plan(model, plan, {"source_model": str(tmp_path / "base")})
    return save(model, _bpe_tokenizer(), tmp_path / "ckpt")


def test_export_entry_point_checks_the_output_first(tmp_path, monkeypatch):
    """X6, X7, X12 through llmdrop.export.export: one table of formats, the output checked before the model loads."""
    import os
    import stat

    from llmdrop import export as export_mod
    from llmdrop.export import FORMATS, export

    assert set(FORMATS) == {"gguf", "vllm", "mergekit"}
    src = _saved_llama(tmp_path, DropPlan(attn=[1], num_layers=4))
    old = os.umask(0o022)
    try:
        message = export(str(src), "gguf", tmp_path / "new" / "sub" / "x.gguf", progress=False)  # X7: parents made
    finally:
        os.umask(old)
    out = tmp_path / "new" / "sub" / "x.gguf"
    assert message.startswith(f"wrote {out} (") and "f32" in message
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # O15
    assert _fields(out)[1]["general.architecture"] == "deci"

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("llmdrop.models.load_model", no_loading)
    with pytest.raises(LlmdropError, match="already exists"):  # X12: refused up front
        export(str(src), "gguf", out)
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(LlmdropError, match="is a directory, not a file"):  # X6
        export(str(src), "gguf", tmp_path / "d.gguf", overwrite=True)
    with pytest.raises(LlmdropError, match="must be one of gguf, vllm, mergekit") as err:
        export(str(src), "onnx", tmp_path / "x.onnx")
    assert err.value.render(lambda p: {"fmt": "--format"}[p]) == "--format must be one of gguf, vllm, mergekit (got 'onnx')"
    with pytest.raises(LlmdropError, match="outtype must be one of f32, f16, q8_0"):
        export(str(src), "gguf", tmp_path / "y.gguf", outtype="q4")
    assert export_mod.EXPORTABLE == ("llama", "mistral")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "d.gguf", "new"]


def test_mergekit_refuses_sublayer_drops_without_recommending_what_cannot_work(tmp_path):
    """X3: the message names the formats that can express the drops and the families they take."""
    from llmdrop.export import export

    src = _saved_llama(tmp_path, DropPlan(mlp=[2], num_layers=4))
    with pytest.raises(LlmdropError, match="cannot express attention or MLP drops; the gguf and vllm formats can "
                                           r"\(for the llama and mistral families\)"):
        export(str(src), "mergekit", tmp_path / "m.yaml")
    assert not (tmp_path / "m.yaml").exists()


def test_vllm_export_of_a_pruned_checkpoint_reloads_with_llmdrop(tmp_path):
    """The sublayer-pruned checkpoint's own model_type ("llmdrop") does not leak into the vLLM export."""
    import json

    import llmdrop
    from llmdrop.export import export

    src = _saved_llama(tmp_path, DropPlan(attn=[0], mlp=[3], num_layers=4))
    export(str(src), "vllm", tmp_path / "v", progress=False)
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and "base_model_type" not in config["llmdrop"]
    assert not (tmp_path / "v" / "modeling_llmdrop.py").exists()
    ids = torch.randint(4, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(llmdrop.load(tmp_path / "v")[0](input_ids=ids).logits,
                           llmdrop.load(src)[0](input_ids=ids).logits)


def test_vllm_export_says_what_serves_it(tmp_path):
    """X2: a patched checkpoint's export warned "vLLM cannot serve this export" and then printed "serve it with
    `vllm serve ...`"; the one line now says stock vLLM cannot serve it, and the serve command only when it can."""
    from llmdrop.checkpoint import save
    from llmdrop.export import export
    from llmdrop.pruned_model import patch_sublayer

    model = tiny_model("llama")
    patch_sublayer(model, {"layers": "model.layers", "attn": "self_attn", "mlp": "mlp"}, "mlp", 1,
                   torch.eye(64) * 0.5)
    apply_plan(model, DropPlan(mlp=[1], attn=[2], num_layers=4))
    save(model, _bpe_tokenizer(), tmp_path / "pm")
    message = export(str(tmp_path / "pm"), "vllm", tmp_path / "pmv", progress=False)
    assert message.startswith(f"wrote {tmp_path / 'pmv'}: a Nemotron-NAS checkpoint whose linear patches")
    assert "stock vLLM cannot serve" in message and "llmdrop's vLLM plugin" in message
    assert f"vllm serve {tmp_path / 'pmv'}" not in message and "`vllm serve CHECKPOINT`" in message  # not the export
    assert (tmp_path / "pmv" / "config.json").is_file()  # still written: other readers and the plugin take it
    plain = _saved_llama(tmp_path, DropPlan(attn=[1], num_layers=4))
    assert export(str(plain), "vllm", tmp_path / "v", progress=False) == \
        f"wrote {tmp_path / 'v'}: serve it with `vllm serve {tmp_path / 'v'} --trust-remote-code`"


def test_vllm_export_of_patches_logs_no_contradicting_warning(tmp_path, caplog):
    from llmdrop.checkpoint import save
    from llmdrop.export.vllm import export_vllm, served_by
    from llmdrop.pruned_model import patch_sublayer

    model = tiny_model("llama")
    patch_sublayer(model, {"layers": "model.layers", "attn": "self_attn", "mlp": "mlp"}, "attn", 0)
    apply_plan(model, DropPlan(attn=[0], num_layers=4))
    save(model, _bpe_tokenizer(), tmp_path / "p")
    with caplog.at_level("WARNING", logger="llmdrop"):
        export_vllm(model, tmp_path / "p", tmp_path / "v")
    assert "serve" not in caplog.text
    assert "stock vLLM cannot serve" in served_by(model, tmp_path / "v")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_an_emptied_last_layer_runs_in_llama_cpp(tmp_path):
    """The last layer's attention and MLP both dropped: deci's `if (n_ff == 0) continue;` there would skip the
    output-row selection and llama.cpp aborts on the first evaluation (GGML_ASSERT(buffer)); a zero feed-forward
    keeps the step, and the logits match."""
    from tiny import llama_cpp_ready

    import llmdrop

    model, tok = llmdrop.load(str(llama_cpp_ready(tmp_path / "base")), progress=False)
    apply_plan(model, DropPlan(attn=[2, 3], mlp=[3], num_layers=4))
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    _, f = _fields(path)
    assert f["deci.feed_forward_length"] == [96, 96, 96, ZERO_FFN_WIDTH] and f["deci.attention.head_count_kv"][3] == 0
    ids = torch.randint(4, 100, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    got = llama_cpp_logits(path, ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max() and (got.argmax(-1) == ref.argmax(-1)).all()


TINY_PLANS = {
    "blocks": (DropPlan(blocks=[1], num_layers=4), ()),
    "attn": (DropPlan(attn=[0, 2], num_layers=4), ()),
    "mlp": (DropPlan(mlp=[1, 3], num_layers=4), ()),
    "patched": (DropPlan(attn=[0, 2, 3], mlp=[1, 2], num_layers=4), (("attn", 0), ("attn", 2), ("mlp", 1))),
}


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("kind", list(TINY_PLANS))
def test_tiny_llama_and_mistral_logits_match_in_llama_cpp(tmp_path, family, kind):
    """Every kind of drop and patch of both llama-shaped families, in llama.cpp (llama or deci), against llmdrop."""
    from tiny import _COMMON, CONFIGS
    from transformers import AutoModelForCausalLM

    from llmdrop.pruned_model import patch_sublayer

    plan, patches = TINY_PLANS[kind]
    config = CONFIGS[family]()
    config.vocab_size = len(VOCAB) + 1  # one embedding row per token of the tokenizer below
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(3)
    for sublayer, i in patches:
        w = torch.randn(_COMMON["hidden_size"], _COMMON["hidden_size"], generator=g) / 8
        patch_sublayer(model, {"layers": "model.layers", "attn": "self_attn", "mlp": "mlp"}, sublayer, i, w)
    apply_plan(model, plan)
    # llama.cpp wants BPE merges: one merge, one more token
    vocab = [*VOCAB, "th"]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges=[("t", "h")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    assert _fields(path)[1]["general.architecture"] == ("llama" if kind == "blocks" else "deci")
    ids = torch.randint(4, len(VOCAB), (30,), generator=torch.Generator().manual_seed(1)).tolist()
    got = llama_cpp_logits(path, ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    error = np.abs(got - ref).max()
    assert error < 1e-2 * np.abs(ref).max()
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * error  # random tiny models have near ties
    assert clear.mean() > 0.9 and (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_a_sliding_window_llama_cpp_does_not_apply_is_a_warning(tmp_path, caplog):
    from tiny import CONFIGS
    from transformers import AutoModelForCausalLM

    config = CONFIGS["mistral"]()
    config.sliding_window = 8
    model = AutoModelForCausalLM.from_config(config).eval()
    with caplog.at_level("WARNING", logger="llmdrop"):
        export_gguf(model, _bpe_tokenizer(), tmp_path / "m.gguf")
    assert "sliding window of 8 tokens is not written, so the GGUF matches it only up to 8 tokens" in caplog.text
