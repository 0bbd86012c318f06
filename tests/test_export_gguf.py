import gguf
import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model
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
    assert f["deci.attention.head_count"] == [0, 4, 0, 4]
    assert f["deci.attention.head_count_kv"] == [0, 2, 0, 2]
    # layer 2 lost both (0), layer 3 keeps attention: a zero-weight FFN stands for its dropped MLP
    assert f["deci.feed_forward_length"] == [96, 96, 0, ZERO_FFN_WIDTH]
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight" not in names and "blk.2.ffn_up.weight" not in names
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
        export_gguf(tiny_model("gemma3"), _bpe_tokenizer(), tmp_path / "g.gguf")
    from tiny import tiny_tokenizer

    with pytest.raises(LlmdropError, match="WordLevel tokenizer is not supported"):
        export_gguf(tiny_model("llama"), tiny_tokenizer(), tmp_path / "w.gguf")
    assert list(tmp_path.iterdir()) == []
