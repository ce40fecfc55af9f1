"""LoRA adapters: init layout, combine, merge / unmerge, target selection."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmretriever_jax.models import lora

from bmretriever_jax.util import treeutil

L, D, HD, F, V, R = 2, 8, 12, 16, 10, 4


def make_params(seed=0, dtype=jnp.float32):
    """A model-shaped tree (see notes/INTERFACES.md) with stacked layers [L, ...]."""
    shapes = {
        "embed/embedding": (V, D),
        "layers/attn_norm/scale": (L, D),
        "layers/attn/q/kernel": (L, D, HD), "layers/attn/q/bias": (L, HD),
        "layers/attn/k/kernel": (L, D, HD), "layers/attn/v/kernel": (L, D, HD),
        "layers/attn/o/kernel": (L, HD, D),
        "layers/mlp_norm/scale": (L, D),
        "layers/mlp/gate/kernel": (L, D, F), "layers/mlp/up/kernel": (L, D, F),
        "layers/mlp/down/kernel": (L, F, D),
        "final_norm/scale": (D,),
    }
    # numpy, not jax.random: every eager jax op on a new shape compiles, which dominates this file's time.
    rng = np.random.default_rng(seed)
    return treeutil.unflatten({p: jnp.asarray(rng.normal(size=s), dtype) for p, s in shapes.items()})


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def randomize_b(adapters, seed=1):
    """Adapters with non-zero B, so merges do something."""
    rng = np.random.default_rng(seed)
    return treeutil.unflatten({p: (jnp.asarray(rng.normal(size=v.shape), v.dtype) if p.endswith("lora_b") else v)
                               for p, v in treeutil.flatten(adapters).items()})


# The train loop runs these under jit; so do the tests (one compile instead of one per eager op). Every
# test inits with CFG (alpha only matters to combine / merge), so init compiles once for this file.
CFG = lora.LoraConfig(rank=R)
init = jax.jit(lora.init, static_argnums=1)
merge = jax.jit(lora.merge, static_argnums=2)
unmerge = jax.jit(lora.unmerge, static_argnums=2)


def dense(layer, x):
    """The model's linear: x @ kernel + (x @ lora_a) @ lora_b, per stacked layer: x [L, B, in] -> [L, B, out]."""
    y = jnp.einsum("lbi,lio->lbo", x, layer["kernel"])
    if "lora_a" in layer:
        y = y + jnp.einsum("lbr,lro->lbo", jnp.einsum("lbi,lir->lbr", x, layer["lora_a"]), layer["lora_b"])
    return y


def test_init_returns_only_adapter_leaves_with_stacked_shapes():
    cfg = CFG
    params = make_params()
    adapters = init(params, cfg, jax.random.key(0))
    flat = treeutil.flatten(adapters)
    modules = ["layers/attn/q", "layers/attn/k", "layers/attn/v", "layers/attn/o",
               "layers/mlp/gate", "layers/mlp/up", "layers/mlp/down"]
    assert sorted(flat) == sorted(f"{m}/{n}" for m in modules for n in ("lora_a", "lora_b"))
    kernels = treeutil.flatten(params)
    for m in modules:
        _, d_in, d_out = kernels[f"{m}/kernel"].shape
        a, b = flat[f"{m}/lora_a"], flat[f"{m}/lora_b"]
        assert a.shape == (L, d_in, R) and b.shape == (L, R, d_out)
        assert a.dtype == b.dtype == jnp.float32
        assert np.all(np.asarray(b) == 0)
        bound = 1 / math.sqrt(d_in)
        assert np.all(np.abs(np.asarray(a)) <= bound) and np.std(np.asarray(a)) > bound / 4
    assert not np.allclose(flat["layers/attn/q/lora_a"], flat["layers/attn/k/lora_a"])
    assert lora.num_params(adapters) == sum(math.prod(v.shape) for v in flat.values())


