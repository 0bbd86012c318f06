"""The config vLLM reads for a sublayer-pruned checkpoint: the family's own config, its architecture renamed.

transformers (and so vLLM) refuses ``model_type: "llmdrop"`` unless told to run the checkpoint's remote code. The
plugin registers this class for that model_type instead: it turns config.json back into the family's config (as
``llmdrop.load`` does) and points ``architectures`` at the plugin's class, so no remote code runs and nothing is
exported. The ``llmdrop`` record stays on the config: the model class reads the drops from it.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..errors import LlmdropError
from ..pruned_model import MODEL_TYPE, config_from_dict
from .families import served_architecture, unsupported


class LlmdropServeConfig(PretrainedConfig):
    """Registered with transformers' AutoConfig for model_type "llmdrop"; never instantiated itself."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs: Any) -> Any:
        try:
            out = config_from_dict(config_dict, **kwargs)
        except ValueError as err:  # the record was edited: say so as llmdrop.load does
            raise LlmdropError(str(err)) from None
        config = out[0] if isinstance(out, tuple) else out
        family = config.model_type
        arch = served_architecture(family, config.architectures)
        if arch is None:
            raise LlmdropError(unsupported(family, config.architectures))
        config.architectures = [arch]
        return out
