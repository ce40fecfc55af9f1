"""Weights one tensor at a time: readers and writers over in-memory dicts, safetensors files or sharded folders,
and Orbax checkpoints. Merging streams through them; export writes with them."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from bmretriever_jax.util import treeutil
from bmretriever_jax.util.errors import ConfigError, MissingEntryError, ModelFileNotFound, OutputExistsError



# ----------------------------------------------------------------------------------------------------
# Readers and writers
# ----------------------------------------------------------------------------------------------------
class LeafReader(Protocol):
    """Read one parameter at a time by "/"-path (or any string key, e.g. HF tensor names)."""

    def keys(self) -> list[str]: ...

    def shape(self, path: str) -> tuple[int, ...]: ...

    def dtype(self, path: str) -> np.dtype: ...

    def read(self, path: str) -> Any: ...  # np.ndarray or jax.Array of shape(path)


class LeafWriter(Protocol):
    def write(self, path: str, value: Any) -> None: ...

    def close(self) -> Any: ...


class DictReader:
    """LeafReader over an in-memory nested dict of arrays, or a flat {path: array} dict."""

    def __init__(self, tree: Mapping[str, Any], flat: bool = False):
        self._flat = dict(tree) if flat else treeutil.flatten(tree)

    def keys(self):
        return list(self._flat)

    def shape(self, path):
        return tuple(self._flat[path].shape)

    def dtype(self, path):
        return np.dtype(self._flat[path].dtype)

    def read(self, path):
        return self._flat[path]


class DictWriter:
    """Collects outputs; close() returns the nested tree (or the flat dict with flat=True)."""

    def __init__(self, flat: bool = False):
        self.flat_out: dict[str, Any] = {}
        self._flat = flat

    def write(self, path, value):
        self.flat_out[path] = value

    def close(self):
        return dict(self.flat_out) if self._flat else treeutil.unflatten(self.flat_out)


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsReader:
    """LeafReader over a .safetensors file, or a directory holding model.safetensors or shards listed in
    model.safetensors.index.json. Tensors are read one at a time (memory-mapped by safetensors)."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                self._file = {k: os.path.join(path, v) for k, v in weight_map.items()}
            elif os.path.exists(os.path.join(path, SINGLE_NAME)):
                self._file = self._keys_of(os.path.join(path, SINGLE_NAME))
            else:
                raise ModelFileNotFound(f"{path} has neither {SINGLE_NAME} nor {INDEX_NAME}")
        elif os.path.isfile(path):
            self._file = self._keys_of(path)
        else:
            raise ModelFileNotFound(f"no safetensors file or directory at {path}")
        self.path = path
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    @staticmethod
    def _keys_of(file: str) -> dict[str, str]:
        with safe_open(file, framework="numpy") as f:
            return {k: file for k in f.keys()}

    def keys(self):
        return list(self._file)

    def _info(self, path):
        if path not in self._meta:
            with safe_open(self._file[path], framework="numpy") as f:
                sl = f.get_slice(path)
                self._meta[path] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()))
        return self._meta[path]

    def shape(self, path):
        return self._info(path)[0]

    def dtype(self, path):
        dt = self._info(path)[1]
        if dt is None:
            raise ConfigError(f"{self.path}: tensor {path!r} has an unsupported safetensors dtype")
        return dt

    def read(self, path):
        with safe_open(self._file[path], framework="numpy") as f:
            return f.get_tensor(path)


_SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                       "BF16": np.dtype(jnp.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
                       "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
                       "BOOL": np.dtype(np.bool_)}


class SafetensorsWriter:
    """Writes outputs as safetensors, flushing a shard whenever `max_shard_bytes` is reached, so memory stays
    at one shard. A path ending in .safetensors gives one file; otherwise a directory with model.safetensors,
    or HF-style model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json."""

    def __init__(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                 metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        self._single_file = self.path.endswith(".safetensors")
        self._max = math.inf if self._single_file else max_shard_bytes
        self._metadata = dict(metadata or {"format": "pt"})
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._total = 0
        if not self._single_file:
            os.makedirs(self.path, exist_ok=True)
            # Stale shards or an index from an earlier merge would be read back mixed with this one.
            stale = [f for f in os.listdir(self.path) if f.endswith(".safetensors") or f == INDEX_NAME]
            if stale:
                raise OutputExistsError(f"{self.path} already holds {sorted(stale)[:3]}; write to a new directory")

    def write(self, path, value):
        arr = np.ascontiguousarray(np.asarray(value))
        if self._pending and self._pending_bytes + arr.nbytes > self._max:
            self._flush()
        self._pending[path] = arr
        self._pending_bytes += arr.nbytes
        self._total += arr.nbytes

    def _flush(self):
        name = self.path if self._single_file else os.path.join(self.path, f".shard-{len(self._shards):05d}.tmp")
        save_file(self._pending, name, metadata=self._metadata)
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> str:
        if self._pending or not self._shards:
            self._flush()
        if self._single_file:
            return self.path
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], os.path.join(self.path, SINGLE_NAME))
            return self.path
        weight_map = {}
        for i, (tmp, keys) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.path, final))
            weight_map.update({k: final for k in keys})
        with open(os.path.join(self.path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)
        return self.path


class OrbaxReader:
    """LeafReader over the arrays of one Orbax PyTree item directory (e.g. RUN/checkpoints/STEP/state), under
    `prefix` (e.g. "trainable/model"). Each read is a partial restore of that one leaf as numpy, so a fully
    fine-tuned checkpoint streams leaf by leaf instead of being restored whole (with its optimizer state)."""

    def __init__(self, item_dir: str | os.PathLike, prefix: str = ""):
        self.path = epath.Path(os.fspath(item_dir))
        if not (self.path / "_METADATA").exists():
            raise ModelFileNotFound(f"{item_dir}: not an Orbax PyTree item (no _METADATA)")
        self._handler = ocp.PyTreeCheckpointHandler()
        tree = self._handler.metadata(self.path).tree
        for key in [k for k in prefix.split("/") if k]:
            if not isinstance(tree, Mapping) or key not in tree:
                raise MissingEntryError(f"{item_dir}: checkpoint has no {prefix!r} subtree (missing {key!r})")
            tree = tree[key]
        self._prefix = [k for k in prefix.split("/") if k]
        self._meta = treeutil.flatten(tree) if isinstance(tree, Mapping) else {}

    def keys(self):
        return list(self._meta)

    def shape(self, path):
        return tuple(self._meta[path].shape)

    def dtype(self, path):
        return np.dtype(self._meta[path].dtype)

    def read(self, path):
        if path not in self._meta:
            raise MissingEntryError(f"{self.path}: no leaf {path!r} under {'/'.join(self._prefix) or '<root>'}")
        full = self._prefix + path.split("/")
        leaf = jax.ShapeDtypeStruct(self.shape(path), self.dtype(path))
        item = restore_args = None
        for key in reversed(full):
            item = {key: leaf if item is None else item}
            restore_args = {key: ocp.RestoreArgs(restore_type=np.ndarray) if restore_args is None else restore_args}
        out = self._handler.restore(self.path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
        for key in full:
            out = out[key]
        return np.asarray(out)


def open_reader(path: str | os.PathLike) -> LeafReader:
    """Default model resolver of `run_merge`: safetensors files or directories."""
    p = os.fspath(path)
    if p.endswith(".safetensors") or os.path.isdir(p):
        return SafetensorsReader(p)
    raise ConfigError(f"no reader for {p!r}: expected a .safetensors file or a directory of them")
