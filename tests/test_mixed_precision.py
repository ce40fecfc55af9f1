"""mp_einsum: bf16 matmuls with f32 accumulation in the forward AND the backward pass."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmretriever_jax.models.decoder import mp_einsum

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
