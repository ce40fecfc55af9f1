"""mp_einsum: bf16 matmuls with f32 accumulation in the forward AND the backward pass."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmretriever_jax.models.ops import mp_einsum

SPECS = [("...i,io->...o", (3, 5, 64), (64, 48)),   # linear
         ("bqd,bsd->bqs", (4, 16, 32), (4, 12, 32)),  # attention scores
         ("bqs,bsd->bqd", (4, 16, 12), (4, 12, 32))]  # attention output


def _loss(fn):
    def f(a, b, w):
        return jnp.sum(fn(a, b) * w)
    return f


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_grads_match_f32_within_bf16_rounding(spec, sa, sb):
    ka, kb, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    a, b = jax.random.normal(ka, sa), jax.random.normal(kb, sb)
    w = jax.random.normal(kw, jnp.einsum(spec, a, b).shape)
    ref = jax.grad(_loss(lambda x, y: jnp.einsum(spec, x, y, precision="highest")), argnums=(0, 1))(a, b, w)
    got = jax.grad(_loss(lambda x, y: mp_einsum(spec, x, y, jnp.bfloat16)), argnums=(0, 1))(a, b, w)
    for r, g in zip(ref, got):
        assert g.dtype == jnp.float32 and g.shape == r.shape
        # inputs and cotangent rounded to bf16 (8-bit mantissa), sums in f32: normwise error ~ 2^-8
        rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
        assert rel < 1e-2, rel
    # float32 compute is exactly the plain einsum
    got32 = jax.grad(_loss(lambda x, y: mp_einsum(spec, x, y, jnp.float32)), argnums=(0, 1))(a, b, w)
    plain = jax.grad(_loss(lambda x, y: jnp.einsum(spec, x, y)), argnums=(0, 1))(a, b, w)
    for p, g in zip(plain, got32):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(g))


def test_backward_matmuls_take_bf16_operands():
    """The point of mp_einsum: no float32 dot in the backward pass (plain autodiff has two)."""
    a, b = jnp.ones((8, 64)), jnp.ones((64, 32))

    def dots(fn):
        hlo = jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y) ** 2), argnums=(0, 1))).lower(a, b).as_text()
        return re.findall(r"stablehlo.dot_general[^\n]*", hlo)

    plain = dots(lambda x, y: jnp.einsum("...i,io->...o", x.astype(jnp.bfloat16), y.astype(jnp.bfloat16),
                                         preferred_element_type=jnp.float32))
    ours = dots(lambda x, y: mp_einsum("...i,io->...o", x, y, jnp.bfloat16))
    operand_types = lambda line: re.search(r"\(tensor<[^)]*\)\s*->", line).group(0)  # noqa: E731
    assert len(ours) == 3  # forward, d/da, d/db
    assert all("f32>, tensor" not in operand_types(d) and "xf32>," not in operand_types(d) for d in ours), ours
    assert any("xf32>," in operand_types(d) for d in plain), plain  # the slow path this replaces


# ----------------------------------------------------------------------------------------------------
# lora_linear: the hand-written backward of base + LoRA adapter
# ----------------------------------------------------------------------------------------------------
def _lora_inputs(seed=0, lead=(3, 5), n_in=24, n_out=20, r=4):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], lead + (n_in,))
    xa = jnp.where(jax.random.bernoulli(k[1], 0.7, x.shape), x / 0.7, 0.0)  # dropout-like second input
    w = jax.random.normal(k[2], (n_in, n_out)) * 0.2
    a = jax.random.normal(k[3], (n_in, r)) * 0.2
    b = jax.random.normal(k[4], (r, n_out)) * 0.2
    cot = jax.random.normal(k[5], lead + (n_out,))
    return x, xa, w, a, b, cot


def _plain_lora(x, xa, w, a, b):
    hp = "highest"
    return jnp.einsum("...i,io->...o", x, w, precision=hp) + jnp.einsum(
        "...r,ro->...o", jnp.einsum("...i,ir->...r", x if xa is None else xa, a, precision=hp), b, precision=hp)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_lora_linear_fp32_equals_autodiff(with_dropout):
    from bmretriever_jax.models.ops import lora_linear

    x, xa, w, a, b, cot = _lora_inputs()
    xa = xa if with_dropout else None
    ours = lambda x, w, a, b: lora_linear(x, xa, w, a, b, jnp.float32)  # noqa: E731
    ref = lambda x, w, a, b: _plain_lora(x, xa, w, a, b)  # noqa: E731
    np.testing.assert_allclose(ours(x, w, a, b), ref(x, w, a, b), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda *t: jnp.sum(ours(*t) * cot), argnums=(0, 1, 2, 3))(x, w, a, b)
    g_ref = jax.grad(lambda *t: jnp.sum(ref(*t) * cot), argnums=(0, 1, 2, 3))(x, w, a, b)
    for name, go, gr in zip(("x", "w", "a", "b"), g_ours, g_ref):
        assert go.shape == gr.shape and go.dtype == gr.dtype, name
        np.testing.assert_allclose(np.asarray(go), np.asarray(gr), rtol=1e-5, atol=1e-5, err_msg=name)
    if with_dropout:  # the gradient through the dropped input reaches x via the mask
        g_x_drop = jax.grad(lambda x: jnp.sum(lora_linear(x, jnp.where(xa != 0, x / 0.7, 0.0), w, a, b,
                                                          jnp.float32) * cot))(x)
        g_x_ref = jax.grad(lambda x: jnp.sum(_plain_lora(x, jnp.where(xa != 0, x / 0.7, 0.0), w, a, b) * cot))(x)
        np.testing.assert_allclose(np.asarray(g_x_drop), np.asarray(g_x_ref), rtol=1e-5, atol=1e-5)


def test_lora_linear_bf16_within_rounding_and_bf16_backward():
    from bmretriever_jax.models.ops import lora_linear

    x, _, w, a, b, cot = _lora_inputs(seed=1, n_in=64, n_out=48, r=8)
    f = lambda x, w, a, b: jnp.sum(lora_linear(x, None, w, a, b, jnp.bfloat16) * cot)  # noqa: E731
    fr = lambda x, w, a, b: jnp.sum(_plain_lora(x, None, w, a, b) * cot)  # noqa: E731
    for go, gr in zip(jax.grad(f, argnums=(0, 1, 2, 3))(x, w, a, b), jax.grad(fr, argnums=(0, 1, 2, 3))(x, w, a, b)):
        assert go.dtype == jnp.float32
        assert float(jnp.linalg.norm(go - gr) / jnp.linalg.norm(gr)) < 2e-2
    # every matmul of forward and backward takes bf16 operands (f32 accumulation)
    hlo = jax.jit(jax.grad(f, argnums=(0, 2, 3))).lower(x, w, a, b).as_text()
    dots = re.findall(r"stablehlo.dot_general[^\n]*", hlo)
    operands = [re.search(r"\(tensor<[^)]*\)\s*->", d).group(0) for d in dots]
    assert len(dots) >= 6 and all("xf32>," not in o and "f32>, tensor" not in o for o in operands), operands


def test_lora_linear_frozen_base_drops_the_weight_gradient():
    """With the base frozen (LoRA training), the compiled backward has no [in, out] weight-gradient matmul;
    with the base trained (full fine-tuning) it has."""
    from bmretriever_jax.models.ops import lora_linear

    x, _, w, a, b, cot = _lora_inputs(seed=2, lead=(4, 8), n_in=40, n_out=56, r=4)
    loss = lambda w, a, b, x: jnp.sum(lora_linear(x, None, w, a, b, jnp.float32) * cot)  # noqa: E731
    weight_grad_dot = re.compile(r"f32\[40,56\]\{[0-9,]*\} dot\(")
    frozen = jax.jit(jax.grad(loss, argnums=(1, 2))).lower(w, a, b, x).compile().as_text()
    trained = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(w, a, b, x).compile().as_text()
    assert not weight_grad_dot.search(frozen)
    assert weight_grad_dot.search(trained)
