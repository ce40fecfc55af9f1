"""Generation with a KV cache (synth/generate.py): against re-running the whole forward each step, against
transformers' `generate`, sampling maths and reproducibility, EOS, stop strings, chat templates."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bmretriever_jax.convert.hf import load_hf
from bmretriever_jax.synth.generate import (CHATML_TEMPLATE, Generator, generate_tokens, greedy_no_cache,
                                            head_weights, sample_logits, truncate_at_stop, unstack_layers)
from hf_tiny import padded_batch, save_tiny_tokenizer, tiny_hf_config

N_NEW = 12


def _tiny_causal_lm(family: str, path: str, seed: int = 0):
    """A tiny random CausalLM (LM head included when untied), weights large enough that the argmax is far
    from ties, saved to `path`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family.startswith("gemma") else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return model


def _keys(n, seed=0):
    return jax.vmap(jax.random.key)(jnp.arange(seed, seed + n, dtype=jnp.uint32))


_gen = jax.jit(generate_tokens, static_argnums=(0,),
               static_argnames=("max_new_tokens", "temperature", "top_p", "dtype"))
NO_EOS = jnp.asarray([-1], jnp.int32)


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    """family -> (cfg, params, ids, mask, greedy tokens without a cache, transformers' greedy tokens); built once."""
    cache = {}

    def get(family):
        if family not in cache:
            path = str(tmp_path_factory.mktemp(family))
            hf = _tiny_causal_lm(family, path)
            cfg, params = load_hf(path)
            ids, mask = padded_batch(seed=1, batch=3, length=11)        # rows left-padded by 0, 3, 6
            ref = greedy_no_cache(cfg, params, ids.numpy(), mask.numpy(), N_NEW)
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            cache[family] = (cfg, params, jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32),
                             ref, out[:, ids.shape[1]:].numpy())
        return cache[family]

    return get


# gemma3: sliding windows on some layers (window 6 < prompt + new tokens), local/global rope theta, q/k norms,
# sandwich norms (the all-sliding Mistral layout runs the same code); gpt_neox: parallel residual, partial
# rotary, biases, untied head.
@pytest.mark.parametrize("family", ["gemma3", "gpt_neox"])
def test_kv_cache_greedy_equals_no_cache_and_transformers(family, tiny_lms):
    cfg, params, ids, mask, ref, hf = tiny_lms(family)
    ours, steps = _gen(cfg, unstack_layers(params), head_weights(cfg, params, jnp.float32), ids, mask, _keys(3),
                       NO_EOS, jnp.int32(0), max_new_tokens=N_NEW, dtype=jnp.float32)
    assert int(steps) == N_NEW
    np.testing.assert_array_equal(np.asarray(ours), ref)
    np.testing.assert_array_equal(ref, hf)


def test_scanned_layers_agree(tiny_lms):
    cfg, params, ids, mask, ref, _ = tiny_lms("gemma3")
    stacked, _ = _gen(cfg, params, head_weights(cfg, params, jnp.float32), ids, mask, _keys(3), NO_EOS,
                      jnp.int32(0), max_new_tokens=N_NEW, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(stacked), ref)


def test_eos_stops_rows_and_pads_after(tiny_lms):
    cfg, params, ids, mask, ref, _ = tiny_lms("gemma3")
    eos = int(ref[0, 3])  # row 0 produces it at step 3
    out, steps = _gen(cfg, unstack_layers(params), head_weights(cfg, params, jnp.float32), ids, mask, _keys(3),
                      jnp.asarray([eos], jnp.int32), jnp.int32(-7), max_new_tokens=N_NEW, dtype=jnp.float32)
    out = np.asarray(out)
    stops = []
    for r in range(3):
        hit = [j for j in range(N_NEW) if ref[r, j] == eos]
        stop = hit[0] if hit else N_NEW - 1
        stops.append(stop)
        np.testing.assert_array_equal(out[r, :stop + 1], ref[r, :stop + 1])
        assert (out[r, stop + 1:] == -7).all()
    assert stops[0] <= 3
    # the loop exits as soon as every row has stopped
    assert int(steps) == max(stops) + 1


def test_sampling_matches_softmax_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    n = 20000
    keys = jax.vmap(jax.random.key)(jnp.arange(n, dtype=jnp.uint32))
    draw = jax.jit(jax.vmap(lambda k, t, p: sample_logits(logits, k[None], t, p)[0],
                            in_axes=(0, None, None)), static_argnums=(1, 2))
    freq = np.bincount(np.asarray(draw(keys, 1.0, 1.0)), minlength=4) / n
    # binomial standard error at n=20000 is <= 0.0036: 4 sigma
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # temperature 0.5 squares and renormalises the probabilities
    p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    freq = np.bincount(np.asarray(draw(keys, 0.5, 1.0)), minlength=4) / n
    np.testing.assert_allclose(freq, p2 / p2.sum(), atol=0.015)
    # top-p 0.7: 0.5 + 0.3 reach it, so only the first two tokens remain, renormalised
    freq = np.bincount(np.asarray(draw(keys, 1.0, 0.7)), minlength=4) / n
    np.testing.assert_allclose(freq, [0.625, 0.375, 0.0, 0.0], atol=0.015)
    assert freq[2] == 0 and freq[3] == 0
    # greedy
    assert int(sample_logits(logits, keys[:1], 0.0, 1.0)[0]) == 0


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    _tiny_causal_lm("llama", path)           # tied embeddings: the LM head is the embedding
    save_tiny_tokenizer(path)
    return Generator.load(path, dtype="float32", batch_size=4, quiet=True)


