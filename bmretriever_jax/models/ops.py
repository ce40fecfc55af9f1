"""The numerics every module is built from: mixed-precision matmuls (with their hand-written backward), the
LoRA linear, norms, activations, rotary tables and attention masks. Pure functions over arrays.

Precision: the residual stream, norms, softmax and rotary maths are float32; matmuls take their inputs in
`dtype` (bf16 by default) and accumulate in float32 (`preferred_element_type`), which is what makes CPU
bf16 dot-product units (AVX512-BF16 here, AMX elsewhere) and TPU/GPU tensor cores pay off without giving up
f32 accuracy in reductions.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from bmretriever_jax.models.config import ModelConfig

NEG_INF = -1e30  # finite: a fully masked row (left padding + causal) must not produce NaN


# ----------------------------------------------------------------------------------------------------
# Mixed-precision matmul
# ----------------------------------------------------------------------------------------------------
def mp_einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum with inputs cast to `dtype` and float32 accumulation/output, in the forward AND backward pass.

    Autodiff of `einsum(a.astype(bf16), b.astype(bf16), preferred_element_type=f32)` takes the float32
    cotangent as it is, so both backward matmuls run in float32 (XLA promotes the bf16 operand): on this
    CPU that made a LoRA training step ~2x slower than torch autocast. Here the backward casts the cotangent
    to `dtype` as torch autocast does (f32 accumulation, f32 results), and saves the bf16 inputs as
    residuals (half the memory of the f32 ones). fp32 compute is plain einsum.

    `spec` is a two-operand contraction where every index of an operand appears in the other operand or
    in the output (every matmul form used here).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _mp_einsum(spec, dtype, a.dtype, b.dtype, a, b)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _mp_einsum(spec, dtype, a_dtype, b_dtype, a, b):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _mp_einsum_fwd(spec, dtype, a_dtype, b_dtype, a, b):
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    return jnp.einsum(spec, a_c, b_c, preferred_element_type=jnp.float32), (a_c, b_c)


def _mp_einsum_bwd(spec, dtype, a_dtype, b_dtype, res, g):
    a_c, b_c = res
    ins, out = spec.replace(" ", "").split("->")
    sa, sb = ins.split(",")
    g_c = g.astype(dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g_c, b_c, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a_c, g_c, preferred_element_type=jnp.float32)
    return da.astype(a_dtype), db.astype(b_dtype)


_mp_einsum.defvjp(_mp_einsum_fwd, _mp_einsum_bwd)


# ----------------------------------------------------------------------------------------------------
# The LoRA linear
# ----------------------------------------------------------------------------------------------------
def lora_linear(x: jax.Array, xa: Optional[jax.Array], w: jax.Array, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """x @ w + (xa @ a) @ b: x, xa [..., in] (xa: x after LoRA dropout; None = x), w [in, out], a [in, r],
    b [r, out] -> [..., out] float32; matmul inputs in `dtype`, float32 accumulation, forward and backward.

    Why by hand: autodiff of the three einsums (3-D activations, rank-16 factors) made XLA:CPU spend more
    on the adapter's backward than on the base's (a LoRA step of Gemma 3 270M in fp32: the adapters'
    gradients took longer than the backward of the whole frozen network). Here every product is one 2-D
    matmul over [tokens, features], the rank-r intermediate is computed once and saved, and the backward
    is the four small products plus dx. dw is also returned (full fine-tuning); when w is frozen nothing
    asks for it and XLA removes it.
    """
    return _lora_linear(jnp.dtype(dtype), x, xa, w, a, b)


def _mm(u: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.dot(u, v, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_linear(dtype, x, xa, w, a, b):
    return _lora_linear_fwd(dtype, x, xa, w, a, b)[0]


def _lora_linear_fwd(dtype, x, xa, w, a, b):
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in).astype(dtype)
    xa2 = None if xa is None else xa.reshape(-1, n_in).astype(dtype)
    wc, ac, bc = w.astype(dtype), a.astype(dtype), b.astype(dtype)
    h = _mm(x2 if xa2 is None else xa2, ac).astype(dtype)  # [tokens, r]
    y = _mm(x2, wc) + _mm(h, bc)
    # empty arrays carry the input dtypes to the backward (cotangents must match them)
    like = tuple(jnp.zeros((0,), t.dtype) for t in (x, w, a, b))
    return y.reshape(lead + (w.shape[1],)), (x2, xa2, h, wc, ac, bc, like)


def _lora_linear_bwd(dtype, res, g):
    x2, xa2, h, wc, ac, bc, (tx, tw, ta, tb) = res
    lead, n_in = g.shape[:-1], x2.shape[-1]
    g2 = g.reshape(-1, g.shape[-1]).astype(dtype)
    dh = _mm(g2, bc.T).astype(dtype)   # [tokens, r]
    dx = _mm(g2, wc.T)
    dxa = _mm(dh, ac.T)
    if xa2 is None:
        dx, dxa = dx + dxa, None
    else:
        dxa = dxa.reshape(lead + (n_in,)).astype(tx.dtype)
    dw = _mm(x2.T, g2)
    da = _mm((x2 if xa2 is None else xa2).T, dh)
    db = _mm(h.T, g2)
    return (dx.reshape(lead + (n_in,)).astype(tx.dtype), dxa, dw.astype(tw.dtype), da.astype(ta.dtype),
            db.astype(tb.dtype))


_lora_linear.defvjp(_lora_linear_fwd, _lora_linear_bwd)


# ----------------------------------------------------------------------------------------------------
# Norms, activations, rotary tables, masks, pooling
# ----------------------------------------------------------------------------------------------------
def norm(cfg: ModelConfig, x: jax.Array, scale: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """RMSNorm (or LayerNorm with bias when cfg.norm == "layer") over the last axis, in float32;
    the weight is used as cfg.norm_offset + scale (Gemma stores w - 1)."""
    x = x.astype(jnp.float32)
    scale = scale.astype(jnp.float32) + cfg.norm_offset
    if cfg.norm == "layer":
        mu = x.mean(-1, keepdims=True)
        var = jnp.square(x - mu).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + cfg.norm_eps) * scale + bias.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + cfg.norm_eps) * scale


def activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.act == "silu":
        return jax.nn.silu(x)
    if cfg.act == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if cfg.act == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {cfg.act!r}; allowed: silu, gelu, gelu_tanh")


def rope_inv_freq(cfg: ModelConfig, theta: float) -> jax.Array:
    rd = cfg.rotary_dim
    inv = 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = jnp.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        return jnp.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def rope_tables(cfg: ModelConfig, positions: jax.Array, theta: float):
    """positions [B, T] -> (cos, sin) [B, T, 1, rotary_dim // 2] float32.

    Half width: HF's rotate-half tables are [freqs, freqs], the same values twice.
    """
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg, theta)
    return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, hd]; rotates the first rotary_dim features (all of them unless GPT-NeoX), HF's
    rotate-half layout. cos, sin [B, T, 1, rotary_dim // 2].

    Written per half (x1 c - x2 s, x2 c + x1 s) rather than x cos + rotate_half(x) sin: the same arithmetic
    (so the same rounding) without materialising the rotated copy.
    """
    h = cos.shape[-1]
    x1, x2, xp = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if xp.shape[-1]:
        parts.append(xp)
    return jnp.concatenate(parts, axis=-1)


def attention_bias(attention_mask: jax.Array, *, causal: bool, window: Optional[int]) -> jax.Array:
    """attention_mask [B, T] (1 = token) -> additive bias [B, 1, T, T] float32 (query, key).

    Windows follow transformers: causal keeps 0 <= q - k < window; bidirectional keeps a window of the
    same total width centred on the query, |q - k| <= window // 2 (transformers' Gemma 3 rule).
    """
    allowed = _positional_rule(attention_mask.shape[1], causal, window)[None] & (attention_mask[:, None, :] > 0)
    return jnp.where(allowed, 0.0, NEG_INF)[:, None]


def _positional_rule(T: int, causal: bool, window: Optional[int]) -> jax.Array:
    """[T, T] (query, key) bool: causal and window rules by index distance."""
    q = jnp.arange(T)[:, None]
    k = jnp.arange(T)[None, :]
    allowed = jnp.ones((T, T), bool)
    if causal:
        allowed &= k <= q
    if window is not None:
        allowed &= (q - k < window) if causal else (jnp.abs(q - k) <= window // 2)
    return allowed


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Left padding: the first real token is position 0 (rotary attention is shift-invariant anyway)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


# ----------------------------------------------------------------------------------------------------
# Packed sequences: several texts per row, told apart by segment ids (0 = padding, 1..K = the texts of the row
# in order, each contiguous). Attention never crosses a segment, positions restart at 0 in each, and pooling
# is per segment, so a packed text gets the vector it gets alone in a padded row.
# ----------------------------------------------------------------------------------------------------
def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, T] -> positions [B, T]: 0, 1, ... from the first token of each segment (0 on padding)."""
    T = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(T), segment_ids.shape)
    prev = jnp.pad(segment_ids, [(0, 0)] * (segment_ids.ndim - 1) + [(1, 0)], constant_values=-1)[..., :-1]
    start = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids > 0, idx - start, 0)


def segment_attention_bias(segment_ids: jax.Array, *, causal: bool, window: Optional[int]) -> jax.Array:
    """segment_ids [B, T] -> additive bias [B, 1, T, T]: `attention_bias`'s rules (causal, windows) inside each
    segment, nothing across segments or to padding. Segments are contiguous, so the index distance inside one
    is the position distance, as in a padded row."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    return jnp.where(_positional_rule(segment_ids.shape[1], causal, window)[None] & same, 0.0, NEG_INF)[:, None]


def pool_segments(hidden: jax.Array, segment_ids: jax.Array, max_segments: int, pooling: str,
                  normalize: bool) -> jax.Array:
    """hidden [B, T, D], segment_ids [B, T] -> one vector per segment slot [B, K, D] float32 (K = max_segments;
    an empty slot is zeros). last: the segment's last token (its EOS, as left padding puts it at T-1); mean:
    the mean over the segment's tokens. Row-local (a one-hot [B, K, T] contraction), so a batch-sharded
    hidden stays sharded."""
    slots = jnp.arange(1, max_segments + 1)
    member = segment_ids[:, None, :] == slots[None, :, None]  # [B, K, T]
    if pooling == "last":
        nxt = jnp.pad(segment_ids, ((0, 0), (0, 1)))[:, 1:]
        member &= (segment_ids != nxt)[:, None, :]
    elif pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}; allowed: last, mean")
    w = member.astype(jnp.float32)
    v = jnp.einsum("bkt,btd->bkd", w, hidden.astype(jnp.float32))
    if pooling == "mean":
        v = v / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    if normalize:  # an empty slot is all zeros: the norm's gradient there must be 0, not NaN
        v = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-24))
    return v


def gather_slots(slot_vectors: jax.Array, slot_index: jax.Array, n_shards: int = 1) -> jax.Array:
    """Slot vectors [R, K, D] + each text's slot [N] -> texts' vectors [N, D] in the original order.

    Rows and texts are both split into `n_shards` contiguous blocks (the blocks a batch-sharded array has);
    text j of block s sits in row slot_index[j] // K, slot slot_index[j] % K, counted inside block s. The
    gather stays inside each block, so no device reads another's vectors."""
    R, K, D = slot_vectors.shape
    N = slot_index.shape[0]
    blocks = slot_vectors.reshape(n_shards, (R // n_shards) * K, D)
    idx = slot_index.reshape(n_shards, N // n_shards, 1)
    return jnp.take_along_axis(blocks, idx, axis=1).reshape(N, D)


def pool(hidden: jax.Array, mask: jax.Array, pooling: str, normalize: bool) -> jax.Array:
    """hidden [B, T, D], mask [B, T] -> [B, D] float32 (last token: left padding puts it at T-1)."""
    if pooling == "last":
        v = hidden[:, -1]
    elif pooling == "mean":
        m = mask[..., None].astype(hidden.dtype)
        v = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; allowed: last, mean")
    if normalize:
        v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return v
