"""Runtime of a pruned model: no-op and linear-patch sublayers, compact KV-cache slots, and the loader class.

This file depends on torch and transformers only, never on the rest of llmdrop, because it is also copied into every
sublayer-pruned checkpoint as ``modeling_llmdrop.py``: ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` then works where llmdrop is not installed. It knows no model family: the module paths it
needs are recorded as data under the ``llmdrop`` key of config.json.

Such a checkpoint's config.json carries ``model_type: "llmdrop"`` (the family's own type is kept in the record): plain
transformers does not know that type, so without ``trust_remote_code=True`` it refuses to load the checkpoint instead
of silently building the unpruned model with random weights where the dropped sublayers were.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CONFIG_KEY = "llmdrop"
REMOTE_CODE_FILE = "modeling_llmdrop.py"
REMOTE_CODE_CLASS = "LlmdropForCausalLM"
REMOTE_CONFIG_CLASS = "LlmdropConfig"
# config.json's model_type of a sublayer-pruned checkpoint; the family's own model_type is under the record's BASE_TYPE.
MODEL_TYPE = "llmdrop"
BASE_TYPE = "base_model_type"
# Record keys: the layers (current numbering) whose removed attention / MLP is a linear patch, a subset of the record's
# "attn" / "mlp" (every removed sublayer, zero or patched).
PATCHED_ATTN = "patched_attn"
PATCHED_MLP = "patched_mlp"
# Record key: how the patches were fitted, one entry per fit (patch.fit_patches' summary, in that fit's numbering).
PATCH_FITS = "patch_fits"


def record_of(config: Any) -> dict:
    """The drops recorded under config.llmdrop ({} for a model llmdrop never pruned)."""
    record = getattr(config, CONFIG_KEY, None)
    if record is None and isinstance(config, dict):
        record = config.get(CONFIG_KEY)
    return record or {}


def has_sublayer_drops(config: Any) -> bool:
    """Whether attention or MLP sublayers are gone or patched (then the family's own class cannot load the checkpoint)."""
    record = record_of(config)
    return bool(record.get("attn") or record.get("mlp"))


def has_patches(config: Any) -> bool:
    """Whether some removed sublayers were replaced by a linear patch (PatchedAttention / PatchedMLP)."""
    record = record_of(config)
    return bool(record.get(PATCHED_ATTN) or record.get(PATCHED_MLP))


def base_class(config: Any) -> type:
    """The family's own causal-LM class for `config` (KeyError when transformers has none for it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def _family_of_class(name: str) -> str | None:
    """The model_type of the config that transformers' class `name` (e.g. "LlamaForCausalLM") takes, else None."""
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a lazy import that fails is as unknown as a name that does not exist
        return None
    family = getattr(getattr(cls, "config_class", None), "model_type", None)
    return family if isinstance(family, str) and family else None


def family_problem(raw: dict, where: str = "config.json") -> str | None:
    """Why the family recorded in a pruned checkpoint's config.json cannot be the one its weights were saved as (one
    sentence), or None when it is, or when the config is no pruned one.

    The family picks the class that is built (and, say, a sliding window the weights were never trained with), and
    strict loading cannot catch a wrong one: families share tensor names. config.json's ``architectures`` is written
    by save_pretrained from the class that held the weights, next to the record.
    """
    if raw.get("model_type") != MODEL_TYPE:
        return None
    record = raw.get(CONFIG_KEY)
    base = record.get(BASE_TYPE) if isinstance(record, dict) else None
    if not base or not isinstance(base, str):
        return (f"{where} has model_type {MODEL_TYPE!r} but no {CONFIG_KEY}.{BASE_TYPE} naming the model family, so "
                "the checkpoint was edited or is corrupt: write it again")
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) and a for a in archs):
        return (f"{where} records the family {base!r} under {CONFIG_KEY}.{BASE_TYPE} but names no class in "
                "'architectures' to check it against, so the checkpoint was edited or is corrupt: write it again")
    families = {a: _family_of_class(a) for a in archs}
    if base in families.values():
        return None
    arch, family = next(iter(families.items()))
    if family is None:
        return (f"{where} records the family {base!r} under {CONFIG_KEY}.{BASE_TYPE}, but its weights were saved by "
                f"{arch}, which is no model class of this transformers, so the checkpoint was edited or is corrupt: "
                "write it again")
    return (f"{where} records the family {base!r} under {CONFIG_KEY}.{BASE_TYPE}, but its weights were saved by "
            f"{arch} (family {family!r}), so the config was edited or is corrupt: set {BASE_TYPE} back to "
            f"{family!r} or write the checkpoint again")


def config_from_dict(raw: dict, **kwargs: Any) -> Any:
    """The family's config from a pruned checkpoint's config.json contents (model_type "llmdrop" undone).

    Returns what ``PretrainedConfig.from_dict`` returns for `kwargs` (a tuple with ``return_unused_kwargs=True``).
    Raises ValueError when the recorded family is missing or is not the one the weights were saved as.
    """
    from transformers import CONFIG_MAPPING

    raw = dict(raw)
    record = dict(raw.get(CONFIG_KEY) or {})
    if raw.get("model_type") == MODEL_TYPE:
        problem = family_problem(raw)
        if problem:
            raise ValueError(problem)
        raw["model_type"] = record.pop(BASE_TYPE)
        raw[CONFIG_KEY] = record
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw, **kwargs)


