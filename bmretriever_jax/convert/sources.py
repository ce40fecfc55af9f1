"""Any model we can read, as transformers tensors one at a time: a model folder (config.json + safetensors), a
known name, or a training run's checkpoint (LoRA adapters folded into their base tensor by tensor, or a full
fine-tune). Export and merging both read through `open_source`; the names come from convert/names.py."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from safetensors.numpy import load_file

from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.convert import hub
from bmretriever_jax.models import lora as lora_lib
from bmretriever_jax.util import paths, treeutil
from bmretriever_jax.convert.hf import PICKLE_FILES, config_from_hf
from bmretriever_jax.convert.names import Rule, _hf_to_jax, _jax_to_hf, rules_for, strip_prefix
from bmretriever_jax.embed import PASSAGE_TEMPLATE, QUERY_TEMPLATE, TASK_INSTRUCTIONS
from bmretriever_jax.util.errors import MissingEntryError, ModelFileNotFound, ModelSourceError
from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.models.decoder import param_shapes
from bmretriever_jax.convert.weights import OrbaxReader, SafetensorsReader

FORMATS = ("hf", "sentence-transformers", "peft")
SETTINGS_FILE = "bmretriever.json"
ADAPTER_FILE = "adapter.safetensors"  # written by train.export_model: the flattened adapter tree, raw lora_b
# BMRetriever's general question-answering instruction (its NFCorpus one); `instruction=` overrides it.
DEFAULT_INSTRUCTION = TASK_INSTRUCTIONS["nfcorpus"]
QUERY_PROMPT = QUERY_TEMPLATE.split("{query}")[0]  # "{instruction}\nQuery: "
PASSAGE_PROMPT = PASSAGE_TEMPLATE.split("{title}")[0]  # "Represent this passage\npassage: "
_TOKENIZER_EXTRA = ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
                    "spiece.model")
# Families whose transformers model honours bidirectional attention from config.json (use_bidirectional_attention).
_BIDIRECTIONAL_IN_HF = ("gemma3",)


# ----------------------------------------------------------------------------------------------------


# The tensor layout of a family: transformers base-model names, in the name table's order
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Slot:
    rule: Rule
    layer: Optional[int]
    shape: Tuple[int, ...]


def _hf_shape(rule: Rule, ours: Tuple[int, ...]) -> Tuple[int, ...]:
    if rule.kind == "copy":
        return ours
    if rule.kind == "linear":
        return tuple(reversed(ours))
    if rule.kind == "neox_qkv":  # kernels [D, H*hd] -> [3*H*hd, D]; biases [H*hd] -> [3*H*hd]
        return (3 * ours[-1],) + tuple(reversed(ours[:-1]))
    raise ModelSourceError(f"unknown conversion kind {rule.kind!r}")


def hf_layout(cfg: ModelConfig) -> Dict[str, Slot]:
    """{transformers base-model tensor name: Slot} for cfg, per layer, in the name table's order (no LM head)."""
    shapes = treeutil.flatten(param_shapes(cfg))
    out: Dict[str, Slot] = {}
    for rule in rules_for(cfg):
        ours = tuple(shapes[rule.jax[0]])
        if rule.per_layer:
            for i in range(cfg.num_layers):
                out[rule.hf.format(i=i)] = Slot(rule, i, _hf_shape(rule, ours[1:]))
        else:
            out[rule.hf] = Slot(rule, None, _hf_shape(rule, ours))
    return out


