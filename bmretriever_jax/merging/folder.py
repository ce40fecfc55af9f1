"""Merging into a model folder (`bmr merge CONFIG.yaml --out DIR`), and the same merge in memory for weight search.

The config's `model:` entries may be training runs (LoRA experts are folded into their base tensor by tensor), model
folders or known names. Every input is read as transformers base-model tensors (export.open_source), one tensor per
input at a time, into a safetensors writer: memory is about one output shard plus one tensor per input, and each
per-layer tensor is merged as its own tensor, as mergekit does. The output folder (config.json + model.safetensors +
tokenizer + bmretriever.json) is what Encoder.load, `bmr eval` and `bmr export` take.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from bmretriever_jax.convert import export as ex
from bmretriever_jax.convert.names import hf_to_params
from bmretriever_jax.util.errors import ConfigError
from bmretriever_jax.merging.methods import METHODS
from bmretriever_jax.merging.mergekit import MergeConfig, parse_merge_config, run_merge
from bmretriever_jax.merging.stream import merge_streamed
from bmretriever_jax.convert.weights import DictReader, DictWriter, SafetensorsWriter

_RETRIEVER_KEYS = ("pooling", "normalize", "max_length", "bidirectional")


# ----------------------------------------------------------------------------------------------------
# bmr merge
# ----------------------------------------------------------------------------------------------------
def as_config(config) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else parse_merge_config(config)


def input_refs(mc: MergeConfig) -> List[str]:
    """Every model the merge reads: the models, then the base (when the method uses one)."""
    refs = list(mc.models)
    if METHODS[mc.method].needs_base and mc.base_model not in refs:
        refs.append(mc.base_model)
    return refs


def open_inputs(mc: MergeConfig, *, quiet: bool = True) -> Dict[str, ex.ModelSource]:
    sources = {ref: ex.open_source(ref, quiet=quiet) for ref in input_refs(mc)}
    check_same_architecture(sources)
    return sources


def check_same_architecture(sources: Mapping[str, ex.ModelSource]) -> None:
    """Raise naming the models and the config fields that differ (merging needs one architecture)."""
    items = list(sources.items())
    ref_name, ref = items[0]
    for name, s in items[1:]:
        if s.cfg != ref.cfg:
            diff = [f"{f.name}: {getattr(ref.cfg, f.name)!r} vs {getattr(s.cfg, f.name)!r}"
                    for f in dataclasses.fields(ref.cfg) if getattr(ref.cfg, f.name) != getattr(s.cfg, f.name)]
            raise ConfigError(f"cannot merge {ref_name!r} and {name!r}: different architectures ({'; '.join(diff[:6])})")


def tokenizer_folder(mc: MergeConfig, sources: Mapping[str, ex.ModelSource], override: Optional[str]) -> Optional[str]:
    choice = override or mc.extra.get("tokenizer_source")
    if isinstance(mc.extra.get("tokenizer"), Mapping) and not choice:
        choice = mc.extra["tokenizer"].get("source")
    if choice == "union":
        raise ConfigError("tokenizer_source: union is not supported (the models must share one tokenizer)")
    if choice == "base":
        if mc.base_model is None:
            raise ConfigError("tokenizer_source: base, but the config has no base_model")
        choice = mc.base_model
    if choice:
        if choice in sources:
            return sources[choice].tokenizer_folder
        return ex.open_source(choice).tokenizer_folder
    order = ([mc.base_model] if mc.base_model in sources else []) + list(mc.models)
    return next((sources[r].tokenizer_folder for r in order if sources[r].tokenizer_folder), None)


def _jsonable(options: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}


def merged_settings(mc: MergeConfig, sources: Mapping[str, ex.ModelSource], seed: int = 0) -> Dict[str, Any]:
    """bmretriever.json of a merge: the experts' retriever settings (they should agree) + what was merged."""
    experts = [sources[r] for r in mc.models if r != mc.base_model] or [sources[r] for r in mc.models]
    first = experts[0].settings
    for s in experts[1:]:
        for k in _RETRIEVER_KEYS:
            if k in first and k in s.settings and first[k] != s.settings[k]:
                warnings.warn(f"merged models disagree on {k}: {first[k]!r} ({experts[0].label}) vs {s.settings[k]!r} "
                              f"({s.label}); the merge uses {first[k]!r}")
    out = {k: first[k] for k in _RETRIEVER_KEYS if k in first}
    base = sources.get(mc.base_model) if mc.base_model else None
    out["base_model"] = (base.settings.get("base_model") if base is not None else None) or mc.base_model or \
        first.get("base_model")
    out["lora"] = None
    out["merge"] = {"method": mc.method, "models": list(mc.models), "base_model": mc.base_model,
                    "options": _jsonable(mc.options), "seed": seed}
    return out


def merge_to_folder(config, out: str, *, seed: int = 0, tokenizer_source: Optional[str] = None,
                    quiet: bool = True) -> str:
    """Run a mergekit-format config (path, YAML text, dict or MergeConfig) streamed into the model folder `out`."""
    mc = as_config(config)
    sources = open_inputs(mc, quiet=quiet)
    tok = tokenizer_folder(mc, sources, tokenizer_source)
    settings = merged_settings(mc, sources, seed)
    ex._prepare_out(out)
    dtype = mc.dtype or "float32"
    # The readers present per-layer transformers tensors: no stacked axes (each tensor is merged whole, as mergekit).
    run_merge(mc, resolve_reader=lambda ref: sources[ref].reader, out_writer=SafetensorsWriter(out), key=seed,
              stacked=(), progress=not quiet)
    ex.write_model_files(sources[input_refs(mc)[0]].cfg, out, settings, tok, dtype=dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# In-memory merges (search)
# ----------------------------------------------------------------------------------------------------
def load_flat(source: ex.ModelSource) -> Dict[str, np.ndarray]:
    """{transformers tensor name: float32 array} of a whole source."""
    return {n: source.reader.read(n) for n in source.reader.keys()}


def merge_flat(mc: MergeConfig, flats: Mapping[str, Mapping[str, np.ndarray]], options: Mapping[str, Any], *,
               seed: int = 0) -> Dict[str, np.ndarray]:
    """The same merge as merge_to_folder, of tensors held in memory ({ref: flat}), with `options` replacing the
    config's method options. Returns {tensor name: array}."""
    base = DictReader(flats[mc.base_model], flat=True) if METHODS[mc.method].needs_base else None
    return merge_streamed(mc.method, [DictReader(flats[r], flat=True) for r in mc.models], base,
                          DictWriter(flat=True), key=seed, stacked=(), names=list(mc.models),
                          base_name=mc.base_model or "base", **options)


def flat_to_tree(cfg, flat: Mapping[str, np.ndarray]) -> dict:
    return hf_to_params(cfg, flat.__getitem__, flat.__contains__)


# ----------------------------------------------------------------------------------------------------
