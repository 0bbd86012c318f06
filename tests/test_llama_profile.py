"""llama.cpp's own decode profile (llmdrop.llama_cpp): sublayer boundaries read from node names, shares that add
up to 1, attention time exactly where attention still runs, and the ideal speedup of a drop read from it."""

from __future__ import annotations

import importlib.util

import pytest
from tiny import llama_cpp_ready, random_ids

from llmdrop.checkpoint import save
from llmdrop.errors import LlmdropError
from llmdrop.export import export
from llmdrop.llama_cpp import boundary, profile_llama_decode
from llmdrop.models import load_model
from llmdrop.patches.linear import fit_patches
from llmdrop.plan import DropPlan
from llmdrop.profile import KINDS, dropped_set, dropped_share, ideal_for
from llmdrop.surgery import apply_plan

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (setup.sh --test builds it)")


@pytest.mark.parametrize("name, expected", [
    ("attn_norm-3", ("attn_norms", 3)), ("kqv_out-0", ("attention", 0)), ("attn_out-7", ("attention", 7)),
    ("wo-12", ("attention", 12)), ("ffn_inp-2", ("other", 2)), ("ffn_norm-2", ("mlp_norms", 2)),
    ("ffn_out-29", ("mlp", 29)), ("l_out-1", ("other", 1)), ("result_norm", ("norms", None)),
    ("result_output", ("lm_head", None)), ("Qcur-3", None), ("cache_k_l0 (view)", None), ("node_21", None),
    ("ffn_gate-4", None), ("norm-0", None),
])
def test_boundaries_by_node_name(name, expected):
    assert boundary(name) == expected


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """GGUF exports of a tiny llama: base; attention 1 and 2 dropped; attention 1 replaced by a linear patch."""
    root = tmp_path_factory.mktemp("llama_profile")
    base_dir = llama_cpp_ready(root / "base")
    out = {}
    for name, plan, patch in (("base", None, False), ("dropped", [1, 2], False), ("patched", [1], True)):
        model, tok = load_model(str(base_dir), progress=False)
        if plan:
            drop = DropPlan(attn=plan, num_layers=4)
            if patch:
                fit_patches(model, drop, random_ids(4, 32), batch_size=2, progress=False)
            apply_plan(model, drop)
        save(model, tok, root / name, overwrite=True)
        export(str(root / name), "gguf", root / f"{name}.gguf", outtype="f32", progress=False)
        out[name] = (root / f"{name}.gguf", model)
    return out


@needs_llama_cpp
def test_profile_shares_add_up_and_attention_runs_only_where_kept(ggufs):
    profiles = {name: profile_llama_decode(path, context=40, steps=3, threads=1) for name, (path, _) in ggufs.items()}
    for name, prof in profiles.items():
        shares = prof.shares()
        assert set(shares) == set(KINDS) and sum(shares.values()) == pytest.approx(1.0, abs=1e-9), name
        assert all(v >= 0 for v in shares.values()) and shares["mlp"] > 0 and shares["lm_head"] > 0, name
        assert all(t > 0 for t in prof.layers["mlp"]) and prof.step_ms() > 0
        for i in range(4):  # a layer's sublayers are inside the layer's time
            inner = sum(prof.layers[k][i] for k in ("attention", "attn_norms", "mlp", "mlp_norms"))
            assert 0 < inner <= prof.layers["layer"][i] + 1e-12
    assert all(t > 0 for t in profiles["base"].layers["attention"])
    dropped = profiles["dropped"].layers["attention"]
    assert dropped[1] == dropped[2] == 0 and dropped[0] > 0 and dropped[3] > 0
    assert all(t > 0 for t in profiles["patched"].layers["attention"])  # the linear attention's matmul is timed


@needs_llama_cpp
def test_ideal_speedup_from_the_llama_cpp_base_profile(ggufs):
    base_path, base_model = ggufs["base"]
    prof = profile_llama_decode(base_path, context=24, steps=2, threads=1)
    gone = dropped_set(base_model, ggufs["dropped"][1])
    assert gone.attn == [1, 2]
    lay = prof.layers
    share = sum(lay["attention"][i] + lay["attn_norms"][i] for i in (1, 2)) / prof.total_s
    assert dropped_share(prof, gone) == pytest.approx(share)
    assert ideal_for(prof, gone)["ideal_speedup"] == pytest.approx(1 / (1 - share))


@needs_llama_cpp
def test_bad_settings_are_one_sentence(ggufs):
    with pytest.raises(LlmdropError, match="at least 1"):
        profile_llama_decode(ggufs["base"][0], context=8, steps=0)
