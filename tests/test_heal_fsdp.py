"""Healing on several ranks with FSDP2 (CPU, gloo) and the chunked KL.

One torchrun launch of 2 ranks (the slow part: two interpreters importing torch and transformers) runs every
multi-rank heal; the 1-process references run here. Checked: each rank holds half of every sharded parameter and of
the AdamW moments; the healed weights of 2 ranks equal one process's (all, lora, norms, chunked KL with activation
checkpointing); a heal stopped on 2 ranks resumes on 1, and one stopped on 1 resumes on 2, both equal to an
uninterrupted run; the record names the engine and world size; bad input is one sentence. The chunked KL equals the
whole one, loss and gradients, in every family whose head differs (Gemma's soft-capping).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_heal import SEQ, _config, _pair, _weights, one_thread  # noqa: F401 (an autouse fixture)
from tiny import random_ids, tiny_model, tiny_tokenizer

import llmdrop
from llmdrop import cli
from llmdrop import distill as distill_mod
from llmdrop.errors import LlmdropError
from llmdrop.heal import HealConfig, heal, state_dir
from llmdrop.plan import DropPlan
from llmdrop.surgery import apply_plan

# 8 steps of 4 chunks: 2 chunks per rank, 2 micro-batches each (gradient accumulation under FSDP too).
STEPS = dict(tokens=SEQ * 4 * 8, batch_size=1, grad_accum=4)
TOL = 1e-5

_RANKS = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from llmdrop import cli
    from llmdrop import distill
    from llmdrop.heal import HealConfig, heal

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher, text, root = sys.argv[1:5]
    seen = {"models": [], "optimizer": None}
    shard, save = distill._shard, distill._save_state

    def recording_shard(model, base, mesh):  # each model's local and global sizes right after sharding
        shard(model, base, mesh)
        seen["models"].append({n: [type(p).__name__, p.to_local().numel(), p.numel()]
                               for n, p in model.named_parameters()})

    def recording_save(folder, config, step, trained, names, optimizer, *rest):
        if seen["optimizer"] is None:
            seen["optimizer"] = [[type(v).__name__, v.to_local().numel(), v.numel()] for s in optimizer.state.values()
                                 for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
        save(folder, config, step, trained, names, optimizer, *rest)
        if folder.name.startswith("cut2") and step == 4:
            raise KeyboardInterrupt

    distill._shard, distill._save_state = recording_shard, recording_save

    def run(out, **kw):
        args = dict(tokens=16 * 4 * 8, seq_len=16, batch_size=1, grad_accum=4, lr=3e-3, warmup=0.1, calibration=text,
                    skip_tokens=0, progress=False, save_every=None, check_tokens=0, shard=(rank, world))
        args.update(kw)
        return heal(HealConfig(student, teacher=teacher, output=f"{root}/{out}", **args)).kl

    results = {"two": run("two", save_every=2)}
    try:
        run("cut2", save_every=2)
    except KeyboardInterrupt:
        results["cut2"] = "stopped"
    results["cut1"] = run("cut1", save_every=2, resume=True)
    results["lora2"] = run("lora2", train="lora", lora_rank=4)
    results["norms2"] = run("norms2", train="norms")
    results["chunk2"] = run("chunk2", kl_chunk=5, activation_checkpointing=True)
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump({"seen": seen, "results": results}, f)
    # Last: the command line under torchrun tears the process group down when it returns.
    code = cli.main(["heal", student, "--teacher", teacher, "--tokens", "1000", "--seq-len", "16", "--batch-size", "1",
                     "--grad-accum", "3", "--calibration", text, "--skip-tokens", "0", "-o", f"{root}/odd", "-q"])
    with open(f"{root}/code{rank}.txt", "w") as f:
        f.write(str(code))
""")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Paths and results of the 1-process references and the 2-rank runs, made once for the module."""
    root = tmp_path_factory.mktemp("fsdp")
    text = root / "cal.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog while counting to "
                                f"{i * 7}." for i in range(60)))
    student, teacher = _pair(root)

    def one(out, **kw):
        return heal(_config(student, teacher, root / out, text, **{**STEPS, **kw}))

    refs = {"whole": one("whole", save_every=2), "lora1": one("lora1", train="lora", lora_rank=4),
            "norms1": one("norms1", train="norms")}
    save = distill_mod._save_state

    def stop_at_4(folder, config, step, *args):
        save(folder, config, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    distill_mod._save_state = stop_at_4
    try:
        with pytest.raises(KeyboardInterrupt):
            one("cut1", save_every=2)
    finally:
        distill_mod._save_state = save
    assert json.loads((state_dir(root / "cut1") / "heal-state.json").read_text())["world_size"] == 1
    script = root / "ranks.py"
    script.write_text(_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(student), str(teacher), str(text), str(root)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    codes = [int((root / f"code{r}.txt").read_text()) for r in range(2)]
    return dict(root=root, student=student, teacher=teacher, text=text, refs=refs, ranks=out, codes=codes,
                stderr=proc.stderr, one=one)


def _assert_same_weights(a_dir, b_dir, tol=TOL):
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=tol, rtol=0), (name, float((a[name] - b[name]).abs().max()))


def _heal_record(path):
    return json.loads((path / "config.json").read_text())["llmdrop"]["heal"][-1]


def test_each_rank_holds_half_of_every_parameter_and_of_the_optimizer_state(ranks):
    for rank in ranks["ranks"]:
        student, teacher = rank["seen"]["models"][:2]  # the first heal: its student, then its teacher
        for sizes in (student, teacher):
            for name, (kind, local, whole) in sizes.items():
                assert kind == "DTensor" and local * 2 == whole, (name, kind, local, whole)
        moments = rank["seen"]["optimizer"]
        assert len(moments) == 2 * len([n for n in student if "embed_tokens" not in n])  # exp_avg, exp_avg_sq each
        assert all(kind == "DTensor" and local * 2 == whole for kind, local, whole in moments)


def test_two_ranks_train_the_weights_of_one_process(ranks):
    root, whole = ranks["root"], ranks["refs"]["whole"]
    assert any(not torch.equal(a, b) for a, b in zip(_weights(root / "whole").values(),
                                                     _weights(ranks["student"]).values()))  # it trained
    _assert_same_weights(root / "whole", root / "two")
    for rank in ranks["ranks"]:
        assert rank["results"]["two"] == pytest.approx(whole.kl, abs=TOL)
    record = _heal_record(root / "two")
    assert record["engine"] == "fsdp2" and record["world_size"] == 2
    assert record["final_kl"] == pytest.approx(whole.last_kl, abs=TOL)
    assert _heal_record(root / "whole")["engine"] == "single process" and _heal_record(root / "whole")["world_size"] == 1
    assert not state_dir(root / "two").exists()


def test_only_some_weights_train_under_fsdp_lora_and_norms(ranks):
    root = ranks["root"]
    _assert_same_weights(root / "lora1", root / "lora2")
    _assert_same_weights(root / "norms1", root / "norms2")
    base, normed = _weights(ranks["student"]), _weights(root / "norms2")
    changed = {k for k in base if not torch.equal(base[k], normed[k])}
    assert changed and all("norm" in k for k in changed)
    assert _weights(root / "lora2").keys() == base.keys()  # adapters merged: a plain checkpoint again


def test_chunked_kl_with_activation_checkpointing_on_two_ranks_equals_one_process(ranks):
    _assert_same_weights(ranks["root"] / "whole", ranks["root"] / "chunk2")
    assert ranks["ranks"][0]["results"]["chunk2"] == pytest.approx(ranks["refs"]["whole"].kl, abs=TOL)


def test_a_heal_stopped_on_two_ranks_resumes_on_one(ranks):
    root = ranks["root"]
    assert ranks["ranks"][0]["results"]["cut2"] == "stopped" and not (root / "cut2").exists()
    info = json.loads((state_dir(root / "cut2") / "heal-state.json").read_text())
    assert info["step"] == 4 and info["world_size"] == 2 and info["engine"] == "fsdp2"
    assert sorted(p.name for p in state_dir(root / "cut2").iterdir()) == ["heal-state.json", "step-4"]
    resumed = ranks["one"]("cut2", save_every=2, resume=True)
    assert resumed.resumed_from == 4 and resumed.kl == pytest.approx(ranks["refs"]["whole"].kl, abs=TOL)
    _assert_same_weights(root / "whole", root / "cut2")
    assert _heal_record(root / "cut2")["world_size"] == 1 and not state_dir(root / "cut2").exists()


def test_a_heal_stopped_on_one_process_resumes_on_two_ranks(ranks):
    root = ranks["root"]
    _assert_same_weights(root / "whole", root / "cut1")
    assert ranks["ranks"][1]["results"]["cut1"] == pytest.approx(ranks["refs"]["whole"].kl, abs=TOL)
    assert _heal_record(root / "cut1")["world_size"] == 2 and not state_dir(root / "cut1").exists()


def test_a_batch_the_ranks_cannot_split_is_one_sentence_and_exit_2(ranks, tmp_path):
    assert ranks["codes"] == [2, 2]
    assert ("llmdrop: error: one step's 3 chunks (--batch-size x --grad-accum) cannot be split evenly over 2 ranks; "
            "make --batch-size x --grad-accum a multiple of 2") in ranks["stderr"]
    assert not (ranks["root"] / "odd").exists() and not state_dir(ranks["root"] / "odd").exists()
    with pytest.raises(LlmdropError, match="cannot be split evenly over 4 ranks"):
        HealConfig("s", "t", "o", tokens=4096, batch_size=2, grad_accum=3, shard=(0, 4))
    HealConfig("s", "t", "o", tokens=4096, batch_size=2, grad_accum=2, shard=(0, 4))  # 4 chunks over 4 ranks: fine


def test_a_state_saved_by_another_model_is_one_sentence(tmp_path, text_file, monkeypatch):
    student, teacher = _pair(tmp_path)
    out = tmp_path / "healed"
    save = distill_mod._save_state

    def stop_at_2(folder, config, step, *args):
        save(folder, config, step, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "_save_state", stop_at_2)
    with pytest.raises(KeyboardInterrupt):
        heal(_config(student, teacher, out, text_file, save_every=2))
    monkeypatch.setattr(distill_mod, "_save_state", save)
    # Another model written where the student was: same path (so the same settings), other weights.
    other = tiny_model("llama")
    apply_plan(other, DropPlan(attn=[2], num_layers=4))
    llmdrop.save(other, tiny_tokenizer(), student, overwrite=True)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher loaded before the check")

    monkeypatch.setattr("llmdrop.heal.load_model", no_teacher)
    with pytest.raises(LlmdropError, match=r"^the heal state in .* was saved for other weights than this heal trains "
                                           r"\(model\.layers\.1\.\S+: absent then, \[\d+(, \d+)*\] now\), by another "
                                           "model or another train; remove that directory to start over$"):
        heal(_config(student, teacher, out, text_file, save_every=2, resume=True))
    assert not out.exists() and (state_dir(out) / "heal-state.json").is_file()


def test_fsdp_on_a_device_or_group_that_cannot_is_one_sentence(tmp_path, text_file, monkeypatch):
    import torch.distributed as dist

    with pytest.raises(LlmdropError, match=r"^device mps cannot heal on several ranks: FSDP2 shards here on cpu \(gloo\) "
                                           "or cuda \\(nccl\\) only"):
        distill_mod.check_engine("mps", "gloo")
    distill_mod.check_engine("cpu", "cpu:gloo,cuda:nccl")
    # A CPU heal in a process group without gloo (here a pretend NCCL group of 2): refused before anything is read.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    student, teacher = _pair(tmp_path)
    with pytest.raises(LlmdropError, match=r"^device cpu cannot be sharded by FSDP2 over a nccl process group, which "
                                           "needs gloo for cpu tensors; start the group with gloo"):
        heal(_config(student, teacher, tmp_path / "out", text_file, **STEPS, shard=(0, 2)))
    assert not (tmp_path / "out").exists() and not state_dir(tmp_path / "out").exists()
    assert cli.BY_NAME["heal"].distributed  # the CLI starts gloo for cpu and nccl for cuda under torchrun


# --- the chunked KL, in one process -----------------------------------------------------------------------------------


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_the_chunked_kl_equals_the_whole_kl_loss_and_gradients(family):
    """Gemma 2 soft-caps its logits: the chunked head must too. Activation checkpointing changes nothing either."""
    teacher, student = tiny_model(family, seed=0), tiny_model(family, seed=1)
    teacher.requires_grad_(False)
    ids = random_ids(samples=3, seq_len=SEQ)
    cap = getattr(student.config, "final_logit_softcapping", None)
    whole = distill_mod._step_kl(student, teacher, ids, ids.numel(), None, None)
    expected = _grads(student)
    for chunk, checkpointed in ((5, False), (7, True), (1000, False)):
        student.zero_grad(set_to_none=True)
        layers = distill_mod._decoder_layers(student) if checkpointed else []
        with distill_mod._deferred_heads(student, teacher) as heads, distill_mod._checkpointed(layers):
            distill_mod._check_heads(student, teacher, ids[:1, :8], heads)
            chunked = distill_mod._step_kl(student, teacher, ids, ids.numel(), chunk, heads)
        assert float(chunked) == pytest.approx(float(whole), rel=1e-5)
        got = _grads(student)
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-7), (chunk, name)
    assert "forward" not in student.get_output_embeddings().__dict__  # the heads are put back
    assert getattr(student.config, "final_logit_softcapping", None) == cap and (cap is not None) == (family == "gemma2")
    assert all("forward" not in layer.__dict__ for layer in distill_mod._decoder_layers(student))
    check = distill_mod.kl_divergence(student, teacher, ids, batch_size=2)
    assert distill_mod.kl_divergence(student, teacher, ids, batch_size=2, chunk=4) == pytest.approx(check, rel=1e-5)


def test_a_head_the_chunked_kl_cannot_reproduce_is_refused():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    student.config.final_logit_softcapping = 0.5  # llama's forward ignores it, so the chunked head would differ
    with distill_mod._deferred_heads(student, teacher) as heads, pytest.raises(LlmdropError, match="kl_chunk"):
        distill_mod._check_heads(student, teacher, random_ids(1, 8), heads)
