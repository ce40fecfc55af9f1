"""InfoNCE: plain vs numpy reference, sharded vs plain, gradient cache vs full-batch gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bmretriever_jax.training.losses import grad_cache, info_nce, make_loss, sharded_info_nce

MESHES = {
    "data8": ((8,), ("data",), "data"),
    "data4_fsdp2": ((4, 2), ("data", "fsdp"), ("data", "fsdp")),
}


def make_mesh(name):
    shape, names, axis = MESHES[name]
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    return mesh, axis


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_trees_close(got, want, tol=1e-5):
    paths_got = jax.tree_util.tree_leaves_with_path(got)
    paths_want = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in paths_got] == [p for p, _ in paths_want]
    for (path, a), (_, b) in zip(paths_got, paths_want):
        assert np.all(np.isfinite(np.asarray(a))), jax.tree_util.keystr(path)
        err = rel_err(a, b)
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.3g} > {tol}"


# --------------------------------------------------------------------------------------------------
# Tiny encoder: token embeddings + MLP + masked mean pooling (an attention layer would only add compile time:
# the losses see nothing but the [n, d] vectors and the parameter pytree).
# --------------------------------------------------------------------------------------------------
VOCAB, DIM, HID, OUT = 32, 16, 32, 8


# Test data comes from numpy: eager jax.random ops would each compile, which dominates this file's time.
def normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def init_encoder(seed):
    rng = np.random.default_rng(seed)
    return {
        "embed": normal(rng, (VOCAB, DIM)),
        "mlp": {"kernel": normal(rng, (DIM, HID), 0.3), "bias": normal(rng, (HID,), 0.1)},
        "out": {"kernel": normal(rng, (HID, OUT), 0.3)},
    }


def encode(params, batch):
    """batch: input_ids / attention_mask [n, T] -> [n, OUT]."""
    mask = batch["attention_mask"].astype(jnp.float32)
    h = jnp.tanh(params["embed"][batch["input_ids"]] @ params["mlp"]["kernel"] + params["mlp"]["bias"])
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled @ params["out"]["kernel"]


def make_batch(seed, n, t):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=n)
    mask = (np.arange(t)[None, :] >= t - lengths[:, None]).astype(np.int32)  # left padding
    return {"input_ids": jnp.asarray(rng.integers(0, VOCAB, size=(n, t)), jnp.int32),
            "attention_mask": jnp.asarray(mask)}


def full_batch_loss(params, q_batch, p_batch, loss_fn, *extra):
    q = encode(params, q_batch)
    p = encode(params, p_batch)
    return loss_fn(q, p.reshape(q.shape[0], -1, q.shape[1]), *extra)


# --------------------------------------------------------------------------------------------------
# info_nce vs numpy.
# --------------------------------------------------------------------------------------------------
def numpy_info_nce(q, p, logit_scale, similarity):
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    b, g, d = p.shape
    flat = p.reshape(b * g, d)
    if similarity == "cos":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    losses, correct, pos, hard = [], [], [], []
    for i in range(b):
        sims = np.array([q[i] @ flat[j] for j in range(b * g)])
        logits = sims * logit_scale
        log_softmax = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        losses.append(-log_softmax[i * g])
        correct.append(float(np.argmax(logits) == i * g))
        pos.append(sims[i * g])
        hard.append(max(sims[j] for j in range(b * g) if j != i * g))
    return {"loss": np.mean(losses), "accuracy": np.mean(correct), "pos_sim": np.mean(pos),
            "hard_neg_sim": np.mean(hard)}


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("group", [1, 3])
def test_info_nce_matches_numpy(similarity, group):
    rng = np.random.default_rng(0)
    b, d = 6, 8
    q = normal(rng, (b, d))
    p = q[:, None, :] + normal(rng, (b, group, d), 0.8)  # positives correlate with queries
    temperature = 0.05 if similarity == "cos" else 2.0
    loss, metrics = jax.jit(functools.partial(info_nce, temperature=temperature, similarity=similarity))(q, p)
    want = numpy_info_nce(q, p, 1.0 / temperature, similarity)
    assert abs(float(loss) - want["loss"]) <= 1e-6 * max(1.0, abs(want["loss"]))
    assert 0.0 < want["accuracy"] < 1.0 or group == 1  # the metric is exercised, not trivially 0 or 1
    for k, v in want.items():
        assert abs(float(metrics[k]) - v) <= 1e-6 * max(1.0, abs(v)), (k, float(metrics[k]), v)

    # scale=log(1/T) must give the same loss as temperature=T.
    log_scale = jnp.log(1.0 / temperature)
    loss_s, _ = jax.jit(functools.partial(info_nce, similarity=similarity))(q, p, scale=log_scale)
    assert abs(float(loss_s) - want["loss"]) <= 1e-6 * max(1.0, abs(want["loss"]))


def test_info_nce_rejects_bad_input():
    q, p = jnp.ones((4, 8)), jnp.ones((4, 2, 8))
    with pytest.raises(ValueError, match="similarity"):
        info_nce(q, p, similarity="l2")
    with pytest.raises(ValueError, match=r"q \[B, d\]"):
        info_nce(q, p[:3])


# --------------------------------------------------------------------------------------------------
# sharded_info_nce vs info_nce.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_sharded_matches_plain(mesh_name, similarity):
    mesh, axis = make_mesh(mesh_name)
    b, g, d = 16, 3, 8
    rng = np.random.default_rng(1)
    q = normal(rng, (b, d))
    p = q[:, None, :] + normal(rng, (b, g, d))
    log_scale = jnp.float32(np.log(1 / 0.1)) if similarity == "cos" else jnp.float32(-1.0)
    batch = NamedSharding(mesh, P(axis))
    qs, ps = jax.device_put(q, batch), jax.device_put(p, batch)
    assert len(qs.sharding.device_set) == 8 and qs.addressable_shards[0].data.shape[0] == b // 8

    def plain(q, p, s):
        return info_nce(q, p, similarity=similarity, scale=s)

    def sharded(q, p, s):
        return sharded_info_nce(q, p, mesh, axis=axis, similarity=similarity, scale=s)

    grad_args = (0, 1, 2)
    (loss_p, met_p), g_p = jax.jit(jax.value_and_grad(plain, grad_args, has_aux=True))(q, p, log_scale)
    (loss_s, met_s), g_s = jax.jit(jax.value_and_grad(sharded, grad_args, has_aux=True))(qs, ps, log_scale)
    assert rel_err(loss_s, loss_p) <= 1e-6
    assert_trees_close(met_s, met_p, 1e-6)
    assert_trees_close(g_s, g_p, 1e-5)
    # Passage gradients must be non-trivial, or the check above would not test the all_gather transpose.
    assert float(jnp.abs(g_p[1]).min()) > 0

    # Temperature path (no scale operand) too.
    loss_t, _ = jax.jit(functools.partial(sharded_info_nce, mesh=mesh, axis=axis, temperature=0.1,
                                          similarity=similarity))(qs, ps)
    assert rel_err(loss_t, info_nce(q, p, temperature=0.1, similarity=similarity)[0]) <= 1e-6


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_encoder_grads_match_plain(mesh_name):
    mesh, axis = make_mesh(mesh_name)
    b, g = 16, 2
    params = init_encoder(2)
    q_batch, p_batch = make_batch(20, b, 6), make_batch(21, b * g, 10)
    batch = NamedSharding(mesh, P(axis))
    q_sh, p_sh = jax.device_put((q_batch, p_batch), batch)
    plain = make_loss(temperature=0.05)
    sharded = make_loss(temperature=0.05, mesh=mesh, axis=axis)

    vg = lambda fn: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda prm, qb, pb: full_batch_loss(prm, qb, pb, fn), has_aux=True))
    (loss_p, _), g_p = vg(plain)(params, q_batch, p_batch)
    (loss_s, _), g_s = vg(sharded)(params, q_sh, p_sh)
    assert rel_err(loss_s, loss_p) <= 1e-6
    assert_trees_close(g_s, g_p, 1e-5)


def test_sharded_rejects_indivisible_batch():
    mesh, axis = make_mesh("data8")
    with pytest.raises(ValueError, match="not divisible"):
        sharded_info_nce(jnp.ones((12, 4)), jnp.ones((12, 2, 4)), mesh, axis=axis)
    with pytest.raises(ValueError, match="lack"):
        sharded_info_nce(jnp.ones((16, 4)), jnp.ones((16, 2, 4)), mesh, axis="model")


# --------------------------------------------------------------------------------------------------
# grad_cache vs full-batch jax.grad.
# --------------------------------------------------------------------------------------------------
def _reference(params, q_batch, p_batch, loss_fn, *extra):
    argnums = (0,) if not extra else (0, 3)
    fn = lambda prm, qb, pb, *e: full_batch_loss(prm, qb, pb, loss_fn, *e)  # noqa: E731
    (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums, has_aux=True))(
        params, q_batch, p_batch, *extra)
    return loss, metrics, grads[0] if not extra else grads


@functools.lru_cache(maxsize=None)
def _case(b, g):
    """Encoder params, q / p batches and the full-batch (loss, metrics, grads), shared by parametrizations."""
    params = init_encoder(b * 10 + g)
    q_batch, p_batch = make_batch(b * 10 + g + 1, b, 6), make_batch(b * 10 + g + 2, b * g, 10)
    return params, q_batch, p_batch, _reference(params, q_batch, p_batch, GC_LOSS)


GC_LOSS = functools.partial(info_nce, temperature=0.05)


@pytest.mark.parametrize("b,g,chunk_size", [(8, 2, 1), (8, 2, 2), (8, 2, 4), (8, 2, 8), (5, 3, 2)])
def test_grad_cache_matches_full_batch(b, g, chunk_size):
    """Chunk sizes 1, 2, 4, whole batch; (5, 3, 2) leaves ragged last chunks for q (5) and p (15)."""
    params, q_batch, p_batch, (loss_r, met_r, grads_r) = _case(b, g)
    loss_fn = GC_LOSS

    run = jax.jit(functools.partial(grad_cache, encode, chunk_size=chunk_size, loss_fn=loss_fn))
    loss, metrics, grads = run(params, q_batch, p_batch)
    assert rel_err(loss, loss_r) <= 1e-6
    assert_trees_close(metrics, met_r, 1e-6)
    assert_trees_close(grads, grads_r, 1e-5)


def test_grad_cache_learnable_scale():
    params = init_encoder(4)
    q_batch, p_batch = make_batch(40, 6, 6), make_batch(41, 12, 10)
    loss_fn = lambda q, p, s: info_nce(q, p, scale=s)  # noqa: E731
    log_scale = jnp.float32(2.5)
    loss_r, _, (g_params_r, g_scale_r) = _reference(params, q_batch, p_batch, loss_fn, log_scale)
    run = jax.jit(functools.partial(grad_cache, encode, chunk_size=4, loss_fn=loss_fn))
    loss, _, (g_params, g_scale) = run(params, q_batch, p_batch, loss_params=log_scale)
    assert rel_err(loss, loss_r) <= 1e-6
    assert_trees_close(g_params, g_params_r, 1e-5)
    assert rel_err(g_scale, g_scale_r) <= 1e-5 and float(jnp.abs(g_scale_r)) > 0


@pytest.mark.parametrize("mesh_name,chunk_size", [("data8", 1), ("data4_fsdp2", 2), ("data4_fsdp2", 3)])
def test_grad_cache_sharded(mesh_name, chunk_size):
    """Batch sharded over the data axes, sharded loss; chunk_size counts rows per device (local q: 2, p: 4;
    chunk 3 clips to 2 for q and pads p's local 4 rows to 6)."""
    mesh, axis = make_mesh(mesh_name)
    params, q_batch, p_batch, (loss_r, met_r, grads_r) = _case(16, 2)

    q_sh, p_sh = jax.device_put((q_batch, p_batch), NamedSharding(mesh, P(axis)))
    loss_fn = make_loss(temperature=0.05, mesh=mesh, axis=axis)
    run = jax.jit(functools.partial(grad_cache, encode, chunk_size=chunk_size, loss_fn=loss_fn, mesh=mesh,
                                    axis=axis))
    loss, metrics, grads = run(params, q_sh, p_sh)
    assert rel_err(loss, loss_r) <= 1e-6
    assert_trees_close(metrics, met_r, 1e-6)
    assert_trees_close(grads, grads_r, 1e-5)


def test_grad_cache_rejects_bad_arguments():
    params = init_encoder(6)
    q_batch, p_batch = make_batch(7, 4, 6), make_batch(8, 8, 6)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="chunk_size"):
            grad_cache(encode, params, q_batch, p_batch, chunk_size=bad, loss_fn=info_nce)
    with pytest.raises(ValueError, match="not a multiple"):
        grad_cache(encode, params, q_batch, make_batch(9, 6, 6), chunk_size=2, loss_fn=info_nce)
    mesh, axis = make_mesh("data8")
    with pytest.raises(ValueError, match="not divisible"):
        grad_cache(encode, params, q_batch, p_batch, chunk_size=1, loss_fn=info_nce, mesh=mesh, axis=axis)


