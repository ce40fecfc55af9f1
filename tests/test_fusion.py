"""Fusion (eval/fusion.py) against hand-computed cases, its parameters chosen on dev only (also through
`bmr eval --fusion`'s evaluate_all), and TREC run files written and read back. No model is loaded here."""
import json
import os

import numpy as np
import pytest

from bmretriever_jax.eval import fusion, metrics, suite
from bmretriever_jax.util.errors import ConfigError, DataFormatError

A = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
B = {"q": {"c": 10.0, "a": 5.0, "d": 1.0}}


def test_rrf_hand_computed():
    out = fusion.rrf([A, B], k=60)["q"]
    want = {"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63}
    assert list(out) == ["a", "c", "b", "d"]
    for d, v in want.items():
        assert out[d] == pytest.approx(v, abs=1e-12)
    out1 = fusion.rrf([A, B], k=1)["q"]
    assert out1["a"] == pytest.approx(1 / 2 + 1 / 3) and out1["c"] == pytest.approx(1 / 4 + 1 / 2)
    # weights multiply each system's terms
    w = fusion.rrf([A, B], k=60, weights=[2.0, 0.0])["q"]
    assert w["a"] == pytest.approx(2 / 61) and w["d"] == 0.0


def test_wsum_hand_computed():
    # min-max: A a=1 b=.5 c=0; B c=1 a=4/9 d=0; a document a system did not return counts 0
    eq = fusion.wsum([A, B])["q"]
    assert list(eq) == ["a", "c", "b", "d"]
    assert eq["a"] == pytest.approx(0.5 * (1 + 4 / 9)) and eq["b"] == pytest.approx(0.25)
    assert eq["c"] == pytest.approx(0.5) and eq["d"] == 0.0
    w = fusion.wsum([A, B], [0.2, 0.8])["q"]
    assert list(w) == ["c", "a", "b", "d"]
    assert w["a"] == pytest.approx(0.2 + 0.8 * 4 / 9) and w["c"] == pytest.approx(0.8)


def test_edges_constant_lists_missing_queries_ties_and_depth():
    np.testing.assert_array_equal(fusion.minmax([2.0, 2.0]), [1.0, 1.0])  # all equal -> 1
    assert fusion.minmax([]).size == 0
    out = fusion.wsum([{"q": {"x": 5.0}}, {"q": {}, "r": {"y": 1.0}}])
    assert out == {"q": {"x": 0.5}, "r": {"y": 0.5}}  # every query of any run; an empty list adds nothing
    # the same ranks in another order tie exactly, and ties go by doc id descending (trec_eval)
    r1, r2, r3 = {"q": {"x": 3, "y": 1, "z": 2}}, {"q": {"x": 2, "y": 2.5, "z": 3}}, {"q": {"x": 1, "y": 3, "z": 0}}
    out = fusion.rrf([r1, r2, r3])["q"]
    assert out["x"] == out["y"] == out["z"] and list(out) == ["z", "y", "x"]  # ranks (1,3,2), (3,2,1), (2,1,3)
    assert list(fusion.rrf([A, B], depth=2)["q"]) == ["a", "c"]
    with pytest.raises(ConfigError, match="2 weight"):
        fusion.wsum([A, B, A], [0.5, 0.5])
    with pytest.raises(ConfigError, match="allowed: rrf, wsum"):
        fusion.fuse([A], "max")


def test_fused_order_is_the_metric_order():
    rng = np.random.default_rng(0)
    runs = [{f"q{i}": {f"d{j}": float(rng.integers(0, 5)) for j in rng.choice(40, 25, replace=False)}
             for i in range(5)} for _ in range(3)]
    for method in fusion.METHODS:
        for qid, scores in fusion.fuse(runs, method).items():
            assert list(scores) == metrics.rank(scores)


def test_weight_grid():
    g = fusion.weight_grid(2)
    assert g[0] == [0.5, 0.5] and len(g) == 11 and all(abs(sum(w) - 1) < 1e-9 for w in g)
    assert [1.0, 0.0] in g and [0.0, 1.0] in g
    g3 = fusion.weight_grid(3)
    assert g3[0] == pytest.approx([1 / 3] * 3) and len(g3) == 67  # 66 on the 0.1 grid + equal weights
    assert fusion.param_grid("rrf", 2)[0] == {"k": 60}


# --------------------------------------------------------------------------------- parameters from dev only
DEV_QRELS = {"q0": {"r0": 1}, "q1": {"r1": 1}}
TEST_QRELS = {"q2": {"r2": 1}, "q3": {"r3": 1}}


def _lists(qids, good):
    """good: r 1.0, x 0.9, y 0 (-> r first); bad: x 1, y .5, r 0. Equal wsum weights put x first; only
    weights (1, 0) on the 0.1 grid put r first (r = w_good > x = 0.9 w_good + w_bad needs w_good > 10/11)."""
    g = {q: {f"r{q[1]}": 1.0, f"x{q[1]}": 0.9, f"y{q[1]}": 0.0} for q in qids}
    b = {q: {f"x{q[1]}": 1.0, f"y{q[1]}": 0.5, f"r{q[1]}": 0.0} for q in qids}
    return (g, b) if good == "A" else (b, g)


RUNS = {}
for _split, _qids, _good in (("dev", ["q0", "q1"], "A"), ("test", ["q2", "q3"], "B")):
    _a, _b = _lists(_qids, _good)
    RUNS.setdefault("A", {})[_split] = _a
    RUNS.setdefault("B", {})[_split] = _b


def test_choose_params_wsum_uses_only_the_runs_it_is_given():
    dev, _ = fusion.choose_params([RUNS["A"]["dev"], RUNS["B"]["dev"]], DEV_QRELS, "wsum")
    test, _ = fusion.choose_params([RUNS["A"]["test"], RUNS["B"]["test"]], TEST_QRELS, "wsum")
    assert dev == {"weights": [1.0, 0.0]} and test == {"weights": [0.0, 1.0]}


def test_choose_params_rrf_keeps_the_default_unless_another_k_is_better():
    # r at ranks (1, 10), x at (3, 3): r first for small k (1/2 + 1/11 > 2/4), x first for k = 60 (2/63 > 1/61 + 1/70)
    lists = [{"q": {"r": 10.0, "a": 9.5, "x": 8.0}},
             {"q": {"p0": 20.0, "p1": 19.0, "x": 18.5, **{f"p{i}": 20.0 - i for i in range(2, 8)}, "r": 1.0}}]
    assert metrics.rank(lists[1]["q"]).index("x") == 2 and metrics.rank(lists[1]["q"]).index("r") == 9
    params, score = fusion.choose_params(lists, {"q": {"r": 1}}, "rrf")
    assert params["k"] < 60 and score == 1.0
    assert list(fusion.rrf(lists, k=params["k"])["q"])[0] == "r" and list(fusion.rrf(lists)["q"])[0] == "x"
    params, _ = fusion.choose_params(lists, {"q": {"x": 1}}, "rrf")
    assert params == {"k": 60}  # k=60 already ranks x first: the default stays


@pytest.fixture
def two_split_beir(tmp_path):
    root = tmp_path / "toy"
    (root / "qrels").mkdir(parents=True)
    docs = [f"{p}{i}" for i in range(4) for p in "rxy"]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": d}) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": "t"}) + "\n" for i in range(4)))
    for split, qrels in (("dev", DEV_QRELS), ("test", TEST_QRELS)):
        (root / "qrels" / f"{split}.tsv").write_text(
            "".join(f"{q}\t{d}\t{s}\n" for q, j in qrels.items() for d, s in j.items()))
    return str(root)


