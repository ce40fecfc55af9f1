"""The functional face of the modules in `modules.py`: params in, arrays out, for the rest of the package.

`forward` / `encode` (training and encoding), `prefill` / `decode_step` (generation with a KV cache) and
`logits` all apply the same `Decoder` to the same parameter tree; `init_params` and `param_shapes` are its
`init`. Params are one plain nested dict with the stacked layers on axis 0 (see `modules.py`).

Keep the params in float32 and let each linear cast its weights inside the layer loop (~1% of a forward on
CPU). Casting the stacked weights to bf16 beforehand is slower with XLA:CPU (jax 0.10.2): it upcasts the
whole bf16 stack to f32 before the loop so that it can dynamic-slice it, then casts back per layer
(measured 5% slower on Gemma 3 270M).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.models.modules import Decoder, Encoder
from bmretriever_jax.models.ops import mp_einsum
from bmretriever_jax.util.precision import resolve_dtype

Params = dict


# ----------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------
def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """`Decoder(cfg).init` (normal(0.02) matrices, unit norms, zero biases): for tests and from-scratch runs.

    Use under `jax.eval_shape` / `jax.jit(out_shardings=...)` to avoid materialising big models on one host.
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg, param_dtype=dtype).init(key, ids, jnp.ones_like(ids))["params"]


