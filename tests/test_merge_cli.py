"""`bmr merge` (mergekit YAML over model folders and training runs, streamed into a model folder), `bmr merge-search`
(grid and CMA-ES over merge weights scored by dev NDCG@10) and the CMA-ES itself."""
import argparse
import json
import os

import jax
import numpy as np
import pytest

from bmretriever_jax.cli import main as bmr
import yaml

from bmretriever_jax.convert import export as ex
from bmretriever_jax.models import lora
from bmretriever_jax import merging as merge
from bmretriever_jax.util import treeutil
from bmretriever_jax.merging import folder, methods, search
from bmretriever_jax.cli import merging
from bmretriever_jax.convert.hf import load_hf
from bmretriever_jax.embed import Encoder
from bmretriever_jax.eval.evaluate import evaluate_retrieval
from hf_tiny import tiny_beir, tiny_model_dir
from test_export import fake_run, flat_max_diff, random_adapters, write_settings


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """A base and two 'fine-tuned' llama folders of it (the base plus different perturbations)."""
    root = tmp_path_factory.mktemp("experts")
    base = tiny_model_dir(str(root / "base"), "llama", seed=0)
    cfg, params = load_hf(base)
    rng = np.random.default_rng(0)
    out = {"base": base}
    for name in ("a", "b"):
        tree = jax.tree.map(lambda x: x + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
        folder = str(root / name)
        from bmretriever_jax.convert.hf import save_hf

        save_hf(cfg, tree, folder)
        ex.copy_tokenizer(base, folder)
        write_settings(folder, max_length=32)
        out[name] = folder
    return out


def _yaml(tmp_path, cfg):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _tree(folder):
    return load_hf(folder)[1]


# ------------------------------------------------------------------------------------------------- bmr merge
def test_merge_linear_and_ties_equal_the_in_memory_merge(experts, tmp_path):
    a, b, base = experts["a"], experts["b"], experts["base"]
    lin = _yaml(tmp_path, {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.3}},
                                                                {"model": b, "parameters": {"weight": 0.7}}]})
    out = folder.merge_to_folder(lin, str(tmp_path / "linear"))
    assert flat_max_diff(_tree(out), merge.linear([_tree(a), _tree(b)], [0.3, 0.7])) == 0.0
    ties = {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5},
            "models": [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6,
                                                                                               "density": 0.3}}]}
    out = folder.merge_to_folder(ties, str(tmp_path / "ties"))
    # per-layer tensors merged whole == our stacked leaves merged per layer slice
    want = merge.ties(_tree(base), [_tree(a), _tree(b)], [0.4, 0.6], [0.5, 0.3])
    assert flat_max_diff(_tree(out), want) == 0.0
    # the merged folder is a retriever: settings of the experts, tokenizer, and the merge recorded
    s = json.load(open(os.path.join(out, "bmretriever.json")))
    assert s["max_length"] == 32 and s["merge"]["method"] == "ties" and s["merge"]["options"]["density"] == [0.5, 0.3]
    enc = Encoder.load(out, dtype="float32", quiet=True)
    assert enc.max_length == 32 and np.isfinite(enc.encode_queries(["gene query"], "scifact")).all()
    # and `bmr export` takes it
    st = ex.export(out, str(tmp_path / "hf"), "hf")
    assert flat_max_diff(_tree(st), want) == 0.0


def test_merge_lora_runs_folds_each_expert_first(tmp_path):
    base = tiny_model_dir(str(tmp_path / "base"), "gemma3")
    cfg, params = load_hf(base)
    lcfg = lora.LoraConfig(rank=2, alpha=4.0)
    runs, merged = [], []
    for seed in (1, 2):
        flat = random_adapters(params, lcfg, seed)
        runs.append(fake_run(tmp_path / f"run{seed}", base, flat, lcfg=lcfg))
        merged.append(jax.tree.map(np.asarray, lora.merge(params, treeutil.unflatten(flat), lcfg)))
    cfg_yaml = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 0.8},
                "models": [{"model": runs[0], "parameters": {"weight": 0.5}},
                           {"model": runs[1], "parameters": {"weight": 0.5}}]}
    out = folder.merge_to_folder(cfg_yaml, str(tmp_path / "ta"))
    want = merge.task_arithmetic(params, merged, [0.5, 0.5], lambda_=0.8)
    assert flat_max_diff(_tree(out), want) <= 1e-6
    assert json.load(open(os.path.join(out, "bmretriever.json")))["max_length"] == 24  # from the runs' config


