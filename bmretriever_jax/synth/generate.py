"""Text generation with a KV cache: batched, left-padded prompts, one jitted prefill + `lax.while_loop` decode.

The model is the package's one `Decoder` module (`models.decoder.prefill` / `decode_step`, the same layers,
attention and numerics as `forward` + `logits` with the same `dtype`); this file holds only sampling, the
decode loop and host-side batching.

Cache layout: k and v are each [L, B, K, T + N, hd] in `dtype` (see `models.modules.Attention`). Slot s holds
the token at column s of the left-padded prompt (s < T) or the (s - T)-th generated token.

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

from bmretriever_jax.convert import hub
from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.models.decoder import decode_step, forward, head_weights, prefill, unstack_layers
from bmretriever_jax.models.decoder import logits as lm_logits
from bmretriever_jax.util.precision import resolve_dtype

# SmolLM2's own template (ChatML) without its default system prompt: the fallback for tokenizers that
# carry no chat template.
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
# End-of-turn tokens of common chat templates: generation stops on them as on EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>")
PROMPT_BUCKETS = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


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

    tok = sample_logits(lm_logits(cfg, params, h, dtype, head=head), step_keys(keys, 0), temperature, top_p)
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
        nxt = sample_logits(lm_logits(cfg, params, h, dtype, head=head), step_keys(keys, i + 1), temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i + 1))
        return i + 1, nxt, out, done | jnp.isin(nxt, eos), ck, cv

    i, _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tok, out, done, cache_k, cache_v))
    return out, i + 1


def greedy_no_cache(cfg: ModelConfig, params: dict, input_ids, attention_mask, max_new_tokens: int,
                    dtype=jnp.float32) -> np.ndarray:
    """Reference greedy decoding that re-runs `decoder.forward` over the whole sequence at every step
    (no cache): [B, T] -> [B, N] int32. Slow; for tests."""
    fwd = jax.jit(lambda p, i, m: lm_logits(cfg, p, forward(cfg, p, i, m, dtype=dtype)[:, -1], dtype=dtype))
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


__all__ = ["CHATML_TEMPLATE", "Generator", "count_flops_per_token", "generate_tokens", "greedy_no_cache",
           "row_seeds", "sample_logits", "truncate_at_stop"]
