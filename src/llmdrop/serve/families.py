"""Which model families vLLM serves llmdrop checkpoints of, as data: no vLLM, no torch.

A sublayer-pruned checkpoint says ``model_type: "llmdrop"`` and keeps its family's class in ``architectures``
(``LlamaForCausalLM``). The plugin gives vLLM that family's config back and names the architecture
``"Llmdrop" + architecture``, a class that is vLLM's own model for the family with the recorded sublayers replaced.
What differs between families (biases, q/k norms, sandwich norms, ``1 + w`` norm weights, scaled embeddings, sliding
layers) stays in vLLM's own code: the plugin touches only the modules the record names (``modules`` in config.json's
``llmdrop`` entry), which vLLM's decoder layers call by the same names as transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "Llmdrop"


@dataclass(frozen=True)
class Family:
    """One family vLLM serves pruned: the transformers model_type and the architecture names config.json may carry
    (vLLM's registry maps each to its class). vLLM's classes keep their decoder layers under the path transformers'
    do (``model.layers``), which the record names."""

    model_type: str
    architectures: tuple[str, ...]


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", ("LlamaForCausalLM",)),
    Family("mistral", ("MistralForCausalLM",)),
    Family("qwen2", ("Qwen2ForCausalLM",)),
    Family("qwen3", ("Qwen3ForCausalLM",)),
    Family("phi3", ("Phi3ForCausalLM",)),
    Family("gemma2", ("Gemma2ForCausalLM",)),
    Family("gemma3_text", ("Gemma3ForCausalLM",)),
)}

# Every architecture the plugin registers, "Llmdrop" + the stock name -> the stock name.
ARCHITECTURES: dict[str, str] = {PREFIX + a: a for f in FAMILIES.values() for a in f.architectures}


def served_architecture(model_type: str, architectures: list[str] | None) -> str | None:
    """The plugin's architecture for a pruned checkpoint of `model_type` saved by `architectures`, or None when
    vLLM serves no pruned checkpoint of that family (then `unsupported` says why)."""
    family = FAMILIES.get(model_type)
    if family is None:
        return None
    for arch in architectures or ():
        if arch in family.architectures:
            return PREFIX + arch
    return None


def unsupported(model_type: str, architectures: list[str] | None) -> str:
    """One sentence: why vLLM cannot serve this pruned checkpoint, and what can."""
    if model_type not in FAMILIES:
        return (f"llmdrop's vLLM plugin serves sublayer-pruned checkpoints of the families "
                f"{', '.join(sorted(FAMILIES))}, not {model_type!r}; load this one with llmdrop.load instead")
    return (f"llmdrop's vLLM plugin serves {model_type!r} checkpoints saved as "
            f"{', '.join(FAMILIES[model_type].architectures)}, not {', '.join(architectures or ['(none)'])}; "
            "load this one with llmdrop.load instead")
