"""The flax.linen modules: their parameter tree is the saved layout, pure init / apply, LoRA inside the
linears (hand-written backward), remat and unrolled layers change nothing."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmretriever_jax.models import lora

from bmretriever_jax.util import treeutil
from bmretriever_jax.convert import presets
from bmretriever_jax.convert.hf import config_from_hf
from bmretriever_jax.models import Decoder, Encoder, forward, init_params, param_shapes
from bmretriever_jax.models.decoder import unstack_layers
from hf_tiny import padded_batch, tiny_hf_config

FAMILIES = ["gpt_neox", "llama", "mistral", "gemma", "gemma3", "qwen3"]


def _cfg(family):
    return config_from_hf(tiny_hf_config(family).to_dict())


def saved_layout(cfg):
    """The parameter paths and shapes runs, exports and Orbax checkpoints were written with before the modules
    (the pre-Flax `param_shapes` table, written out): the modules must produce exactly these."""
    L, D, F, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = {"embed/embedding": (cfg.vocab_size, D)}

    def linear(path, n_in, n_out, bias):
        out[f"layers/{path}/kernel"] = (L, n_in, n_out)
        if bias:
            out[f"layers/{path}/bias"] = (L, n_out)

    def norm(path, dim, lead=(L,)):
        out[f"{path}/scale"] = lead + (dim,)
        if cfg.norm == "layer":
            out[f"{path}/bias"] = lead + (dim,)

    for name, n_in, n_out in (("q", D, q), ("k", D, kv), ("v", D, kv), ("o", q, D)):
        linear(f"attn/{name}", n_in, n_out, cfg.attn_bias)
    for name, n_in, n_out in (("up", D, F), ("down", F, D)) + ((("gate", D, F),) if cfg.gated_mlp else ()):
        linear(f"mlp/{name}", n_in, n_out, cfg.mlp_bias)
    norm("layers/attn_norm", D)
    norm("layers/mlp_norm", D)
    if cfg.qk_norm:
        out["layers/q_norm/scale"] = (L, hd)
        out["layers/k_norm/scale"] = (L, hd)
    if cfg.sandwich_norm:
        norm("layers/post_attn_norm", D)
        norm("layers/post_mlp_norm", D)
    norm("final_norm", D, ())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_init_tree_is_the_saved_layout(family):
    cfg = _cfg(family)
    ids = jnp.zeros((1, 1), jnp.int32)
    for module in (Decoder(cfg), Encoder(cfg)):
        tree = jax.eval_shape(lambda k: module.init(k, ids, ids)["params"], jax.random.PRNGKey(0))
        assert type(tree) is dict  # a plain nested dict, no FrozenDict
        got = {p: tuple(x.shape) for p, x in treeutil.flatten(tree).items()}
        assert got == saved_layout(cfg)


def test_num_params_counts_the_initialised_tree():
    # ModelConfig.num_params counts from the switches (models/config.py imports nothing from the modules)
    cfgs = [_cfg(f) for f in FAMILIES] + [presets.preset(n) for n in presets.names()]
    cfgs += [dataclasses.replace(_cfg("llama"), attn_bias=True, mlp_bias=True, norm="layer", qk_norm=True,
                                 sandwich_norm=True, gated_mlp=False)]
    for cfg in cfgs:
        shapes = treeutil.flatten(param_shapes(cfg))
        assert cfg.num_params() == sum(math.prod(s) for s in shapes.values()), cfg.family


@pytest.fixture(scope="module")
def gemma3():
    cfg = _cfg("gemma3")  # sliding + global layers, two rope thetas, q/k norms, sandwich norms
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids, mask = padded_batch(seed=2, batch=3, length=9)
    return cfg, params, jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32)


def test_encoder_apply_is_pooled_normalised_decoder(gemma3):
    cfg, params, ids, mask = gemma3
    vecs = jax.jit(lambda p: Encoder(cfg).apply({"params": p}, ids, mask))(params)
    hidden = jax.jit(lambda p: Decoder(cfg).apply({"params": p}, ids, mask))(params)
    last = np.asarray(hidden[:, -1])
    np.testing.assert_allclose(np.asarray(vecs), last / np.linalg.norm(last, axis=-1, keepdims=True), atol=1e-6)
    mean = jax.jit(lambda p: Encoder(cfg, pooling="mean", normalize=False).apply({"params": p}, ids, mask))(params)
    m = np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.asarray(mean), (np.asarray(hidden) * m).sum(1) / m.sum(1), atol=1e-5)


def test_remat_and_unrolled_layers_change_nothing(gemma3):
    cfg, params, ids, mask = gemma3

    def loss(p, remat):
        return jnp.sum(forward(cfg, p, ids, mask, dtype=jnp.float32, remat=remat) ** 2)

    ref, g_ref = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
    for remat in (True, "dots_with_no_batch_dims_saveable"):
        val, g = jax.jit(jax.value_and_grad(lambda p, r=remat: loss(p, r)))(params)
        np.testing.assert_allclose(float(val), float(ref), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    flat = unstack_layers(params)
    assert "layers" not in flat and f"layers_{cfg.num_layers - 1}" in flat
    unrolled = jax.jit(lambda p: Decoder(cfg, scan_layers=False).apply({"params": p}, ids, mask))(flat)
    scanned = jax.jit(lambda p: Decoder(cfg).apply({"params": p}, ids, mask))(params)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), atol=1e-5)


def test_lora_inside_the_linears_equals_merged_weights_and_their_gradients(gemma3):
    """Adapters ride in the params (lora.combine) and run through the custom-vjp linear; the forward and the
    adapters' gradients equal those of the merged kernels (plain autodiff through lora.merge)."""
    cfg, _, ids, mask = gemma3
    rng = np.random.default_rng(0)
    # weights far from init's 0.02 scale, so that no gradient is all cancellation (k behind a k-norm is)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, jnp.float32), gemma3[1])
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = lora.init(params, lcfg, jax.random.PRNGKey(1))
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32), adapters)

    def loss(ad, how):
        p = lora.combine(params, ad, lcfg) if how == "inside" else lora.merge(params, ad, lcfg)
        return jnp.sum(forward(cfg, p, ids, mask, dtype=jnp.float32)[:, -1] ** 2)

    v_in, g_in = jax.jit(jax.value_and_grad(lambda a: loss(a, "inside")))(adapters)
    v_mg, g_mg = jax.jit(jax.value_and_grad(lambda a: loss(a, "merged")))(adapters)
    np.testing.assert_allclose(float(v_in), float(v_mg), rtol=1e-5)
    for path, g in treeutil.flatten(g_in).items():
        want = np.asarray(treeutil.flatten(g_mg)[path])
        # fp32 sums over tokens in a different order: errors relative to the leaf's scale, not per element
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=path)
    # the hand-written backward is what runs (a custom_vjp per adapted linear inside the scanned block)
    assert "custom_vjp_call" in str(jax.make_jaxpr(jax.grad(lambda a: loss(a, "inside")))(adapters))


def test_lora_dropout_uses_the_dropout_rng(gemma3):
    cfg, params, ids, mask = gemma3
    lcfg = lora.LoraConfig(rank=4)
    adapters = lora.init(params, lcfg, jax.random.PRNGKey(1))
    adapters = jax.tree.map(lambda x: jnp.full(x.shape, 0.05, x.dtype), adapters)
    p = lora.combine(params, adapters, lcfg)
    run = jax.jit(lambda k: forward(cfg, p, ids, mask, dtype=jnp.float32, dropout=0.5, dropout_key=k))
    a, b, c = run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
