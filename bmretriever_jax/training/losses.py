"""Contrastive (InfoNCE) losses for dense retrieval: global, sharded, and gradient-cached.

Layout shared by every function here: `q` is `[B, d]` (one vector per query) and `p` is `[B, G, d]`
(G passages per query: `p[:, 0]` the positive, `p[:, 1:]` its hard negatives). Each query is scored
against all `B * G` passages of the batch, so the other queries' positives and hard negatives serve as
extra negatives; the target of query `i` is flat passage index `i * G`.

* `info_nce`          -- the plain version over global arrays; the reference the others are tested against.
* `sharded_info_nce`  -- the same loss when q / p are sharded over mesh axes on the batch dimension
                         (`jax.shard_map`: all-gather passages, offset labels by the device index).
* `grad_cache`        -- GradCache (Gao et al., 2021): the full-batch gradient of a contrastive loss with
                         the activation memory of one chunk of the batch.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Array = jax.Array
PyTree = Any
AxisName = Union[str, Sequence[str]]

SIMILARITIES = ("cos", "dot")
# Guards the L2 normalisation of an all-zero vector (its gradient would otherwise be NaN).
_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------
# Core: per-query terms, shared by the global and the sharded loss.
# ----------------------------------------------------------------------------------------------------
def _l2_normalize(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPS**2))


def _per_query_terms(q: Array, passages: Array, labels: Array, *, temperature: float, similarity: str,
                     scale: Optional[Array]) -> Dict[str, Array]:
    """Per-query loss and metric terms.

    Args:
      q: [b, d] queries (any float dtype; computed in float32).
      passages: [N, d] every passage a query is scored against.
      labels: [b] int, index of each query's positive in `passages`.
    Returns:
      dict of [b] float32 arrays: loss (cross-entropy), accuracy (0/1), pos_sim, hard_neg_sim
      (the largest similarity to any passage other than the positive).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    q = q.astype(jnp.float32)
    passages = passages.astype(jnp.float32)
    if similarity == "cos":
        q, passages = _l2_normalize(q), _l2_normalize(passages)
    sim = q @ passages.T  # [b, N]
    if scale is None:
        logits = sim / temperature
    else:
        logits = sim * jnp.exp(jnp.asarray(scale, jnp.float32))
    pos_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    loss = jax.nn.logsumexp(logits, axis=1) - pos_logit

    sim = jax.lax.stop_gradient(sim)
    is_pos = jnp.arange(sim.shape[1])[None, :] == labels[:, None]
    pos_sim = jnp.take_along_axis(sim, labels[:, None], axis=1)[:, 0]
    hard_neg_sim = jnp.max(jnp.where(is_pos, -jnp.inf, sim), axis=1)
    accuracy = (jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == labels).astype(jnp.float32)
    return {"loss": loss, "accuracy": accuracy, "pos_sim": pos_sim, "hard_neg_sim": hard_neg_sim}


def _check_shapes(q: Array, p: Array) -> Tuple[int, int, int]:
    if q.ndim != 2 or p.ndim != 3 or p.shape[0] != q.shape[0] or p.shape[2] != q.shape[1]:
        raise ValueError(f"expected q [B, d] and p [B, G, d], got q {q.shape} and p {p.shape}")
    return p.shape