@functools.lru_cache(maxsize=32)
def _shapes(cfg: ModelConfig):
    return jax.tree.map(lambda s: tuple(s.shape), jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0)))


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of shapes (tuples) with the same structure as the params."""
    return jax.tree.map(lambda s: s, _shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def unstack_layers(params: Params) -> Params:
    """params with "layers" stacked on axis 0 -> the tree of `Decoder(scan_layers=False)`, whose layers are
    `layers_0`, `layers_1`, ... (generation runs them unrolled; see `modules.py`). Already unstacked: as is."""
    if "layers" not in params:
        return params
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)})
    return out


# ----------------------------------------------------------------------------------------------------
# Encoding and training
# ----------------------------------------------------------------------------------------------------
# XLA:CPU's matmuls (YNNPACK, jax 0.10.2) lose ~25-30% per FLOP once a [tokens, D] x [D, F] product has more
# than a few thousand rows (measured on a 2-core AVX512-BF16 machine: 8192 rows vs 2048, in bf16 and fp32; the
# activations stop fitting in cache). So on CPU a large batch runs as a loop over chunks of about this many
# tokens. Sequences are independent, so chunking changes no result; accelerators get the whole batch at once.
CPU_CHUNK_TOKENS = 2048

# Causal attention on CPU runs in this many query blocks, each against the keys up to its end: (n + 1) / 2n of
# the T x T scores, softmax and probabilities x values (modules.Attention), for sequences of at least
# CPU_CAUSAL_MIN_TOKENS (below that attention is a sliver of the work and the blocks' small matmuls cost more).
# Measured (benchmarks/profile_ops.py, Gemma 3 270M, 32 x 256 tokens, fp32, 2-core AMD EPYC AVX2): the attention
# ops took 1.12-1.19 s with 4 blocks, 1.82-2.03 s with 1 (BENCHMARKS.md, "Where the time goes"); results equal
# the one-block ones up to float32 summation order (bit-identical in that run). Accelerators get one block: the
# pod plans are compiled for that program.
CPU_CAUSAL_BLOCKS = 4
CPU_CAUSAL_MIN_TOKENS = 128


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


def _module_kw(dtype, bidirectional, remat, dropout, dropout_key, activation_sharding):
    use_dropout = dropout > 0.0 and dropout_key is not None
    on_cpu = (_TARGET_PLATFORM or jax.default_backend()) == "cpu"
    kw = dict(dtype=resolve_dtype(dtype), bidirectional=bidirectional, remat=remat,
              dropout=dropout if use_dropout else 0.0, activation_sharding=activation_sharding,
              causal_blocks=CPU_CAUSAL_BLOCKS if on_cpu else 1, causal_blocks_min_tokens=CPU_CAUSAL_MIN_TOKENS)
    return kw, ({"dropout": dropout_key} if use_dropout else None)


def _apply_rows(module: Decoder, params: Params, input_ids: jax.Array, attention_mask: jax.Array, rngs):
    """module.apply on [B, T] rows -> [B, ...]; on CPU, batches of more than CPU_CHUNK_TOKENS tokens run chunk
    by chunk (see there); not with dropout, whose masks are drawn for the whole batch, nor with
    activation_sharding (a mesh splits the batch already)."""
    B, T = input_ids.shape
    whole = rngs is not None or module.activation_sharding is not None
    n = 1 if whole else _row_chunks(B, T)
    run = lambda ids, mask: module.apply({"params": params}, ids, mask, rngs=rngs)  # noqa: E731
    if n == 1:
        return run(input_ids, attention_mask)
    rows = -(-B // n)
    pad = n * rows - B  # all-padding rows (mask 0) fill the last chunk; their outputs are dropped
    ids = jnp.pad(input_ids, ((0, pad), (0, 0))).reshape(n, rows, T)
    mask = jnp.pad(attention_mask, ((0, pad), (0, 0))).reshape(n, rows, T)
    out = jax.lax.map(lambda a: run(a[0], a[1]), (ids, mask))
    return out.reshape((n * rows,) + out.shape[2:])[:B]


def forward(cfg: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
            dtype: Any = "auto", bidirectional: bool = False, remat: bool = False, dropout: float = 0.0,
            dropout_key: Optional[jax.Array] = None,
            activation_sharding: Optional[jax.sharding.Sharding] = None) -> jax.Array:
    """input_ids, attention_mask [B, T] -> final hidden states [B, T, D] float32 (after the final norm).

    The `Decoder` module's settings (see there): bidirectional, remat, dropout (LoRA dropout, needs
    dropout_key), activation_sharding (e.g. NamedSharding(mesh, P(("data", "fsdp"), None, None)); ignored
    for batches the batch axes do not divide).
    """
    kw, rngs = _module_kw(dtype, bidirectional, remat, dropout, dropout_key, activation_sharding)
    return _apply_rows(Decoder(cfg, **kw), params, input_ids, attention_mask, rngs)


def encode(cfg: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
           pooling: str = "last", normalize: bool = True, dtype: Any = "auto", bidirectional: bool = False,
           remat: bool = False, dropout: float = 0.0, dropout_key: Optional[jax.Array] = None,
           activation_sharding: Optional[jax.sharding.Sharding] = None, max_segments: int = 0) -> jax.Array:
    """input_ids, attention_mask [B, T] -> `Encoder` vectors [B, D] float32 (pooled, optionally L2-normalised);
    the other arguments as for `forward`. max_segments K > 0: packed rows (attention_mask = segment ids) ->
    slot vectors [B, K, D] (see `ops.pool_segments`)."""
    kw, rngs = _module_kw(dtype, bidirectional, remat, dropout, dropout_key, activation_sharding)
    module = Encoder(cfg, pooling=pooling, normalize=normalize, max_segments=max_segments, **kw)
    return _apply_rows(module, params, input_ids, attention_mask, rngs)


# ----------------------------------------------------------------------------------------------------
# Generation: the LM head and the KV cache
# ----------------------------------------------------------------------------------------------------
def head_weights(cfg: ModelConfig, params: Params, dtype) -> jax.Array:
    """The LM head in `dtype`: [V, D] (tied embedding) or [D, V] (separate lm_head kernel)."""
    if cfg.tie_embeddings:
        return jnp.asarray(params["embed"]["embedding"]).astype(dtype)
    if "lm_head" not in params:
        raise ValueError("this checkpoint has an untied LM head that was not loaded (a base-model checkpoint): "
                         "load the CausalLM checkpoint to generate text")
    return jnp.asarray(params["lm_head"]["kernel"]).astype(dtype)


def logits(cfg: ModelConfig, params: Params, hidden: jax.Array, dtype: Any = jnp.bfloat16,
           head: Optional[jax.Array] = None) -> jax.Array:
    """hidden [..., D] -> vocabulary logits [..., V] float32 (tied or separate LM head); matmul inputs in
    `dtype`. head: `head_weights(cfg, params, dtype)` computed once (a decode loop), else cast here."""
    w = head_weights(cfg, params, dtype) if head is None else head
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", hidden.astype(dtype), w, preferred_element_type=jnp.float32)
    y = mp_einsum("...i,io->...o", hidden, w, dtype)
    if "bias" in params["lm_head"]:
        y = y + params["lm_head"]["bias"].astype(jnp.float32)
    return y


def _generation_decoder(cfg: ModelConfig, params: Params, dtype) -> Decoder:
    return Decoder(cfg, dtype=resolve_dtype(dtype), scan_layers="layers" in params)


def prefill(cfg: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *, dtype):
    """`Decoder.prefill`: a left-padded prompt [B, T] -> (last hidden [B, D], k, v [L, B, K, T, hd] in `dtype`).
    params stacked (scanned layers) or `unstack_layers(params)` (unrolled)."""
    return _generation_decoder(cfg, params, dtype).apply({"params": params}, input_ids, attention_mask,
                                                         method=Decoder.prefill)


def decode_step(cfg: ModelConfig, params: Params, token: jax.Array, position: jax.Array, cache_k: jax.Array,
                cache_v: jax.Array, key_valid: jax.Array, slot: jax.Array, *, dtype):
    """`Decoder.decode`: one token per row against the KV cache -> (hidden [B, D], cache_k, cache_v)."""
    return _generation_decoder(cfg, params, dtype).apply({"params": params}, token, position, cache_k, cache_v,
                                                         key_valid, slot, method=Decoder.decode)
