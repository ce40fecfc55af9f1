"""Retrieval metrics with trec_eval's (pytrec_eval's) exact definitions.

Names and their trec_eval counterparts (relevance level 1: a document is relevant when its qrel >= 1):
  ndcg@k    ndcg_cut.k   gains = qrel values (negative -> 0), discount 1/log2(rank + 1), ideal from all qrels
  map@k     map_cut.k    sum of precision at each relevant rank <= k, divided by ALL relevant docs of the query
  recall@k  recall.k     relevant in top k / all relevant (0 when the query has none)
  p@k       P.k          relevant in top k / k (always k, even if fewer were retrieved)
  mrr@k     recip_rank on the run cut to its top k (trec_eval's recip_rank itself has no cutoff)

Ranking = trec_eval's: score descending, ties broken by document id descending (byte order, as strcmp).
Queries evaluated = those in both qrels and run (a query in the run with no results scores 0; a query with no
relevant documents scores 0), exactly what pytrec_eval returns; `missing="zero"` instead counts judged
queries absent from the run as empty runs, which is the honest choice when a system may drop queries.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

DEFAULT_K = (1, 3, 5, 10, 100, 1000)
MEASURES = ("ndcg", "map", "recall", "p", "mrr")

Run = Mapping[str, Mapping[str, float]]    # query id -> {doc id: score}
Qrels = Mapping[str, Mapping[str, int]]    # query id -> {doc id: relevance}


def rank(scores: Mapping[str, float]) -> list[str]:
    """Doc ids in trec_eval order: score descending, then doc id descending."""
    for doc_id, s in scores.items():
        if isinstance(s, float) and math.isnan(s):
            raise ValueError(f"NaN score for document {doc_id!r}")
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (float(kv[1]), kv[0]), reverse=True)]


def query_metrics(judged: Mapping[str, int], scores: Mapping[str, float],
                  k_values: Iterable[int] = DEFAULT_K) -> dict[str, float]:
    """All measures at every k for one query. judged: {doc id: relevance}; scores: {doc id: score}."""
    ks = sorted(set(int(k) for k in k_values))
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive integers, got {ks}")
    ranked = rank(scores)
    rels = np.array([judged.get(d, 0) for d in ranked], dtype=np.float64)            # [n]
    n = len(ranked)
    is_rel = rels >= 1
    gains = np.maximum(rels, 0.0)
    num_rel = sum(1 for r in judged.values() if r >= 1)
    ideal = np.sort(np.maximum(np.fromiter(judged.values(), dtype=np.float64, count=len(judged)), 0.0))[::-1]
    ideal = ideal[ideal > 0]

    positions = np.arange(1, n + 1, dtype=np.float64)                                  # ranks 1..n
    cum_dcg = np.cumsum(gains / np.log2(positions + 1.0))
    cum_idcg = np.cumsum(ideal / np.log2(np.arange(1, len(ideal) + 1, dtype=np.float64) + 1.0))
    cum_rel = np.cumsum(is_rel)
    cum_ap = np.cumsum(np.where(is_rel, cum_rel / positions, 0.0))
    first_rel = int(np.argmax(is_rel)) + 1 if is_rel.any() else 0                     # 1-based, 0 = none

    out: dict[str, float] = {}
    for k in ks:
        top = min(k, n)  # number of retrieved docs within the cutoff
        dcg = cum_dcg[top - 1] if top else 0.0
        idcg = cum_idcg[min(k, len(ideal)) - 1] if len(ideal) else 0.0
        rel_k = int(cum_rel[top - 1]) if top else 0
        out[f"ndcg@{k}"] = float(dcg / idcg) if idcg > 0 else 0.0
        out[f"map@{k}"] = float(cum_ap[top - 1] / num_rel) if (top and num_rel) else 0.0
        out[f"recall@{k}"] = rel_k / num_rel if num_rel else 0.0
        out[f"p@{k}"] = rel_k / k
        out[f"mrr@{k}"] = 1.0 / first_rel if 0 < first_rel <= k else 0.0
    return out


def per_query_metrics(qrels: Qrels, run: Run, k_values: Iterable[int] = DEFAULT_K, *,
                      missing: str = "skip") -> dict[str, dict[str, float]]:
    """{query id: {"ndcg@10": v, ...}} for every judged query in the run (see module doc for `missing`)."""
    if missing not in ("skip", "zero"):
        raise ValueError(f"missing must be 'skip' or 'zero', got {missing!r}")
    k_values = tuple(k_values)
    out = {}
    for qid, judged in qrels.items():
        if qid in run:
            out[qid] = query_metrics(judged, run[qid], k_values)
        elif missing == "zero":
            out[qid] = query_metrics(judged, {}, k_values)
    return out


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Arithmetic mean of each measure over queries (trec_eval's "all" line). {} when there are none."""
    if not per_query:
        return {}
    names = next(iter(per_query.values())).keys()
    return {name: float(np.mean([m[name] for m in per_query.values()])) for name in names}


def evaluate_run(qrels: Qrels, run: Run, k_values: Iterable[int] = DEFAULT_K, *,
                 missing: str = "skip") -> dict[str, float]:
    """Mean metrics of a run: {"ndcg@10": mean, "map@10": ..., "recall@100": ..., "p@1": ..., "mrr@10": ...}."""
    return mean_metrics(per_query_metrics(qrels, run, k_values, missing=missing))
