"""Exports of pruned models to the formats other runtimes load: one table of formats, one entry point.

The format modules are imported only when used (gguf needs the `gguf` package, mergekit needs nothing heavy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import options as o
from ..errors import LlmdropError
from ..files import check_output, literal
from ..options import Checked, opt
from .families import EXPORTABLE, OUTTYPES, check_exportable  # noqa: F401  (public here too)

log = logging.getLogger("llmdrop")

@dataclass(frozen=True)
class Format:
    """One export format: what it writes (a file or a directory) and the function that writes it."""

    kind: str  # "file" or "dir", as files.check_output takes it
    help: str
    write: Callable[..., str]


def _gguf(spec: str, out: Path, outtype: str, overwrite: bool, dtype: str, cache_dir, progress: bool) -> str:
    from ..models import load_model
    from .gguf import OUTTYPES, export_gguf, source_gguf_of
    from .quantize import check_outtype

    if outtype not in OUTTYPES:
        raise LlmdropError(f"unknown outtype '{literal(outtype)}'; {{outtype}} must be one of {', '.join(OUTTYPES)}",
                           params=["outtype"])
    check_outtype(outtype)  # a k-quant without llama-cpp-python: one sentence before the model loads
    model, tokenizer = load_model(spec, dtype=dtype, progress=progress, cache_dir=cache_dir)
    source = source_gguf_of(spec, model.config, cache_dir)
    export_gguf(model, tokenizer, out, outtype=outtype, source_gguf=source, overwrite=overwrite)
    return (f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {outtype}; tokenizer from "
            f"{source.name if source else 'the HF tokenizer'})")


def _vllm(spec: str, out: Path, outtype: str, overwrite: bool, dtype: str, cache_dir, progress: bool) -> str:
    from ..models import load_model, resolve
    from .vllm import export_vllm, served_by

    model, _ = load_model(spec, dtype=dtype, progress=progress, cache_dir=cache_dir)
    where = resolve(spec, progress=False, cache_dir=cache_dir)
    if not isinstance(where, Path):
        raise LlmdropError(f"vLLM export copies a checkpoint directory; '{spec}' is a hub id: save it locally first")
    export_vllm(model, where, out, overwrite=overwrite)
    return f"wrote {out}: {served_by(model, out)}"


def _mergekit(spec: str, out: Path, outtype: str, overwrite: bool, dtype: str, cache_dir, progress: bool) -> str:
    from ..checkpoint import read_config
    from ..models import resolve
    from ..pruned_model import record_of
    from .mergekit import export_mergekit, mergekit_yaml

    where = resolve(spec, progress=progress, cache_dir=cache_dir)
    if not isinstance(where, Path):
        raise LlmdropError(f"'{spec}' is not a checkpoint written by `llmdrop drop`, so it records no base model")
    config = read_config(where)
    source = record_of(config).get("source_model")
    if not source:
        raise LlmdropError("the checkpoint does not record its base model; it must come from `llmdrop drop`")
    mergekit_yaml(config, source, dtype)  # what mergekit cannot express fails before the base is looked up
    base = resolve(source, progress=False, cache_dir=cache_dir)
    export_mergekit(config, base, out, dtype=dtype, overwrite=overwrite)
    return f"wrote {out}: run `mergekit-yaml {out} OUT_DIR` to rebuild the model from its base"


FORMATS: dict[str, Format] = {
    "gguf": Format("file", "one .gguf file for llama.cpp", _gguf),
    "vllm": Format("dir", "a Nemotron-NAS (DeciLM) checkpoint directory for vLLM", _vllm),
    "mergekit": Format("file", "the passthrough YAML that rebuilds a block-dropped model from its base", _mergekit),
}


@dataclass
class ExportConfig(Checked):
    """One `llmdrop export`: `model` written in format `fmt` (a row of FORMATS) at `output`."""

    model: str = o.MODEL()
    output: str = o.OUTPUT(help="the .gguf / .yaml file, or for vllm the directory, to write", metavar="OUT",
                           check=o.model_spec, group=None)
    fmt: str = opt("gguf", "; ".join(f"{name}: {row.help}" for name, row in FORMATS.items()), choices=tuple(FORMATS),
                   flags=("--format",))
    outtype: str = opt("f32", "GGUF tensor type", choices=OUTTYPES)
    overwrite: bool = o.OVERWRITE(False, group=None)
    dtype: str = o.DTYPE("float32")
    cache_dir: str | None = o.CACHE_DIR(None)
    progress: bool = o.PROGRESS(True)


def export(config: ExportConfig | str, fmt: str | None = None, out: str | Path | None = None, **options: Any) -> str:
    """Write a model (a pruned checkpoint, or any model llmdrop loads) in format `fmt` at `out`: an ExportConfig, or
    `export(model, fmt, out, outtype=..., ...)` with the config's fields as keywords.

    The output location is checked before the model loads. Returns the one-line "wrote ..." message.
    """
    if not isinstance(config, ExportConfig):
        config = ExportConfig(config, output=out, **({"fmt": fmt} if fmt is not None else {}), **options)
    form = FORMATS[config.fmt]
    target = check_output(config.output, config.overwrite, kind=form.kind)
    return form.write(config.model, target, config.outtype, config.overwrite, config.dtype, config.cache_dir,
                      config.progress)