def test_grad_cache_memory_shrinks_with_chunk_size():
    """Compiled temp memory: activations of one chunk, not of the whole batch."""
    def wide_encode(params, batch):  # big [n, T, H] activations, small params
        h = jnp.tanh(params["embed"][batch["input_ids"]] @ params["up"])
        return h.mean(1) @ params["down"]

    rng = np.random.default_rng(10)
    params = {"embed": normal(rng, (VOCAB, 16)), "up": normal(rng, (16, 512), 0.1),
              "down": normal(rng, (512, 8), 0.1)}
    b, g, t = 32, 2, 64
    q_batch, p_batch = make_batch(11, b, t), make_batch(12, b * g, t)

    def temp_bytes(chunk_size):
        fn = jax.jit(functools.partial(grad_cache, wide_encode, chunk_size=chunk_size, loss_fn=info_nce))
        stats = fn.lower(params, q_batch, p_batch).compile().memory_analysis()
        assert stats is not None, "XLA:CPU gives a memory analysis"
        return stats.temp_size_in_bytes

    one_chunk_activations = b * g * t * 512 * 4  # a single [B*G, T, 512] float32 tensor
    small, whole = temp_bytes(2), temp_bytes(b * g)
    assert whole >= one_chunk_activations  # the whole-batch run holds full activations ...
    assert small * 8 < whole  # ... chunks of 2 need far less