class TensorReader:
    """LeafReader (merge.py) over a model's transformers base-model tensors, float32, one tensor per read.

    fetch(name) returns the tensor; its shape is checked against the config, naming the tensor on a mismatch."""

    def __init__(self, cfg: ModelConfig, fetch: Callable[[str], np.ndarray], label: str):
        self.cfg, self._fetch, self.label = cfg, fetch, label
        self.layout = hf_layout(cfg)

    def keys(self) -> List[str]:
        return list(self.layout)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.layout[name].shape

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)

    def read(self, name: str) -> np.ndarray:
        if name not in self.layout:
            raise MissingEntryError(f"{self.label}: {name!r} is not a tensor of a {self.cfg.family} base model")
        x = np.asarray(self._fetch(name), np.float32)
        if tuple(x.shape) != self.layout[name].shape:
            raise ModelSourceError(f"{self.label}: tensor {name!r} has shape {tuple(x.shape)}, the config implies "
                             f"{self.layout[name].shape}")
        return x


def _folder_fetch(cfg: ModelConfig, folder: str) -> Callable[[str], np.ndarray]:
    """fetch over a transformers folder's tensors by base-model name (a CausalLM's "model." prefix is dropped).
    Each read opens and closes the file, so no memory map keeps already merged tensors resident."""
    pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(folder, p))]
    if pickles and not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise ModelSourceError(f"{folder}: only pickle checkpoints ({', '.join(pickles)}); refusing to load pickle files "
                         "(they can run arbitrary code). Convert them to safetensors first.")
    files = SafetensorsReader(folder)
    stored = strip_prefix(files.keys())
    missing = [n for n in hf_layout(cfg) if n not in stored]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise MissingEntryError(f"{folder}: missing tensor(s) {shown} of a {cfg.family} model")
    return lambda name: files.read(stored[name])


def _module_of(kernel_path: str) -> Optional[str]:
    return kernel_path[: -len("/kernel")] if kernel_path.endswith("/kernel") else None


def _lora_fetch(cfg: ModelConfig, base: Callable[[str], np.ndarray], adapters: Mapping[str, np.ndarray],
                lcfg: lora_lib.LoraConfig) -> Callable[[str], np.ndarray]:
    """fetch over base tensors with scale * lora_a[i] @ lora_b[i] added to each adapted kernel (float32), i.e.
    lora.merge done one transformers tensor at a time (GPT-NeoX's fused q/k/v gets all three deltas)."""
    layout = hf_layout(cfg)
    modules = _adapter_modules(cfg, adapters)
    s = np.float32(lora_lib.scale(lcfg))

    def fetch(name: str) -> np.ndarray:
        slot = layout[name]
        tensor = np.asarray(base(name), np.float32)
        hit = [p for p in slot.rule.jax if _module_of(p) in modules]
        if not hit:
            return tensor
        if slot.layer is None:
            raise ModelSourceError(f"adapter on a non-layer parameter ({hit}) is not supported")
        parts = _hf_to_jax(slot.rule, cfg, tensor)
        for j, p in enumerate(slot.rule.jax):
            mod = _module_of(p)
            if mod in modules:
                a, b = modules[mod]
                parts[j] = parts[j] + s * (np.asarray(a[slot.layer], np.float32) @ np.asarray(b[slot.layer], np.float32))
        return _jax_to_hf(slot.rule, cfg, parts)

    return fetch


def _full_fetch(cfg: ModelConfig, base: Callable[[str], np.ndarray], trained) -> Callable[[str], np.ndarray]:
    """fetch over a full fine-tune: leaves in `trained` (a LeafReader over our "/"-paths, stacked [L, ...]) replace
    the base's. Only the current rule's stacked leaves stay cached: the canonical order visits one rule's layers in a
    row, so each leaf is restored once and memory holds one stacked leaf (three for GPT-NeoX's fused q/k/v)."""
    layout = hf_layout(cfg)
    trained_paths = set(trained.keys())
    cache: Dict[str, np.ndarray] = {}

    def fetch(name: str) -> np.ndarray:
        slot = layout[name]
        hit = [p for p in slot.rule.jax if p in trained_paths]
        if not hit:
            return base(name)
        for p in [p for p in cache if p not in slot.rule.jax]:
            del cache[p]
        for p in hit:
            if p not in cache:
                cache[p] = np.asarray(trained.read(p), np.float32)
        parts = (_hf_to_jax(slot.rule, cfg, np.asarray(base(name), np.float32)) if len(hit) < len(slot.rule.jax)
                 else [None] * len(slot.rule.jax))
        for j, p in enumerate(slot.rule.jax):
            if p in cache:
                parts[j] = cache[p][slot.layer] if slot.layer is not None else cache[p]
        return _jax_to_hf(slot.rule, cfg, parts)

    return fetch


