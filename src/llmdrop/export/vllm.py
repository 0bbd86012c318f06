"""Export a sublayer-pruned llama-family checkpoint as a Nemotron-NAS (DeciLM) checkpoint for vLLM.

vLLM's `DeciLMForCausalLM` reads one `block_configs` entry per layer: `attention.no_op` / `ffn.no_op` mark removed
sublayers, `attention.n_heads_in_group` gives the KV heads (num_attention_heads // n_heads_in_group) and
`ffn.intermediate_size` the MLP width. A linear patch is `replace_with_linear: true`, its weight under the name
Nemotron-NAS gives it (`self_attn.linear_attn.weight`, `mlp.linear_mlp.weight`, as llmdrop's patches are named). Tensor
names stay the llama ones, so the weights are copied unchanged. The config class is the small generic
`configuration_decilm.py` written next to it (attribute access to the entries).

vLLM's own DeciLM loader (vllm/model_executor/models/nemotron_nas.py, read at vLLM 0.33) implements `no_op` but not
`replace_with_linear`: it builds a full attention there. A checkpoint with linear patches is written all the same
(llmdrop.load, NVIDIA's DeciLM modeling code, TensorRT-LLM and mlx-lm read it, and a vLLM plugin can serve it), and
`served_by` says so instead of the `vllm serve` line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from ..arch import arch_for, head_counts
from ..files import atomic_dir
from ..pruned_model import BASE_TYPE, CONFIG_KEY, REMOTE_CODE_FILE
from ..surgery import dropped_flags, patched_flags
from .families import check_exportable

MODEL_TYPE = "nemotron-nas"
CONFIG_CODE = '''"""Config of a Nemotron-NAS (DeciLM) checkpoint from llmdrop: a Llama config plus per-layer block_configs."""

from types import SimpleNamespace

from transformers import LlamaConfig


def _namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def _plain(value):
    if isinstance(value, SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_namespace(b) for b in (block_configs or [])]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(b) for b in self.block_configs]
        return out
'''


def block_configs(model: nn.Module) -> list[dict]:
    """One Nemotron-NAS entry per layer of a (pruned) llama-family model."""
    config = model.config.get_text_config(decoder=True)
    heads, kv, _ = head_counts(config)
    no_attn, no_mlp = dropped_flags(model)
    lin_attn, lin_mlp = patched_flags(model)
    return [{"attention": {"no_op": a and not la, "replace_with_linear": la, "n_heads_in_group": heads // kv},
             "ffn": {"no_op": m and not lm, "replace_with_linear": lm, "intermediate_size": config.intermediate_size}}
            for a, m, la, lm in zip(no_attn, no_mlp, lin_attn, lin_mlp)]


def served_by(model: nn.Module, out: str | Path) -> str:
    """What serves the export of `model` at `out`: the `vllm serve` command, or, with linear patches, which stock
    vLLM cannot serve (it would build full sublayers where the patches are), what serves the checkpoint instead (the
    plugin in llmdrop.serve)."""
    if not any(any(flags) for flags in patched_flags(model)):
        return f"serve it with `vllm serve {out} --trust-remote-code`"
    return ("a Nemotron-NAS checkpoint whose linear patches (replace_with_linear) stock vLLM cannot serve, as its "
            "DeciLM loader does not implement them (llmdrop and NVIDIA's DeciLM modeling code read it as it is); to "
            "serve it, serve the pruned checkpoint directory itself with llmdrop's vLLM plugin: install llmdrop in "
            "vLLM's environment (pip install 'llmdrop[vllm]') and run `vllm serve CHECKPOINT`")


def export_vllm(model: nn.Module, checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write `out`: the weights of `checkpoint` (the saved pruned model) with a Nemotron-NAS config.

    A model with linear patches is written too; `served_by` says what can serve the result."""
    check_exportable(arch_for(model).family, "vLLM's Nemotron-NAS loader")
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    record = dict(config.get(CONFIG_KEY) or {})
    if record.pop(BASE_TYPE, None) is not None:  # our own model_type is replaced by Nemotron-NAS's below
        config[CONFIG_KEY] = record
    config.update(model_type=MODEL_TYPE, architectures=["DeciLMForCausalLM"], block_configs=block_configs(model),
                  auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"})
    with atomic_dir(out, overwrite) as tmp:
        for f in checkpoint.iterdir():
            if f.is_file() and f.name not in ("config.json", REMOTE_CODE_FILE):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "configuration_decilm.py").write_text(CONFIG_CODE)
    return Path(out)

