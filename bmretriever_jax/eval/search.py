"""Exact (brute-force) top-k search in JAX, streamed over corpus blocks and sharded over devices.

The corpus never has to be in device memory at once: it arrives as blocks (slices of an array or
np.memmap, or any iterator of [n_i, d] arrays, e.g. cached chunks read from disk), and a running top-k is
merged after each block with `jax.lax.top_k`. With more than one device, each block's rows are split over a
1-D view of the mesh with `jax.shard_map`; every device scores its rows and keeps a local top-k, the local
results are all-gathered (k per device, tiny) and merged, so only the queries and the running top-k are
replicated.

Ties are deterministic: among equal scores the lower corpus index wins, whatever the block size or number
of devices. `lax.top_k` puts the lower position first, and every concatenation here is in corpus order (the
running top-k holds earlier blocks, so it goes first; shards are gathered in device order and hold
consecutive rows).
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _as_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return jnp.dtype(_DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return dtype


def _normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm in float32; zero rows stay zero (cosine 0 with everything)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _scores(q: jax.Array, block: jax.Array, similarity: str, dtype: jnp.dtype) -> jax.Array:
    """[Q, d] x [B, d] -> [Q, B] float32. bf16 operands accumulate in float32 (AMX / MXU fast path)."""
    if similarity == "cos":
        block = _normalize(block)
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(q.astype(dtype), block.astype(dtype), (((1,), (1,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def merge_topk(scores_a: jax.Array, idx_a: jax.Array, scores_b: jax.Array, idx_b: jax.Array, k: int):
    """Top k of two candidate lists [Q, ka] and [Q, kb] -> ([Q, k], [Q, k]).

    Equal scores keep `a` before `b`, so pass the candidates with the lower corpus indices as `a`.
    """
    s = jnp.concatenate([scores_a, scores_b], axis=1)
    i = jnp.concatenate([idx_a, idx_b], axis=1)
    top, pos = lax.top_k(s, k)
    return top, jnp.take_along_axis(i, pos, axis=1)


def _block_topk(q, block, offset, n_valid, row0, *, k, similarity, dtype):
    """Top-k of one block's rows [b, d] (rows row0.. of the block at corpus row `offset`) -> [Q, <=k] x2."""
    s = _scores(q, block, similarity, dtype)                                 # [Q, b]
    rows = row0 + jnp.arange(block.shape[0], dtype=jnp.int32)
    s = jnp.where((rows < n_valid)[None, :], s, -jnp.inf)                    # padding rows never win
    ls, li = lax.top_k(s, min(k, block.shape[0]))
    return ls, li + (offset + row0)


@functools.lru_cache(maxsize=None)
def _single_step(k: int, similarity: str, dtype: jnp.dtype):
    def step(best_s, best_i, q, block, offset, n_valid):
        ls, li = _block_topk(q, block, offset, n_valid, 0, k=k, similarity=similarity, dtype=dtype)
        return merge_topk(best_s, best_i, ls, li, k)
    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _sharded_step(mesh: Mesh, k: int, similarity: str, dtype: jnp.dtype):
    axes = tuple(mesh.axis_names)

    def step(best_s, best_i, q, block, offset, n_valid):
        # block: this device's [B / n_devices, d] rows; shards hold consecutive rows in device order.
        row0 = lax.axis_index(axes) * block.shape[0]
        ls, li = _block_topk(q, block, offset, n_valid, row0, k=k, similarity=similarity,
                             dtype=dtype)
        gs = lax.all_gather(ls, axes, axis=1, tiled=True)                    # [Q, n_devices * k_local]
        gi = lax.all_gather(li, axes, axis=1, tiled=True)
        return merge_topk(best_s, best_i, gs, gi, k)

    # The merged top-k is identical on every device (it is computed from all-gathered values), but the type
    # system marks all_gather results as device-varying, so the replication check has to be switched off.
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(axes, None), P(), P()),
                            out_specs=(P(), P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=(0, 1))


