"""topk_search against a numpy brute force: ties, k > N, iterators, memmaps, bf16, 8 fake devices."""
import jax
import numpy as np
import pytest

from bmretriever_jax.eval import search
from bmretriever_jax.eval.search import merge_topk, topk_search


def brute_force(q, c, k, similarity="dot"):
    """Reference: float64 scores, stable sort on -score (lower index first among ties), -inf/-1 padding."""
    q, c = q.astype(np.float64), c.astype(np.float64)
    if similarity == "cos":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    s = q @ c.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(s, order, axis=1)
    pad = k - order.shape[1]
    if pad > 0:
        order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, order


def tie_heavy(rng, n, d):
    # Small integers: every dot product is exact in float32 and bf16, and many are equal.
    return rng.integers(-2, 3, size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("block_size", [7, 64, 1000])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_exact_with_ties_single_device(block_size, k):
    rng = np.random.default_rng(k * 1000 + block_size)
    q, c = tie_heavy(rng, 13, 4), tie_heavy(rng, 301, 4)
    ref_s, ref_i = brute_force(q, c, k)
    s, i = topk_search(q, c, k, block_size=block_size, similarity="dot", mesh=None)
    full = np.sort(q.astype(np.float64) @ c.T.astype(np.float64), axis=1)[:, ::-1]
    assert (full[:, k - 1] == full[:, k]).any(), "some query should have a tie across the cutoff"
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


def test_k_larger_than_corpus_pads_with_minus_inf_and_minus_one():
    rng = np.random.default_rng(0)
    q, c = tie_heavy(rng, 3, 8), tie_heavy(rng, 5, 8)
    s, i = topk_search(q, c, 9, block_size=4, similarity="dot", mesh=None)
    ref_s, ref_i = brute_force(q, c, 9)
    np.testing.assert_array_equal(i, ref_i)
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
    np.testing.assert_array_equal(s[:, :5], ref_s[:, :5].astype(np.float32))


def test_cosine_random_float_data():
    rng = np.random.default_rng(1)
    q, c = rng.normal(size=(20, 32)).astype(np.float32), rng.normal(size=(999, 32)).astype(np.float32)
    c[5] = 0.0  # a zero vector scores 0 instead of NaN
    ref_s, ref_i = brute_force(q, c, 10, "cos")
    s, i = topk_search(q, c, 10, block_size=128, similarity="cos", mesh=None)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6)


def test_iterator_of_uneven_blocks_and_memmap(tmp_path):
    rng = np.random.default_rng(2)
    q, c = tie_heavy(rng, 6, 5), tie_heavy(rng, 250, 5)
    ref_s, ref_i = brute_force(q, c, 12)
    pieces = [c[:3], c[3:3], c[3:100], c[100:101], c[101:]]
    s, i = topk_search(q, iter(pieces), 12, block_size=32, similarity="dot", mesh=None)
    np.testing.assert_array_equal(i, ref_i)
    path = tmp_path / "c.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=c.shape)
    mm[:] = c
    mm.flush()
    s2, i2 = topk_search(q, np.memmap(path, dtype=np.float32, mode="r", shape=c.shape), 12, block_size=64,
                         similarity="dot", mesh=None)
    np.testing.assert_array_equal(i2, ref_i)
    np.testing.assert_array_equal(s2, s)


def test_bfloat16_operands_with_float32_accumulation():
    rng = np.random.default_rng(3)
    # Integers up to 8 are exact in bf16 and sums of 64 products stay exact in float32 accumulation.
    q = rng.integers(-8, 9, size=(9, 64)).astype(np.float32)
    c = rng.integers(-8, 9, size=(400, 64)).astype(np.float32)
    ref_s, ref_i = brute_force(q, c, 15)
    s, i = topk_search(q, c, 15, block_size=100, similarity="dot", dtype="bfloat16", mesh=None)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


