"""Model merging as leaf-by-leaf pytree arithmetic: Linear, Task Arithmetic, TIES, DARE, SLERP, Model Stock.

Definitions follow mergekit 0.1.5 (arcee-ai/mergekit: merge_methods/generalized_task_arithmetic.py,
sparsify.py, linear.py, slerp.py, model_stock.py, registry.py), including its defaults:

  method           normalize  rescale  sparsify    sign consensus
  linear           True       -        -           -            sum_i w_i x_i / sum_i w_i
  task_arithmetic  False      False    -           -            base + lambda * sum_i w_i d_i
  ties             True       False    magnitude   sum          disjoint mean of agreeing w_i d_i
  dare_ties        False      True     random      sum
  dare_linear      False      True     random      -
with d_i = x_i - base trimmed/dropped BEFORE weighting, the elected sign = sign(sum_i w_i d_i) (>= 0 is +),
"normalize" dividing by sum_i w_i (TIES: by the sum of the weights of the models that agree with the elected
sign at that element), then lambda. mergekit's rescale=True is "l1": the dropped delta is scaled so each
tensor keeps its L1 norm (`rescale="density"` gives the DARE paper's 1/density, exactly unbiased).
`int8_mask` only changes the dtype of mergekit's mask tensor, so it has no counterpart here.

Differences from mergekit, on purpose: arithmetic is always float32 (mergekit computes in the load dtype),
the result is cast to `dtype` (default: the base's leaf dtype, or the first model's for linear); DARE's
random masks come from a jax PRNG key folded with each leaf path and model index (reproducible and
independent of leaf order, but not torch's random stream); linear with weights summing to 0 raises.

Whole-tensor reductions (TIES top-k, DARE's L1 rescale, SLERP's angle, Model Stock's angle) run per
TENSOR in mergekit, where each layer is its own tensor. Our layers are stacked ([L, ...] under "layers/"),
so `stacked` = [(regex, n)] says which leaves have n leading stacked axes; each slice along them is merged
as one tensor, which makes the results equal mergekit's on the exported per-layer weights (up to fused
HF tensors such as GPT-NeoX's query_key_value and top-k tie order).

Everything runs one leaf path at a time over `LeafReader`s (in-memory dicts, safetensors files or
sharded directories) into a `LeafWriter`, so memory is about one output model plus one leaf per input;
`parse_merge_config` reads mergekit YAML and `run_merge` ties it together.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bmretriever_jax import treeutil
from bmretriever_jax.errors import ConfigError, MissingEntryError, ModelFileNotFound, OutputExistsError

F32 = np.float32
# Leaves whose path fully matches the regex have that many leading stacked (per-layer) axes.
STACKED: tuple[tuple[str, int], ...] = ((r"layers/.*", 1),)
_EPS_RESCALE = 1e-7  # mergekit sparsify.rescaled_masked_tensor
_SLERP_DOT_THRESHOLD = 0.9995  # mergekit slerp: above this |cos|, interpolate linearly
_SLERP_EPS = 1e-8


# ----------------------------------------------------------------------------------------------------
# Per-leaf kernels. Inputs are float32 "rows" [S, N]: S independent tensors (stacked slices) of N elements.
# They are numpy on the host on purpose: a merge streams leaves from disk one at a time, every leaf shape
# and option set would otherwise compile its own XLA program, and numpy float32 follows the same IEEE
# arithmetic as mergekit's torch CPU kernels. Only DARE's masks come from jax.random (reproducible keys).
# ----------------------------------------------------------------------------------------------------
def _rescaled(delta: np.ndarray, mask: np.ndarray, rescale: str | None, density: float) -> np.ndarray:
    masked = delta * mask
    if rescale is None:
        return masked
    if rescale == "density":
        return masked / density if density > 0 else masked
    before = np.abs(delta).sum(-1, keepdims=True)
    after = np.abs(masked).sum(-1, keepdims=True)
    ok = (before >= _EPS_RESCALE) & (after >= _EPS_RESCALE)
    return np.where(ok, masked * (before / np.where(ok, after, 1.0)), masked)


def _magnitude(delta: np.ndarray, density: float, rescale: str | None) -> np.ndarray:
    """Keep the top max(1, int(density * N)) |values| of each row (TIES trim)."""
    if density >= 1:
        return delta
    s, n = delta.shape
    if density <= 0 or n == 0:
        return np.zeros_like(delta)
    k = max(1, int(density * n))
    return _rescaled(delta, _top_k_mask(np.abs(delta), k), rescale, density)


def _top_k_mask(mag: np.ndarray, k: int) -> np.ndarray:
    """Float32 mask [S, N] of the k largest entries of each row of mag [S, N] (>= 0 or NaN), as a stable sort on
    -mag would pick them: among equal magnitudes the lower index wins (torch's order is unspecified), NaN last.

    A selection (np.partition, O(N)) finds the k-th largest value instead of sorting: a 262k x 640 embedding is one
    168M-element tensor, which a sort takes tens of seconds and int64 indices of 8 bytes per element to order."""
    s, n = mag.shape
    if np.isnan(mag).any():
        mag = np.where(np.isnan(mag), np.float32(-1), mag)  # below every magnitude: picked last, lower index first
    mask = np.zeros(mag.shape, F32)
    for r in range(s):
        row = mag[r]
        threshold = np.partition(row, n - k)[n - k]
        above = row > threshold
        mask[r] = above
        need = k - int(np.count_nonzero(above))
        if need > 0:  # entries equal to the threshold fill the rest in index order
            mask[r, np.flatnonzero(row == threshold)[:need]] = 1.0
    return mask


def _random(delta: np.ndarray, density: float, rescale: str | None, key: jax.Array) -> np.ndarray:
    """DARE: keep each element with probability `density`, then rescale."""
    if density >= 1:
        return delta
    mask = np.asarray(jax.random.bernoulli(key, density, delta.shape), F32)
    return _rescaled(delta, mask, rescale, density)


def _gta(base, xs, keys, *, weights, density, normalize, rescale, lambda_, sparsify, consensus):
    """mergekit GeneralizedTaskArithmeticMerge.merge_group on rows [S, N]."""
    deltas = []
    for i, x in enumerate(xs):
        d = x - base
        if sparsify == "magnitude":
            d = _magnitude(d, density[i], rescale)
        elif sparsify == "random":
            d = _random(d, density[i], rescale, keys[i])
        deltas.append(d)
    w = np.asarray(weights, F32).reshape(-1, 1, 1)
    deltas = np.stack(deltas) * w  # [M, S, N]
    if consensus:
        elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(deltas) == elected  # zero deltas never agree, so they do not dilute the mean
        mixed = np.where(agree, deltas, 0.0).sum(0)
        divisor = np.where(agree, w, 0.0).sum(0)
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor = np.where(np.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def _linear(base, xs, keys, *, weights, normalize):
    out = np.zeros_like(xs[0])
    for w, x in zip(weights, xs):
        out = out + np.float32(w) * x
    return out / np.float32(sum(weights)) if normalize else out


def _slerp(base, xs, keys, *, t):
    """Spherical interpolation from base (t=0) to xs[0] (t=1) per row; lerp when (anti)colinear."""
    a, b = base, xs[0]
    if a.shape[1] == 0:
        return (1 - t) * a + t * b
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    na = np.where(na > _SLERP_EPS, na, 1.0)
    nb = np.where(nb > _SLERP_EPS, nb, 1.0)
    dot = np.clip(((a / na) * (b / nb)).sum(-1, keepdims=True), -1.0, 1.0)
    lin = np.abs(dot) > _SLERP_DOT_THRESHOLD
    theta = np.arccos(np.where(lin, 0.0, dot))
    sin_theta = np.where(lin, 1.0, np.sin(theta))
    coef_a = np.where(lin, 1 - t, np.sin((1 - t) * theta) / sin_theta)
    coef_b = np.where(lin, t, np.sin(t * theta) / sin_theta)
    return coef_a * a + coef_b * b


def _model_stock(base, xs, keys):
    """Model Stock (Jang et al. 2024) as mergekit: t = N cos / (1 + (N-1) cos), cos = mean pairwise cosine
    of the task vectors; result = t * mean(models) + (1 - t) * base, per row."""
    offsets = [x - base for x in xs]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cos.append(np.clip((a * b).sum(-1) / np.maximum(norm_product, 1e-6), -1.0, 1.0))
    cos_theta = np.stack(cos).mean(0)[:, None]
    n = len(xs)
    denominator = 1 + (n - 1) * cos_theta
    # No finite estimate at the singularity: keep the base rather than amplify opposing updates.
    singular = np.abs(denominator) < 1e-6
    t = np.where(singular, 0.0, n * cos_theta / np.where(singular, 1.0, denominator))
    average = sum(xs) / n
    return t * average + (1 - t) * base


# ----------------------------------------------------------------------------------------------------
# Method table
# ----------------------------------------------------------------------------------------------------
_REQUIRED = object()
_PER_MODEL = frozenset({"weights", "density"})


@dataclasses.dataclass(frozen=True)
class _Method:
    fn: Callable
    needs_base: bool
    min_models: int
    max_models: int | None
    defaults: Mapping[str, Any]
    random: bool = False


def _gta_method(sparsify, consensus, normalize, rescale, random=False):
    fn = lambda base, xs, keys, **kw: _gta(base, xs, keys, sparsify=sparsify, consensus=consensus, **kw)  # noqa: E731
    return _Method(fn, True, 1, None, dict(weights=_REQUIRED, density=1.0, normalize=normalize, rescale=rescale,
                                           lambda_=1.0), random)


METHODS: dict[str, _Method] = {
    "linear": _Method(_linear, False, 1, None, dict(weights=_REQUIRED, normalize=True)),
    "task_arithmetic": _gta_method(None, False, False, False),
    "ties": _gta_method("magnitude", True, True, False),
    "dare_ties": _gta_method("random", True, False, True, random=True),
    "dare_linear": _gta_method("random", False, False, True, random=True),
    "slerp": _Method(_slerp, True, 1, 1, dict(t=_REQUIRED)),
    "model_stock": _Method(_model_stock, True, 2, None, {}),
}


def _resolve_options(method: str, n_models: int, options: Mapping[str, Any]) -> dict[str, Any]:
    m = METHODS[method]
    unknown = sorted(set(options) - set(m.defaults))
    if unknown:
        raise ConfigError(f"merge method {method!r} has no option(s) {unknown}; allowed: {sorted(m.defaults)}")
    out = {}
    for name, default in m.defaults.items():
        value = options.get(name, default)
        if value is _REQUIRED or value is None and default is _REQUIRED:
            raise ConfigError(f"merge method {method!r} needs {name!r}")
        if name in _PER_MODEL:
            values = [value] * n_models if np.ndim(value) == 0 else list(value)
            if len(values) != n_models:
                raise ConfigError(f"{name!r} has {len(values)} values for {n_models} models")
            value = tuple(float(v) for v in values)
        out[name] = value
    if "density" in out and any(not 0.0 <= d <= 1.0 for d in out["density"]):
        raise ConfigError(f"density must be in [0, 1], got {out['density']}")
    if "rescale" in out:
        r = out["rescale"]
        if r not in (False, None, True, "l1", "density"):
            raise ConfigError(f"rescale must be False, True (= 'l1', mergekit) or 'density', got {r!r}")
        out["rescale"] = "l1" if r is True else (r or None)
    if method == "linear" and out["normalize"] and sum(out["weights"]) == 0:
        raise ConfigError(f"linear merge with normalize=True needs weights not summing to 0, got {out['weights']}")
    if "t" in out:
        out["t"] = float(out["t"])
    if "lambda_" in out:
        out["lambda_"] = float(out["lambda_"])
    return out


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
        from safetensors import safe_open
        with safe_open(file, framework="numpy") as f:
            return {k: file for k in f.keys()}

    def keys(self):
        return list(self._file)

    def _info(self, path):
        if path not in self._meta:
            from safetensors import safe_open
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
        from safetensors import safe_open
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
        from safetensors.numpy import save_file
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
        import orbax.checkpoint as ocp
        from etils import epath

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
        import orbax.checkpoint as ocp

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


# ----------------------------------------------------------------------------------------------------
# The streamed engine (every public merge goes through it)
# ----------------------------------------------------------------------------------------------------
def _show(paths: Sequence[str], n: int = 5) -> str:
    return ", ".join(repr(p) for p in list(paths)[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _validate(readers: Sequence[LeafReader], labels: Sequence[str]) -> list[str]:
    """Same paths, shapes and floating dtypes everywhere; returns the paths in the first input's order."""
    ref_keys = list(readers[0].keys())
    ref_set = set(ref_keys)
    for reader, label in zip(readers[1:], labels[1:]):
        keys = set(reader.keys())
        missing = [k for k in ref_keys if k not in keys]
        if missing:
            raise ConfigError(f"{label} is missing {len(missing)} parameter(s) that {labels[0]} has: {_show(missing)}")
        extra = sorted(keys - ref_set)
        if extra:
            raise ConfigError(f"{label} has {len(extra)} parameter(s) that {labels[0]} lacks: {_show(extra)}")
    for path in ref_keys:
        shapes = [tuple(r.shape(path)) for r in readers]
        if len(set(shapes)) > 1:
            listing = ", ".join(f"{label} {s}" for label, s in zip(labels, shapes))
            raise ConfigError(f"parameter {path!r}: shapes differ: {listing}")
        for reader, label in zip(readers, labels):
            dt = reader.dtype(path)
            if not jnp.issubdtype(dt, jnp.floating):
                raise ConfigError(f"parameter {path!r} of {label} has dtype {dt}; merging needs floating point")
    return ref_keys


def _path_seed(path: str) -> int:
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def _as_key(key: jax.Array | int) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def leaf_keys(key: jax.Array | int, path: str, n: int) -> list[jax.Array]:
    """The DARE PRNG keys of the n models at leaf `path`: a function of (key, path, model index) only, so
    masks are reproducible and do not depend on which other leaves exist or their order. Model i's mask
    is jax.random.bernoulli(keys[i], density, [S, N]) over the leaf's rows (see `stacked`)."""
    leaf_key = jax.random.fold_in(_as_key(key), _path_seed(path))
    return [jax.random.fold_in(leaf_key, i) for i in range(n)]


def _rows(x: Any, rows: tuple[int, int]) -> np.ndarray:
    return np.asarray(x).astype(F32, copy=False).reshape(rows)


def merge_streamed(method: str, readers: Sequence[LeafReader], base_reader: LeafReader | None = None,
                   out_writer: LeafWriter | None = None, *, dtype=None, key: jax.Array | int = 0,
                   stacked: Sequence[tuple[str, int]] = STACKED, names: Sequence[str] | None = None,
                   base_name: str = "base", progress: bool = False, **options) -> Any:
    """Merge `readers` (and `base_reader`) one leaf path at a time into `out_writer`; returns its close().

    method: a key of METHODS; options: that method's options (weights, density, normalize, rescale,
    lambda_, t). All inputs are validated (paths, shapes, dtypes) before anything is computed or written.
    dtype: output dtype (default: the base's leaf dtype, or the first model's). key: PRNG key or int seed
    (DARE only). With out_writer=None the merged nested dict is returned. progress: a bar over the leaves.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; allowed: {sorted(METHODS)}")
    m = METHODS[method]
    readers = list(readers)
    n = len(readers)
    if m.needs_base and base_reader is None:
        raise ConfigError(f"merge method {method!r} needs a base model")
    if not m.needs_base and base_reader is not None:
        raise ConfigError(f"merge method {method!r} takes no base model; pass it as one of the models")
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        want = m.min_models if m.max_models == m.min_models else f"at least {m.min_models}"
        raise ConfigError(f"merge method {method!r} needs {want} model(s) besides the base, got {n}")
    opts = _resolve_options(method, n, options)
    labels = list(names) if names is not None else [f"models[{i}]" for i in range(n)]
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} names for {n} models")
    all_readers = ([base_reader] if base_reader is not None else []) + readers
    all_labels = ([base_name] if base_reader is not None else []) + labels
    paths = _validate(all_readers, all_labels)
    out_dtype = None if dtype is None else jnp.dtype(dtype)
    root_key = _as_key(key) if m.random else None
    writer = out_writer if out_writer is not None else DictWriter()
    for path in tqdm(paths, desc=f"merging ({method})", unit="tensor", disable=not progress, leave=False):
        ref = all_readers[0]
        shape = tuple(ref.shape(path))
        nb = min(treeutil.first_match(path, stacked, 0), len(shape))
        rows = (math.prod(shape[:nb]), math.prod(shape[nb:]))
        base = None if base_reader is None else _rows(base_reader.read(path), rows)
        xs = [_rows(r.read(path), rows) for r in readers]
        keys = leaf_keys(root_key, path, n) if m.random else None
        out = m.fn(base, xs, keys, **opts)
        writer.write(path, out.reshape(shape).astype(out_dtype or ref.dtype(path)))
        del base, xs, out
    return writer.close()


def merge_trees(method: str, models: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None = None,
                **kwargs) -> dict:
    """In-memory `merge_streamed` over nested-dict trees; returns the merged tree (jax arrays)."""
    out = merge_streamed(method, [DictReader(t) for t in models], None if base is None else DictReader(base),
                         **kwargs)
    return treeutil.unflatten({p: jnp.asarray(v) for p, v in treeutil.flatten(out).items()})


# ----------------------------------------------------------------------------------------------------
# Public per-method functions over trees
# ----------------------------------------------------------------------------------------------------
def linear(models, weights, normalize: bool = True, *, dtype=None, stacked=STACKED) -> dict:
    """sum_i w_i x_i (/ sum_i w_i if normalize)."""
    return merge_trees("linear", models, weights=weights, normalize=normalize, dtype=dtype, stacked=stacked)


def task_arithmetic(base, models, weights, lambda_: float = 1.0, *, normalize: bool = False, dtype=None,
                    stacked=STACKED) -> dict:
    """base + lambda * sum_i w_i (x_i - base) (divided by sum_i w_i if normalize)."""
    return merge_trees("task_arithmetic", models, base, weights=weights, lambda_=lambda_, normalize=normalize,
                       dtype=dtype, stacked=stacked)


def ties(base, models, weights, density, normalize: bool = True, lambda_: float = 1.0, *, rescale=False,
         dtype=None, stacked=STACKED) -> dict:
    """TIES: trim each task vector to its top-`density` magnitudes (per tensor), elect the sign of the sum
    of weighted trimmed vectors, take the disjoint weighted mean of the agreeing entries. density may be
    one value or one per model."""
    return merge_trees("ties", models, base, weights=weights, density=density, normalize=normalize,
                       lambda_=lambda_, rescale=rescale, dtype=dtype, stacked=stacked)


def dare_ties(base, models, weights, density, key, normalize: bool = False, lambda_: float = 1.0, *,
              rescale=True, dtype=None, stacked=STACKED) -> dict:
    """DARE drop (keep with prob density, rescale) + TIES sign consensus. key: PRNG key or int seed."""
    return merge_trees("dare_ties", models, base, weights=weights, density=density, normalize=normalize,
                       lambda_=lambda_, rescale=rescale, key=key, dtype=dtype, stacked=stacked)


def dare_linear(base, models, weights, density, key, normalize: bool = False, lambda_: float = 1.0, *,
                rescale=True, dtype=None, stacked=STACKED) -> dict:
    """DARE drop (keep with prob density, rescale) + task arithmetic."""
    return merge_trees("dare_linear", models, base, weights=weights, density=density, normalize=normalize,
                       lambda_=lambda_, rescale=rescale, key=key, dtype=dtype, stacked=stacked)


def slerp(a, b, t: float, *, dtype=None, stacked=STACKED) -> dict:
    """Spherical interpolation per tensor: a at t=0, b at t=1 (a is mergekit's base_model)."""
    return merge_trees("slerp", [b], a, t=t, dtype=dtype, stacked=stacked)


def model_stock(base, models, *, dtype=None, stacked=STACKED) -> dict:
    """Model Stock over >= 2 fine-tuned models of one base."""
    return merge_trees("model_stock", models, base, dtype=dtype, stacked=stacked)


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
        import yaml
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
            if v is _REQUIRED:
                raise ConfigError(f"merge config: model {path!r} has no {name!r}; set it in its parameters or in "
                                 f"the top-level 'parameters'")
            values.append(v)
        return tuple(values)

    options: dict[str, Any] = {}
    if "weight" in per_model:  # linear and the task-arithmetic family
        options["weights"] = per_model_value("weight", _REQUIRED)
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
