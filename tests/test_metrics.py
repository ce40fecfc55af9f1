"""metrics.py against pytrec_eval (trec_eval) on randomised runs: ties, graded and negative qrels, misses."""
import random

import pytest
import pytrec_eval

from bmretriever_jax.eval import metrics

K = (1, 3, 5, 10, 100, 1000)


def _random_case(seed: int, n_queries: int = 60):
    rng = random.Random(seed)
    # Ids of varying length and case so that "docid descending" is tested as a string order ("d9" > "d10").
    pool = [f"d{i}" for i in range(1500)] + ["D7", "a", "zz", "d", "d05"]
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        kind = rng.random()
        n_docs = rng.choice([0, 1, 2, 5, 20, 150, 1200]) if kind > 0.05 else 0
        docs = rng.sample(pool, n_docs)
        # Few distinct score values -> many ties, which trec_eval breaks by doc id.
        levels = rng.choice([2, 5, 1000])
        run_q = {d: float(rng.randrange(levels)) / 7.0 for d in docs}
        judged_pool = docs + rng.sample(pool, 10)  # some relevant docs are never retrieved
        n_judged = rng.choice([0, 1, 3, 8, 25])
        judged_docs = rng.sample(judged_pool, min(n_judged, len(judged_pool)))
        judged = {d: rng.choice([-1, 0, 0, 1, 1, 2, 3]) for d in judged_docs}
        if rng.random() < 0.1:
            judged = {d: 0 for d in judged}  # judged query with no relevant document
        if judged and rng.random() < 0.95:
            qrels[qid] = judged
        if rng.random() < 0.93:
            run[qid] = run_q
    run["unjudged"] = {"d1": 1.0}
    return qrels, run


def _pytrec(qrels, run):
    measures = {f"{m}.{','.join(map(str, K))}" for m in ("ndcg_cut", "map_cut", "recall", "P")} | {"recip_rank"}
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    for k in K:
        cut = {q: {d: s[d] for d in metrics.rank(s)[:k]} for q, s in run.items()}
        for q, v in rr.evaluate(cut).items():
            full[q][f"mrr_{k}"] = v["recip_rank"]
    return full


NAMES = {"ndcg": "ndcg_cut_{}", "map": "map_cut_{}", "recall": "recall_{}", "p": "P_{}", "mrr": "mrr_{}"}


@pytest.mark.parametrize("seed", range(4))
def test_every_metric_matches_pytrec_eval(seed):
    qrels, run = _random_case(seed)
    ours = metrics.per_query_metrics(qrels, run, K)
    ref = _pytrec(qrels, run)
    assert set(ours) == set(ref)
    assert len(ours) > 30
    for qid in ref:
        for m, ref_name in NAMES.items():
            for k in K:
                assert ours[qid][f"{m}@{k}"] == pytest.approx(ref[qid][ref_name.format(k)], abs=1e-6), (qid, m, k)
    means = metrics.evaluate_run(qrels, run, K)
    for m, ref_name in NAMES.items():
        for k in K:
            ref_mean = sum(v[ref_name.format(k)] for v in ref.values()) / len(ref)
            assert means[f"{m}@{k}"] == pytest.approx(ref_mean, abs=1e-6)


def test_ties_are_broken_by_doc_id_descending():
    assert metrics.rank({"a": 1.0, "b": 1.0, "c": 2.0, "d10": 0.5, "d9": 0.5}) == ["c", "b", "a", "d9", "d10"]
    # trec_eval agrees: with a tie, "b" is ranked before "a".
    ref = pytrec_eval.RelevanceEvaluator({"q": {"a": 1}}, {"P.1"}).evaluate({"q": {"a": 1.0, "b": 1.0}})
    assert ref["q"]["P_1"] == 0.0
    assert metrics.per_query_metrics({"q": {"a": 1}}, {"q": {"a": 1.0, "b": 1.0}}, (1,))["q"]["p@1"] == 0.0


def test_hand_computed_graded_example():
    # Ranked: d (unjudged), c (0), b (2), a (1), z (3); ideal gains 3, 2, 1.
    qrels = {"q": {"a": 1, "b": 2, "c": 0, "z": 3}}
    run = {"q": {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.9, "z": 0.1}}
    m = metrics.per_query_metrics(qrels, run, (3, 5))["q"]
    idcg3 = 3 + 2 / 1.584962500721156 + 1 / 2
    assert m["ndcg@3"] == pytest.approx((2 / 2) / idcg3, abs=1e-12)
    assert m["p@3"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["map@3"] == pytest.approx((1 / 3) / 3)
    assert m["mrr@3"] == pytest.approx(1 / 3) and m["mrr@5"] == pytest.approx(1 / 3)


def test_missing_queries_skip_or_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0}}
    assert metrics.evaluate_run(qrels, run, (10,))["ndcg@10"] == 1.0
    assert metrics.evaluate_run(qrels, run, (10,), missing="zero")["ndcg@10"] == 0.5


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        metrics.rank({"a": float("nan")})
    with pytest.raises(ValueError, match="positive"):
        metrics.query_metrics({"a": 1}, {"a": 1.0}, (0,))