def test_sampling_is_seeded_and_row_independent(tiny_generator):
    g = tiny_generator
    prompts = [[2, 10, 11, 12], [2, 20, 21, 22], [2, 30, 31, 32]]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, eos_ids=())
    a = g.generate_ids(prompts, seed=5, **kw)
    assert g.generate_ids(prompts, seed=5, **kw) == a
    assert g.generate_ids(prompts, seed=6, **kw) != a
    # a row's sample depends on its own seed only, not on its neighbours or its place in the batch
    alone = g.generate_ids([prompts[1]], seed=[6], **kw)
    assert alone[0] == a[1]
    swapped = g.generate_ids([prompts[2], prompts[0]], seed=[7, 5], **kw)
    assert swapped == [a[2], a[0]]


def test_more_prompts_than_batch_and_order(tiny_generator):
    g = tiny_generator
    prompts = [[2] + [10 + i] * (1 + i % 5) for i in range(9)]   # 9 prompts, batch 4: 3 batches, sorted by length
    out = g.generate_ids(prompts, max_new_tokens=10, eos_ids=())
    singles = [g.generate_ids([p], max_new_tokens=10, eos_ids=())[0] for p in prompts[:3]]
    assert out[:3] == singles
    assert all(len(o) == 10 for o in out)


def test_stop_strings_and_context_limit(tiny_generator):
    g = tiny_generator
    assert truncate_at_stop("a b\n\nc STOP d", ["STOP", "\n\n"]) == "a b"
    assert truncate_at_stop("abc", []) == "abc"
    full = g.generate(["the claim of"], max_new_tokens=10)[0]
    words = full.split()
    assert len(words) >= 3
    cut = g.generate(["the claim of"], max_new_tokens=10, stop=[" " + words[2]])[0]
    assert cut == " ".join(words[:2])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        g.generate_ids([[2] * 120], max_new_tokens=20)


def test_chat_template_and_chatml_fallback(tiny_generator):
    g = tiny_generator
    msgs = [{"role": "user", "content": "the claim"}]
    assert not getattr(g.tokenizer, "chat_template", None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        prompt = g.chat_prompt(msgs)
    assert prompt == "<|im_start|>user\nthe claim<|im_end|>\n<|im_start|>assistant\n"
    assert any("ChatML" in str(x.message) for x in w)
    g.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[bot]"
    try:
        assert g.chat_prompt(msgs) == "[user] the claim [bot]"
        out = g.chat([msgs, msgs], max_new_tokens=10)
        assert out[0] == out[1] and out[0] == g.generate(["[user] the claim [bot]"], max_new_tokens=10,
                                                          add_special_tokens=False)[0]
    finally:
        g.tokenizer.chat_template = None
    assert CHATML_TEMPLATE.startswith("{% for message in messages %}")


# ------------------------------------------------------------------------------------------------ real model
PROMPTS = ["What is the capital of France?",
           "Write one question answered by this passage. Output only the question.\n\nPassage: Aspirin reduces the "
           "risk of heart attack in adults over 50 by inhibiting platelet aggregation.",
           "Give three symptoms of influenza."]


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate():
    from bmretriever_jax.convert import hub

    jax.config.update("jax_default_matmul_precision", "highest")
    g = Generator.load("smollm2-135m", dtype="float32", batch_size=4, quiet=True)
    assert g.tokenizer.chat_template, "the SmolLM2 GGUF carries its chat template"
    gguf = hub.gguf_path("smollm2-135m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                            dtype=torch.float32).eval()
    tok = g.tokenizer
    prompts = [tok(g.chat_prompt([{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
               for p in PROMPTS]
    n_new, eos = 40, tok.eos_token_id
    ours = g.generate_ids(prompts, max_new_tokens=n_new, eos_ids=[eos])
    T = max(map(len, prompts))
    ids = np.full((len(prompts), T), tok.pad_token_id)
    mask = np.zeros((len(prompts), T), np.int64)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n_new,
                           do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)[:, T:].tolist()
    for o, r in zip(ours, out):
        r = r[:r.index(eos)] if eos in r else r
        assert o == r, (tok.decode(o), tok.decode(r))
    assert "Paris" in tok.decode(ours[0])


@pytest.mark.slow
def test_smollm2_bf16_sampling_reproducible():
    g = Generator.load("smollm2-135m", dtype="bfloat16", batch_size=4, quiet=True)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    a = g.chat(msgs, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=3)
    assert a == g.chat(msgs, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=3)
    assert all(t.strip() for t in a)
