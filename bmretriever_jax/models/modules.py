"""The backbones as flax.linen modules: one set of layers for every family, driven by `ModelConfig` switches.

    params = Decoder(cfg).init(key, ids, mask)["params"]
    hidden = Decoder(cfg).apply({"params": params}, ids, mask)             # [B, T, D] after the final norm
    vecs = Encoder(cfg, pooling="last").apply({"params": params}, ids, mask)  # [B, D], L2-normalised

The parameter tree is one plain nested dict, named so that it is the tree Orbax saves, LoRA targets by regex,
merging adds up and `convert/names.py` maps to transformers:

    embed/embedding                                    [V, D]
    layers/{attn_norm,mlp_norm,post_attn_norm,post_mlp_norm}/scale (+ bias: LayerNorm)   [L, D]
    layers/{q_norm,k_norm}/scale                       [L, hd]   (owned by the block, used by its attention)
    layers/attn/{q,k,v,o}/kernel (+ bias)              [L, in, out]
    layers/mlp/{gate,up,down}/kernel (+ bias)          [L, in, out]
    final_norm/scale (+ bias)                          [D]

`layers` is the block under `nn.scan` (every leaf has the layer axis first) and, with `remat`, under
`nn.remat`. `scan_layers=False` runs the same block as a Python loop over `layers_0`, `layers_1`, ...
(`decoder.unstack_layers` makes that tree): decoding is nothing but small matmuls, and on XLA:CPU a bf16
matmul inside a scan body runs up to 10x slower than the same matmul unrolled (measured at batch 4).

LoRA: a linear whose parameters also hold `lora_a` [in, r] and `lora_b` [r, out] (already scaled: what
`lora.combine` adds to the tree) runs base + adapter through `ops.lora_linear` (one hand-written backward),
with LoRA dropout on the adapter input drawn from the "dropout" rng.

KV cache: an explicit pytree in and out. `Decoder.prefill` returns each layer's keys and values
[L, B, K, T, hd]; `Decoder.decode` runs one token per row against caches [L, B, K, S, hd] and returns the
new token's keys and values for the caller to write into its slot (see `Attention`).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.models.ops import (NEG_INF, activation, apply_rope, attention_bias, lora_linear, mp_einsum, norm,
                                        pool, pool_segments, positions_from_mask, rope_tables,
                                        segment_attention_bias,
                                        segment_positions)

_normal = nn.initializers.normal(0.02)


@struct.dataclass
class Context:
    """What every layer shares (broadcast over the scanned stack): rotary tables (cos, sin) [B, T, 1, rd/2]
    and additive attention masks ([B, 1, T, T] for a sequence, [B, 1, 1, S] for a decode step against a
    cache of S slots). The local (sliding-window) variants are None when they equal the global ones."""
    rope_global: Any
    bias_full: Any
    rope_local: Any = None
    bias_local: Any = None
    return_kv: bool = struct.field(pytree_node=False, default=False)  # prefill: each layer's keys/values out
    # causal attention computed in this many query blocks, block i against keys [0, its end) only (see Attention)
    causal_blocks: int = struct.field(pytree_node=False, default=1)


def _pin(x: jax.Array, sharding) -> jax.Array:
    """with_sharding_constraint(x, sharding) when the sharding divides x's shape (else x unchanged)."""
    if sharding is None:
        return x
    try:
        sharding.shard_shape(x.shape)
    except ValueError:  # jax's IndivisibleError: a dimension the mesh axes do not divide
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def _select(is_sliding, local, full):
    """Per-layer choice: a Python bool (unrolled layers) picks statically, a traced one (scan) with where."""
    if local is None:
        return full
    if isinstance(is_sliding, (bool, np.bool_)):
        return local if is_sliding else full
    return jax.tree.map(lambda a, b: jnp.where(is_sliding, a, b), local, full)


