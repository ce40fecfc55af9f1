"""Merging: hand-computed cases per method, identities, DARE randomness, validation, YAML, streaming,
and (when mergekit is installed) equality with mergekit's own kernels."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmretriever_jax import merging as merge

from bmretriever_jax.util import treeutil

from bmretriever_jax.convert import weights
from bmretriever_jax.merging import methods

# Three-element task vectors, hand-checked below: d1 = m1 - base = [1, -2, 0.5], d2 = [-1, 1.5, 0.5].
BASE = {"w": jnp.array([1.0, 2.0, 3.0])}
M1 = {"w": jnp.array([2.0, 0.0, 3.5])}
M2 = {"w": jnp.array([0.0, 3.5, 3.5])}


def w(tree):
    return np.asarray(tree["w"])


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float32), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- by hand
def test_linear_by_hand():
    # (1 * [2, 0, 3.5] + 3 * [0, 3.5, 3.5]) = [2, 10.5, 14]; / 4
    close(w(merge.linear([M1, M2], [1.0, 3.0])), [0.5, 2.625, 3.5])
    close(w(merge.linear([M1, M2], [1.0, 3.0], normalize=False)), [2.0, 10.5, 14.0])


def test_task_arithmetic_by_hand():
    # 0.5 * d1 + d2 = [-0.5, 0.5, 0.75]; * lambda 2 = [-1, 1, 1.5]; + base
    close(w(merge.task_arithmetic(BASE, [M1, M2], [0.5, 1.0], lambda_=2.0)), [0.0, 3.0, 4.5])
    # normalize: [-0.5, 0.5, 0.75] / 1.5 + base
    close(w(merge.task_arithmetic(BASE, [M1, M2], [0.5, 1.0], normalize=True)), [2 / 3, 2 + 1 / 3, 3.5])


def test_ties_by_hand():
    # density 1: sum of deltas [0, -0.5, 1] elects [+, -, +] (0 counts as +); agreeing entries:
    # elem 0: d1 = 1 -> 1; elem 1: d1 = -2 -> -2; elem 2: (0.5 + 0.5) / 2 -> 0.5.
    close(w(merge.ties(BASE, [M1, M2], [1.0, 1.0], density=1.0)), [2.0, 0.0, 3.5])
    # density 2/3 keeps int(2/3 * 3) = 2 largest |d|: d1 -> [1, -2, 0], d2 -> [-1, 1.5, 0];
    # weighted by [1, 2]: [1, -2, 0], [-2, 3, 0]; sum [-1, 1, 0] elects [-, +, +];
    # disjoint mean: elem 0: -2 / 2 = -1; elem 1: 3 / 2 = 1.5; elem 2: nobody agrees (zeros) -> 0.
    close(w(merge.ties(BASE, [M1, M2], [1.0, 2.0], density=2 / 3)), [0.0, 3.5, 3.0])
    # Without normalize the agreeing weighted deltas are summed: [-2, 3, 0].
    close(w(merge.ties(BASE, [M1, M2], [1.0, 2.0], density=2 / 3, normalize=False)), [-1.0, 5.0, 3.0])
    # Per-model density: d1 keeps 1 entry ([0, -2, 0]); d2 keeps 2 ([-1, 1.5, 0]); weights 1:
    # sum [-1, -0.5, 0] elects [-, -, +]; elem 0: -1; elem 1: -2; elem 2: 0. lambda 0.5 halves it.
    close(w(merge.ties(BASE, [M1, M2], [1.0, 1.0], density=[1 / 3, 2 / 3], lambda_=0.5)), [0.5, 1.0, 3.0])


def test_dare_with_density_one_by_hand():
    # No drop: dare_ties = TIES sign election without normalize: elem 2 sums 0.5 + 0.5.
    close(w(merge.dare_ties(BASE, [M1, M2], [1.0, 1.0], density=1.0, key=0)), [2.0, 0.0, 4.0])
    # dare_linear = task arithmetic: base + d1 + d2.
    close(w(merge.dare_linear(BASE, [M1, M2], [1.0, 1.0], density=1.0, key=0)), [1.0, 1.5, 4.0])


def test_dare_drop_values_by_hand():
    # With the paper's 1/density rescale every entry of the single task vector is 0 or d / density.
    d = np.array([1.0, -2.0, 0.5, 4.0] * 50, np.float32)
    base = {"w": jnp.zeros_like(d)}
    out = w(merge.dare_linear(base, [{"w": jnp.asarray(d)}], [1.0], density=0.25, key=7, rescale="density"))
    kept = out != 0
    assert 0 < kept.sum() < d.size
    close(out[kept], d[kept] * 4.0)
    # mergekit's rescale (L1) keeps the task vector's L1 norm: sum|out| == sum|d|.
    out = w(merge.dare_linear(base, [{"w": jnp.asarray(d)}], [1.0], density=0.25, key=7))
    np.testing.assert_allclose(np.abs(out).sum(), np.abs(d).sum(), rtol=1e-6)
    np.testing.assert_array_equal(out != 0, kept)  # same key, same mask


def test_slerp_by_hand():
    s = np.sqrt(0.5)
    close(w(merge.slerp({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}, 0.5)), [s, s])
    # theta = pi/2: coefficients sin(2/3 * pi/2) = sin(pi/3) and sin(pi/6).
    close(w(merge.slerp({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}, 1 / 3)), [np.sqrt(3) / 2, 0.5])
    # The angle comes from the normalised vectors, the coefficients multiply the raw ones.
    close(w(merge.slerp({"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}, 0.5)), [2 * s, s])
    # Colinear (cos > 0.9995): plain lerp 0.75 * [1, 2] + 0.25 * [2, 4].
    close(w(merge.slerp({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([2.0, 4.0])}, 0.25)), [1.25, 2.5])


def test_model_stock_by_hand():
    # offsets [1, 0] and [1, 1]: cos = 1/sqrt(2); t = 2 cos / (1 + cos) = 2 (sqrt(2) - 1);
    # result = base + t * (mean - base) = [1, 1] + t * [1, 0.5].
    t = 2 * (np.sqrt(2) - 1)
    out = merge.model_stock({"w": jnp.array([1.0, 1.0])}, [{"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([2.0, 2.0])}])
    close(w(out), [1 + t, 1 + t / 2])
    # Orthogonal task vectors: cos 0 -> t 0 -> the base.
    # d1 = [1, -2, 0.5] and [2, 1, 0] are orthogonal.
    close(w(merge.model_stock(BASE, [M1, {"w": jnp.array([3.0, 3.0, 3.0])}])), [1.0, 2.0, 3.0])


def test_stacked_leaves_are_merged_per_layer():
    # A [2, 3] leaf under layers/ is two tensors: TIES keeps the top int(3 / 3) = 1 per layer,
    # not the top int(6 / 3) = 2 of the whole leaf.
    base = {"layers": {"x": jnp.zeros((2, 3))}, "y": jnp.zeros((2, 3))}
    d = jnp.array([[10.0, 1.0, 2.0], [0.1, 0.3, 0.2]])
    out = merge.ties(base, [{"layers": {"x": d}, "y": d}], [1.0], density=1 / 3)
    close(out["layers"]["x"], [[10, 0, 0], [0, 0.3, 0]])
    close(out["y"], [[10, 0, 2], [0, 0, 0]])
    flat = merge.ties(base, [{"layers": {"x": d}, "y": d}], [1.0], density=1 / 3, stacked=())
    close(flat["layers"]["x"], [[10, 0, 2], [0, 0, 0]])


# ---------------------------------------------------------------------------------------------- identities
def random_tree(seed, dtype=jnp.float32):
    # numpy draws: each eager jax.random call on a new shape compiles, which would dominate this file.
    rng = np.random.default_rng(seed)
    r = lambda *shape, dt=dtype: jnp.asarray(rng.normal(size=shape), dt)  # noqa: E731
    return {"embed": {"embedding": r(5, 4)},
            "layers": {"attn": {"q": {"kernel": r(2, 4, 6), "bias": r(2, 6)}}},
            "final_norm": {"scale": r(4, dt=jnp.bfloat16)}}


def assert_trees_close(a, b, atol=1e-6):
    fa, fb = treeutil.flatten(a), treeutil.flatten(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_allclose(np.asarray(fa[path], np.float32), np.asarray(fb[path], np.float32),
                                   rtol=1e-6, atol=atol, err_msg=path)


def test_merging_copies_returns_the_model():
    base, model = random_tree(0), random_tree(1)
    copies = [model] * 3
    assert_trees_close(merge.linear(copies, [0.2, 0.5, 1.3]), model)
    assert_trees_close(merge.task_arithmetic(base, copies, [0.2, 0.3, 0.5]), model)
    assert_trees_close(merge.task_arithmetic(base, copies, [1.0, 1.0, 1.0], normalize=True), model)
    assert_trees_close(merge.ties(base, copies, [1.0, 2.0, 3.0], density=1.0), model)
    assert_trees_close(merge.dare_ties(base, copies, [1.0, 1.0, 1.0], 1.0, key=0, normalize=True), model)
    assert_trees_close(merge.dare_linear(base, copies, [0.5, 0.25, 0.25], 1.0, key=0), model)
    assert_trees_close(merge.slerp(model, model, 0.37), model)
    assert_trees_close(merge.model_stock(base, copies), model)


def test_linear_with_one_weight_one_returns_that_model():
    a, b, c = random_tree(0), random_tree(1), random_tree(2)
    assert_trees_close(merge.linear([a, b, c], [0.0, 1.0, 0.0]), b, atol=0)
    assert_trees_close(merge.linear([a, b, c], [0.0, 1.0, 0.0], normalize=False), b, atol=0)


def test_output_dtype():
    base, model = random_tree(0), random_tree(1)
    out = merge.task_arithmetic(base, [model], [1.0], dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in treeutil.flatten(out).values())
    out = merge.task_arithmetic(base, [model], [1.0])
    assert out["final_norm"]["scale"].dtype == jnp.bfloat16 and out["embed"]["embedding"].dtype == jnp.float32


# ---------------------------------------------------------------------------------------------- DARE randomness
def test_dare_reproducible_seeded_and_independent_of_leaf_order():
    base, m1, m2 = random_tree(0), random_tree(1), random_tree(2)
    run = lambda b, ms, key: merge.dare_ties(b, ms, [1.0, 0.7], 0.5, key=key)  # noqa: E731
    assert_trees_close(run(base, [m1, m2], 3), run(base, [m1, m2], 3), atol=0)
    assert_trees_close(run(base, [m1, m2], jax.random.key(3)), run(base, [m1, m2], 3), atol=0)
    a, b = run(base, [m1, m2], 3), run(base, [m1, m2], 4)
    assert not np.allclose(a["layers"]["attn"]["q"]["kernel"], b["layers"]["attn"]["q"]["kernel"])
    # Drop one leaf and reverse the order of the others: every remaining leaf keeps its mask.
    def shuffled(t):
        flat = treeutil.flatten(t)
        return treeutil.unflatten({p: flat[p] for p in reversed(list(flat)) if p != "embed/embedding"})
    c = run(shuffled(base), [shuffled(m1), shuffled(m2)], 3)
    for path, v in treeutil.flatten(c).items():
        np.testing.assert_array_equal(v, treeutil.flatten(a)[path], err_msg=path)


def test_dare_unbiased_in_expectation():
    # With 1/density rescaling E[out] = base + d. Each kept-or-not entry has std |d| sqrt((1-p)/p);
    # we average 1000 independent copies of each value over 40 seeds (40,000 samples per value), so the
    # standard error is |d| sqrt(3) / 200 at p = 0.25; we allow 5 standard errors.
    p, n_seeds = 0.25, 40
    d = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    tiled = jnp.asarray(np.tile(d, 1000))
    base = {"w": jnp.zeros_like(tiled)}
    total = np.zeros(4, np.float64)
    for seed in range(n_seeds):
        out = w(merge.dare_linear(base, [{"w": tiled}], [1.0], p, key=seed, rescale="density"))
        total += out.reshape(1000, 4).mean(0)
    se = np.abs(d) * np.sqrt((1 - p) / p) / np.sqrt(1000 * n_seeds)
    assert np.all(np.abs(total / n_seeds - d) < 5 * se), (total / n_seeds, d, se)


# ---------------------------------------------------------------------------------------------- validation
def test_shape_mismatch_names_path_and_shapes():
    a = {"layers": {"q": {"kernel": jnp.zeros((2, 3))}}, "n": jnp.zeros(3)}
    b = {"layers": {"q": {"kernel": jnp.zeros((2, 4))}}, "n": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"'layers/q/kernel'.*models\[0\] \(2, 3\).*models\[1\] \(2, 4\)"):
        merge.linear([a, b], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"'layers/q/kernel'.*base \(2, 3\).*models\[0\] \(2, 4\)"):
        merge.ties(a, [b], [1.0], 0.5)


def test_missing_and_extra_leaves_are_named():
    a = {"x": jnp.zeros(3), "y": {"z": jnp.zeros(2)}}
    b = {"x": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"models\[0\] is missing 1 parameter.*'y/z'"):
        merge.task_arithmetic(a, [b], [1.0])
    with pytest.raises(ValueError, match=r"models\[1\] has 1 parameter.*lacks: 'y/z'"):
        merge.linear([b, a], [1.0, 1.0])


def test_bad_inputs_and_options():
    t = {"x": jnp.zeros(3)}
    with pytest.raises(ValueError, match="dtype int32"):
        merge.linear([{"x": jnp.zeros(3, jnp.int32)}], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        merge.model_stock(t, [t])
    with pytest.raises(ValueError, match="2 values for 3 models"):
        merge.linear([t, t, t], [1.0, 2.0])
    with pytest.raises(ValueError, match="summing to 0"):
        merge.linear([t, t], [1.0, -1.0])
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        merge.ties(t, [t], [1.0], 1.5)
    with pytest.raises(ValueError, match="needs a base"):
        merge.merge_streamed("ties", [weights.DictReader(t)], weights=[1.0])
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        merge.merge_streamed("nope", [weights.DictReader(t)])
    with pytest.raises(ValueError, match=r"no option\(s\) \['t'\]"):
        merge.merge_streamed("linear", [weights.DictReader(t)], weights=[1.0], t=0.5)


# ---------------------------------------------------------------------------------------------- YAML
TIES_YAML = """
merge_method: ties
base_model: base
models:
  - model: base
  - model: expert_a
    parameters: {weight: 0.7, density: 0.5}
  - model: expert_b
    parameters: {weight: 0.3}
