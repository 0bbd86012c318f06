"""A study whose start failed must not lock its own directory (R12)."""

import json

import pytest
from tiny import tiny_model, tiny_tokenizer

from llmdrop import study as study_mod
from llmdrop.errors import LlmdropError


def _config(tmp_path, monkeypatch, calibration):
    model_dir = tmp_path / "m"
    if not model_dir.exists():
        tiny_model("llama").save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    monkeypatch.setenv("LLMDROP_CACHE", str(tmp_path / "cache"))
    return study_mod.StudyConfig(model_name=str(model_dir), targets=["attn"], counts=[1], calibration=str(calibration),
                                 samples=2, seq_len=16, ppl_samples=1, speed_new_tokens=2, speed_repeats=1)


@pytest.mark.parametrize("existing", [False, True], ids=["new directory", "directory made beforehand"])
def test_a_start_that_failed_on_its_inputs_does_not_refuse_the_corrected_run(existing, tmp_path, monkeypatch):
    """R12: study.json was written before the calibration was read, so after a mistyped --calibration the corrected
    run was refused with "holds a study made with other settings"."""
    cal = tmp_path / "cal.txt"
    cal.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    out = tmp_path / "ST"
    if existing:
        out.mkdir()
    quiet = {"progress": False, "log": lambda m: None}
    with pytest.raises(LlmdropError, match="nope.txt does not exist"):
        study_mod.run_study(_config(tmp_path, monkeypatch, tmp_path / "nope.txt"), out, **quiet)
    assert not (out / "study.json").exists()
    assert out.is_dir() == existing  # a directory the failed start made is gone; the user's own stays
    rows = study_mod.run_study(_config(tmp_path, monkeypatch, cal), out, **quiet)
    assert [r["key"] for r in rows] == ["base", "one-shot:attn:1"]
    assert json.loads((out / "study.json").read_text())["calibration"] == str(cal)
    # Once the study has started, other settings are still refused
    with pytest.raises(LlmdropError, match="holds a study made with other settings"):
        study_mod.run_study(_config(tmp_path, monkeypatch, tmp_path / "nope.txt"), out, **quiet)