class DroppedAttention(nn.Module):
    """Stands where an attention sublayer was: no parameters, never touches the KV cache, adds zero to the residual."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """Stands where an MLP sublayer was: no parameters, adds zero to the residual."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class PatchedAttention(DroppedAttention):
    """Stands where an attention sublayer was: a d x d linear map of the normed input it read, no bias, no KV cache.

    A DroppedAttention subclass, so whatever asks whether the original attention (and its cache) is gone gets yes.
    The layer's norms stay (the map reads the attention's normed input, and a sandwich norm still normalises its
    output), so the layer computes ``h + post_norm(W input_norm(h))``. The weight is named as Nemotron-NAS (DeciLM)
    names its "linear attention" (``self_attn.linear_attn.weight``), which llama.cpp's converter maps to attn_output.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.linear_attn = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.linear_attn(hidden_states), None


class PatchedMLP(DroppedMLP):
    """Stands where an MLP sublayer was: a d x d linear map of its (normed) input, no bias (DeciLM's ``linear_mlp``).

    A DroppedMLP subclass, so whatever asks whether the original MLP is gone gets yes."""

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.linear_mlp = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.linear_mlp(hidden_states)


# Attention stand-ins that hold no KV cache: they get no cache slot.
NO_CACHE_ATTENTION = (DroppedAttention, PatchedAttention)


class DroppedNorm(nn.Module):
    """Replaces a norm that only served a dropped branch.

    Identity rather than deletion: the decoder layer still calls it, and a hook on it still sees the residual stream
    (the mid-residual point of llama-style layers is the input of such a norm). Feeding a dropped sublayer, or
    normalising its zero output, the identity changes nothing.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _decoder_path(modules: dict) -> str:
    return modules["layers"].rpartition(".")[0]


def attention_layers(model: nn.Module, modules: dict) -> list[int]:
    """Indices (in the model's current layer list) of the layers whose attention is still there (with a KV cache)."""
    layers = model.get_submodule(modules["layers"])
    return [i for i, layer in enumerate(layers)
            if not isinstance(layer.get_submodule(modules["attn"]), NO_CACHE_ATTENTION)]


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def new_patch(kind: str, d: int, weight: torch.Tensor | None = None, **where) -> nn.Module:
    """A linear patch for an attention (`kind` "attn") or MLP ("mlp") of hidden size `d`, with `where` (dtype,
    device) and `weight` (out x in, as nn.Linear holds it) copied in when given."""
    patch = (PatchedAttention if kind == "attn" else PatchedMLP)(d, **where)
    if weight is not None:
        set_patch_weight(patch, weight)
    return patch


def set_patch_weight(patch: nn.Module, weight: torch.Tensor) -> None:
    linear = patch.linear_attn if isinstance(patch, PatchedAttention) else patch.linear_mlp
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))


def patch_sublayer(model: nn.Module, modules: dict, kind: str, i: int, weight: torch.Tensor | None = None) -> nn.Module:
    """Replace layer `i`'s attention (`kind` "attn") or MLP ("mlp") by a linear patch, in place; the norms stay.

    The patch takes the replaced module's dtype and device; `weight` (out x in, as nn.Linear holds it) is copied in
    when given (a load fills it from the checkpoint instead). Returns the patch.
    """
    layer = model.get_submodule(modules["layers"])[i]
    old = layer.get_submodule(modules[kind])
    if isinstance(old, (PatchedAttention, PatchedMLP)):
        patch = old
        if weight is not None:
            set_patch_weight(patch, weight)
    else:
        ref = next(old.parameters(), None)
        where = dict(dtype=ref.dtype, device=ref.device) if ref is not None else {}
        patch = new_patch(kind, _hidden_size(model), weight, **where)
        _set_submodule(layer, modules[kind], patch)
    return patch


def drop_sublayers(model: nn.Module, modules: dict, attn: list[int], mlp: list[int],
                   patched_attn: list[int] | tuple[int, ...] = (), patched_mlp: list[int] | tuple[int, ...] = ()) -> None:
    """Replace the attention / MLP sublayers of the given layers (and the norms only they use) by no-ops, in place.

    Layers in `patched_attn` / `patched_mlp` get a linear patch instead (weights left for a load to fill) and keep
    their norms; a sublayer that already is a patch stays one. The replaced modules' parameters are released with
    them. Kept attention layers are renumbered to consecutive KV-cache slots so the cache holds only what is used.
    """
    layers = model.get_submodule(modules["layers"])
    for kind, gone, patched, stand_in in (("attn", attn, patched_attn, DroppedAttention),
                                          ("mlp", mlp, patched_mlp, DroppedMLP)):
        for i in sorted(set(gone) | set(patched)):
            if i in set(patched):
                patch_sublayer(model, modules, kind, i)
            elif not isinstance(layers[i].get_submodule(modules[kind]), (PatchedAttention, PatchedMLP)):
                _set_submodule(layers[i], modules[kind], stand_in())
                for norm in modules[f"{kind}_norms"]:
                    _set_submodule(layers[i], norm, DroppedNorm())
    compact_kv_slots(model, modules)