def test_init_depends_only_on_key_and_path():
    params = make_params()
    full = init(params, CFG, jax.random.key(3))
    only_q = init(params, lora.LoraConfig(rank=R, targets=[r"layers/attn/q"]), jax.random.key(3))
    assert list(treeutil.flatten(only_q)) == ["layers/attn/q/lora_a", "layers/attn/q/lora_b"]
    np.testing.assert_array_equal(only_q["layers"]["attn"]["q"]["lora_a"], full["layers"]["attn"]["q"]["lora_a"])
    other = init(params, CFG, jax.random.key(4))
    assert not np.allclose(other["layers"]["attn"]["q"]["lora_a"], full["layers"]["attn"]["q"]["lora_a"])


def test_init_under_eval_shape():
    params = jax.eval_shape(make_params)
    shapes = jax.eval_shape(lambda: lora.init(params, CFG, jax.random.key(0)))
    assert shapes["layers"]["mlp"]["down"]["lora_a"].shape == (L, F, R)


def test_scale():
    assert lora.scale(lora.LoraConfig(rank=16, alpha=32)) == 2.0
    assert lora.scale(lora.LoraConfig(rank=16, alpha=32, rslora=True)) == 8.0


def test_zero_init_leaves_outputs_unchanged():
    cfg = CFG
    params = make_params()
    combined = lora.combine(params, init(params, cfg, jax.random.key(0)), cfg)
    x = normal((L, 3, D), 5)
    for name in ("q", "k", "v"):
        layer = combined["layers"]["attn"][name]
        assert set(layer) >= {"kernel", "lora_a", "lora_b"}
        np.testing.assert_array_equal(dense(layer, x), dense(params["layers"]["attn"][name], x))


def test_combine_scales_b_and_matches_merged_kernel():
    cfg = dataclasses.replace(CFG, alpha=12.0)  # scale 3
    params = make_params()
    adapters = randomize_b(init(params, CFG, jax.random.key(0)))
    combined = jax.jit(lora.combine, static_argnums=2)(params, adapters, cfg)
    q_ad = adapters["layers"]["attn"]["q"]
    np.testing.assert_allclose(combined["layers"]["attn"]["q"]["lora_b"], 3.0 * q_ad["lora_b"], rtol=1e-6)
    np.testing.assert_array_equal(combined["layers"]["attn"]["q"]["bias"], params["layers"]["attn"]["q"]["bias"])
    np.testing.assert_array_equal(combined["embed"]["embedding"], params["embed"]["embedding"])
    merged = merge(params, adapters, cfg)
    x = normal((L, 3, HD), 6)
    layer = combined["layers"]["attn"]["o"]
    np.testing.assert_allclose(dense(layer, x), dense(merged["layers"]["attn"]["o"], x), rtol=1e-5, atol=1e-5)


def test_grads_through_combine_equal_grads_through_merge():
    # combine folds the scale into B inside the differentiated function, so d/dB must match the merged form.
    cfg = dataclasses.replace(CFG, alpha=8.0)
    params = make_params()
    adapters = randomize_b(init(params, CFG, jax.random.key(0)))
    x = normal((L, 3, D), 7)

    def loss_combined(ad):
        return jnp.sum(dense(lora.combine(params, ad, cfg)["layers"]["mlp"]["up"], x) ** 2)

    def loss_merged(ad):
        return jnp.sum(dense(merge(params, ad, cfg)["layers"]["mlp"]["up"], x) ** 2)

    g1, g2 = jax.grad(loss_combined)(adapters), jax.grad(loss_merged)(adapters)
    for path, v in treeutil.flatten(g1).items():
        np.testing.assert_allclose(v, treeutil.flatten(g2)[path], rtol=1e-4, atol=1e-4, err_msg=path)
    assert np.abs(np.asarray(g1["layers"]["mlp"]["up"]["lora_b"])).max() > 0


