"""One pure-functional decoder for every family: params are nested dicts, layers stacked on axis 0.

Precision: the residual stream, norms, softmax and rotary maths are float32; matmuls take their inputs in
`dtype` (bf16 by default) and accumulate in float32 (`preferred_element_type`), which is what makes CPU
bf16 dot-product units (AVX512-BF16 here, AMX elsewhere) and TPU/GPU tensor cores pay off without giving up
f32 accuracy in reductions.

Keep the params in float32 and let `linear` cast each layer's weights inside the layer loop (~1% of a
forward on CPU). Casting the stacked weights to bf16 beforehand is slower with XLA:CPU (jax 0.10.2): it
upcasts the whole bf16 stack to f32 before the loop so that it can dynamic-slice it, then casts back per
layer (measured 5% slower on Gemma 3 270M).
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp

from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.precision import resolve_dtype

Params = dict
NEG_INF = -1e30  # finite: a fully masked row (left padding + causal) must not produce NaN


# ----------------------------------------------------------------------------------------------------
# Parameter shapes and initialisation
# ----------------------------------------------------------------------------------------------------
def _linear_shape(cfg: ModelConfig, n_in: int, n_out: int, bias: bool, L: Optional[int]) -> dict:
    lead = () if L is None else (L,)
    p = {"kernel": lead + (n_in, n_out)}
    if bias:
        p["bias"] = lead + (n_out,)
    return p


def _norm_shape(cfg: ModelConfig, dim: int, L: Optional[int]) -> dict:
    lead = () if L is None else (L,)
    p = {"scale": lead + (dim,)}
    if cfg.norm == "layer":
        p["bias"] = lead + (dim,)
    return p


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of shapes (tuples) with the same structure as the params."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = {
        "q": _linear_shape(cfg, D, q_dim, cfg.attn_bias, L),
        "k": _linear_shape(cfg, D, kv_dim, cfg.attn_bias, L),
        "v": _linear_shape(cfg, D, kv_dim, cfg.attn_bias, L),
        "o": _linear_shape(cfg, q_dim, D, cfg.attn_bias, L),
    }
    mlp = {"up": _linear_shape(cfg, D, F, cfg.mlp_bias, L), "down": _linear_shape(cfg, F, D, cfg.mlp_bias, L)}
    if cfg.gated_mlp:
        mlp["gate"] = _linear_shape(cfg, D, F, cfg.mlp_bias, L)
    layers = {"attn_norm": _norm_shape(cfg, D, L), "attn": attn, "mlp_norm": _norm_shape(cfg, D, L), "mlp": mlp}
    if cfg.qk_norm:
        layers["q_norm"] = {"scale": (L, cfg.head_dim)}
        layers["k_norm"] = {"scale": (L, cfg.head_dim)}
    if cfg.sandwich_norm:
        layers["post_attn_norm"] = _norm_shape(cfg, D, L)
        layers["post_mlp_norm"] = _norm_shape(cfg, D, L)
    shapes = {"embed": {"embedding": (cfg.vocab_size, D)}, "layers": layers, "final_norm": _norm_shape(cfg, D, None)}
    return shapes


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random init (normal(0.02) matrices, unit norms): for tests and from-scratch runs.

    Use under `jax.eval_shape` / `jax.jit(out_shardings=...)` to avoid materialising big models on one host.
    """
    shapes = param_shapes(cfg)
    paths, treedef = jax.tree.flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(paths))
    leaves = []
    for (path, shape), k in zip(paths, keys):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.endswith("scale"):
            # Gemma-style norms hold w with scale = 1 + w: unit scale is w = 0
            leaves.append(jnp.full(shape, 1.0 - cfg.norm_offset, dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


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
# Layers
# ----------------------------------------------------------------------------------------------------
def linear(p: dict, x: jax.Array, dtype, dropout_key: Optional[jax.Array] = None, dropout: float = 0.0):
    """x [..., in] -> [..., out] float32; matmul inputs in `dtype`, accumulation in float32.

    A LoRA adapter rides along as p["lora_a"] [in, r] and p["lora_b"] [r, out] (already scaled) and runs
    through `lora_linear` (one hand-written backward for base + adapter).
    """
    if "lora_a" in p:
        xa = None
        if dropout > 0.0 and dropout_key is not None:
            keep = jax.random.bernoulli(dropout_key, 1.0 - dropout, x.shape)
            xa = jnp.where(keep, x / (1.0 - dropout), 0.0)
        y = lora_linear(x, xa, p["kernel"], p["lora_a"], p["lora_b"], dtype)
    else:
        y = mp_einsum("...i,io->...o", x, p["kernel"], dtype)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y


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


def norm(cfg: ModelConfig, p: dict, x: jax.Array, eps: Optional[float] = None) -> jax.Array:
    eps = cfg.norm_eps if eps is None else eps
    x = x.astype(jnp.float32)
    scale = p["scale"].astype(jnp.float32) + cfg.norm_offset
    if cfg.norm == "layer":
        mu = x.mean(-1, keepdims=True)
        var = jnp.square(x - mu).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + eps) * scale + p["bias"].astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * scale


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
    T = attention_mask.shape[1]
    q = jnp.arange(T)[:, None]
    k = jnp.arange(T)[None, :]
    allowed = jnp.ones((T, T), bool)
    if causal:
        allowed &= k <= q
    if window is not None:
        allowed &= (q - k < window) if causal else (jnp.abs(q - k) <= window // 2)
    allowed = allowed[None] & (attention_mask[:, None, :] > 0)
    return jnp.where(allowed, 0.0, NEG_INF)[:, None]


def attention(cfg: ModelConfig, p: dict, x, cos, sin, bias, dtype, keys=None, dropout=0.0):
    """x [B, T, D] -> [B, T, D]; grouped-query attention, bias [B, 1, T, S] (S = T keys).

    Layout: heads before time, and the G = H/K query heads that share one KV head stacked along the
    query axis, so each (batch, kv head) pair is ONE plain matmul [G*T, hd] x [hd, S]: 3-D batched
    matmuls with large M are what the CPU/GPU matmul libraries are fast at. (The 5-D einsum
    "btkgd,bskd->bkgts" made XLA:CPU compute the scores key-major and transpose them every layer.)
    """
    B, T, _ = x.shape
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // K
    k_ = (lambda i: None) if keys is None else (lambda i: keys[i])
    q = linear(p["attn"]["q"], x, dtype, k_(0), dropout).reshape(B, T, H, hd)
    k = linear(p["attn"]["k"], x, dtype, k_(1), dropout).reshape(B, T, K, hd)
    v = linear(p["attn"]["v"], x, dtype, k_(2), dropout).reshape(B, T, K, hd)
    if cfg.qk_norm:
        q = norm(cfg, p["q_norm"], q)
        k = norm(cfg, p["k_norm"], k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
    q = (q * scale).reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, hd)
    k = k.transpose(0, 2, 1, 3).reshape(B * K, T, hd)
    v = v.transpose(0, 2, 1, 3).reshape(B * K, T, hd)
    s = mp_einsum("bqd,bsd->bqs", q, k, dtype)
    if cfg.attn_logit_softcap:
        s = jnp.tanh(s / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    s = s.reshape(B, K, G, T, T) + bias[:, :, None]
    probs = jax.nn.softmax(s, axis=-1).reshape(B * K, G * T, T)
    o = mp_einsum("bqs,bsd->bqd", probs, v, dtype)
    o = o.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
    return linear(p["attn"]["o"], o, dtype, k_(3), dropout)


def mlp(cfg: ModelConfig, p: dict, x, dtype, keys=None, dropout=0.0):
    k_ = (lambda i: None) if keys is None else (lambda i: keys[i])
    up = linear(p["mlp"]["up"], x, dtype, k_(4), dropout)
    if cfg.gated_mlp:
        h = activation(cfg, linear(p["mlp"]["gate"], x, dtype, k_(5), dropout)) * up
    else:
        h = activation(cfg, up)
    return linear(p["mlp"]["down"], h, dtype, k_(6), dropout)


def block(cfg: ModelConfig, p: dict, x, rope, bias, dtype, keys=None, dropout=0.0):
    """One decoder layer on x [B, T, D] float32 (p holds this layer's slice of the stacked params)."""
    cos, sin = rope
    h = attention(cfg, p, norm(cfg, p["attn_norm"], x), cos, sin, bias, dtype, keys, dropout)
    if cfg.sandwich_norm:
        h = norm(cfg, p["post_attn_norm"], h)
    if cfg.parallel_residual:
        return x + h + mlp(cfg, p, norm(cfg, p["mlp_norm"], x), dtype, keys, dropout)
    x = x + h
    h = mlp(cfg, p, norm(cfg, p["mlp_norm"], x), dtype, keys, dropout)
    if cfg.sandwich_norm:
        h = norm(cfg, p["post_mlp_norm"], h)
    return x + h


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
def embed_tokens(cfg: ModelConfig, params: Params, input_ids: jax.Array) -> jax.Array:
    x = jnp.take(params["embed"]["embedding"], input_ids, axis=0).astype(jnp.float32)
    if cfg.embed_scale:
        # transformers rounds sqrt(hidden) to the weight dtype before multiplying
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, params["embed"]["embedding"].dtype).astype(jnp.float32)
    return x


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Left padding: the first real token is position 0 (rotary attention is shift-invariant anyway)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


# XLA:CPU's matmuls (YNNPACK, jax 0.10.2) lose ~25-30% per FLOP once a [tokens, D] x [D, F] product has more
# than a few thousand rows (measured on a 2-core AVX512-BF16 machine: 8192 rows vs 2048, in bf16 and fp32; the
# activations stop fitting in cache). So on CPU a large batch runs as a loop over chunks of about this many
# tokens. Sequences are independent, so chunking changes no result; accelerators get the whole batch at once.
CPU_CHUNK_TOKENS = 2048


# The platform the traced program is compiled for when that is not this process's default backend: a deviceless
# compile for TPU / GPU from a CPU process (`bmr plan --target`) must not get the CPU-only row chunking, or it
# measures a different program from the one the chips run (see `compiling_for`).
_TARGET_PLATFORM: Optional[str] = None


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace `forward` as for `platform` ("tpu", "gpu", "cpu") inside this block, whatever jax.default_backend()."""
    global _TARGET_PLATFORM
    previous, _TARGET_PLATFORM = _TARGET_PLATFORM, platform
    try:
        yield
    finally:
        _TARGET_PLATFORM = previous


def _row_chunks(batch: int, seq: int) -> int:
    """How many chunks to split `batch` rows of `seq` tokens into on CPU (1 = no chunking)."""
    if (_TARGET_PLATFORM or jax.default_backend()) != "cpu" or CPU_CHUNK_TOKENS <= 0:
        return 1
    return min(batch, -(-batch * seq // CPU_CHUNK_TOKENS))


def forward(
    cfg: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    dtype: Any = "auto",
    bidirectional: bool = False,
    remat: bool = False,
    dropout: float = 0.0,
    dropout_key: Optional[jax.Array] = None,
    activation_sharding: Optional[jax.sharding.Sharding] = None,
) -> jax.Array:
    """input_ids, attention_mask [B, T] -> final hidden states [B, T, D] float32 (after the final norm).

    bidirectional: every token sees every (non-pad) token (STM's option); sliding windows stay.
    dropout: LoRA dropout on the adapter inputs (only where adapters are present), needs dropout_key.
    activation_sharding: where the hidden states [B, T, D] live on a device mesh (e.g. NamedSharding(mesh,
    P(("data", "fsdp"), None, None))): pinned with with_sharding_constraint at every layer boundary, so the
    partitioner keeps activations (and the scan's saved residuals) split over the batch axes and gathers
    the FSDP-sharded weights instead (without it GSPMD may split the stacked residuals along the layer
    axis, or all-gather activations over "fsdp"). Ignored for batches the batch axes do not divide.
    On CPU, batches of more than CPU_CHUNK_TOKENS tokens run chunk by chunk (see there); not with dropout,
    whose masks are drawn for the whole batch, nor with activation_sharding (a mesh splits the batch already).
    """
    B, T = input_ids.shape
    whole = (dropout > 0.0 and dropout_key is not None) or activation_sharding is not None
    n = 1 if whole else _row_chunks(B, T)
    if n == 1:
        return _forward(cfg, params, input_ids, attention_mask, dtype=dtype, bidirectional=bidirectional,
                        remat=remat, dropout=dropout, dropout_key=dropout_key,
                        activation_sharding=activation_sharding)
    rows = -(-B // n)
    pad = n * rows - B  # all-padding rows (mask 0) fill the last chunk; their outputs are dropped
    ids = jnp.pad(input_ids, ((0, pad), (0, 0))).reshape(n, rows, T)
    mask = jnp.pad(attention_mask, ((0, pad), (0, 0))).reshape(n, rows, T)
    h = jax.lax.map(lambda a: _forward(cfg, params, a[0], a[1], dtype=dtype, bidirectional=bidirectional,
                                       remat=remat), (ids, mask))
    return h.reshape(n * rows, T, h.shape[-1])[:B]


def _pin(x: jax.Array, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
    """with_sharding_constraint(x, sharding) when the sharding divides x's shape (else x unchanged)."""
    if sharding is None:
        return x
    try:
        sharding.shard_shape(x.shape)
    except ValueError:  # jax's IndivisibleError: a dimension the mesh axes do not divide
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def _forward(cfg: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *, dtype,
             bidirectional: bool, remat: bool, dropout: float = 0.0, dropout_key: Optional[jax.Array] = None,
             activation_sharding: Optional[jax.sharding.Sharding] = None):
    """`forward` on one chunk of rows: [b, T] -> [b, T, D] float32."""
    dtype = resolve_dtype(dtype)
    T = input_ids.shape[1]
    x = _pin(embed_tokens(cfg, params, input_ids), activation_sharding)
    positions = positions_from_mask(attention_mask)
    rope_global = rope_tables(cfg, positions, cfg.rope_theta)
    rope_local = rope_tables(cfg, positions, cfg.rope_local_theta or cfg.rope_theta)
    bias_full = attention_bias(attention_mask, causal=not bidirectional, window=None)
    # a window at least as wide as the sequence masks nothing: no second mask, no per-layer select
    window_bites = cfg.sliding_window is not None and (
        T > cfg.sliding_window if not bidirectional else T - 1 > cfg.sliding_window // 2)
    bias_local = (attention_bias(attention_mask, causal=not bidirectional, window=cfg.sliding_window)
                  if window_bites else bias_full)
    sliding = jnp.asarray(cfg.layer_is_sliding)
    use_dropout = dropout > 0.0 and dropout_key is not None
    layer_keys = (jax.random.split(dropout_key, cfg.num_layers) if use_dropout
                  else jnp.zeros((cfg.num_layers, 2), jnp.uint32))

    def body(x, xs):
        p, is_sliding, key = xs
        rope = jax.tree.map(lambda a, b: jnp.where(is_sliding, a, b), rope_local, rope_global)
        bias = jnp.where(is_sliding, bias_local, bias_full) if window_bites else bias_full
        keys = jax.random.split(key, 7) if use_dropout else None
        x = _pin(x, activation_sharding)
        return _pin(block(cfg, p, x, rope, bias, dtype, keys, dropout if use_dropout else 0.0),
                    activation_sharding), None

    if remat:
        # remat=True: keep nothing per layer (least memory); or name a jax.checkpoint_policies policy,
        # e.g. "dots_with_no_batch_dims_saveable" to keep the weight matmuls' outputs (less recompute)
        policy = getattr(jax.checkpoint_policies, remat if isinstance(remat, str) else "nothing_saveable")
        body = jax.checkpoint(body, policy=policy)
    x, _ = jax.lax.scan(body, x, (params["layers"], sliding, layer_keys))
    return norm(cfg, params["final_norm"], x)


def logits(cfg: ModelConfig, params: Params, hidden: jax.Array, dtype: Any = jnp.bfloat16) -> jax.Array:
    """hidden [..., D] -> vocabulary logits [..., V] float32 (tied or separate LM head)."""
    if cfg.tie_embeddings:
        w = params["embed"]["embedding"]
        return jnp.einsum("...d,vd->...v", hidden.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    if "lm_head" not in params:
        raise ValueError("this checkpoint has an untied LM head that was not loaded (a base-model checkpoint): "
                         "load the CausalLM checkpoint to generate text")
    return linear(params["lm_head"], hidden, dtype)