def _round_rows(rows: int, block_size: int, multiple: int) -> int:
    """Padded block height: a power of two (few compilations) capped at block_size, divisible by `multiple`."""
    size = min(block_size, 1 << max(rows - 1, 0).bit_length())
    return -(-size // multiple) * multiple


def _pad_rows(block, rows: int):
    pad = rows - block.shape[0]
    if pad == 0:
        return block
    if isinstance(block, jax.Array):
        return jnp.pad(block, ((0, pad), (0, 0)))
    return np.pad(np.asarray(block), ((0, pad), (0, 0)))


def _iter_blocks(corpus, block_size: int) -> Iterator:
    """Yields consecutive row blocks of at most block_size rows from an array or an iterator of arrays."""
    if hasattr(corpus, "shape") and hasattr(corpus, "__getitem__"):
        if len(corpus.shape) != 2:
            raise ValueError(f"corpus must be [N, d], got shape {corpus.shape}")
        for start in range(0, corpus.shape[0], block_size):
            yield corpus[start:start + block_size]
        return
    # An iterator of arbitrary-size blocks: regroup into block_size rows so each step is one compiled shape.
    pending, n_pending = [], 0
    for part in corpus:
        part = np.asarray(part)
        if part.ndim != 2:
            raise ValueError(f"corpus blocks must be [n, d], got shape {part.shape}")
        while part.shape[0]:
            take = min(block_size - n_pending, part.shape[0])
            pending.append(part[:take])
            n_pending += take
            part = part[take:]
            if n_pending == block_size:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, n_pending = [], 0
    if n_pending:
        yield np.concatenate(pending)


def default_mesh() -> Mesh | None:
    """A 1-D mesh over this process's devices when it has more than one, else None (single-device path). Local
    devices only: in a multi-process job a search is called by one process (or by each on its own copy), and a
    mesh over every process's devices would make it a collective that a lone caller waits on forever."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return None
    return Mesh(np.asarray(devices), ("corpus",), axis_types=(jax.sharding.AxisType.Auto,))


def topk_search(query_vecs, corpus: "np.ndarray | jax.Array | Iterable[np.ndarray]", k: int, *,
                block_size: int = 65536, similarity: str = "cos", dtype="float32",
                mesh: Mesh | None | str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product / cosine search.

    Args:
      query_vecs: [Q, d] array.
      corpus: [N, d] array (numpy, np.memmap, jax.Array: read block by block) or an iterable of [n_i, d]
        blocks in corpus order (indices count rows across blocks).
      k: results per query. If k > N the tail is padded with score -inf and index -1.
      block_size: corpus rows scored per step; device memory ~ Q * block_size * 4 bytes for the scores.
      similarity: "cos" (rows L2-normalised in float32 first) or "dot".
      dtype: "float32" (exact, HIGHEST precision) or "bfloat16" (bf16 operands, float32 accumulation).
      mesh: "auto" = this process's devices when it has several; None = one device; or a Mesh whose axes are all
        used to split each block's rows.
    Returns:
      (scores [Q, k] float32, indices [Q, k] int64), best first; ties -> lower index first.
    """
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
    if k < 1 or block_size < 1:
        raise ValueError(f"k and block_size must be positive, got k={k}, block_size={block_size}")
    dtype = _as_dtype(dtype)
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be 'auto', None or a Mesh, got {mesh!r}")
        mesh = default_mesh()
    n_dev = 1 if mesh is None else mesh.size

    q = jnp.asarray(query_vecs, dtype=jnp.float32)
    if q.ndim != 2:
        raise ValueError(f"query_vecs must be [Q, d], got shape {q.shape}")
    if similarity == "cos":
        q = _normalize(q)
    n_q, dim = q.shape
    best_s = jnp.full((n_q, k), -jnp.inf, jnp.float32)
    best_i = jnp.full((n_q, k), -1, jnp.int32)
    if mesh is None:
        step = _single_step(k, similarity, dtype)
        put = lambda x: x  # noqa: E731  (jit moves host arrays to the device)
    else:
        step = _sharded_step(mesh, k, similarity, dtype)
        replicated = NamedSharding(mesh, P())
        q, best_s, best_i = (jax.device_put(x, replicated) for x in (q, best_s, best_i))
        put = functools.partial(jax.device_put, device=NamedSharding(mesh, P(tuple(mesh.axis_names), None)))

    block_size = -(-block_size // n_dev) * n_dev
    offset = 0
    for block in _iter_blocks(corpus, block_size):
        rows = block.shape[0]
        if block.shape[1] != dim:
            raise ValueError(f"corpus dim {block.shape[1]} != query dim {dim} (block at row {offset})")
        if offset + rows > np.iinfo(np.int32).max:
            raise ValueError("corpus larger than 2^31 rows: search it in parts and merge with merge_topk")
        block = _pad_rows(block, _round_rows(rows, block_size, n_dev))
        best_s, best_i = step(best_s, best_i, q, put(block), jnp.int32(offset), jnp.int32(rows))
        offset += rows
    scores = np.asarray(best_s)
    indices = np.where(np.isneginf(scores), -1, np.asarray(best_i)).astype(np.int64)
    return scores, indices