def test_sharded_over_8_devices_equals_single_device():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    rng = np.random.default_rng(4)
    q, c = tie_heavy(rng, 11, 6), tie_heavy(rng, 1003, 6)
    for k, block_size in [(10, 256), (3, 8), (40, 1000), (1100, 512)]:
        single = topk_search(q, c, k, block_size=block_size, similarity="dot", mesh=None)
        sharded = topk_search(q, c, k, block_size=block_size, similarity="dot")  # "auto": all 8 devices
        np.testing.assert_array_equal(sharded[1], single[1])
        np.testing.assert_array_equal(sharded[0], single[0])
        np.testing.assert_array_equal(single[1], brute_force(q, c, k)[1])
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    two_axes = topk_search(q, c, 10, block_size=64, similarity="dot", mesh=mesh)
    np.testing.assert_array_equal(two_axes[1], brute_force(q, c, 10)[1])
    # Cosine on continuous data (no near-ties that rounding could flip), sharded.
    qf, cf = rng.normal(size=(7, 16)).astype(np.float32), rng.normal(size=(500, 16)).astype(np.float32)
    s, i = topk_search(qf, cf, 10, block_size=128, similarity="cos", mesh=mesh)
    ref_s, ref_i = brute_force(qf, cf, 10, "cos")
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 10, 20, 37])
def test_tiled_blocks_and_grouped_topk_exact_with_ties(k):
    """Blocks of several TILEs (a scan), the grouped top-k of a tile (k * GROUP * 2 <= TILE) and the plain one
    (k = 37), a padded last block, single device and 8 devices: equal to the brute force, ties included."""
    assert (search.TILE, search.GROUP) == (4096, 64), "the sizes below are chosen for these"
    rng = np.random.default_rng(k)
    q, c = tie_heavy(rng, 9, 6), tie_heavy(rng, 40000, 6)   # last block: 7232 rows, padded to 8192 (2 tiles)
    ref_s, ref_i = brute_force(q, c, k)
    # One device: 16384-row blocks (4 tiles); 8 devices: one 65536-row block, 8192 rows (2 tiles) a device.
    for mesh, block_size in ((None, 16384), ("auto", 65536)):
        s, i = topk_search(q, c, k, block_size=block_size, similarity="dot", mesh=mesh)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(s, ref_s.astype(np.float32))
    qf, cf = rng.normal(size=(5, 32)).astype(np.float32), rng.normal(size=(20000, 32)).astype(np.float32)
    s, i = topk_search(qf, cf, k, block_size=8192, similarity="cos", mesh=None)
    np.testing.assert_array_equal(i, brute_force(qf, cf, k, "cos")[1])
    # Every score negative: the zero padding rows (score 0) of the last block's tiles must still never win.
    qn, cn = np.ones((2, 6), np.float32), -(np.abs(tie_heavy(rng, 40000, 6)) + 1)
    ref_s, ref_i = brute_force(qn, cn, k)
    for mesh, block_size in ((None, 16384), ("auto", 65536)):
        s, i = topk_search(qn, cn, k, block_size=block_size, similarity="dot", mesh=mesh)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(s, ref_s.astype(np.float32))


def test_nan_scores_count_as_minus_infinity():
    """A NaN vector never wins, wherever it lies among the tiles' groups; with too few other rows its place is
    the -inf / -1 padding."""
    rng = np.random.default_rng(7)
    c = np.zeros((8192, 4), np.float32)
    c[:, 0] = rng.uniform(0, 1, size=8192)
    c[3000, 0] = 5.0
    c[100, 0] = np.nan
    q = np.array([[1.0, 0, 0, 0]], np.float32)
    for block_size in (8192, 100):  # tiled + grouped top-k, and the plain one
        s, i = topk_search(q, c, 2, block_size=block_size, similarity="dot", mesh=None)
        finite = np.where(np.isnan(c[:, 0]), -np.inf, c[:, 0])
        np.testing.assert_array_equal(i[0], np.argsort(-finite, kind="stable")[:2])
    s, i = topk_search(q, c[99:101], 2, similarity="dot", mesh=None)
    assert i.tolist() == [[0, -1]] and np.isneginf(s[0, 1])


def test_merge_topk_prefers_first_argument_on_ties():
    s, i = merge_topk(np.array([[2.0, 1.0]]), np.array([[4, 5]]), np.array([[2.0, 1.0]]), np.array([[9, 1]]), 3)
    np.testing.assert_array_equal(np.asarray(i), [[4, 9, 5]])


def test_bad_arguments():
    q = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="dim"):
        topk_search(q, np.zeros((4, 5), np.float32), 2, mesh=None)
    with pytest.raises(ValueError, match="similarity"):
        topk_search(q, np.zeros((4, 3), np.float32), 2, similarity="l2", mesh=None)
    with pytest.raises(ValueError, match="dtype"):
        topk_search(q, np.zeros((4, 3), np.float32), 2, dtype="float16", mesh=None)