class Linear(nn.Module):
    """x [..., in] -> [..., out] float32; matmul inputs in `dtype`, float32 accumulation (forward and backward)."""
    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout: float = 0.0  # LoRA dropout (PEFT: on the adapter's input), only where an adapter is present

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _normal, (x.shape[-1], self.features), self.param_dtype)
        if self.has_variable("params", "lora_a"):
            a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
            xa = None
            if self.dropout > 0.0:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout, x.shape)
                xa = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
            y = lora_linear(x, xa, kernel, a, b, self.dtype)
        else:
            y = mp_einsum("...i,io->...o", x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(jnp.float32)
        return y


class Norm(nn.Module):
    """RMSNorm, or LayerNorm with bias (cfg.norm == "layer"), over the last axis; float32 maths."""
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dim = self.cfg, x.shape[-1]
        # Gemma-style norms hold w with scale = 1 + w: unit scale is w = 0
        scale = self.param("scale", nn.initializers.constant(1.0 - cfg.norm_offset), (dim,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (dim,), self.param_dtype) if cfg.norm == "layer" else None
        return norm(cfg, x, scale, bias)


class Embed(nn.Module):
    """ids [B, T] -> embeddings [B, T, D] float32 (Gemma: times sqrt(D))."""
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        table = self.param("embedding", _normal, (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        x = jnp.take(table, input_ids, axis=0).astype(jnp.float32)
        if cfg.embed_scale:
            # transformers rounds sqrt(hidden) to the weight dtype before multiplying
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, table.dtype).astype(jnp.float32)
        return x


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings, optional q/k norms and logit soft-capping.

    Layout: heads before time, and the G = H/K query heads that share one KV head stacked along the query
    axis, so each (row, KV head) pair is ONE plain matmul [G*T, hd] x [hd, S]: 3-D batched matmuls with
    large M are what the CPU/GPU matmul libraries are fast at. (The 5-D einsum "btkgd,bskd->bkgts" made
    XLA:CPU compute the scores key-major and transpose them every layer.) The KV cache has the same layout,
    [B, K, S, hd], so a decode step reads it with no transpose.
    """
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout: float = 0.0
    q_norm: Optional[nn.Module] = None  # the block's q/k norms (their params live at layers/q_norm, k_norm)
    k_norm: Optional[nn.Module] = None

    def _scores(self, q, k):
        s = mp_einsum("bqd,bsd->bqs", q, k, self.dtype)
        if self.cfg.attn_logit_softcap:
            s = jnp.tanh(s / self.cfg.attn_logit_softcap) * self.cfg.attn_logit_softcap
        return s

    @nn.compact
    def __call__(self, x: jax.Array, rope, bias: jax.Array, cache=None, return_kv: bool = False,
                 causal_blocks: int = 1):
        """x [B, T, D] float32 -> (out [B, T, D] float32, kv).

        cache None: the T tokens attend to each other under bias [B, 1, T, T] (query, key); kv = this
        layer's (k, v) [B, K, T, hd] in `dtype` if return_kv, else None.
        cache (k, v) [B, K, S, hd] in `dtype`: one token per row (T = 1) attends to the S cache slots under
        bias [B, 1, 1, S] and to itself; kv = its (k, v) [B, K, hd] for the caller to store.
        causal_blocks n > 1 (no cache; `bias` causal, T divisible by n): the same, computed in n query blocks.
        """
        cfg, dtype = self.cfg, self.dtype
        B, T, _ = x.shape
        H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        G = H // K

        def dense(features, name):
            return Linear(features, cfg.attn_bias, dtype, self.param_dtype, self.dropout, name=name)

        q = dense(H * hd, "q")(x).reshape(B, T, H, hd)
        k = dense(K * hd, "k")(x).reshape(B, T, K, hd)
        v = dense(K * hd, "v")(x).reshape(B, T, K, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        q = (q * scale).reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, hd)
        k = k.transpose(0, 2, 1, 3)                                                    # [B, K, T, hd]
        v = v.transpose(0, 2, 1, 3)
        if cache is None and causal_blocks > 1:
            # Causal: query block i (of n) sees keys up to its own end only, so its scores, softmax and
            # probabilities x values skip the keys after it: (n + 1) / 2n of the full T x T work. The keys
            # skipped are masked in `bias` anyway (their exp is exactly 0), so every real token's output
            # is the full computation's up to summation order.
            c = T // causal_blocks
            qb = q.reshape(B * K, G, T, hd)
            kf, vf = k.reshape(B * K, T, hd), v.reshape(B * K, T, hd)
            outs = []
            for i in range(causal_blocks):
                lo, hi = i * c, (i + 1) * c
                s = self._scores(qb[:, :, lo:hi].reshape(B * K, G * c, hd), kf[:, :hi])
                s = s.reshape(B, K, G, c, hi) + bias[:, :, None, lo:hi, :hi]
                probs = jax.nn.softmax(s, axis=-1).reshape(B * K, G * c, hi)
                outs.append(mp_einsum("bqs,bsd->bqd", probs, vf[:, :hi], dtype).reshape(B * K, G, c, hd))
            o = jnp.concatenate(outs, axis=2).reshape(B * K, G * T, hd)
            kv = (k.astype(dtype), v.astype(dtype)) if return_kv else None
        elif cache is None:
            s = self._scores(q, k.reshape(B * K, T, hd)).reshape(B, K, G, T, T) + bias[:, :, None]
            probs = jax.nn.softmax(s, axis=-1).reshape(B * K, G * T, T)
            o = mp_einsum("bqs,bsd->bqd", probs, v.reshape(B * K, T, hd), dtype)
            kv = (k.astype(dtype), v.astype(dtype)) if return_kv else None
        else:
            kc, vc = cache
            S = kc.shape[2]
            k, v = k.astype(dtype), v.astype(dtype)
            # scores against the cache and against the token itself, one softmax over both: the cache is
            # read in place instead of being copied into a concatenation every layer and step
            s_cache = self._scores(q, kc.reshape(B * K, S, hd)).reshape(B, K, G, S) + bias
            s_self = self._scores(q, k.reshape(B * K, 1, hd)).reshape(B, K, G, 1)
            probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], axis=-1), axis=-1).reshape(B * K, G, S + 1)
            o = (mp_einsum("bgs,bsd->bgd", probs[..., :S], vc.reshape(B * K, S, hd), dtype)
                 + mp_einsum("bgs,bsd->bgd", probs[..., S:], v.reshape(B * K, 1, hd), dtype))
            kv = (k[:, :, 0], v[:, :, 0])
        o = o.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
        return dense(cfg.hidden_size, "o")(o), kv


class Mlp(nn.Module):
    """Gated (act(gate(x)) * up(x)) or plain (act(up(x))) MLP, then down."""
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg

        def dense(features, name):
            return Linear(features, cfg.mlp_bias, self.dtype, self.param_dtype, self.dropout, name=name)

        up = dense(cfg.intermediate_size, "up")(x)
        if cfg.gated_mlp:
            h = activation(cfg, dense(cfg.intermediate_size, "gate")(x)) * up
        else:
            h = activation(cfg, up)
        return dense(cfg.hidden_size, "down")(h)


class Block(nn.Module):
    """One decoder layer: pre-norm attention and MLP (sandwich norms for Gemma 2/3, GPT-NeoX's parallel
    residual), x [B, T, D] float32 -> (x, kv); the (carry, per-layer output) signature of nn.scan."""
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout: float = 0.0
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: Context, layer: dict):
        """ctx: shared by all layers; layer: this layer's {"sliding": bool, "cache": (k, v) (decode only)}."""
        cfg = self.cfg

        def norm_(name):
            return Norm(cfg, self.param_dtype, name=name)

        q_norm, k_norm = (norm_("q_norm"), norm_("k_norm")) if cfg.qk_norm else (None, None)
        attn = Attention(cfg, self.dtype, self.param_dtype, self.dropout, q_norm, k_norm, name="attn")
        mlp = Mlp(cfg, self.dtype, self.param_dtype, self.dropout, name="mlp")
        rope = _select(layer["sliding"], ctx.rope_local, ctx.rope_global)
        bias = _select(layer["sliding"], ctx.bias_local, ctx.bias_full)
        x = _pin(x, self.activation_sharding)
        h, kv = attn(norm_("attn_norm")(x), rope, bias, layer.get("cache"), ctx.return_kv, ctx.causal_blocks)
        if cfg.sandwich_norm:
            h = norm_("post_attn_norm")(h)
        if cfg.parallel_residual:
            return _pin(x + h + mlp(norm_("mlp_norm")(x)), self.activation_sharding), kv
        x = x + h
        h = mlp(norm_("mlp_norm")(x))
        if cfg.sandwich_norm:
            h = norm_("post_mlp_norm")(h)
        return _pin(x + h, self.activation_sharding), kv


class Decoder(nn.Module):
    """The backbone: embed -> layers -> final norm.

    dtype: matmul inputs (float32 accumulation); param_dtype: what `init` creates. bidirectional: every
    token sees every (non-pad) token (STM's option); sliding windows stay. remat: True (keep nothing per
    layer) or the name of a jax.checkpoint_policies policy, e.g. "dots_with_no_batch_dims_saveable".
    dropout: LoRA dropout rate (needs the "dropout" rng). activation_sharding: where the hidden states
    [B, T, D] live on a device mesh, pinned at every layer boundary, so the partitioner keeps activations
    (and the scan's saved residuals) split over the batch axes and gathers FSDP-sharded weights instead.
    """
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bidirectional: bool = False
    remat: Union[bool, str] = False
    dropout: float = 0.0
    activation_sharding: Any = None
    scan_layers: bool = True
    causal_blocks: int = 1  # causal attention in this many query blocks when T divides (see Attention)
    causal_blocks_min_tokens: int = 0  # ... for sequences of at least this many tokens

    def setup(self):
        cfg = self.cfg
        self.embed = Embed(cfg, self.param_dtype)
        block = Block
        if self.remat:
            policy = getattr(jax.checkpoint_policies, self.remat if isinstance(self.remat, str) else "nothing_saveable")
            block = nn.remat(Block, policy=policy)
        kw = dict(cfg=cfg, dtype=self.dtype, param_dtype=self.param_dtype, dropout=self.dropout,
                  activation_sharding=self.activation_sharding)
        if self.scan_layers:
            self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                  in_axes=(nn.broadcast, 0), length=cfg.num_layers)(**kw)
        else:
            self.layers = [block(**kw) for _ in range(cfg.num_layers)]
        self.final_norm = Norm(cfg, self.param_dtype)

    def _layers(self, x, ctx: Context, caches=None):
        """x [B, T, D] through every layer -> (x, per-layer kv stacked on a leading L axis, or None)."""
        sliding = self.cfg.layer_is_sliding
        if self.scan_layers:
            layer = {"sliding": jnp.asarray(sliding)}
            if caches is not None:
                layer["cache"] = caches
            return self.layers(x, ctx, layer)
        kvs = []
        for i, block in enumerate(self.layers):
            layer = {"sliding": sliding[i]}
            if caches is not None:
                layer["cache"] = jax.tree.map(lambda a, i=i: a[i], caches)
            x, kv = block(x, ctx, layer)
            kvs.append(kv)
        return x, (None if kvs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs))

    def _sequence_context(self, attention_mask: jax.Array, causal: bool, return_kv: bool = False,
                          packed: bool = False) -> Context:
        """packed: `attention_mask` holds segment ids (several texts per row, see `ops.segment_positions`)."""
        cfg = self.cfg
        T = attention_mask.shape[1]
        if packed:
            positions = segment_positions(attention_mask)
            bias = lambda window: segment_attention_bias(attention_mask, causal=causal, window=window)  # noqa: E731
        else:
            positions = positions_from_mask(attention_mask)
            bias = lambda window: attention_bias(attention_mask, causal=causal, window=window)  # noqa: E731
        # a window at least as wide as the sequence masks nothing: no second mask, no per-layer select
        window_bites = cfg.sliding_window is not None and (T > cfg.sliding_window if causal
                                                           else T - 1 > cfg.sliding_window // 2)
        return Context(
            rope_global=rope_tables(cfg, positions, cfg.rope_theta), bias_full=bias(None),
            rope_local=rope_tables(cfg, positions, cfg.rope_local_theta) if cfg.rope_local_theta else None,
            bias_local=bias(cfg.sliding_window) if window_bites else None, return_kv=return_kv,
            causal_blocks=self.causal_blocks if causal and self.causal_blocks > 1 and T % self.causal_blocks == 0
            and T >= self.causal_blocks_min_tokens else 1)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, packed: bool = False) -> jax.Array:
        """input_ids, attention_mask [B, T] (left padded) -> final hidden states [B, T, D] float32.
        packed: attention_mask holds segment ids instead (0 = padding, 1.. = the texts of a row)."""
        x = _pin(self.embed(input_ids), self.activation_sharding)
        x, _ = self._layers(x, self._sequence_context(attention_mask, causal=not self.bidirectional, packed=packed))
        return self.final_norm(x)

    def prefill(self, input_ids: jax.Array, attention_mask: jax.Array):
        """Run a (causal, left-padded) prompt [B, T] -> (hidden of the last column after the final norm
        [B, D] float32, k, v [L, B, K, T, hd] in `dtype`)."""
        x = self.embed(input_ids)
        x, (ks, vs) = self._layers(x, self._sequence_context(attention_mask, causal=True, return_kv=True))
        return self.final_norm(x[:, -1]), ks, vs

    def decode(self, token: jax.Array, position: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               key_valid: jax.Array, slot: jax.Array):
        """One new token per row against the cache.

        token, position [B] int32; cache_k/v [L, B, K, S, hd]; key_valid [B, S] bool (cache slots this token
        may see, excluding its own slot); slot: scalar int, the cache slot the token is written to. Real
        tokens of a row are contiguous (left padding), so slot distances are position distances, which the
        sliding-window rule 0 <= q - k < window is written in.
        -> (hidden after the final norm [B, D] float32, cache_k, cache_v with the slot filled).
        """
        cfg = self.cfg
        S = cache_k.shape[3]
        x = self.embed(token[:, None])                                                  # [B, 1, D]
        positions = position[:, None]
        bias_local = None
        if cfg.sliding_window is not None:
            in_window = slot - jnp.arange(S) < cfg.sliding_window
            bias_local = jnp.where(key_valid & in_window[None], 0.0, NEG_INF)[:, None, None, :]
        ctx = Context(rope_global=rope_tables(cfg, positions, cfg.rope_theta),
                      bias_full=jnp.where(key_valid, 0.0, NEG_INF)[:, None, None, :],
                      rope_local=rope_tables(cfg, positions, cfg.rope_local_theta) if cfg.rope_local_theta else None,
                      bias_local=bias_local)
        x, (ks, vs) = self._layers(x, ctx, (cache_k, cache_v))                          # ks [L, B, K, hd]
        # one in-place write of the new slot for all layers (the while-loop carry is updated in place)
        cache_k = jax.lax.dynamic_update_slice(cache_k, ks[:, :, :, None], (0, 0, 0, slot, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, vs[:, :, :, None], (0, 0, 0, slot, 0))
        return self.final_norm(x[:, 0]), cache_k, cache_v


class Encoder(Decoder):
    """Decoder + pooling (last token / masked mean) + optional L2 norm: [B, T] ids, mask -> [B, D] float32.
    The same parameter tree as `Decoder`. max_segments K > 0: packed rows, the mask holds segment ids, and the
    output is one vector per segment slot [B, K, D] (`ops.pool_segments`; `ops.gather_slots` orders them)."""
    pooling: str = "last"
    normalize: bool = True
    max_segments: int = 0

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        if self.max_segments:
            hidden = super().__call__(input_ids, attention_mask, packed=True)
            return pool_segments(hidden, attention_mask, self.max_segments, self.pooling, self.normalize)
        return pool(super().__call__(input_ids, attention_mask), attention_mask, self.pooling, self.normalize)