def test_merge_equals_explicit_formula():
    cfg = dataclasses.replace(CFG, alpha=6.0)  # scale 1.5
    params = make_params()
    adapters = randomize_b(init(params, CFG, jax.random.key(0)))
    merged = merge(params, adapters, cfg)
    for name in ("gate", "up", "down"):
        w = np.asarray(params["layers"]["mlp"][name]["kernel"], np.float64)
        a = np.asarray(adapters["layers"]["mlp"][name]["lora_a"], np.float64)
        b = np.asarray(adapters["layers"]["mlp"][name]["lora_b"], np.float64)
        expected = np.stack([w[i] + 1.5 * a[i] @ b[i] for i in range(L)])
        np.testing.assert_allclose(merged["layers"]["mlp"][name]["kernel"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["layers"]["attn_norm"]["scale"], params["layers"]["attn_norm"]["scale"])
    assert set(treeutil.flatten(merged)) == set(treeutil.flatten(params))


def test_merge_unmerge_round_trip():
    cfg = CFG
    params = make_params()
    adapters = randomize_b(init(params, CFG, jax.random.key(0)))
    flat = treeutil.flatten(params)
    for tree in (unmerge(merge(params, adapters, cfg), adapters, cfg),
                 merge(unmerge(params, adapters, cfg), adapters, cfg)):
        for path, v in treeutil.flatten(tree).items():
            np.testing.assert_allclose(v, flat[path], rtol=0, atol=1e-6, err_msg=path)


def test_merge_keeps_kernel_dtype():
    cfg = CFG
    adapters = randomize_b(init(make_params(), CFG, jax.random.key(0)))
    merged = merge(make_params(dtype=jnp.bfloat16), adapters, cfg)
    assert merged["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16


def test_target_matching_nothing_raises_with_available_paths():
    params = make_params()
    with pytest.raises(ValueError, match=r"'attn/q_proj'.*available paths include.*layers/attn/q/kernel"):
        lora.init(params, lora.LoraConfig(targets=[r"layers/(attn|mlp)/[^/]+/kernel", r"attn/q_proj"]),
                  jax.random.key(0))
    # A norm scale is not a linear kernel, so it is no target.
    with pytest.raises(ValueError, match="attn_norm"):
        init(params, lora.LoraConfig(targets=[r"layers/attn_norm/scale"]), jax.random.key(0))


def test_combine_rejects_adapters_that_do_not_fit():
    cfg = CFG
    params = make_params()
    adapters = init(params, cfg, jax.random.key(0))
    bad = treeutil.unflatten({**treeutil.flatten(adapters), "layers/attn/q/lora_b": jnp.zeros((L, R, HD + 1))})
    with pytest.raises(ValueError, match="layers/attn/q"):
        lora.combine(params, bad, cfg)
    with pytest.raises(ValueError, match="no kernel"):
        merge(params, {"nope": {"lora_a": jnp.zeros((D, R)), "lora_b": jnp.zeros((R, D))}}, cfg)


def test_treeutil_paths_and_regex_rules():
    # The path helpers every selector (LoRA targets, merge `stacked`, freezing) is built on.
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert treeutil.flatten(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert treeutil.unflatten(treeutil.flatten(tree)) == tree
    with pytest.raises(ValueError, match="runs through leaf 'a/b'"):
        treeutil.unflatten({"a/b": 1, "a/b/c": 2})
    with pytest.raises(ValueError, match="without '/'"):
        treeutil.flatten({"a/b": 1})
    # fullmatch, first rule wins, not_fn for the rest.
    out = treeutil.tree_map_with_regex(lambda x, v: x * v, tree, [(r"a/.*", 10), (r"a/b", 100)],
                                       not_fn=lambda x: -x)
    assert out == {"a": {"b": 10, "c": {"d": 20}}, "e": -3}
    assert treeutil.select(tree, [r"a/c/.*", r"e"]) == ["a/c/d", "e"]
    assert treeutil.select(tree, [r"c/d"]) == []
    assert treeutil.first_match("layers/x", [(r"emb.*", 0), (r"layers/.*", 1)], 5) == 1
    with pytest.raises(ValueError, match=r"'\[' is not a valid regex"):
        treeutil.check_patterns(["["], ["a"])
