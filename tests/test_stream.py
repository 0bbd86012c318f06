import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import random_ids, tiny_model, tiny_tokenizer

import llmdrop
from llmdrop.checkpoint import save
from llmdrop.errors import LlmdropError
from llmdrop.measure import measure
from llmdrop.plan import DropPlan
from llmdrop.stream import drop_streamed, measure_streamed
from llmdrop.surgery import apply_plan


def _save(tmp_path, family, name="src"):
    path = tmp_path / name
    save(tiny_model(family), tiny_tokenizer(), path)
    return path


@pytest.mark.parametrize("budget", [None, 2000])  # 2000 bytes: hidden states go to disk
def test_streamed_scores_equal_in_memory(family, tmp_path, budget):
    path = _save(tmp_path, family)
    ids = random_ids(3, 20)
    a = measure(tiny_model(family), ids, batch_size=2, progress=False)
    b = measure_streamed(path, ids, batch_size=2, max_memory=budget, progress=False)
    for kind in ("attn", "mlp", "block"):
        assert b.of(kind) == pytest.approx(a.of(kind), abs=1e-5)
    assert b.tokens == a.tokens


def test_streamed_no_residual_scores_equal_in_memory(tmp_path):
    path = _save(tmp_path, "gemma3")
    ids = random_ids(2, 16)
    a = measure(tiny_model("gemma3"), ids, residual=False, progress=False)
    b = measure_streamed(path, ids, residual=False, progress=False)
    assert b.attn == pytest.approx(a.attn, abs=1e-5) and b.mlp == pytest.approx(a.mlp, abs=1e-5)