def test_dare_is_reproducible_by_seed(experts, tmp_path):
    cfg = {"merge_method": "dare_ties", "base_model": experts["base"], "parameters": {"density": 0.5},
           "models": [{"model": experts["a"], "parameters": {"weight": 0.5}},
                      {"model": experts["b"], "parameters": {"weight": 0.5}}]}
    t1 = _tree(folder.merge_to_folder(cfg, str(tmp_path / "s0"), seed=0))
    t2 = _tree(folder.merge_to_folder(cfg, str(tmp_path / "s0b"), seed=0))
    t3 = _tree(folder.merge_to_folder(cfg, str(tmp_path / "s1"), seed=1))
    assert flat_max_diff(t1, t2) == 0.0 and flat_max_diff(t1, t3) > 0


def test_merge_errors(experts, tmp_path, capsys):
    other = tiny_model_dir(str(tmp_path / "gemma"), "gemma3")
    bad = {"merge_method": "linear", "models": [{"model": experts["a"], "parameters": {"weight": 1.0}},
                                                {"model": other, "parameters": {"weight": 1.0}}]}
    with pytest.raises(ValueError, match="different architectures .*family: 'llama' vs 'gemma3'"):
        folder.merge_to_folder(bad, str(tmp_path / "x"))
    missing = {"merge_method": "linear", "models": [{"model": experts["a"], "parameters": {"weight": 1.0}},
                                                    {"model": str(tmp_path / "nope"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(FileNotFoundError, match="nope"):
        folder.merge_to_folder(missing, str(tmp_path / "y"))
    with pytest.raises(ValueError, match="needs 'base_model'"):
        folder.merge_to_folder({"merge_method": "ties", "models": [{"model": experts["a"]}]}, str(tmp_path / "z"))
    # the command line reports errors as one line
    p = argparse.ArgumentParser()
    p.add_argument("-q", "--quiet", action="store_true")
    merging.add_commands(p.add_subparsers(dest="cmd"))
    capsys.readouterr()
    assert bmr(["-q", "merge", _yaml(tmp_path, bad), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bmr merge: error: cannot merge") and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------ search
def test_grid_and_cmaes_spaces():
    grid = search.grid_candidates("linear", 2)
    assert [c["weights"] for c in grid] == [(round(0.1 * i, 10), round(1 - 0.1 * i, 10)) for i in range(1, 10)]
    ties = search.grid_candidates("ties", 2)
    assert len(ties) == 27 and {c["density"] for c in ties} == {0.3, 0.5, 0.7}
    three = search.simplex_grid(3, 0.25)
    assert three == [(0.25, 0.25, 0.5), (0.25, 0.5, 0.25), (0.5, 0.25, 0.25)]
    with pytest.raises(ValueError, match="has none"):
        search.grid_candidates("slerp", 2)
    opts = search.decode_cmaes(np.array([0.0, 0.0, 0.0]), "ties", 2)
    assert opts["weights"] == (0.5, 0.5) and opts["density"] == pytest.approx(0.525)


def test_cmaes_minimises_and_is_deterministic():
    target = np.array([1.0, -2.0, 0.5])
    scales = np.array([1.0, 10.0, 100.0])  # an ill-conditioned ellipsoid: needs the covariance adaptation

    def run(seed, budget=1500, popsize=None):
        calls = []

        def f(x, generation):
            calls.append((generation, x.copy()))
            return float(np.sum(scales * (x - target) ** 2))

        best_x, best_f = search.cmaes_minimise(f, 3, budget=budget, sigma=1.0, popsize=popsize, seed=seed)
        return best_x, best_f, calls

    best_x, best_f, calls = run(0)
    assert best_f < 1e-8 and np.abs(best_x - target).max() < 1e-4
    assert len(calls) == 1500 and calls[0][0] == 0 and not calls[0][1].any()  # the start point 0 first
    gens = [g for g, _ in calls[1:]]
    assert gens == sorted(gens) and gens[:7] == [1] * 7 and gens[7] == 2  # popsize 4 + 3 ln 3 = 7 per generation
    best_x2, best_f2, calls2 = run(0)
    assert best_f2 == best_f and np.array_equal(best_x, best_x2)
    assert all(g == g2 and np.array_equal(x, x2) for (g, x), (g2, x2) in zip(calls, calls2))
    assert run(1)[1] != best_f  # another seed, other points
    _, _, short = run(0, budget=6, popsize=3)  # the start point, a full generation of 3, 2 of the next
    assert [g for g, _ in short] == [0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="popsize"):
        run(0, popsize=1)


def test_grid_search_picks_the_best_and_writes_it(experts, tmp_path):
    dev = tiny_beir(str(tmp_path / "beir"))
    cfg = {"merge_method": "linear", "models": [{"model": experts["a"], "parameters": {"weight": 1.0}},
                                                {"model": experts["b"], "parameters": {"weight": 1.0}}]}
    out = str(tmp_path / "search")
    res = search.search(cfg, [dev], out=out, dtype="float32", quiet=True)
    scores = [r["ndcg@10"] for r in res.candidates]
    assert len(scores) == 9 and len(set(scores)) > 1  # the weights matter on this dev set
    assert res.best["id"] == int(np.argmax(scores)) and res.best["ndcg@10"] == max(scores)
    # deterministic: a second search (its corpus vectors now cached) gives the same table
    again = search.search(cfg, [dev], out=str(tmp_path / "again"), dtype="float32", quiet=True,
                             cache_dir=os.path.join(out, "vector_cache"), write_model=False)
    assert [r["ndcg@10"] for r in again.candidates] == scores
    # the written model is the chosen merge and scores what the search said
    chosen = yaml.safe_load(open(os.path.join(out, "merge.yaml")))
    assert [m["parameters"]["weight"] for m in chosen["models"]] == res.best["weights"]
    enc = Encoder.load(os.path.join(out, "model"), dtype="float32", quiet=True)
    got = evaluate_retrieval(enc, dev, "dev", search._dev_instruction(dev, None))["ndcg@10"]
    assert got == pytest.approx(res.best["ndcg@10"], abs=1e-9)
    w = res.best["weights"]
    assert flat_max_diff(_tree(os.path.join(out, "model")), merge.linear([_tree(experts["a"]), _tree(experts["b"])], w)) == 0
    rows = open(os.path.join(out, "candidates.tsv")).read().splitlines()
    assert len(rows) == 10 and rows[0].startswith("id\tstrategy\tgeneration\tweights\tdensity\tndcg@10:beir")
    assert json.load(open(os.path.join(out, "search.json")))["best"]["id"] == res.best["id"]


def test_cmaes_search_ties(experts, tmp_path):
    dev = tiny_beir(str(tmp_path / "beir"))
    cfg = {"merge_method": "ties", "base_model": experts["base"],
           "models": [{"model": experts["a"], "parameters": {"weight": 1.0, "density": 1.0}},
                      {"model": experts["b"], "parameters": {"weight": 1.0, "density": 1.0}}]}
    res = search.search(cfg, [dev], strategy="cmaes", budget=7, popsize=3, dtype="float32", quiet=True,
                           out=str(tmp_path / "s"), write_model=False)
    assert len(res.candidates) == 7
    first = res.candidates[0]
    assert first["weights"] == [0.5, 0.5] and first["density"] == pytest.approx(0.525)
    assert all(0.05 <= r["density"] <= 1.0 and sum(r["weights"]) == pytest.approx(1.0) for r in res.candidates)
    assert res.best["ndcg@10"] == max(r["ndcg@10"] for r in res.candidates)
    assert res.config["models"][0]["parameters"]["density"] == res.best["density"]
    with pytest.raises(ValueError, match="has none"):
        search.search({"merge_method": "slerp", "base_model": experts["base"], "parameters": {"t": 0.5},
                          "models": [{"model": experts["a"]}]}, [dev], quiet=True)


def test_top_k_selection_equals_a_stable_sort():
    # methods._top_k_mask (selection, O(N)) must pick what a stable argsort on -|d| picks, ties and NaN included
    rng = np.random.default_rng(0)
    for trial in range(200):
        s, n = int(rng.integers(1, 4)), int(rng.integers(1, 50))
        d = rng.integers(-3, 4, size=(s, n)).astype(np.float32) if trial % 2 else rng.normal(size=(s, n)).astype(np.float32)
        if trial % 3 == 0:
            d[rng.random((s, n)) < 0.2] = np.nan
        for k in sorted({1, max(1, n // 3), n}):
            ref = np.zeros((s, n), np.float32)
            np.put_along_axis(ref, np.argsort(-np.abs(d), axis=-1, kind="stable")[:, :k], 1.0, axis=-1)
            assert np.array_equal(methods._top_k_mask(np.abs(d), k), ref), (d, k)
