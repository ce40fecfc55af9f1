"""Text generation with a KV cache: batched, left-padded prompts, one jitted prefill + `lax.while_loop` decode.

The layers mirror `models.decoder.attention` / `models.decoder.block` (GQA, q/k norms, sandwich norms,
per-layer sliding windows and rope thetas, GPT-NeoX parallel residual) and reuse its public pieces, so the
numerics are those of `decoder.forward` + `decoder.logits` with the same `dtype`: matmul inputs in `dtype`
(bf16 by default), float32 accumulation, float32 residual stream, norms, softmax and rotary maths.

Cache layout: k and v are each [L, B, K, T + N, hd] in `dtype` (decoder.attention casts k/v to `dtype`
before its einsums, so storing them in `dtype` changes nothing). KV heads come before time so that each
(row, KV head) sequence is contiguous and a decode step's attention is two plain batched matmuls, the layout
decoder.attention uses, with no transpose of the cache per step. Slot s holds the token at column s of the
left-padded prompt (s < T) or the (s - T)-th generated token. Because the real tokens of a
row are contiguous (left padding), slot distances equal position distances, which is what the sliding-window
rule `0 <= q - k < window` of `decoder.attention_bias` is written in.

Sampling: greedy (temperature 0), or temperature + nucleus (top-p) sampling. Each prompt row carries its own
PRNG key (from its own seed), folded with the step index, so a row's sample does not depend on which other
prompts share its batch or in which order they come. Stop strings are applied on the host to the decoded
text (the output is cut at the first occurrence); EOS tokens stop a row on the device.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.models.decoder import (NEG_INF, apply_rope, embed_tokens, linear, mlp, norm, positions_from_mask,
                                            rope_tables)
from bmretriever_jax.precision import resolve_dtype

# SmolLM2's own template (ChatML) without its default system prompt: the fallback for tokenizers that
# carry no chat template.
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
# End-of-turn tokens of common chat templates: generation stops on them as on EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>")
PROMPT_BUCKETS = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


# ----------------------------------------------------------------------------------------------------
# Layers with a cache
# ----------------------------------------------------------------------------------------------------
def _qkv(cfg: ModelConfig, p: dict, x, cos, sin, dtype):
    """x [B, S, D] -> q [B, S, K, G, hd] float32 (scaled), k, v [B, S, K, hd] in `dtype`."""
    B, S, _ = x.shape
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(p["attn"]["q"], x, dtype).reshape(B, S, H, hd)
    k = linear(p["attn"]["k"], x, dtype).reshape(B, S, K, hd)
    v = linear(p["attn"]["v"], x, dtype).reshape(B, S, K, hd)
    if cfg.qk_norm:
        q = norm(cfg, p["q_norm"], q)
        k = norm(cfg, p["k_norm"], k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
    return (q * scale).reshape(B, S, K, H // K, hd), k.astype(dtype), v.astype(dtype)


def _scores(cfg: ModelConfig, q, k, dtype):
    """q [N, Q, hd], k [N, S, hd] (N = rows x KV heads) -> [N, Q, S] float32 (soft-capped like decoder.attention)."""
    s = jnp.einsum("bqd,bsd->bqs", q.astype(dtype), k, preferred_element_type=jnp.float32)
    if cfg.attn_logit_softcap:
        s = jnp.tanh(s / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    return s


def _block(cfg: ModelConfig, p: dict, x, attend, dtype):
    """decoder.block with the attention core swapped: attend(p, h) -> (out [B, S, D], new k/v)."""
    h, kv = attend(p, norm(cfg, p["attn_norm"], x))
    if cfg.sandwich_norm:
        h = norm(cfg, p["post_attn_norm"], h)
    if cfg.parallel_residual:
        return x + h + mlp(cfg, p, norm(cfg, p["mlp_norm"], x), dtype), kv
    x = x + h
    h = mlp(cfg, p, norm(cfg, p["mlp_norm"], x), dtype)
    if cfg.sandwich_norm:
        h = norm(cfg, p["post_mlp_norm"], h)
    return x + h, kv


def _ropes(cfg: ModelConfig, positions):
    return (rope_tables(cfg, positions, cfg.rope_theta),
            rope_tables(cfg, positions, cfg.rope_local_theta or cfg.rope_theta))


def _prompt_bias(attention_mask: jax.Array, window: Optional[int]) -> jax.Array:
    """attention_mask [B, T] -> causal additive bias [B, 1, 1, T, T] float32 (query, key); a window keeps
    0 <= q - k < window (transformers' rule, as decoder.attention)."""
    T = attention_mask.shape[1]
    q, k = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    allowed = allowed[None] & (attention_mask[:, None, :] > 0)
    return jnp.where(allowed, 0.0, NEG_INF)[:, None, None]


def _select(is_sliding, local, full):
    """Per-layer choice: a Python bool (unrolled layers) picks statically, a traced one (scan) with where."""
    if isinstance(is_sliding, (bool, np.bool_)):
        return local if is_sliding else full
    return jax.tree.map(lambda a, b: jnp.where(is_sliding, a, b), local, full)


def unstack_layers(params: dict) -> dict:
    """params with "layers" stacked on axis 0 -> the same tree with "layers" a list of per-layer trees.

    The generator loops over such a list in Python (unrolled) instead of `lax.scan`: on XLA:CPU a bf16
    matmul inside a scan body runs up to 10x slower than the same matmul unrolled (measured at batch 4),
    and decoding is nothing but small matmuls.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]}


def _run_layers(cfg: ModelConfig, layers, x, layer_fn, per_layer=None):
    """x -> (x, stacked ys) through every layer: layer_fn(p, is_sliding, x, per_layer slice) -> (x, ys).

    `layers` stacked (scan, is_sliding traced) or a list (Python loop, is_sliding a bool); `per_layer` is an
    optional tree of [L, ...] arrays sliced per layer (the caches).
    """
    sliding = cfg.layer_is_sliding
    if isinstance(layers, (list, tuple)):
        ys = []
        for i, p in enumerate(layers):
            extra = None if per_layer is None else jax.tree.map(lambda a, i=i: a[i], per_layer)
            x, y = layer_fn(p, sliding[i], x, extra)
            ys.append(y)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)

    def body(x, xs):
        p, is_sliding, extra = xs
        return layer_fn(p, is_sliding, x, extra)

    return jax.lax.scan(body, x, (layers, jnp.asarray(sliding), per_layer))


def prefill(cfg: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array, *, dtype):
    """Run the prompt: input_ids, attention_mask [B, T] (left padded) ->
    (hidden of the last column after the final norm [B, D] float32, k, v [L, B, K, T, hd] in `dtype`).

    params["layers"] may be stacked or a list (`unstack_layers`)."""
    x = embed_tokens(cfg, params, input_ids)
    rope_global, rope_local = _ropes(cfg, positions_from_mask(attention_mask))
    bias_full = _prompt_bias(attention_mask, None)
    bias_local = bias_full if cfg.sliding_window is None else _prompt_bias(attention_mask, cfg.sliding_window)
    B, T = input_ids.shape
    K, hd = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // K

    def layer(p, is_sliding, x, _):
        cos, sin = _select(is_sliding, rope_local, rope_global)
        bias = _select(is_sliding, bias_local, bias_full)

        def attend(p, h):
            q, k, v = _qkv(cfg, p, h, cos, sin, dtype)
            # heads before time, the G query heads of one KV head stacked along the query axis: each
            # (row, KV head) is one plain [G*T, hd] x [hd, T] matmul (as decoder.attention)
            q3 = q.transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, hd)
            k = k.transpose(0, 2, 1, 3)                                                   # [B, K, T, hd]
            v = v.transpose(0, 2, 1, 3)
            s = _scores(cfg, q3, k.reshape(B * K, T, hd), dtype).reshape(B, K, G, T, T) + bias
            probs = jax.nn.softmax(s, axis=-1).astype(dtype).reshape(B * K, G * T, T)
            o = jnp.einsum("bqs,bsd->bqd", probs, v.reshape(B * K, T, hd), preferred_element_type=jnp.float32)
            o = o.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G * hd)
            return linear(p["attn"]["o"], o, dtype), (k, v)

        return _block(cfg, p, x, attend, dtype)

    x, (ks, vs) = _run_layers(cfg, params["layers"], x, layer)
    return norm(cfg, params["final_norm"], x[:, -1]), ks, vs


def decode_step(cfg: ModelConfig, params: dict, token: jax.Array, position: jax.Array, cache_k: jax.Array,
                cache_v: jax.Array, key_valid: jax.Array, slot: jax.Array, *, dtype):
    """One new token per row against the cache.

    token, position [B] int32; cache_k/v [L, B, K, S, hd]; key_valid [B, S] bool (cache slots this token
    may see, excluding its own slot); slot: scalar int, the cache slot the token is written to.
    -> (hidden after the final norm [B, D] float32, cache_k, cache_v with slot filled).
    """
    B = token.shape[0]
    S = cache_k.shape[3]
    K, hd = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // K
    x = embed_tokens(cfg, params, token[:, None])                                          # [B, 1, D]
    rope_global, rope_local = _ropes(cfg, position[:, None])
    bias_full = jnp.where(key_valid, 0.0, NEG_INF)                                         # [B, S]
    bias_local = bias_full
    if cfg.sliding_window is not None:
        in_window = slot - jnp.arange(S) < cfg.sliding_window
        bias_local = jnp.where(key_valid & in_window[None], 0.0, NEG_INF)

    def layer(p, is_sliding, x, cache):
        kc, vc = cache                                                                    # [B, K, S, hd]
        cos, sin = _select(is_sliding, rope_local, rope_global)
        bias = _select(is_sliding, bias_local, bias_full)[:, None, None, :]              # [B, 1, 1, S]

        def attend(p, h):
            q, k, v = _qkv(cfg, p, h, cos, sin, dtype)                                    # k, v [B, 1, K, hd]
            q3 = q.reshape(B * K, G, hd)
            k3, v3 = k.reshape(B * K, 1, hd), v.reshape(B * K, 1, hd)
            # scores against the cache and against the token itself, one softmax over both: the cache
            # is read in place instead of being copied into a concatenation every layer and step
            s_cache = _scores(cfg, q3, kc.reshape(B * K, S, hd), dtype).reshape(B, K, G, S) + bias
            s_self = _scores(cfg, q3, k3, dtype).reshape(B, K, G, 1)
            probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], axis=-1), axis=-1).astype(dtype)
            probs = probs.reshape(B * K, G, S + 1)
            o = (jnp.einsum("bgs,bsd->bgd", probs[..., :S], vc.reshape(B * K, S, hd),
                            preferred_element_type=jnp.float32)
                 + jnp.einsum("bgs,bsd->bgd", probs[..., S:], v3, preferred_element_type=jnp.float32))
            return linear(p["attn"]["o"], o.reshape(B, 1, K * G * hd), dtype), (k[:, 0], v[:, 0])

        return _block(cfg, p, x, attend, dtype)

    x, (ks, vs) = _run_layers(cfg, params["layers"], x, layer, (cache_k, cache_v))       # ks [L, B, K, hd]
    # one in-place write of the new slot for all layers (the while-loop carry is updated in place)
    cache_k = jax.lax.dynamic_update_slice(cache_k, ks[:, :, :, None], (0, 0, 0, slot, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, vs[:, :, :, None], (0, 0, 0, slot, 0))
    return norm(cfg, params["final_norm"], x[:, 0]), cache_k, cache_v


def head_weights(cfg: ModelConfig, params: dict, dtype) -> jax.Array:
    """The LM head in `dtype`, cast once: [V, D] (tied embedding) or [D, V] (separate lm_head kernel)."""
    if cfg.tie_embeddings:
        return jnp.asarray(params["embed"]["embedding"]).astype(dtype)
    if "lm_head" not in params:
        raise ValueError("this checkpoint has an untied LM head that was not loaded (a base-model checkpoint): "
                         "load the CausalLM checkpoint to generate text")
    return jnp.asarray(params["lm_head"]["kernel"]).astype(dtype)


def head_logits(cfg: ModelConfig, params: dict, head: jax.Array, hidden: jax.Array, dtype) -> jax.Array:
    """hidden [B, D] -> logits [B, V] float32; the same einsums as `decoder.logits`."""
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", hidden.astype(dtype), head, preferred_element_type=jnp.float32)
    p = {"kernel": head}
    if "bias" in params["lm_head"]:
        p["bias"] = params["lm_head"]["bias"]
    return linear(p, hidden, dtype)


# ----------------------------------------------------------------------------------------------------
# Sampling and the decode loop
# ----------------------------------------------------------------------------------------------------
def sample_logits(logits: jax.Array, keys: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits [B, V] float32, keys [B] (one PRNG key per row) -> token ids [B] int32.

    temperature <= 0: greedy (argmax). top_p < 1: nucleus sampling, keeping the smallest set of most likely
    tokens whose probability reaches top_p (the most likely token is always kept).
    """
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]                                 # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p                                                         # first always kept
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def generate_tokens(cfg: ModelConfig, params: dict, head: jax.Array, input_ids: jax.Array,
                    attention_mask: jax.Array, keys: jax.Array, eos_ids: jax.Array, pad_id: jax.Array, *,
                    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, dtype="auto"):
    """Prefill + decode loop (pure; jit it with cfg and the keyword arguments static).

    input_ids, attention_mask [B, T] int32, left padded; keys [B] PRNG keys (one per row); eos_ids [E] int32
    (stop tokens; pass [-1] for none); pad_id: scalar int32 written after a row's EOS.
    -> (tokens [B, N] int32: generated ids, `pad_id` after a row's first EOS (the EOS itself is kept);
        steps: scalar int32, number of decode columns filled (the loop exits early when every row is done)).
    """
    dtype = resolve_dtype(dtype)
    B, T = input_ids.shape
    N = max_new_tokens
    L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    pad_id = jnp.asarray(pad_id, jnp.int32)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))

    h, ks, vs = prefill(cfg, params, input_ids, attention_mask, dtype=dtype)
    pad_slots = ((0, 0), (0, 0), (0, 0), (0, N), (0, 0))
    cache_k, cache_v = jnp.pad(ks, pad_slots), jnp.pad(vs, pad_slots)                     # [L, B, K, T + N, hd]
    assert cache_k.shape == (L, B, K, T + N, hd)
    prompt_len = attention_mask.sum(-1).astype(jnp.int32)                                  # [B]
    # generated slots are always real tokens; key_valid below also requires slot < current slot
    row_mask = jnp.concatenate([attention_mask > 0, jnp.ones((B, N), bool)], axis=1)     # [B, T + N]
    slots = jnp.arange(T + N)

    tok = sample_logits(head_logits(cfg, params, head, h, dtype), step_keys(keys, 0), temperature, top_p)
    out = jnp.full((B, N), pad_id).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i + 1 < N) & ~jnp.all(done)

    def body(state):
        i, tok, out, done, ck, cv = state
        slot = T + i
        h, ck, cv = decode_step(cfg, params, tok, prompt_len + i, ck, cv, row_mask & (slots < slot)[None], slot,
                                dtype=dtype)
        nxt = sample_logits(head_logits(cfg, params, head, h, dtype), step_keys(keys, i + 1), temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i + 1))
        return i + 1, nxt, out, done | jnp.isin(nxt, eos), ck, cv

    i, _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tok, out, done, cache_k, cache_v))
    return out, i + 1


