import subprocess
import sys

import pytest

import llmdrop


def test_every_public_name_resolves_lazily():
    for name in llmdrop.__all__:
        assert getattr(llmdrop, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llmdrop.nope  # noqa: B018


def test_import_is_cheap():
    """`import llmdrop` loads no torch or transformers: the CLI's --help and a notebook's import stay fast."""
    code = "import sys, llmdrop; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_one_loader_and_callable_job_modules():
    from importlib import import_module

    from llmdrop import models

    assert llmdrop.load is models.load_model and llmdrop.load_model is models.load_model
    import_module("llmdrop.run"), import_module("llmdrop.export")  # as any `from llmdrop.run import ...` does
    # `run` and `export` are modules and their main functions at once: llmdrop.run(config), llmdrop.run.RunConfig
    assert callable(llmdrop.run) and llmdrop.run.RunConfig is llmdrop.RunConfig
    assert callable(llmdrop.export) and hasattr(llmdrop.export, "FORMATS")


def test_run_is_callable_from_python(saved_tiny, text_file, tmp_path):
    config = llmdrop.RunConfig(str(saved_tiny("llama")), plan=llmdrop.PlanSpec("attn", n=1), calibration=str(text_file),
                               samples=2, seq_len=16, ppl_samples=1, bench=False, progress=False,
                               output=str(tmp_path / "o"))
    result = llmdrop.run(config)
    assert result.output == tmp_path / "o" and (tmp_path / "o" / "report.md").exists()
    assert len(result.choice.plan.attn) == 1
    model, _ = llmdrop.load(tmp_path / "o")
    assert model.config.llmdrop["attn"] == result.choice.plan.attn