def _adapter_modules(cfg: ModelConfig, adapters: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """{module path (e.g. "layers/attn/q"): (lora_a [L, in, r], lora_b [L, r, out])}, checked against cfg."""
    flat = treeutil.flatten(adapters) if any(isinstance(v, Mapping) for v in adapters.values()) else dict(adapters)
    shapes = treeutil.flatten(param_shapes(cfg))
    modules: Dict[str, Dict[str, Any]] = {}
    for path, x in flat.items():
        mod, _, leaf = path.rpartition("/")
        if leaf not in ("lora_a", "lora_b"):
            raise ModelSourceError(f"adapter leaf {path!r} is not a lora_a / lora_b leaf")
        modules.setdefault(mod, {})[leaf] = x
    out = {}
    for mod, ab in modules.items():
        kernel = f"{mod}/kernel"
        if set(ab) != {"lora_a", "lora_b"}:
            raise ModelSourceError(f"adapter {mod!r} has only {sorted(ab)}")
        if kernel not in shapes or not kernel.startswith("layers/"):
            raise ModelSourceError(f"adapter {mod!r} does not target a per-layer linear layer of a {cfg.family} model")
        a, b = ab["lora_a"], ab["lora_b"]
        k = shapes[kernel]
        if tuple(a.shape[:-1]) != tuple(k[:-1]) or tuple(b.shape[:-2]) != tuple(k[:-2]) or b.shape[-1] != k[-1] \
                or a.shape[-1] != b.shape[-2]:
            raise ModelSourceError(f"adapter {mod!r}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} do not fit kernel {k}")
        out[mod] = (a, b)
    return out


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelSource:
    """A retriever opened for streaming. reader: TensorReader (the merged weights); settings: bmretriever.json
    contents (pooling, normalize, max_length, bidirectional, base_model, lora, ...); adapters: the raw LoRA tree
    (flat "/"-paths, lora_b unscaled) with its LoraConfig, when the source is a LoRA expert."""
    label: str
    cfg: ModelConfig
    reader: TensorReader
    tokenizer_folder: Optional[str]
    settings: Dict[str, Any]
    adapters: Optional[Dict[str, np.ndarray]] = None
    lora: Optional[lora_lib.LoraConfig] = None
    base_folder: Optional[str] = None
    step: Optional[int] = None


def _read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ModelFileNotFound(f"{folder}: no config.json (not a transformers model folder)")
    with open(path) as f:
        return config_from_hf(json.load(f))


def _lora_config(d: Optional[Mapping[str, Any]]) -> Optional[lora_lib.LoraConfig]:
    if not d or not d.get("enabled", True):
        return None
    return lora_lib.LoraConfig(rank=int(d["rank"]), alpha=float(d["alpha"]), rslora=bool(d.get("rslora", False)),
                               dropout=float(d.get("dropout", 0.0)),
                               targets=tuple(d.get("targets") or lora_lib.DEFAULT_TARGETS))


def _step_dir(path: str, step: Optional[int]) -> Optional[str]:
    """The checkpoint step directory of a run folder / checkpoint root / step dir, or None if `path` is none."""
    if os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta")):
        if step is not None and os.path.basename(os.path.normpath(path)) != str(step):
            raise ModelSourceError(f"{path} is the checkpoint of one step; do not pass step={step}")
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = paths.checkpoint_steps(root)
    if not steps:
        if root != path:
            raise ModelFileNotFound(f"{root}: no checkpoint")
        return None
    if step is None:
        with ckpt.manager(root, async_save=False) as m:  # the manager knows which steps finished writing
            step = m.latest_step()
        if step is None:
            raise ModelFileNotFound(f"{root}: no finished checkpoint")
    if step not in steps:
        raise ModelFileNotFound(f"{root}: no checkpoint of step {step} (steps: {steps})")
    return os.path.join(root, str(step))


def _open_run(step_dir: str) -> ModelSource:
    meta = ocp.JsonCheckpointHandler().restore(epath.Path(os.path.join(step_dir, "meta")))
    run = meta.get("config") or {}
    base_folder = meta.get("model_folder")
    if not base_folder or not os.path.isdir(base_folder):
        raise ModelFileNotFound(f"{step_dir}: the run's base model folder {base_folder!r} is gone; re-create it "
                                f"(e.g. `bmr info {run.get('model', {}).get('name', 'MODEL')}`) and retry")
    cfg = _read_config(base_folder)
    base = _folder_fetch(cfg, base_folder)
    trained = OrbaxReader(os.path.join(step_dir, "state"), "trainable/model")
    m = run.get("model", {})
    lcfg = _lora_config(run.get("lora"))
    settings = {"pooling": m.get("pooling", "last"), "normalize": m.get("normalize", True),
                "max_length": m.get("max_length", 512), "bidirectional": m.get("bidirectional", False),
                "base_model": m.get("name", base_folder), "lora": dict(run["lora"]) if lcfg else None}
    label = os.path.normpath(step_dir)
    step = int(os.path.basename(label))
    if lcfg is not None:
        adapters = {p: np.asarray(trained.read(p), np.float32) for p in trained.keys()}
        fetch = _lora_fetch(cfg, base, adapters, lcfg)
        return ModelSource(label, cfg, TensorReader(cfg, fetch, label), base_folder, settings, adapters, lcfg,
                           base_folder, step)
    return ModelSource(label, cfg, TensorReader(cfg, _full_fetch(cfg, base, trained), label), base_folder, settings,
                       step=step)


def _open_folder(folder: str, label: str) -> ModelSource:
    cfg = _read_config(folder)
    settings = hub.retriever_settings(folder)
    reader = TensorReader(cfg, _folder_fetch(cfg, folder), label)
    adapters = lcfg = base_folder = None
    if os.path.exists(os.path.join(folder, ADAPTER_FILE)) and settings.get("lora"):
        adapters = load_file(os.path.join(folder, ADAPTER_FILE))
        lcfg = _lora_config(settings["lora"])
        _adapter_modules(cfg, adapters)
        try:
            base_folder = hub.resolve(settings.get("base_model") or "", quiet=True)
        except (FileNotFoundError, KeyError):
            base_folder = None
    tok = folder if any(f.startswith("tokenizer") for f in os.listdir(folder)) else None
    return ModelSource(label, cfg, reader, tok, settings, adapters, lcfg, base_folder)


def open_source(src: str, *, step: Optional[int] = None, quiet: bool = True) -> ModelSource:
    """A run folder, checkpoint root or step dir, a model folder, or a known model name / .gguf -> ModelSource."""
    src = os.fspath(src)
    if os.path.isdir(src) and not os.path.exists(os.path.join(src, "config.json")):
        src = os.path.abspath(src)  # Orbax refuses relative checkpoint paths
        step_dir = _step_dir(src, step)
        if step_dir is not None:
            return _open_run(step_dir)
        if os.path.exists(os.path.join(src, "model", "config.json")):
            return _open_folder(os.path.join(src, "model"), src)
        raise ModelFileNotFound(f"{src}: neither a model folder (config.json) nor a run (checkpoints/)")
    if step is not None:
        raise ModelSourceError(f"step={step} only applies to a training run, not to the model {src!r}")
    return _open_folder(hub.resolve(src, quiet=quiet), src)