parameters:
  density: 0.8
  normalize: false
  int8_mask: true
  lambda: 1.5
dtype: bfloat16
tokenizer_source: base
"""


def test_parse_ties_config_per_model_overrides_global():
    cfg = merge.parse_merge_config(TIES_YAML)
    assert cfg.method == "ties" and cfg.base_model == "base" and cfg.models == ("expert_a", "expert_b")
    assert cfg.options == {"weights": (0.7, 0.3), "normalize": False, "lambda_": 1.5, "density": (0.5, 0.8),
                           "rescale": False}
    assert cfg.dtype == "bfloat16" and cfg.extra == {"tokenizer_source": "base"}


def test_parse_defaults_follow_mergekit():
    dare = merge.parse_merge_config({"merge_method": "dare_ties", "base_model": "b",
                                     "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.3}}]})
    assert dare.options == {"weights": (1.0,), "normalize": False, "lambda_": 1.0, "density": (0.3,),
                            "rescale": True}
    lin = merge.parse_merge_config({"merge_method": "linear", "base_model": "b", "parameters": {"weight": 0.5},
                                    "models": [{"model": "x", "parameters": {"weight": 2}}]})
    # mergekit adds an unlisted base_model to a linear merge's inputs; its weight falls back to the global one.
    assert lin.models == ("x", "b") and lin.options == {"weights": (2.0, 0.5), "normalize": True}
    s = merge.parse_merge_config("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
                                 "parameters: {t: 0.25}\nout_dtype: torch.float16\n")
    assert s.models == ("b",) and s.options == {"t": 0.25} and s.dtype == "float16"
    ms = merge.parse_merge_config({"merge_method": "model_stock", "base_model": "b",
                                   "models": [{"model": "x"}, {"model": "y"}]})
    assert ms.models == ("x", "y") and ms.options == {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ta = merge.parse_merge_config({"merge_method": "task_arithmetic", "base_model": "b",
                                       "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}]})
    assert ta.options == {"weights": (1.0,), "normalize": False, "lambda_": 1.0}
    assert any("no effect" in str(c.message) for c in caught)


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "frankenmerge", "models": [{"model": "x"}]},
     r"merge_method 'frankenmerge' is not one of \['dare_linear'"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "seed": 3},
     r"unknown top-level key\(s\) \['seed'\]; allowed: \['base_model'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1, "desnity": 1}}]},
     r"models\[0\]\.parameters\.desnity: unknown parameter for ties; per-model parameters: \['density', 'weight'\]"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": [0, 1]}}]},
     r"models\[0\]\.parameters\.weight: gradients"),
    ({"merge_method": "ties", "base_model": "b", "parameters": {"density": [{"filter": "mlp", "value": 0.5}]},
      "models": [{"model": "x", "parameters": {"weight": 1}}]},
     r"parameters\.density: filtered parameters"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1, "normalize": True}}]},
     r"models\[0\]\.parameters\.normalize: 'normalize' is a global parameter"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}, {"model": "y", "parameters": {"weight": 1}}]},
     r"model 'x' has no 'weight'"),
    ({"merge_method": "ties", "models": [{"model": "x", "parameters": {"weight": 1}}]}, "needs 'base_model'"),
    ({"merge_method": "ties", "base_model": "b", "parameters": {"normalize": "yes"},
      "models": [{"model": "x", "parameters": {"weight": 1}}]}, r"parameters\.normalize: expected true or false"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": "heavy"}}]},
     r"models\[0\]\.parameters\.weight: expected a number"),
    ({"merge_method": "linear", "models": [{"model": "x", "weight": 1}]},
     r"models\[0\]: unknown key\(s\) \['weight'\]; allowed: \['model', 'parameters'\]"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "dtype": "float8"},
     r"dtype 'float8' is not one of \['bfloat16', 'float16', 'float32'\]"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]}, "slerp needs parameters.t"),
    ({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
      "models": [{"model": "b"}, {"model": "c"}]}, "exactly one other model"),
    ({"merge_method": "linear", "slices": [{"sources": []}]}, "'slices' is not supported"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}],
      "parameters": {"filter_wise": True}}, "filter_wise: true is not supported"),
])
def test_parse_errors(config, message):
    with pytest.raises(ValueError, match=message):
        merge.parse_merge_config(config)


# ---------------------------------------------------------------------------------------------- streaming
def save_model(tree, path, max_shard_bytes=None):
    writer = (weights.SafetensorsWriter(path) if max_shard_bytes is None
              else weights.SafetensorsWriter(path, max_shard_bytes=max_shard_bytes))
    for p, v in treeutil.flatten(tree).items():
        writer.write(p, v)
    return writer.close()


def test_streamed_merge_over_safetensors_equals_in_memory(tmp_path):
    base, a, b = random_tree(0), random_tree(1), random_tree(2)
    save_model(base, tmp_path / "base")                                    # directory, one file
    save_model(a, tmp_path / "expert_a", max_shard_bytes=100)               # directory, sharded + index
    save_model(b, tmp_path / "expert_b.safetensors")                        # single file
    assert (tmp_path / "expert_a" / weights.INDEX_NAME).exists()
    config = tmp_path / "merge.yaml"
    config.write_text(TIES_YAML.replace("model: base", f"model: {tmp_path / 'base'}")
                      .replace("base_model: base", f"base_model: {tmp_path / 'base'}")
                      .replace("expert_b", str(tmp_path / "expert_b.safetensors"))
                      .replace("expert_a", str(tmp_path / "expert_a")))
    out_dir = merge.run_merge(str(config), out_writer=weights.SafetensorsWriter(tmp_path / "out", max_shard_bytes=64))
    merged = weights.SafetensorsReader(out_dir)
    expected = merge.ties(base, [a, b], [0.7, 0.3], [0.5, 0.8], normalize=False, lambda_=1.5, dtype="bfloat16")
    flat = treeutil.flatten(expected)
    assert sorted(merged.keys()) == sorted(flat)
    for path, v in flat.items():
        got = merged.read(path)
        assert got.dtype == np.dtype(jnp.bfloat16) and merged.shape(path) == v.shape
        np.testing.assert_array_equal(got.astype(np.float32), np.asarray(v, np.float32), err_msg=path)
    # The same config into memory, with a caller-supplied resolver.
    readers = {str(tmp_path / n): weights.DictReader(t) for n, t in
               [("base", base), ("expert_a", a), ("expert_b.safetensors", b)]}
    assert_trees_close(merge.run_merge(str(config), readers.__getitem__), expected, atol=0)


def test_streamed_errors_name_the_model(tmp_path):
    save_model({"x": jnp.zeros(3)}, tmp_path / "a.safetensors")
    save_model({"x": jnp.zeros(4)}, tmp_path / "b.safetensors")
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "models": [{"model": str(tmp_path / "a.safetensors")}, {"model": str(tmp_path / "b.safetensors")}]}
    with pytest.raises(ValueError, match=r"'x'.*a\.safetensors \(3,\).*b\.safetensors \(4,\)"):
        merge.run_merge(cfg)


# ---------------------------------------------------------------------------------------------- vs mergekit
def _mergekit():
    import torch
    from mergekit.merge_methods.api import merge_tensors  # the Makefile installs it: missing is a failure

    return torch, merge_tensors


def _inputs(seed=0, shape=(6, 5)):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    return base, [base + s * rng.normal(size=shape).astype(np.float32) for s in (0.1, 0.2, 0.3)]


@pytest.mark.parametrize("method, params, ours", [
    ("linear", {"weight": [0.5, 0.3, 0.9]}, lambda b, ms: merge.linear(ms, [0.5, 0.3, 0.9])),
    ("linear", {"weight": [0.5, 0.3, 0.9], "normalize": False},
     lambda b, ms: merge.linear(ms, [0.5, 0.3, 0.9], normalize=False)),
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.9], "lambda": 0.7},
     lambda b, ms: merge.task_arithmetic(b, ms, [0.5, 0.3, 0.9], 0.7)),
    ("ties", {"weight": [0.5, 0.3, 0.9], "density": [0.5, 0.3, 0.7]},
     lambda b, ms: merge.ties(b, ms, [0.5, 0.3, 0.9], [0.5, 0.3, 0.7])),
    ("ties", {"weight": [1.0, -0.5, 0.9], "density": 0.4, "rescale": True, "normalize": False, "lambda": 1.3},
     lambda b, ms: merge.ties(b, ms, [1.0, -0.5, 0.9], 0.4, normalize=False, lambda_=1.3, rescale=True)),
    ("dare_ties", {"weight": [0.5, 0.3, 0.9], "density": 1.0},
     lambda b, ms: merge.dare_ties(b, ms, [0.5, 0.3, 0.9], 1.0, key=0)),
    ("model_stock", {}, lambda b, ms: merge.model_stock(b, ms)),
])
def test_equals_mergekit(method, params, ours):
    torch, merge_tensors = _mergekit()
    base, models = _inputs()
    with_base = method != "linear"
    tensors = ([base] if with_base else []) + models
    expected = merge_tensors([torch.from_numpy(t) for t in tensors], method, parameters=params,
                             base_index=0 if with_base else None).numpy()
    got = ours({"w": jnp.asarray(base)}, [{"w": jnp.asarray(m)} for m in models])["w"]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_slerp_equals_mergekit():
    torch, merge_tensors = _mergekit()
    base, models = _inputs()
    for other, t in ((models[0], 0.3), (-base, 0.6), (2 * base, 0.4)):  # generic, antipodal, colinear
        expected = merge_tensors([torch.from_numpy(base), torch.from_numpy(other)], "slerp",
                                 parameters={"t": t}, base_index=0).numpy()
        got = merge.slerp({"w": jnp.asarray(base)}, {"w": jnp.asarray(other)}, t)["w"]
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_dare_equals_mergekit_with_our_masks(monkeypatch):
    # mergekit draws DARE masks with torch.bernoulli; hand it ours (same order: one per model) and the
    # merges, including its L1 rescale and sign election, must agree.
    torch, merge_tensors = _mergekit()
    base, models = _inputs(shape=(40,))
    keys = merge.leaf_keys(11, "w", len(models))
    masks = [torch.from_numpy(np.asarray(jax.random.bernoulli(k, 0.3, (1, 40)), np.float32).reshape(40))
             for k in keys]
    calls = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda probs: next(calls))
    for method in ("dare_ties", "dare_linear"):
        calls = iter(masks)
        expected = merge_tensors([torch.from_numpy(t) for t in [base] + models], method,
                                 parameters={"weight": [0.5, 0.3, 0.9], "density": 0.3}, base_index=0).numpy()
        fn = merge.dare_ties if method == "dare_ties" else merge.dare_linear
        got = fn({"w": jnp.asarray(base)}, [{"w": jnp.asarray(m)} for m in models], [0.5, 0.3, 0.9], 0.3, key=11)
        np.testing.assert_allclose(np.asarray(got["w"]), expected, rtol=1e-6, atol=1e-6)


def test_stacked_leaf_equals_mergekit_per_layer():
    torch, merge_tensors = _mergekit()
    base, models = _inputs(shape=(3, 4, 5))  # [L, in, out] under layers/
    got = merge.ties({"layers": {"k": jnp.asarray(base)}}, [{"layers": {"k": jnp.asarray(m)}} for m in models],
                     [0.5, 0.3, 0.9], 0.3)["layers"]["k"]
    for layer in range(3):
        expected = merge_tensors([torch.from_numpy(t[layer]) for t in [base] + models], "ties",
                                 parameters={"weight": [0.5, 0.3, 0.9], "density": 0.3}, base_index=0).numpy()
        np.testing.assert_allclose(np.asarray(got[layer]), expected, rtol=1e-6, atol=1e-6)


def test_ties_trim_differs_from_mergekit_only_among_tied_magnitudes():
    """Why TIES on real checkpoints differs from mergekit by up to one delta (benchmarks/merge.py: 0.0031 on
    Gemma 3 270M + N(0, 1e-3) noise): when several elements share the k-th largest |delta| exactly, which of
    them survive the trim is unspecified in mergekit (torch.argsort, not stable) and lower-index-first in
    ours. A 168M-element float32 tensor of N(0, 1e-3) values has ~6 elements per representable value near
    its median, so the cut falls inside such a tie in practice. Here, with quantised values (many exact
    ties): the same number of elements is kept, every element kept by one and not the other has exactly
    the threshold magnitude, and all other elements agree."""
    torch, _ = _mergekit()
    from mergekit.sparsify import magnitude

    rng = np.random.default_rng(0)
    d = (np.round(rng.normal(size=(4000,)) * 20) / 20 * 1e-3).astype(np.float32)  # magnitudes on a 5e-5 grid
    density = 0.37
    k = int(density * d.size)
    ours = methods._magnitude(d[None], density, None)[0] != 0
    theirs = magnitude(torch.from_numpy(d.copy()), density).numpy() != 0
    threshold = np.sort(np.abs(d))[::-1][k - 1]
    assert np.count_nonzero(np.abs(d) == threshold) > 1  # the cut is inside a tie
    assert ours.sum() == k and theirs.sum() == k
    differ = ours != theirs
    assert np.all(np.abs(d[differ]) == threshold)
    assert np.all(ours[np.abs(d) > threshold]) and np.all(theirs[np.abs(d) > threshold])
    # ours breaks the tie deterministically: lower index first
    tied = np.flatnonzero(np.abs(d) == threshold)
    n_tied_kept = k - np.count_nonzero(np.abs(d) > threshold)
    assert np.all(ours[tied[:n_tied_kept]]) and not np.any(ours[tied[n_tied_kept:]])