@pytest.fixture
def fake_systems(monkeypatch):
    """Systems A and B of evaluate_all return the runs above (no model loads)."""
    from bmretriever_jax.data.beir import load_beir

    monkeypatch.setattr(suite, "make_encoder", lambda name, **kw: name)

    def runs(enc, name, data_dir, splits, *a):
        return {s: RUNS[name][s] for s in splits}, {s: load_beir(data_dir, s)[2] for s in splits}

    monkeypatch.setattr(suite, "_system_runs", runs)


def test_eval_fusion_row_uses_the_dev_choice_not_the_test_optimum(two_split_beir, fake_systems, tmp_path):
    res = suite.evaluate_all(["A", "B"], [two_split_beir], cache_dir=str(tmp_path), quiet=True, fusion_method="wsum",
                             save_runs=str(tmp_path / "runs"))
    row = res["wsum(A + B) | toy"]
    assert row["fusion"] == "A 1 + B 0 (chosen on dev: ndcg@10 1.0000)"
    test_runs = [RUNS["A"]["test"], RUNS["B"]["test"]]
    want = metrics.evaluate_run(TEST_QRELS, fusion.wsum(test_runs, [1.0, 0.0]), missing="zero")
    assert row["ndcg@10"] == pytest.approx(want["ndcg@10"]) == pytest.approx(res["A | toy"]["ndcg@10"])
    _, test_best = fusion.choose_params(test_runs, TEST_QRELS, "wsum")
    assert test_best == 1.0 > row["ndcg@10"]  # tuning on test would have scored higher: it was not done
    # run files: every system and the fused run, read back with equal rankings and scores
    folder = tmp_path / "runs" / "toy" / "test"
    assert sorted(os.listdir(folder)) == ["A.trec", "B.trec", "wsum_A_B.trec"]
    back = fusion.read_run(str(folder / "wsum_A_B.trec"))
    fused = fusion.wsum(test_runs, [1.0, 0.0])
    assert back == fused and all(list(back[q]) == metrics.rank(back[q]) for q in back)
    assert fusion.read_run(str(folder / "B.trec")) == RUNS["B"]["test"]


def test_eval_fusion_without_a_dev_split_uses_defaults_and_says_so(two_split_beir, fake_systems, tmp_path):
    os.remove(os.path.join(two_split_beir, "qrels", "dev.tsv"))
    res = suite.evaluate_all(["A", "B"], [two_split_beir], cache_dir=str(tmp_path), quiet=True, fusion_method="rrf")
    assert res["rrf(A + B) | toy"]["fusion"] == "k=60 (default: no dev split)"
    assert suite.print_table(res).count("default: no dev split") == 1