# ----------------------------------------------------------------------------------------------------
# Global loss.
# ----------------------------------------------------------------------------------------------------
def info_nce(q: Array, p: Array, *, temperature: float = 0.02, similarity: str = "cos",
             scale: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
    """InfoNCE with in-batch and hard negatives, over global (unsharded or GSPMD-sharded) arrays.

    Args:
      q: [B, d] query vectors.
      p: [B, G, d] passage vectors; p[:, 0] is the positive of each query, p[:, 1:] its hard negatives.
        Every query is scored against all B*G passages; query i's label is flat index i*G.
      temperature: logits = sim / temperature (used when `scale` is None).
      similarity: "cos" (vectors are L2-normalised here) or "dot".
      scale: optional log inverse temperature, e.g. a learnable scalar parameter; if given,
        logits = sim * exp(scale) and `temperature` is ignored (exp keeps the scale positive).
    Returns:
      (loss, metrics): loss is the mean cross-entropy over queries (float32 scalar); metrics holds
      scalars loss, accuracy (argmax == label), pos_sim (mean positive similarity) and hard_neg_sim
      (mean over queries of the most similar non-positive passage).
    """
    b, g, d = _check_shapes(q, p)
    labels = jnp.arange(b) * g
    terms = _per_query_terms(q, p.reshape(b * g, d), labels, temperature=temperature,
                             similarity=similarity, scale=scale)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics


# ----------------------------------------------------------------------------------------------------
# Sharded loss.
# ----------------------------------------------------------------------------------------------------
def _axes_tuple(axis: AxisName) -> Tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _num_shards(mesh: Mesh, axes: Tuple[str, ...]) -> int:
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh axes {tuple(mesh.shape)} lack {missing}")
    return math.prod(mesh.shape[a] for a in axes)


def sharded_info_nce(q: Array, p: Array, mesh: Mesh, *, axis: AxisName = "data", temperature: float = 0.02,
                     similarity: str = "cos", scale: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
    """`info_nce` for q / p sharded over the batch dimension on mesh axis (or axes) `axis`.

    Same arguments, value and gradients as `info_nce(q, p, ...)` on the global arrays; q [B, d] and
    p [B, G, d] are global arrays whose batch dimension is split over `axis` (a name, or a tuple such
    as ("data", "fsdp") for a batch split over both, in mesh order). Each device all-gathers the passages
    (in their input dtype, to halve traffic for bf16), scores its b = B / n_shards local queries against
    all B*G passages, and offsets its labels by its shard index * b * G. The loss is psum(local sum) / B.
    The transpose of all_gather is a reduce-scatter, so a passage's gradient sums the contributions of
    the queries on every device. Works inside jax.jit; `scale` (if given) is replicated.
    """
    b, g, d = _check_shapes(q, p)
    axes = _axes_tuple(axis)
    n_shards = _num_shards(mesh, axes)
    if b % n_shards:
        raise ValueError(f"batch {b} is not divisible by the {n_shards} shards of mesh axes {axes}")
    batch_spec = P(axes)

    def local(q_l, p_l, *maybe_scale):
        local_b = q_l.shape[0]
        p_all = jax.lax.all_gather(p_l, axes, axis=0, tiled=True)  # [B, G, d]
        first_query = jax.lax.axis_index(axes) * local_b
        labels = (first_query + jnp.arange(local_b)) * g
        terms = _per_query_terms(q_l, p_all.reshape(b * g, d), labels, temperature=temperature,
                                 similarity=similarity, scale=maybe_scale[0] if maybe_scale else None)
        return {k: jax.lax.psum(jnp.sum(v), axes) / b for k, v in terms.items()}

    operands = (q, p) if scale is None else (q, p, jnp.asarray(scale, jnp.float32))
    in_specs = (batch_spec, batch_spec) + ((P(),) if scale is not None else ())
    metrics = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P())(*operands)
    return metrics["loss"], metrics


def make_loss(*, temperature: float = 0.02, similarity: str = "cos", mesh: Optional[Mesh] = None,
              axis: AxisName = "data") -> Callable[..., Tuple[Array, Dict[str, Array]]]:
    """`loss_fn(q, p, scale=None)`: `info_nce`, or `sharded_info_nce` on `mesh` / `axis` if a mesh is given."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if mesh is None:
        return functools.partial(info_nce, temperature=temperature, similarity=similarity)
    return functools.partial(sharded_info_nce, mesh=mesh, axis=axis, temperature=temperature,
                             similarity=similarity)


# ----------------------------------------------------------------------------------------------------
# Gradient cache.
# ----------------------------------------------------------------------------------------------------
def _leading_dim(tree: PyTree, what: str) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"{what}: leaves disagree on the leading (batch) dimension: {sorted(sizes)}")
    return sizes.pop()


class _Chunking:
    """How a [N, ...] batch is cut into `num_chunks` chunks of `n_shards * chunk` rows.

    Rows are first split into the n_shards contiguous blocks a batch-sharded array already has, so chunk k
    is the concatenation of every shard's k-th local chunk: each device embeds its own rows only. A local
    block whose length is not a multiple of `chunk` is padded by repeating its own rows (finite, realistic
    inputs, so no NaN can leak into the gradients); padded rows get zero cotangents and are dropped.
    """

    def __init__(self, n: int, n_shards: int, chunk_size: int, what: str):
        if n % n_shards:
            raise ValueError(f"{what}: batch {n} is not divisible by the {n_shards} data shards")
        self.n, self.n_shards = n, n_shards
        self.local = n // n_shards
        self.chunk = min(chunk_size, self.local)  # a chunk larger than the local batch would be all padding
        self.num_chunks = -(-self.local // self.chunk)
        self.padded = self.num_chunks * self.chunk

    def split(self, x: Array, pad: str) -> Array:
        """[N, ...] -> [num_chunks, n_shards * chunk, ...]; pad is "repeat" (inputs) or "zeros" (cotangents)."""
        rest = x.shape[1:]
        x = x.reshape((self.n_shards, self.local) + rest)
        if self.padded != self.local:
            if pad == "repeat":
                x = jnp.take(x, jnp.arange(self.padded) % self.local, axis=1)
            else:
                x = jnp.pad(x, [(0, 0), (0, self.padded - self.local)] + [(0, 0)] * len(rest))
        x = x.reshape((self.n_shards, self.num_chunks, self.chunk) + rest).swapaxes(0, 1)
        return x.reshape((self.num_chunks, self.n_shards * self.chunk) + rest)

    def merge(self, y: Array) -> Array:
        """Inverse of `split`: [num_chunks, n_shards * chunk, ...] -> [N, ...] without the padding."""
        rest = y.shape[2:]
        y = y.reshape((self.num_chunks, self.n_shards, self.chunk) + rest).swapaxes(0, 1)
        y = y.reshape((self.n_shards, self.padded) + rest)[:, : self.local]
        return y.reshape((self.n,) + rest)


def grad_cache(embed_fn: Callable[[PyTree, PyTree], Array], params: PyTree, q_batch: PyTree,
               p_batch: Optional[PyTree],
               *, chunk_size: int, loss_fn: Callable[..., Tuple[Array, Dict[str, Array]]],
               mesh: Optional[Mesh] = None, axis: AxisName = "data",
               loss_params: Optional[PyTree] = None, q_select: Optional[Callable[[Array], Array]] = None,
               p_select: Optional[Callable[[Array], Array]] = None) -> Tuple[Array, Dict[str, Array], PyTree]:
    """Full-batch contrastive loss and parameter gradients with one chunk's activation memory (GradCache).

    1. Embed all queries and passages chunk by chunk (lax.map, no activations kept).
    2. loss, d loss / d vectors from `loss_fn` on the full set of vectors.
    3. Re-embed each chunk under jax.vjp, pull back its slice of the vector cotangents, and sum the
       parameter gradients in a lax.scan, so peak memory is one chunk's activations (plus all vectors).
    Exact: equals jax.grad of loss_fn(embed_fn(params, q_batch), embed_fn(params, p_batch)) up to float
    rounding, as the vectors' cotangents are fixed once the vectors are.

    Args:
      embed_fn: embed_fn(params, chunk) -> [n, d] vectors for a chunk (a pytree of [n, ...] arrays).
        It must treat rows independently (no batch statistics).
      params: pytree of float arrays, the parameters differentiated.
      q_batch: pytree of [B, ...] arrays (e.g. input_ids / attention_mask [B, T]).
      p_batch: pytree of [B*G, ...] arrays, grouped per query (rows i*G .. i*G+G-1 belong to query i,
        the first being its positive); the vectors are reshaped to [B, G, d] for the loss.
      chunk_size: rows per chunk (per device when `mesh` is given); clipped to the (local) batch size.
        A batch that is not a multiple of it is padded with repeated rows whose cotangents are zero,
        so any chunk size >= 1 works.
      loss_fn: loss_fn(q [B, d], p [B, G, d]) -> (loss, metrics), e.g. partial(info_nce, temperature=...)
        or partial(sharded_info_nce, mesh=mesh, axis=axis); with `loss_params`,
        loss_fn(q, p, loss_params) (e.g. a learnable log-scale).
      mesh, axis: when the batches are sharded over mesh axis (or axes) `axis` on their leading
        dimension, pass the mesh so each chunk is made of every device's next `chunk_size` local rows
        (each device embeds only its own rows) and the layout is pinned with sharding constraints.
        Parameters may have any sharding (GSPMD handles, e.g., FSDP gathers). B must then be divisible
        by the number of shards.
      loss_params: optional pytree of extra loss parameters, differentiated too.
      q_select, p_select: packed rows (data/packing.py): embed_fn returns one vector per segment slot of a row
        ([rows, K, d]), and these map all rows' slot vectors to the texts' vectors ([B, d], [B*G, d]) before
        the loss (`models.ops.gather_slots`); q_batch / p_batch are then rows, in any number. p_batch None:
        queries and passages share the rows of q_batch, and both selections read its vectors.
    Returns:
      (loss, metrics, grads): grads has the structure of `params` (and dtype of each leaf; accumulated in
      float32), or is (param_grads, loss_param_grads) when `loss_params` is given.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    axes = _axes_tuple(axis)
    n_shards = 1 if mesh is None else _num_shards(mesh, axes)
    if (q_select is None) != (p_select is None):
        raise ValueError("give both q_select and p_select (packed rows), or neither")
    joint = p_batch is None
    if joint and q_select is None:
        raise ValueError("p_batch None (shared packed rows) needs q_select and p_select")
    n_q = _leading_dim(q_batch, "q_batch")
    n_p = n_q if joint else _leading_dim(p_batch, "p_batch")
    if q_select is None and n_p % n_q:
        raise ValueError(f"p_batch has {n_p} rows, not a multiple of the {n_q} queries")
    q_cut = _Chunking(n_q, n_shards, chunk_size, "q_batch")
    p_cut = _Chunking(n_p, n_shards, chunk_size, "p_batch")

    def constrain(x: Array, spec: P) -> Array:
        return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    chunked_spec, row_spec = P(None, axes), P(axes)

    def split(tree: PyTree, cut: _Chunking, pad: str) -> PyTree:
        return jax.tree.map(lambda x: constrain(cut.split(x, pad), chunked_spec), tree)

    q_chunks = split(q_batch, q_cut, "repeat")
    p_chunks = None if joint else split(p_batch, p_cut, "repeat")

    # -- 1. vectors, without activations (stop_gradient keeps an outer jax.grad from storing them) --
    frozen = jax.lax.stop_gradient(params)

    def embed_all(chunks: PyTree, cut: _Chunking) -> Array:
        out = jax.lax.map(lambda c: constrain(embed_fn(frozen, c), row_spec), chunks)
        return constrain(cut.merge(constrain(out, chunked_spec)), row_spec)

    q_vec = embed_all(q_chunks, q_cut)  # [B, d] (joint: all rows' slot vectors)
    p_vec = q_vec if joint else embed_all(p_chunks, p_cut)  # [B*G, d]

    # -- 2. loss and its gradient w.r.t. the vectors --
    def loss_of_vectors(qv, pv, *extra):
        if q_select is not None:
            qv, pv = q_select(qv), p_select(pv)
        return loss_fn(qv, pv.reshape((qv.shape[0], pv.shape[0] // qv.shape[0]) + pv.shape[1:]), *extra)

    extra = () if loss_params is None else (loss_params,)
    if joint:  # one set of vectors, read by both selections: its cotangent sums both
        f = lambda v, *e: loss_of_vectors(v, v, *e)  # noqa: E731
        argnums = tuple(range(1 + len(extra)))
        (loss, metrics), g = jax.value_and_grad(f, argnums=argnums, has_aux=True)(q_vec, *extra)
        vec_grads = (g[0], None) + tuple(g[1:])
    else:
        argnums = tuple(range(2 + len(extra)))
        (loss, metrics), vec_grads = jax.value_and_grad(loss_of_vectors, argnums=argnums, has_aux=True)(
            q_vec, p_vec, *extra)
    q_cot, p_cot = vec_grads[0], vec_grads[1]

    # -- 3. re-embed chunk by chunk and pull the cotangents back to the parameters --
    def accumulate(acc: PyTree, chunks: PyTree, cot: Array, cut: _Chunking) -> PyTree:
        cot_chunks = constrain(cut.split(cot, "zeros"), chunked_spec)

        def step(acc, xs):
            chunk, chunk_cot = xs
            _, pull_back = jax.vjp(lambda prm: constrain(embed_fn(prm, chunk), row_spec), params)
            (g,) = pull_back(chunk_cot)
            return jax.tree.map(lambda a, gi: a + gi.astype(a.dtype), acc, g), None

        acc, _ = jax.lax.scan(step, acc, (chunks, cot_chunks))
        return acc

    acc = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)), params)
    acc = accumulate(acc, q_chunks, q_cot, q_cut)
    if not joint:
        acc = accumulate(acc, p_chunks, p_cot, p_cut)
    grads = jax.tree.map(lambda a, x: a.astype(x.dtype), acc, params)
    if loss_params is not None:
        return loss, metrics, (grads, vec_grads[2])
    return loss, metrics, grads
