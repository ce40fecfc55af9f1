"""Exact (brute-force) top-k search in JAX, streamed over corpus blocks and sharded over devices.

The corpus never has to be in device memory at once: it arrives as blocks (slices of an array or
np.memmap, or any iterator of [n_i, d] arrays, e.g. cached chunks read from disk), and a running top-k is
merged after each block with `jax.lax.top_k`. Inside a block the rows are scored TILE at a time, and each
tile's top-k looks only at its best groups of GROUP scores (exact: see `_tile_topk`). With more than one
device, each block's rows are split over a 1-D view of the mesh with `jax.shard_map`; every device scores its
rows and keeps a local top-k, the local results are all-gathered (k per device, tiny) and merged, so only the
queries and the running top-k are replicated.

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


TILE = 4096  # corpus rows scored at once inside a block: the [Q, TILE] float32 scores stay in cache
GROUP = 64   # the top-k of a tile looks only inside the k groups of GROUP scores with the largest maxima


def _tile_topk(q, tile, row0, n_valid, *, k, similarity, dtype):
    """Top-k of one tile's rows [t, d] (block rows row0..row0+t) -> ([Q, <=k], [Q, <=k] block row numbers).

    Exact, ties included: every element of the top k lies in one of the k groups ranked first by (group maximum
    desc, group number asc): a group left out is outranked by k group maxima, each an element that ranks before
    all of its elements. The chosen groups are taken in corpus order, so `lax.top_k` over them still puts the
    lower row first among equal scores. This keeps the top-k a small part of the tile's cost (the tile's full
    sort would be about a fifth of the matmul's time on a CPU)."""
    s = _scores(q, tile, similarity, dtype)                                  # [Q, t]
    t = tile.shape[0]
    rows = row0 + jnp.arange(t, dtype=jnp.int32)
    # Padding rows never win, and neither does a NaN score (a NaN vector): it becomes -inf, so the group maxima
    # and lax.top_k see one order on every platform.
    s = jnp.where((rows < n_valid)[None, :] & ~jnp.isnan(s), s, -jnp.inf)
    kk = min(k, t)
    if t % GROUP or kk * GROUP * 2 > t:                                      # pruning would not pay
        ls, li = lax.top_k(s, kk)
        return ls, li + row0
    groups = s.reshape(s.shape[0], t // GROUP, GROUP)
    _, gi = lax.top_k(groups.max(axis=-1), kk)
    gi = jnp.sort(gi, axis=1)                                                # corpus order
    cand = jnp.take_along_axis(groups, gi[:, :, None], axis=1).reshape(s.shape[0], kk * GROUP)
    ls, pos = lax.top_k(cand, kk)
    return ls, jnp.take_along_axis(gi, pos // GROUP, axis=1) * GROUP + pos % GROUP + row0


def _block_topk(q, block, offset, n_valid, row0, *, k, similarity, dtype):
    """Top-k of one block's rows [b, d] (rows row0.. of the block at corpus row `offset`) -> [Q, <=k] x2.

    The block is scored TILE rows at a time (a scan), each tile keeping its top k: scores of a whole block
    ([Q, 65536] float32 is 256 MB for 1,000 queries) would stream through memory twice and slow the matmul."""
    b = block.shape[0]
    if b % TILE or b == TILE:
        ls, li = _tile_topk(q, block, row0, n_valid, k=k, similarity=similarity, dtype=dtype)
        return ls, li + offset
    n_tiles = b // TILE

    def body(_, x):
        tile, start = x
        return None, _tile_topk(q, tile, row0 + start, n_valid, k=k, similarity=similarity, dtype=dtype)

    starts = jnp.arange(n_tiles, dtype=jnp.int32) * TILE
    _, (ts, ti) = lax.scan(body, None, (block.reshape(n_tiles, TILE, block.shape[1]), starts))
    ts = jnp.moveaxis(ts, 0, 1).reshape(q.shape[0], -1)                      # [Q, n_tiles * k], corpus order
    ti = jnp.moveaxis(ti, 0, 1).reshape(q.shape[0], -1)
    ls, pos = lax.top_k(ts, min(k, ts.shape[1]))
    return ls, jnp.take_along_axis(ti, pos, axis=1) + offset


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
      block_size: corpus rows sent to the device per step (device memory ~ block_size * d * 4 bytes). When a
        device's share of a block is a multiple of TILE (the default on 1, 2, 4, 8, ... devices) it is scored
        TILE rows at a time and the scores take ~ Q * TILE * 4 bytes, else ~ Q * block_size * 4 bytes.
      similarity: "cos" (rows L2-normalised in float32 first) or "dot".
      dtype: "float32" (exact, HIGHEST precision) or "bfloat16" (bf16 operands, float32 accumulation).
      mesh: "auto" = this process's devices when it has several; None = one device; or a Mesh whose axes are all
        used to split each block's rows.
    Returns:
      (scores [Q, k] float32, indices [Q, k] int64), best first; ties -> lower index first. A NaN score counts
      as -inf.
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
