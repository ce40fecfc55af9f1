"""mergekit-format YAML configs: parsing with errors that name the field, and `run_merge` over them."""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import yaml

from bmretriever_jax.util.errors import ConfigError
from bmretriever_jax.merging.methods import REQUIRED, METHODS
from bmretriever_jax.merging.stream import STACKED, merge_streamed
from bmretriever_jax.convert.weights import LeafReader, LeafWriter, open_reader



# ----------------------------------------------------------------------------------------------------
# mergekit YAML
# ----------------------------------------------------------------------------------------------------
_GTA_PARAMS = ({"int8_mask": bool, "normalize": bool, "rescale": bool, "lambda": float},
               {"weight": float, "density": float})
# method -> (global-only parameters, per-model parameters (also settable globally)), as mergekit's specs.
CONFIG_PARAMS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "linear": ({"normalize": bool}, {"weight": float}),
    "task_arithmetic": _GTA_PARAMS,
    "ties": _GTA_PARAMS,
    "dare_ties": _GTA_PARAMS,
    "dare_linear": _GTA_PARAMS,
    "slerp": ({"t": float}, {}),
    "model_stock": ({"filter_wise": bool}, {}),
}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "tokenizer", "chat_template", "slices", "modules"}
_CARRIED = ("tokenizer_source", "tokenizer", "chat_template")
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A parsed mergekit config, resolved to `merge_streamed` arguments.

    models: inputs besides the base, in config order (for linear, the base_model is one of them, as in
    mergekit). options: keyword options of the method (weights, density, normalize, rescale, lambda_, t).
    dtype: output dtype (out_dtype, else dtype, else the inputs'). extra: tokenizer_source / tokenizer /
    chat_template, carried for the exporter and unused by the merge.
    """
    method: str
    models: tuple[str, ...]
    base_model: str | None
    options: Mapping[str, Any]
    dtype: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _scalar(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        value = value[0]  # a list of {filter, value} conditions: reported as filtered below
    if isinstance(value, list):
        raise ConfigError(f"{where}: gradients (lists of values interpolated over layers) are not supported; "
                         f"give one scalar")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: filtered parameters ({{filter, value}}) are not supported; give one scalar")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value) if kind is float else value


def _model_ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model path string, got {value!r} (mergekit's dict references "
                         f"and +lora suffixes are not supported)")
    return value


def parse_merge_config(source: str | os.PathLike | Mapping[str, Any]) -> MergeConfig:
    """Parse a mergekit YAML config (a file path, YAML text, or an already loaded dict).

    Supported: merge_method in CONFIG_PARAMS; base_model; models: [{model: PATH, parameters: {...}}];
    parameters (global; per-model values override them); dtype / out_dtype; scalar parameter values.
    Errors name the bad key, where it is, and the allowed values.
    """
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        text = os.fspath(source)
        if os.path.isfile(text) or re.search(r"\.ya?ml$", text.strip()):
            with open(text) as f:
                text = f.read()
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ConfigError(f"merge config must be a YAML mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"merge config: unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("slices", "modules"):
        if key in raw:
            raise ConfigError(f"merge config: {key!r} is not supported; list whole models under 'models'")
    method = raw.get("merge_method")
    if method not in CONFIG_PARAMS:
        raise ConfigError(f"merge config: merge_method {method!r} is not one of {sorted(CONFIG_PARAMS)}")
    shared, per_model = CONFIG_PARAMS[method]
    allowed = sorted({**shared, **per_model})

    global_params = raw.get("parameters") or {}
    if not isinstance(global_params, dict):
        raise ConfigError("merge config: 'parameters' must be a mapping")
    resolved_global = {}
    for name, value in global_params.items():
        if name not in shared and name not in per_model:
            raise ConfigError(f"merge config: unknown parameter {name!r} in parameters for {method}; allowed: {allowed}")
        resolved_global[name] = _scalar(value, {**shared, **per_model}[name], f"parameters.{name}")

    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("merge config: 'models' must be a non-empty list of {model: PATH, parameters: {...}}")
    base = None if raw.get("base_model") is None else _model_ref(raw["base_model"], "base_model")
    models, params = [], []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"merge config: {where} must be a mapping with a 'model' key, got {entry!r}")
        bad = sorted(set(entry) - {"model", "parameters"})
        if bad:
            raise ConfigError(f"merge config: {where}: unknown key(s) {bad}; allowed: ['model', 'parameters']")
        path = _model_ref(entry["model"], f"{where}.model")
        p = entry.get("parameters") or {}
        if not isinstance(p, dict):
            raise ConfigError(f"merge config: {where}.parameters must be a mapping")
        mine = {}
        for name, value in p.items():
            loc = f"{where}.parameters.{name}"
            if name in shared:
                raise ConfigError(f"merge config: {loc}: {name!r} is a global parameter of {method}; "
                                 f"set it under the top-level 'parameters'")
            if name not in per_model:
                raise ConfigError(f"merge config: {loc}: unknown parameter for {method}; "
                                 f"per-model parameters: {sorted(per_model)}")
            mine[name] = _scalar(value, per_model[name], loc)
        models.append(path)
        params.append(mine)

    if len(set(models)) != len(models):
        raise ConfigError(f"merge config: a model is listed twice in 'models': {models}")
    needs_base = METHODS[method].needs_base
    if needs_base:
        if base is None:
            raise ConfigError(f"merge config: merge_method {method} needs 'base_model'")
        if base in models:
            # As mergekit: the base's own per-model parameters are not used by base-relative methods.
            j = models.index(base)
            if params[j]:
                warnings.warn(f"merge config: parameters of base_model {base!r} are ignored by {method}")
            del models[j], params[j]
    elif base is not None and base not in models:
        # mergekit adds a base_model that is not listed to the inputs of every method, linear included.
        models.append(base)
        params.append({})

    def per_model_value(name: str, default: Any) -> tuple:
        values = []
        for path, p in zip(models, params):
            v = p.get(name, resolved_global.get(name, default))
            if v is REQUIRED:
                raise ConfigError(f"merge config: model {path!r} has no {name!r}; set it in its parameters or in "
                                 f"the top-level 'parameters'")
            values.append(v)
        return tuple(values)

    options: dict[str, Any] = {}
    if "weight" in per_model:  # linear and the task-arithmetic family
        options["weights"] = per_model_value("weight", REQUIRED)
        options["normalize"] = resolved_global.get("normalize", METHODS[method].defaults["normalize"])
    if "density" in per_model:  # the task-arithmetic family
        options["lambda_"] = resolved_global.get("lambda", 1.0)
        density = per_model_value("density", 1.0)
        rescale = resolved_global.get("rescale", METHODS[method].defaults["rescale"])
        if method == "task_arithmetic":
            # mergekit accepts both but applies them only with a sparsification method.
            if any(d != 1.0 for d in density) or rescale:
                warnings.warn("merge config: density and rescale have no effect with task_arithmetic")
        else:
            options["density"] = density
            options["rescale"] = rescale
    if method == "slerp":
        if len(models) != 1:
            raise ConfigError(f"merge config: slerp needs base_model and exactly one other model, got {models}")
        if "t" not in resolved_global:
            raise ConfigError("merge config: slerp needs parameters.t")
        options["t"] = resolved_global["t"]
    if method == "model_stock":
        if resolved_global.get("filter_wise", False):
            raise ConfigError("merge config: parameters.filter_wise: true is not supported (only false)")
        if len(models) < 2:
            raise ConfigError(f"merge config: model_stock needs base_model and at least two other models, got {models}")

    dtype = None
    for key in ("dtype", "out_dtype"):  # out_dtype wins: we compute in float32 whatever the load dtype
        value = raw.get(key)
        if value is None:
            continue
        name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
        if name not in _DTYPES:
            raise ConfigError(f"merge config: {key} {value!r} is not one of {sorted(_DTYPES)}")
        dtype = _DTYPES[name]
    extra = {k: raw[k] for k in _CARRIED if k in raw}
    return MergeConfig(method, tuple(models), base, options, dtype, extra)


def run_merge(config: MergeConfig | str | os.PathLike | Mapping[str, Any],
              resolve_reader: Callable[[str], LeafReader] = open_reader,
              out_writer: LeafWriter | None = None, *, key: jax.Array | int = 0,
              stacked: Sequence[tuple[str, int]] = STACKED, progress: bool = False) -> Any:
    """Parse (if needed) a mergekit config, open every model with `resolve_reader(path)`, merge streamed into
    `out_writer`; returns out_writer.close() (the merged tree if out_writer is None)."""
    cfg = config if isinstance(config, MergeConfig) else parse_merge_config(config)
    readers = [resolve_reader(p) for p in cfg.models]
    base = resolve_reader(cfg.base_model) if METHODS[cfg.method].needs_base else None
    return merge_streamed(cfg.method, readers, base, out_writer, dtype=cfg.dtype, key=key, stacked=stacked,
                          names=list(cfg.models), base_name=cfg.base_model or "base", progress=progress,
                          **cfg.options)