def greedy_no_cache(cfg: ModelConfig, params: dict, input_ids, attention_mask, max_new_tokens: int,
                    dtype=jnp.float32) -> np.ndarray:
    """Reference greedy decoding that re-runs `decoder.forward` over the whole sequence at every step
    (no cache): [B, T] -> [B, N] int32. Slow; for tests."""
    from bmretriever_jax.models import forward, logits

    fwd = jax.jit(lambda p, i, m: logits(cfg, p, forward(cfg, p, i, m, dtype=dtype)[:, -1], dtype=dtype))
    ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
    B, T = ids.shape
    # the growing sequence is left-padded to a fixed T + N columns (more left padding changes nothing), so
    # the forward compiles once
    ids = np.concatenate([np.zeros((B, max_new_tokens), np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((B, max_new_tokens), np.int32), mask], axis=1)
    out = []
    for _ in range(max_new_tokens):
        nxt = np.asarray(jnp.argmax(fwd(params, jnp.asarray(ids), jnp.asarray(mask)), axis=-1), np.int32)
        out.append(nxt)
        ids = np.concatenate([ids[:, 1:], nxt[:, None]], axis=1)
        mask = np.concatenate([mask[:, 1:], np.ones((B, 1), np.int32)], axis=1)
    return np.stack(out, axis=1)


# ----------------------------------------------------------------------------------------------------
# Host side: tokenizer, batching, chat template, stop strings
# ----------------------------------------------------------------------------------------------------
def _bucket(n: int, limit: int) -> int:
    for b in PROMPT_BUCKETS:
        if n <= b:
            return min(b, limit)
    return limit


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string (the stop string is removed)."""
    cut = len(text)
    for s in stop or ():
        if s:
            j = text.find(s)
            if 0 <= j < cut:
                cut = j
    return text[:cut]


def row_seeds(seed: "int | Sequence[int]", n: int) -> list[int]:
    """One seed per row: an int seed gives seed, seed + 1, ...; a list is used as is (length n)."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    return seeds


def _tree_cast_kernels(params: dict, dtype) -> dict:
    """Matrices that `linear` casts to `dtype` on every call are cast once here (identical numerics, half the
    memory traffic per decode step in bf16). Embeddings, norms and biases keep their precision."""
    def cast(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        x = jnp.asarray(x)
        if name.rsplit("/", 1)[-1] in ("kernel", "lora_a", "lora_b"):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map_with_path(cast, params)


class Generator:
    """A causal LM ready to generate: config + params + tokenizer + compiled decode programs.

    Prompts are sorted by length, cut into batches of `batch_size` rows (padded with dummy rows, so one
    program serves every batch) and left-padded to a few bucket lengths (one compile per bucket and
    max_new_tokens).
    """

    def __init__(self, cfg: ModelConfig, params: dict, tokenizer, *, dtype: Any = "auto", batch_size: int = 8,
                 name: str = ""):
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name
        self.dtype = resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        self.params = unstack_layers(_tree_cast_kernels(params, self.dtype))
        self.head = head_weights(cfg, params, self.dtype)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._warned_template = False
        self._fn = jax.jit(functools.partial(generate_tokens, cfg),
                           static_argnames=("max_new_tokens", "temperature", "top_p", "dtype"))

    @classmethod
    def load(cls, name_or_path: str, *, dtype: Any = "auto", batch_size: int = 8, quiet: bool = False):
        """From a model name (smollm2-135m, gemma3-270m), .gguf file or transformers folder."""
        from bmretriever_jax import hub

        cfg, params, tok, folder = hub.load(name_or_path, quiet=quiet)
        return cls(cfg, params, tok, dtype=dtype, batch_size=batch_size, name=name_or_path)

    # ------------------------------------------------------------------------------------------------
    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS of the tokenizer and config, plus end-of-turn tokens of chat templates found in the vocabulary."""
        ids = {i for i in (self.tokenizer.eos_token_id, self.cfg.eos_token_id) if i is not None}
        vocab = self.tokenizer.get_vocab()
        ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        return tuple(sorted(int(i) for i in ids))

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """The prompt text of a conversation under the tokenizer's chat template (ChatML if it has none)."""
        template = None
        if not getattr(self.tokenizer, "chat_template", None):
            if not self._warned_template:
                warnings.warn(f"tokenizer of {self.name or 'this model'} has no chat template: using ChatML "
                              "(SmolLM2's format)", stacklevel=2)
                self._warned_template = True
            template = CHATML_TEMPLATE
        return self.tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: "int | Sequence[int]" = 0,
                      eos_ids: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Token-id prompts -> generated ids per prompt (up to and excluding the first EOS), input order."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        prompts = [list(map(int, p)) for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("empty prompt: a prompt needs at least one token")
        seeds = row_seeds(seed, len(prompts))
        eos = tuple(sorted(set(self.eos_ids if eos_ids is None else map(int, eos_ids))))
        limit = self.cfg.max_position_embeddings
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"context of {limit} tokens: shorten the prompt")
        # a fixed-length EOS array (padded with -1, never a token) keeps one compiled program per shape
        n_eos = max(8, -(-len(eos) // 8) * 8)
        eos_arr = jnp.asarray(list(eos) + [-1] * (n_eos - len(eos)), jnp.int32)
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        results: list[list[int]] = [[] for _ in prompts]
        B = self.batch_size
        for start in range(0, len(prompts), B):
            idx = order[start:start + B]
            T = _bucket(max(len(prompts[i]) for i in idx), limit - max_new_tokens)
            ids = np.full((B, T), self.pad_id, np.int32)
            mask = np.zeros((B, T), np.int32)
            row_keys = []
            for r in range(B):
                p = prompts[idx[r]] if r < len(idx) else [self.pad_id]  # dummy rows: one token
                ids[r, T - len(p):] = p
                mask[r, T - len(p):] = 1
                row_keys.append(seeds[idx[r]] if r < len(idx) else 0)
            keys = jax.vmap(jax.random.key)(jnp.asarray(row_keys, jnp.uint32))
            out, _ = self._fn(self.params, self.head, jnp.asarray(ids), jnp.asarray(mask), keys,
                              eos_arr, jnp.int32(self.pad_id),
                              max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                              dtype=self.dtype)
            out = np.asarray(out)
            for r, i in enumerate(idx):
                row = out[r].tolist()
                stop = next((j for j, t in enumerate(row) if t in eos), len(row))
                results[i] = row[:stop]
        return results

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: "int | Sequence[int]" = 0, stop: Sequence[str] = (),
                 add_special_tokens: bool = True) -> list[str]:
        """Text prompts -> generated texts (special tokens skipped, cut at the first stop string)."""
        ids = [self.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
        out = self.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return [truncate_at_stop(self.tokenizer.decode(o, skip_special_tokens=True), stop) for o in out]

    def chat(self, messages_batch: Sequence[Sequence[dict]], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: "int | Sequence[int]" = 0, stop: Sequence[str] = ()) -> list[str]:
        """Conversations ([{"role", "content"}, ...] each) -> the assistant's replies."""
        prompts = [self.chat_prompt(m) for m in messages_batch]
        # the template writes BOS itself when the model wants one; the tokenizer must not add another
        return self.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, stop=stop, add_special_tokens=False)


def count_flops_per_token(cfg: ModelConfig) -> float:
    """Matmul FLOPs per generated token (2 x weights touched), for throughput reports."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = D * q + 2 * D * kv + q * D + (3 if cfg.gated_mlp else 2) * D * F
    return 2.0 * (L * per_layer + cfg.vocab_size * D)


__all__ = ["CHATML_TEMPLATE", "Generator", "count_flops_per_token", "decode_step", "generate_tokens",
           "greedy_no_cache", "head_logits", "head_weights", "prefill", "row_seeds", "sample_logits",
           "truncate_at_stop", "unstack_layers"]
