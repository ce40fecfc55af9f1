"""One typed config system: dataclasses loaded from YAML, `key=value` overrides from the command line.

Errors name the file and line, the dotted parameter path and the allowed keys or values:
    configs/quickstart.yaml:12: train.stepz: unknown key; allowed: clip, eval_every, ...
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from bmretriever_jax.util.errors import ConfigError, InputPathError  # ConfigError is re-exported: config.ConfigError


# ----------------------------------------------------------------------------------------------------
# The run config, split by concern
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelSection:
    name: str = "gemma3-270m"  # a known name, .gguf file or transformers folder
    max_length: int = 256  # passages; queries use query_max_length
    query_max_length: int = 64
    pooling: str = "last"
    normalize: bool = True
    bidirectional: bool = False
    dtype: str = "auto"  # matmul inputs: auto = bfloat16 where the hardware has bf16 units, else float32 (precision.py)
    param_dtype: str = "float32"  # storage of the frozen base weights
    remat: bool = True  # recompute activations in the backward pass (activation checkpointing)
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (with remat: true)


@dataclasses.dataclass
class DataSection:
    train: List[str] = dataclasses.field(default_factory=list)  # pairs JSONL files or builder names
    num_negatives: int = 1
    negatives: str = "random"
    short: str = "pad"
    dev: Optional[str] = None  # BEIR folder for dev NDCG@10 during training
    dev_split: str = "dev"
    dev_task: Optional[str] = None  # instruction for dev queries (task name or literal; default: by folder name)
    # several texts per row with segment ids (data/packing.py): the step computes text, not padding; the
    # vectors, loss and gradients equal the padded ones'. Rows per device are chosen from the first batches.
    packing: bool = False
    pack_max_segments: int = 16  # texts per packed row at most (GPU attention kernels want a cap)
    pack_calibration_batches: int = 32  # global batches of epoch 0 whose packing sets the row count
    # rows = max(most needed, mean load + this many sd of the calibration blocks' loads + the placement's
    # slack): room for the tail, so the padded fallback shape (which may not fit a pod's memory) stays rare;
    # 0 = the most any calibration batch needed (data/packing.py choose_rows)
    pack_tail_sigmas: float = 6.0
    # order each global batch so every device's block holds about the same tokens (packing.balance_order);
    # off = blocks in the sampled order (more rows for the same data)
    pack_balance: bool = True
    # token lengths `bmr plan` sizes packed rows and counts text with (data/length_profiles.json: pretrain,
    # finetune; or a .json path); "" = the profile named by train.stage
    length_profile: str = ""
    # a `bmr prepare` folder (memory-mapped Arrow) read by the grain loader instead of data.train in memory:
    # batches are built (read, tokenized, packed) by `workers` processes (0 = in this process), each keeping
    # `prefetch` batches ready (data/grain_loader.py, docs/data-pipeline.md)
    prepared: Optional[str] = None
    workers: int = 2
    prefetch: int = 2


@dataclasses.dataclass
class LoraSection:
    enabled: bool = True
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    dropout: float = 0.0
    targets: List[str] = dataclasses.field(
        default_factory=lambda: [r"layers/(attn|mlp)/(q|k|v|o|gate|up|down)/kernel"])


@dataclasses.dataclass
class TrainSection:
    stage: str = "finetune"  # pretrain | finetune
    steps: int = 200
    global_batch_size: int = 32
    grad_accum: int = 1  # optimizer steps every `grad_accum` micro-batches (each of global_batch_size)
    grad_cache_chunk: int = 0  # 0 = no gradient cache; else embed in chunks of this many sequences
    lr: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.01
    clip: float = 1.0
    temperature: float = 0.02
    learn_temperature: bool = False
    similarity: str = "cos"  # cos | dot
    seed: int = 0
    save_every: int = 100
    keep: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (when data.dev is set)
    full_finetune_regex: List[str] = dataclasses.field(default_factory=lambda: [".*"])  # when lora is off


@dataclasses.dataclass
class MeshSection:
    data: int = -1  # -1 = all devices left over
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    out: str = "runs/default"


CHOICES = {
    "model.pooling": ("last", "mean"), "model.dtype": ("auto", "bfloat16", "float32"),
    "model.param_dtype": ("bfloat16", "float32"),
    "model.remat_policy": ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                           "everything_saveable"), "train.stage": ("pretrain", "finetune"),
    "train.schedule": ("linear", "cosine", "constant"), "train.similarity": ("cos", "dot"),
    "data.negatives": ("random", "first"), "data.short": ("pad", "drop"),
}

# numeric ranges checked at load time, so that a bad value fails with its file:line before any model loads
# (path -> (lowest allowed, whether the lowest itself is allowed, highest allowed or None))
RANGES = {
    "model.max_length": (2, True, None), "model.query_max_length": (2, True, None),
    "data.num_negatives": (0, True, None), "data.pack_max_segments": (1, True, None),
    "data.pack_calibration_batches": (1, True, None), "data.pack_tail_sigmas": (0, True, None), "data.workers": (0, True, None), "data.prefetch": (0, True, None),
    "lora.rank": (1, True, None), "lora.alpha": (0, False, None), "lora.dropout": (0, True, 0.999),
    "train.steps": (1, True, None), "train.global_batch_size": (1, True, None), "train.grad_accum": (1, True, None),
    "train.grad_cache_chunk": (0, True, None), "train.lr": (0, False, None), "train.warmup_steps": (0, True, None),
    "train.weight_decay": (0, True, None), "train.clip": (0, True, None), "train.temperature": (0, False, None),
    "train.save_every": (1, True, None), "train.keep": (1, True, None), "train.log_every": (1, True, None),
    "train.eval_every": (0, True, None),
}
# keys a run config must set (a default backbone chosen silently is a surprise, not a convenience)
REQUIRED = {"model.name": "a model: gemma3-270m, smollm2-135m, a .gguf file or a transformers folder"}


def _check_range(path: str, v, where: str) -> None:
    lo, inclusive, hi = RANGES[path]
    if (v < lo if inclusive else v <= lo) or (hi is not None and v > hi):
        want = (f">= {lo}" if inclusive else f"> {lo}") + (f" and <= {hi}" if hi is not None else "")
        raise ConfigError(f"{where}: {v!r} is out of range; allowed: {want}")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def _line_index(text: str) -> Dict[str, int]:
    """dotted key path -> 1-based line in the YAML text."""
    lines: Dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _convert(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(value, args[0], where)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls, d: Dict[str, Any], *, prefix: str = "", source: str = "<config>", lines: Optional[Dict[str, int]] = None):
    """Nested dict -> dataclass instance, validating keys, types and choices."""
    lines = lines or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (d or {}).items():
        path = f"{prefix}{key}"
        where = f"{source}:{lines[path]}: {path}" if path in lines else f"{source}: {path}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key; allowed: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of {', '.join(sorted(f.name for f in dataclasses.fields(tp)))}")
            kwargs[key] = build(tp, value, prefix=path + ".", source=source, lines=lines)
            continue
        v = _convert(value, tp, where)
        if path in CHOICES and v not in CHOICES[path]:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(CHOICES[path])}")
        if path in RANGES:
            _check_range(path, v, where)
        kwargs[key] = v
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def load_config(path: Optional[str], overrides: Sequence[str] = (), cls=RunConfig):
    """YAML file (may be None) + ["train.steps=100", ...] -> cls instance."""
    text = ""
    if path:
        if not os.path.exists(path) or os.path.isdir(path):
            raise InputPathError(f"{path}: no such config file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value (e.g. train.steps=100)")
        k, v = o.split("=", 1)
        _set_dotted(d, k.strip(), yaml.safe_load(v))
    cfg = build(cls, d, source=path or "<overrides>", lines=_line_index(text))
    if cls is RunConfig:
        for dotted, what in REQUIRED.items():
            node = d
            for k in dotted.split("."):
                node = node.get(k) if isinstance(node, dict) else None
            if node in (None, ""):
                raise ConfigError(f"{path or '<overrides>'}: {dotted}: required ({what})")
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve_mesh_shape(m: MeshSection, n_devices: int) -> Tuple[int, int, int]:
    """(data, fsdp, tensor) sizes; a mesh smaller than the device count uses the first devices."""
    sizes = [m.data, m.fsdp, m.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("mesh: at most one axis may be -1")
    fixed = 1
    for s in sizes:
        if s != -1:
            if s < 1:
                raise ConfigError(f"mesh: axis sizes must be >= 1 or -1, got {sizes}")
            fixed *= s
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(f"mesh {sizes}: {n_devices} devices are not divisible by {fixed}")
        sizes[sizes.index(-1)] = n_devices // fixed
    if sizes[0] * sizes[1] * sizes[2] > n_devices:
        raise ConfigError(f"mesh {sizes} needs {sizes[0] * sizes[1] * sizes[2]} devices, have {n_devices}")
    return tuple(sizes)
