"""Healing by distillation: the KL falls, resume equals an uninterrupted run, nothing half-written, ties kept,
bad pairs refused. Several ranks (FSDP2) and the chunked KL: tests/test_heal_fsdp.py."""

import json
import shutil
import signal

import pytest
import torch
from tiny import CONFIGS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import llmdrop
from llmdrop import checkpoint, cli, models
from llmdrop import distill as distill_mod
from llmdrop import heal as heal_mod
from llmdrop.calibration import load_calibration
from llmdrop.errors import LlmdropError
from llmdrop.heal import HealConfig, heal, kl_divergence, state_dir
from llmdrop.options import parse_count
from llmdrop.plan import DropPlan
from llmdrop.surgery import apply_plan

SEQ = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared machine: one intra-op thread is several times faster than two fighting for cores (a
    one-process resume took 0.7 s instead of 5 s under load), as the ranks of test_heal_fsdp run with
    OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tied_model(seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS["llama"]()
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _pair(tmp_path, tied: bool = False, attn=(1,)):
    """(student dir, teacher dir): a tiny llama and the same model with attention layers dropped."""
    teacher = _tied_model() if tied else tiny_model("llama")
    tok = tiny_tokenizer()
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    student = _tied_model() if tied else tiny_model("llama")
    if attn:
        apply_plan(student, DropPlan(attn=list(attn), num_layers=4))
    student_dir = tmp_path / "student"
    llmdrop.save(student, tok, student_dir)
    return student_dir, teacher_dir


def _config(student, teacher, out, text_file, **kw):
    # No held-out check unless a test asks for one: at its default 4,096 tokens it was most of this file's time.
    args = dict(tokens=SEQ * 2 * 8, seq_len=SEQ, batch_size=2, lr=3e-3, warmup=0.1, calibration=str(text_file),
                skip_tokens=0, progress=False, save_every=None, check_tokens=0)
    args.update(kw)
    return HealConfig(str(student), teacher=str(teacher), output=str(out), **args)


def _weights(path):
    model, _ = llmdrop.load(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_heal_lowers_the_kl_and_keeps_the_record(tmp_path, text_file):
    student, teacher = _pair(tmp_path)
    out = tmp_path / "healed"
    result = heal(_config(student, teacher, out, text_file, tokens=SEQ * 2 * 20))
    assert result.steps == 20 and result.tokens == SEQ * 2 * 20 and len(result.kl) == 20
    assert result.last_kl < result.first_kl and result.tokens_per_s > 0
    assert not state_dir(out).exists()
    # KL on fixed chunks, before and after, from the checkpoints on disk
    ids = load_calibration(tiny_tokenizer(), text_file, samples=4, seq_len=SEQ).input_ids
    teacher_model, _ = llmdrop.load(teacher)
    before = kl_divergence(llmdrop.load(student)[0], teacher_model, ids)
    healed, _ = llmdrop.load(out)
    after = kl_divergence(healed, teacher_model, ids)
    assert after < 0.7 * before
    record = healed.config.llmdrop
    assert record["attn"] == [1]  # the drop survives healing
    (entry,) = record["heal"]
    assert entry["tokens"] == result.tokens and entry["steps"] == 20 and entry["train"] == "all"
    assert entry["teacher"] == str(teacher) and entry["final_kl"] == pytest.approx(result.last_kl)
    # the embedding was not trained by default
    assert torch.equal(healed.model.embed_tokens.weight, llmdrop.load(student)[0].model.embed_tokens.weight)


def test_resume_equals_an_uninterrupted_run(tmp_path, text_file, monkeypatch):
    student, teacher = _pair(tmp_path)
    whole = heal(_config(student, teacher, tmp_path / "whole", text_file, save_every=2))
    out = tmp_path / "cut"
    original = distill_mod._save_state

    def save_then_stop(folder, config, step, *args):
        original(folder, config, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        heal(_config(student, teacher, out, text_file, save_every=2))
    monkeypatch.setattr(distill_mod, "_save_state", original)
    # nothing half-written: no output, no temporary entry beside it, only the resumable state
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cut")) == []
    assert json.loads((state_dir(out) / "heal-state.json").read_text())["step"] == 4
    with pytest.raises(LlmdropError, match="resume"):  # never silently thrown away
        heal(_config(student, teacher, out, text_file, save_every=2))
    with pytest.raises(LlmdropError, match="other settings"):
        heal(_config(student, teacher, out, text_file, save_every=2, resume=True, lr=1e-3))
    resumed = heal(_config(student, teacher, out, text_file, save_every=2, resume=True))
    assert resumed.resumed_from == 4 and resumed.steps == whole.steps == 8
    assert resumed.kl == pytest.approx(whole.kl, abs=1e-7)
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-7, rtol=0), name
    assert not state_dir(out).exists()


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_tied_embeddings_stay_tied(tmp_path, text_file, train_embeddings):
    student, teacher = _pair(tmp_path, tied=True)
    out = tmp_path / "healed"
    heal(_config(student, teacher, out, text_file, train_embeddings=train_embeddings))
    healed, _ = llmdrop.load(out)
    assert healed.config.tie_word_embeddings
    assert healed.lm_head.weight.data_ptr() == healed.model.embed_tokens.weight.data_ptr()
    before = llmdrop.load(student)[0].model.embed_tokens.weight
    assert torch.equal(healed.model.embed_tokens.weight, before) != train_embeddings


def test_norms_trains_only_norms_and_lora_merges(tmp_path, text_file):
    student, teacher = _pair(tmp_path)
    base = _weights(student)
    heal(_config(student, teacher, tmp_path / "norms", text_file, train="norms"))
    normed = _weights(tmp_path / "norms")
    changed = {k for k in base if not torch.equal(base[k], normed[k])}
    assert changed and all("norm" in k for k in changed)
    pytest.importorskip("peft")
    result = heal(_config(student, teacher, tmp_path / "lora", text_file, train="lora", lora_rank=4))
    lora = _weights(tmp_path / "lora")
    assert lora.keys() == base.keys()  # adapters merged: a plain checkpoint again
    assert not torch.equal(lora["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert llmdrop.load(tmp_path / "lora")[0].config.llmdrop["heal"][0]["train"] == "lora"
    assert result.last_kl < result.first_kl


def test_bad_pairs_and_settings_are_one_sentence(tmp_path, text_file):
    student, _teacher = _pair(tmp_path)
    tok = tiny_tokenizer()
    for name, change in (("vocab", {"vocab_size": 120}), ("hidden", {"hidden_size": 48})):
        config = CONFIGS["llama"]()
        for k, v in change.items():
            setattr(config, k, v)
        other = tmp_path / name
        AutoModelForCausalLM.from_config(config).save_pretrained(other)
        tok.save_pretrained(other)
        with pytest.raises(LlmdropError, match="vocabulary" if name == "vocab" else "hidden size") as err:
            heal(_config(student, other, tmp_path / "out", text_file))
        assert "teacher" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LlmdropError, match="no linear patches"):
        heal(_config(student, _teacher, tmp_path / "out", text_file, train="patches"))
    with pytest.raises(LlmdropError, match="one optimizer step"):
        _config(student, _teacher, tmp_path / "out", text_file, tokens=SEQ)
    with pytest.raises(LlmdropError, match="train"):
        _config(student, _teacher, tmp_path / "out", text_file, train="everything")
    (tmp_path / "taken").mkdir()
    with pytest.raises(LlmdropError, match="already exists"):
        heal(_config(student, _teacher, tmp_path / "taken", text_file))
    assert parse_count("82k") == 82_000 and parse_count("2M") == 2_000_000 and parse_count("1.5M") == 1_500_000
    assert HealConfig("s", "t", "o", tokens="1M").tokens == 1_000_000
    with pytest.raises(LlmdropError, match="skip_tokens"):  # by default the first 64k tokens are kept for reporting
        heal(_config(student, _teacher, tmp_path / "out", text_file, skip_tokens=heal_mod.DEFAULT_SKIP_TOKENS))


def test_distill_in_memory_as_run_would(text_file):
    """The path of `llmdrop run --heal`: models in memory, text after the chunks run reads, record added."""
    teacher, student, tok = tiny_model("llama"), tiny_model("llama"), tiny_tokenizer()
    apply_plan(student, DropPlan(attn=[1], num_layers=4))
    config = HealConfig("in-memory", teacher="tiny", output="unused", tokens=SEQ * 2 * 30, seq_len=SEQ, batch_size=2,
                        lr=1e-3, calibration=str(text_file), skip_tokens=8 * SEQ, progress=False, save_every=None)
    chunks = heal_mod.healing_text(config, tok, bos=False)
    heldout = load_calibration(tok, text_file, samples=8, seq_len=SEQ).input_ids
    # the healing text starts right after the 8 chunks skipped (run's calibration and held-out text)
    assert torch.equal(chunks[0], load_calibration(tok, text_file, samples=1, seq_len=SEQ, skip=8).input_ids[0])
    before = kl_divergence(student, teacher, heldout)
    model, result = heal_mod.distill(student, teacher, chunks, config)
    assert model is student and result.output is None and result.steps == 30
    assert kl_divergence(model, teacher, heldout) < 0.8 * before
    entry = heal_mod.record_heal(model, config, result)
    assert model.config.llmdrop["heal"] == [entry] and model.config.llmdrop["attn"] == [1]
    assert not any(p.requires_grad for p in model.parameters())


def test_heal_measures_the_kl_on_the_text_right_after_the_healing_text(tmp_path, text_file):
    student, teacher = _pair(tmp_path)
    config = _config(student, teacher, tmp_path / "healed", text_file, tokens=SEQ * 2 * 20, check_tokens=SEQ * 4)
    result = heal(config)
    assert result.check_tokens == SEQ * 4
    assert result.check_kl_after < result.check_kl_before
    # the check chunks are the 4 chunks after the 40 the steps trained on, measured here independently
    ids = load_calibration(tiny_tokenizer(), text_file, samples=4, seq_len=SEQ, skip=40).input_ids
    teacher_model = llmdrop.load(teacher)[0]
    assert result.check_kl_before == pytest.approx(kl_divergence(llmdrop.load(student)[0], teacher_model, ids), rel=1e-5)
    healed = llmdrop.load(tmp_path / "healed")[0]
    assert result.check_kl_after == pytest.approx(kl_divergence(healed, teacher_model, ids), rel=1e-4)
    (entry,) = healed.config.llmdrop["heal"]
    assert entry["check_kl_before"] == pytest.approx(result.check_kl_before)
    assert entry["check_kl_after"] == pytest.approx(result.check_kl_after) and entry["check_tokens"] == SEQ * 4


def test_a_heal_that_moves_away_from_the_teacher_says_so(tmp_path, text_file, caplog):
    student, teacher = _pair(tmp_path)
    config = _config(student, teacher, tmp_path / "healed", text_file, tokens=SEQ * 2 * 4, lr=1.0, warmup=0.0,
                     check_tokens=SEQ * 4)
    with caplog.at_level("WARNING", logger="llmdrop"):
        result = heal(config)
    assert result.check_kl_after > result.check_kl_before
    assert "did not bring the student closer to the teacher" in caplog.text and "lower --lr" in caplog.text


def test_no_check_text_no_check(tmp_path, text_file):
    student, teacher = _pair(tmp_path)
    result = heal(_config(student, teacher, tmp_path / "healed", text_file, check_tokens=0))
    assert result.check_kl_before is None and result.check_kl_after is None and result.check_tokens == 0
    assert "check_kl_after" not in llmdrop.load(tmp_path / "healed")[0].config.llmdrop["heal"][0]
    with pytest.raises(LlmdropError, match="check_tokens"):
        _config(student, teacher, tmp_path / "x", text_file, check_tokens=-1)


def _no_weights_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(checkpoint, "load_checkpoint", refuse)
    monkeypatch.setattr(models, "load_model", refuse)


def test_the_teacher_cannot_be_the_student(tmp_path, text_file, monkeypatch):
    """H3: healing a model against itself trained on float noise, made it worse and blamed the learning rate."""
    student, _teacher = _pair(tmp_path)
    _no_weights_load(monkeypatch)
    (tmp_path / "link").symlink_to(student)
    for same in (student, tmp_path / "link", f"{student}/"):
        with pytest.raises(LlmdropError, match="is the student .* itself.*give the unpruned model"):
            heal(_config(student, same, tmp_path / "out", text_file))
    shutil.copytree(student, tmp_path / "copy")
    with pytest.raises(LlmdropError, match="holds the same weights as the student"):
        heal(_config(student, tmp_path / "copy", tmp_path / "out", text_file))
    assert not (tmp_path / "out").exists()


def test_a_heal_state_that_is_no_object_is_one_sentence(tmp_path, text_file, monkeypatch):
    """H5: heal-state.json holding valid JSON that is not an object gave an AttributeError."""
    student, teacher = _pair(tmp_path)
    _no_weights_load(monkeypatch)
    out = tmp_path / "healed"
    state_dir(out).mkdir()
    for text in ("[]", "3", '"step"'):
        (state_dir(out) / "heal-state.json").write_text(text)
        with pytest.raises(LlmdropError, match="is not a heal state llmdrop wrote"):
            heal(_config(student, teacher, out, text_file, resume=True))
    (state_dir(out) / "heal-state.json").write_text('{"step": 2, "fingerprint": []}')
    with pytest.raises(LlmdropError, match="saved with other settings"):
        heal(_config(student, teacher, out, text_file, resume=True))


@pytest.mark.parametrize("broken", ["no-state-key", "bad-state-name", "no-metadata", "garbage-metadata"])
def test_a_foreign_state_is_one_sentence_before_the_weights_load(tmp_path, text_file, monkeypatch, broken):
    """H7: a state that llmdrop did not write (keys missing, its DCP folder missing or foreign) gave a traceback
    after the teacher had loaded; now it is one sentence before any weights load."""
    student, teacher = _pair(tmp_path)
    out = tmp_path / "healed"
    config = _config(student, teacher, out, text_file, resume=True)
    state_dir(out).mkdir()
    info = {"step": 2, "fingerprint": config.fingerprint(), "kl": [0.1, 0.1], "scheduler": {}, "world_size": 1,
            "state": "step-2"}
    if broken == "no-state-key":
        del info["state"]
    elif broken == "bad-state-name":
        info["state"] = "../elsewhere"
    elif broken == "garbage-metadata":
        (state_dir(out) / "step-2").mkdir()
        (state_dir(out) / "step-2" / ".metadata").write_bytes(b"not a checkpoint")
    (state_dir(out) / "heal-state.json").write_text(json.dumps(info))
    _no_weights_load(monkeypatch)
    with pytest.raises(LlmdropError, match="(is not one llmdrop wrote|could not read the heal state) .*; remove that "
                                           "directory to start over"):
        heal(config)


def _cli_heal(student, teacher, out, text_file, *extra):
    return cli.main(["heal", str(student), "--teacher", str(teacher), "--tokens", str(SEQ * 2 * 4), "--seq-len", str(SEQ),
                     "--batch-size", "2", "--lr", "3e-3", "--calibration", str(text_file), "--skip-tokens", "0",
                     "--check-tokens", "0", "--save-every", "2", "-o", str(out), "-q", *extra])


def test_a_stopped_heal_says_its_state_was_kept(tmp_path, text_file, monkeypatch, capsys):
    """H2: SIGTERM after a saved state is not 'nothing was written': the state is what --resume needs."""
    student, teacher = _pair(tmp_path)
    out = tmp_path / "healed"
    original = distill_mod._save_state
    capsys.readouterr()  # the progress bars of saving the pair

    def stop_before_saving(folder, config, step, *args):
        raise KeyboardInterrupt  # Ctrl-C before any state: nothing was written

    monkeypatch.setattr(distill_mod, "_save_state", stop_before_saving)
    assert _cli_heal(student, teacher, out, text_file) == 130
    assert capsys.readouterr().err.splitlines() == ["llmdrop: interrupted; nothing was written"]
    assert not state_dir(out).exists()

    def save_then_stop(folder, config, step, *args):
        original(folder, config, step, *args)
        raise cli.Terminated(signal.SIGTERM)

    monkeypatch.setattr(distill_mod, "_save_state", save_then_stop)
    assert _cli_heal(student, teacher, out, text_file) == 128 + signal.SIGTERM
    warning, last = capsys.readouterr().err.splitlines()
    assert warning == (f"llmdrop: warning: stopped; the heal state at step 2 of 4 was kept in {state_dir(out)}: the "
                       "same command with --resume continues from there")
    assert last == f"llmdrop: terminated; no output was written, but the resumable state in {state_dir(out)} was kept"
    assert not out.exists() and json.loads((state_dir(out) / "heal-state.json").read_text())["step"] == 2
    monkeypatch.setattr(distill_mod, "_save_state", original)
    assert _cli_heal(student, teacher, out, text_file, "--resume") == 0
    assert out.is_dir() and not state_dir(out).exists()


def test_near_trains_only_the_layers_next_to_the_drops(tmp_path, text_file):
    # 4 layers, attention 0 dropped: layers 0 and 1 are next to it, 2 and 3 are not.
    student, teacher = _pair(tmp_path, attn=(0,))
    base = _weights(student)
    heal(_config(student, teacher, tmp_path / "near", text_file, train="near"))
    healed = _weights(tmp_path / "near")
    changed = {k for k in base if not torch.equal(base[k], healed[k])}
    assert changed and {k.split(".")[2] for k in changed} == {"0", "1"}
    assert llmdrop.load(tmp_path / "near")[0].config.llmdrop["heal"][0]["train"] == "near"


@pytest.mark.parametrize("plan, near", [
    (dict(attn=[2]), {1, 2, 3}),
    (dict(mlp=[0], attn=[5]), {0, 1, 4, 5}),
    (dict(blocks=[2]), {1, 2}),  # kept layers 0 1 | 3 4 5 renumbered 0 1 2 3 4: before and after the gap
    (dict(blocks=[2, 3]), {1, 2}),
    (dict(blocks=[0, 5]), {0, 3}),  # at the ends only one side exists
])
def test_near_layers_are_either_side_of_each_change(plan, near):
    config = CONFIGS["llama"]()
    config.num_hidden_layers = 6
    model = AutoModelForCausalLM.from_config(config)
    apply_plan(model, DropPlan(**plan, num_layers=6))
    assert distill_mod.near_layers(model, len(model.model.layers)) == near


def test_the_learning_rate_decays_to_final_lr():
    factor = distill_mod._schedule(100, 0.1, 0.2)
    assert factor(0) < factor(9) < 1.0 and factor(10) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(0.2) and factor(55) == pytest.approx(0.6)
    assert distill_mod._schedule(100, 0.1)(100) == pytest.approx(0.0)
    with pytest.raises(LlmdropError, match="final_lr"):
        HealConfig("s", teacher="t", output="o", tokens=1000, final_lr=1.5)