def test_eval_fuse_a_subset_of_the_systems(two_split_beir, fake_systems, monkeypatch, tmp_path):
    """fuse=[...] fuses only those systems; the others are scored alone and never retrieve for dev."""
    monkeypatch.setitem(RUNS, "C", {"dev": RUNS["B"]["dev"], "test": RUNS["A"]["test"]})
    asked = []
    inner = suite._system_runs
    monkeypatch.setattr(suite, "_system_runs", lambda enc, name, d, splits, *a: (asked.append((name, tuple(splits))),
                                                                                   inner(enc, name, d, splits, *a))[1])
    monkeypatch.setattr(suite, "evaluate_retrieval", lambda enc, d, split, *a, **kw: metrics.evaluate_run(
        TEST_QRELS, RUNS[enc][split], missing="zero"))  # a system scored alone (no run kept)
    res = suite.evaluate_all(["C", "A", "B"], [two_split_beir], cache_dir=str(tmp_path), quiet=True,
                             fusion_method="wsum", fuse=["A", "B"])
    assert sorted(res) == ["A | toy", "B | toy", "C | toy", "wsum(A + B) | toy"]
    assert res["wsum(A + B) | toy"]["fusion"] == "A 1 + B 0 (chosen on dev: ndcg@10 1.0000)"
    assert res["C | toy"]["ndcg@10"] == pytest.approx(res["A | toy"]["ndcg@10"])  # C's test run is A's
    assert asked == [("A", ("test", "dev")), ("B", ("test", "dev"))]  # C: evaluate_retrieval, test only
    # with run files every system keeps its runs; a later one that is not fused must not hide the dev qrels
    asked.clear()
    res = suite.evaluate_all(["A", "B", "C"], [two_split_beir], cache_dir=str(tmp_path), quiet=True,
                             fusion_method="wsum", fuse=["A", "B"], save_runs=str(tmp_path / "runs"))
    assert res["wsum(A + B) | toy"]["fusion"] == "A 1 + B 0 (chosen on dev: ndcg@10 1.0000)"
    assert asked == [("A", ("test", "dev")), ("B", ("test", "dev")), ("C", ("test",))]
    assert sorted(os.listdir(tmp_path / "runs" / "toy" / "test")) == ["A.trec", "B.trec", "C.trec", "wsum_A_B.trec"]
    with pytest.raises(ConfigError, match=r"--fuse D: not among the systems evaluated; allowed: A, B"):
        suite.evaluate_all(["A", "B"], [two_split_beir], fusion_method="wsum", fuse=["A", "D"])
    with pytest.raises(ConfigError, match="at least two systems"):
        suite.evaluate_all(["A", "B"], [two_split_beir], fusion_method="wsum", fuse=["A", "A"])
    with pytest.raises(ConfigError, match="give --fusion"):
        suite.evaluate_all(["A", "B"], [two_split_beir], fuse=["A", "B"])


def test_eval_fusion_refuses_to_tune_on_the_scored_split_or_fuse_one_system(two_split_beir, tmp_path):
    with pytest.raises(ConfigError, match="split being scored"):
        suite.evaluate_all(["A", "B"], [two_split_beir], split="dev", fusion_method="rrf", fusion_dev_split="dev")
    with pytest.raises(ConfigError, match="at least two systems"):
        suite.evaluate_all(["bm25"], [two_split_beir], fusion_method="rrf")


# ---------------------------------------------------------------------------------------------- run files
def test_run_file_format_and_round_trip(tmp_path):
    run = {"q1": {"d1": 0.5, "d2": 0.5, "d3": 1 / 3}, "q2": {"z": -1.25e-7}, "q3": {}}
    path = fusion.write_run(str(tmp_path / "sub" / "r.trec"), run, "my model")
    lines = open(path).read().splitlines()
    assert lines[0] == "q1 Q0 d2 1 0.5 my_model"  # ties by doc id descending, as trec_eval
    assert lines[2] == f"q1 Q0 d3 3 {1 / 3!r} my_model" and len(lines) == 4
    back = fusion.read_run(path)
    assert back == {"q1": run["q1"], "q2": run["q2"]}  # exact scores; an empty query has no line
    assert all(metrics.rank(back[q]) == metrics.rank(run[q]) for q in back)
    assert list(fusion.read_run(fusion.write_run(str(tmp_path / "d.trec"), run, "t", depth=1))["q1"]) == ["d2"]
    with pytest.raises(ValueError, match="spaces"):
        fusion.format_run({"q": {"a b": 1.0}}, "t")
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 0.4\n")
    with pytest.raises(DataFormatError, match=r"bad.trec:2: expected 6 columns"):
        fusion.read_run(str(tmp_path / "bad.trec"))
    (tmp_path / "bad2.trec").write_text("q1 Q0 d1 1 high t\n")
    with pytest.raises(DataFormatError, match=r"bad2.trec:1: .*not a number"):
        fusion.read_run(str(tmp_path / "bad2.trec"))
