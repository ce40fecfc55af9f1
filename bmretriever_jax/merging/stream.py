"""The streamed merge engine: every merge reads one leaf path per input at a time and writes it out."""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bmretriever_jax.util import treeutil
from bmretriever_jax.util.errors import ConfigError
from bmretriever_jax.merging.methods import F32, METHODS, resolve_options
from bmretriever_jax.convert.weights import DictReader, DictWriter, LeafReader, LeafWriter


# Leaves whose path fully matches the regex have that many leading stacked (per-layer) axes.
STACKED: tuple[tuple[str, int], ...] = ((r"layers/.*", 1),)


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
    opts = resolve_options(method, n, options)
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
