"""Serving llmdrop checkpoints in vLLM: a plugin, no remote code, no export step.

vLLM calls ``register`` in each of its processes through the ``vllm.general_plugins`` entry point (pyproject.toml):
it registers the config for ``model_type: "llmdrop"`` with transformers and one model class per family with vLLM.
Then ``vllm serve PRUNED_DIR`` and ``vllm.LLM(model=PRUNED_DIR)`` serve a sublayer-pruned checkpoint; a block-pruned
one is a plain checkpoint of its family, which vLLM serves without the plugin.
"""

from __future__ import annotations


def register() -> None:
    """The ``vllm.general_plugins`` entry point: safe to call more than once (vLLM does, once per process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..pruned_model import MODEL_TYPE
    from .config import LlmdropServeConfig
    from .families import ARCHITECTURES

    AutoConfig.register(MODEL_TYPE, LlmdropServeConfig, exist_ok=True)
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, f"{__name__}.model:{arch}")