def _tensors(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return out


@pytest.mark.parametrize("plan", [DropPlan(blocks=[1], num_layers=4), DropPlan(attn=[0, 2], mlp=[3], num_layers=4),
                                  DropPlan(blocks=[0], attn=[2], num_layers=4)])
def test_streamed_drop_equals_in_memory_drop(tmp_path, plan):
    src = _save(tmp_path, "gemma3")
    model = tiny_model("gemma3")
    apply_plan(model, plan)
    save(model, tiny_tokenizer(), tmp_path / "mem")
    drop_streamed(src, plan, tmp_path / "stream", shard_bytes=20_000)  # small shards: several files + index
    assert (tmp_path / "stream" / "model.safetensors.index.json").exists()
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((tmp_path / "mem" / "config.json").read_text())
    cb = json.loads((tmp_path / "stream" / "config.json").read_text())
    for key in ("num_hidden_layers", "layer_types", "llmdrop", "auto_map"):
        assert ca.get(key) == cb.get(key), key
    ids = random_ids(1, 10)
    with torch.no_grad():
        assert torch.equal(llmdrop.load(tmp_path / "stream")[0](input_ids=ids).logits, model(input_ids=ids).logits)


def test_streamed_drop_refuses_an_incomplete_checkpoint(tmp_path):
    src = _save(tmp_path, "llama")
    (src / "model.safetensors").unlink()
    with pytest.raises(LlmdropError, match="no safetensors weights"):
        drop_streamed(src, DropPlan(attn=[1], num_layers=4), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_stream_measure_and_drop(tmp_path, text_file, capsys):
    from llmdrop.cli import main

    src = _save(tmp_path, "qwen3")
    common = ["--calibration", str(text_file), "--samples", "3", "--seq-len", "16", "-q"]
    assert main(["measure", str(src), *common, "-o", str(tmp_path / "a.json")]) == 0
    assert main(["measure", str(src), *common, "--stream", "--max-memory", "1KB", "-o", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert b["attn"] == pytest.approx(a["attn"], abs=1e-5)
    assert main(["drop", str(src), "--stream", "--scores", str(tmp_path / "b.json"), "--target", "joint", "--n", "3",
                 "-o", str(tmp_path / "d")]) == 0
    assert len(llmdrop.load(tmp_path / "d")[0].config.llmdrop["plan"]["chosen_scores"]) == 3


def test_two_ranks_equal_one_process(tmp_path, text_file):
    """torchrun with 2 CPU processes (gloo): chunks sharded, sums all-reduced, the same scores as one process."""
    src = _save(tmp_path, "llama")
    args = ["measure", str(src), "--calibration", str(text_file), "--samples", "5", "--seq-len", "16",
            "--batch-size", "1", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "llmdrop", *args, "-o", str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "llmdrop", *args, "-o", str(tmp_path / "two.json")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    assert b["tokens"] == a["tokens"] == 80 and b["calibration"]["ranks"] == 2
    for kind in ("attn", "mlp", "block"):
        assert b[kind] == pytest.approx(a[kind], abs=1e-6)


def test_bf16_checkpoint_is_streamed_in_the_requested_dtype(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    model.config.dtype = "bfloat16"  # the meta skeleton then has bf16 parameters
    model.save_pretrained(tmp_path / "bf16")
    ids = random_ids(2, 12)
    reference = measure(tiny_model("llama").to(torch.bfloat16).float(), ids, progress=False)
    streamed = measure_streamed(tmp_path / "bf16", ids, dtype="float32", progress=False)
    assert streamed.attn == pytest.approx(reference.attn, abs=1e-5)


def _truncated(tmp_path):
    src = _save(tmp_path, "llama")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return src


def test_truncated_weights_are_one_sentence(tmp_path):
    """S2: SafetensorError used to escape as a traceback from both streamed paths."""
    src = _truncated(tmp_path)
    with pytest.raises(LlmdropError, match="could not read the weights in .*incomplete or corrupt"):
        measure_streamed(src, random_ids(1, 8), progress=False)
    with pytest.raises(LlmdropError, match="could not read the weights"):
        drop_streamed(src, DropPlan(attn=[1], num_layers=4), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_family_and_bad_config_are_one_sentence(tmp_path):
    """S4 (an encoder-decoder) and S5 (config.json that is not JSON)."""
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=112,
                                        d_kv=8)).save_pretrained(t5)
    with pytest.raises(LlmdropError, match="unsupported model family 't5'"):
        measure_streamed(t5, random_ids(1, 8), progress=False)
    src = _save(tmp_path, "llama")
    (src / "config.json").write_text("{not json")
    with pytest.raises(LlmdropError, match="config.json is not valid JSON"):
        measure_streamed(src, random_ids(1, 8), progress=False)
    with pytest.raises(LlmdropError, match="config.json is not valid JSON"):
        drop_streamed(src, DropPlan(attn=[1], num_layers=4), tmp_path / "out")


def test_streamed_drop_writes_provenance_through_finish(tmp_path):
    src = _save(tmp_path, "llama")
    out = drop_streamed(src, DropPlan(attn=[1], num_layers=4), tmp_path / "out", provenance={"source_model": "x"},
                        finish=lambda tmp: (tmp / "extra.txt").write_text("hi"))
    assert (out / "extra.txt").read_text() == "hi"
    assert llmdrop.load(out)[0].config.llmdrop["source_model"] == "x"


@pytest.mark.parametrize("streamed, budget", [(False, None), (True, None), (True, 3000)])
def test_layer_walk_holds_what_each_layer_reads(tmp_path, streamed, budget):
    """LayerWalk (the machinery of measure_streamed and of the layer-wise patch fit): after running layers up to i,
    it holds every chunk's input of layer i as the whole model computes it, from memory or read layer by layer; a
    walk of a model in memory can start at any layer."""
    from llmdrop.arch import arch_for
    from llmdrop.stream import CheckpointReader, LayerWalk, empty_model

    family = "gemma3"  # sliding windows, sandwich norms and a scaled embedding: what a wrong walk gets wrong
    ids = random_ids(5, 20)
    with torch.no_grad():
        hidden = tiny_model(family)(input_ids=ids, output_hidden_states=True).hidden_states
    if streamed:
        path = _save(tmp_path, family)
        model, reader = empty_model(path), CheckpointReader(path)
    else:
        model, reader = tiny_model(family), None
    start = 0 if streamed else 2
    with LayerWalk(model, arch_for(model), ids, 2, budget, reader) as walk:
        walk.start(start)
        for i in range(start, 3):
            held = torch.cat([walk.store.get(b) for b in range(len(walk.batches))])
            assert torch.allclose(held, hidden[i], atol=1e-5), i
            with walk.loaded(i):
                walk.run(i)
        assert walk.layer_calls == 3 * 3 and (walk.store.dir is not None) == (budget is not None)
        spill = walk.store.dir
    assert spill is None or not spill.exists()