def compact_kv_slots(model: nn.Module, modules: dict) -> None:
    """Give the kept attention layers KV-cache slots 0..k-1 and make every new cache of the model that size."""
    layers = model.get_submodule(modules["layers"])
    kept = attention_layers(model, modules)
    for slot, i in enumerate(kept):
        layers[i].get_submodule(modules["attn"]).layer_idx = slot
    decoder = model.get_submodule(_decoder_path(modules))
    decoder._llmdrop_kv_layers = kept
    if len(kept) < len(layers) and getattr(decoder, "_llmdrop_cache_hook", None) is None:
        decoder._llmdrop_cache_hook = decoder.register_forward_pre_hook(_compact_cache_hook, with_kwargs=True)


def _compact_cache_layers(config: Any, kept: list[int]) -> list:
    """One cache layer per kept attention layer, each of that layer's own type (full or sliding window)."""
    from transformers import cache_utils

    text_config = config.get_text_config(decoder=True)
    helper = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if helper is not None:
        types, kwargs = helper(text_config)
    else:  # older transformers 5.x: infer from layer_types / sliding_window as the cache itself did
        n = text_config.num_hidden_layers
        types = getattr(text_config, "layer_types", None) or ["full_attention"] * n
        kwargs = [{"sliding_window": text_config.sliding_window} if "sliding" in t else {} for t in types]
    return [cache_utils.DYNAMIC_LAYER_TYPE_MAPPING[types[i]](**kwargs[i]) for i in kept]


def _compact_cache_hook(decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Before the decoder runs, make an empty default cache hold exactly one slot per kept attention layer.

    transformers builds its DynamicCache from the config, one slot per layer and each slot typed by the layer at
    that index; with attention layers gone, slot i must instead be typed by the i-th kept layer (Gemma's sliding
    and global layers), and slot 0 must be a real attention layer, since the cache reads the sequence length there.
    """
    from transformers.cache_utils import DynamicCache

    key = "past_key_values" if "past_key_values" in kwargs else "cache"
    cache = kwargs.get(key)
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(decoder.config, "use_cache", False)
        if not use_cache or decoder.training:
            return None
        cache = DynamicCache(config=decoder.config)
        kwargs[key] = cache
    if type(cache) is not DynamicCache or getattr(cache, "_llmdrop_compact", False):
        return args, kwargs
    if any(getattr(layer, "is_initialized", False) for layer in cache.layers):
        raise ValueError(
            "this cache already holds keys and values from another layout; start generation with an empty cache"
        )
    cache.layers = _compact_cache_layers(decoder.config, decoder._llmdrop_kv_layers)
    cache._llmdrop_compact = True
    return args, kwargs


def apply_recorded_drops(model: nn.Module, config: Any) -> None:
    """Apply the sublayer drops and patches recorded under config.llmdrop (indices in the saved model's numbering)."""
    record = record_of(config)
    if not record:
        return
    drop_sublayers(model, record["modules"], list(record.get("attn", [])), list(record.get("mlp", [])),
                   list(record.get(PATCHED_ATTN, [])), list(record.get(PATCHED_MLP, [])))


_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class(base: type) -> type:
    """A subclass of the family's own model class that removes the recorded sublayers as it is built.

    The removal happens in ``__init__``, so ``from_pretrained`` never allocates the dropped weights and loads the
    checkpoint strictly, with the family's own code for everything else (dtype, device_map, tied embeddings).
    """
    if base not in _PRUNED_CLASSES:

        def __init__(self, config, *args, **kwargs):  # noqa: N807
            base.__init__(self, config, *args, **kwargs)
            apply_recorded_drops(self, config)

        _PRUNED_CLASSES[base] = type(base.__name__, (base,), {"__init__": __init__})
    return _PRUNED_CLASSES[base]


class LlmdropConfig:
    """The config class that config.json's ``auto_map`` names: it returns the family's own config class."""

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Nothing to register: the family's own classes stay in charge."""

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> Any:
        from transformers import PretrainedConfig

        kwargs.pop("trust_remote_code", None)
        raw, kwargs = PretrainedConfig.get_config_dict(path, **kwargs)
        return config_from_dict(raw, **kwargs)


class LlmdropForCausalLM:
    """The model class that config.json's ``auto_map`` names: it picks the family's own class and builds it pruned."""

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModelForCausalLM") -> None:
        """Nothing to register: the family's own classes stay in charge."""

    @classmethod
    def from_pretrained(cls, path: str, *args: Any, config: Any = None, **kwargs: Any) -> nn.Module:
        kwargs.pop("trust_remote_code", None)
        if config is None:
            config = LlmdropConfig.from_pretrained(path)
        return pruned_class(base_class(config)).from_pretrained(path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any) -> nn.Module:
        kwargs.pop("trust_remote_code", None)
        return pruned_class(base_class(config))._from_config(config, **kwargs)
