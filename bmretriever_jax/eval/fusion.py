"""Hybrid retrieval: fuse the ranked lists of several systems (dense models, BM25) for the same queries.

A run is {query id: {doc id: score}}, each system's top-k list (`bmr eval` and `bmr search` use the top 1000).
Two fusions, as ranx names them:

  rrf   reciprocal-rank fusion (Cormack et al., 2009): score(d) = sum_i w_i / (k + rank_i(d)), rank 1-based in
        system i's list, a document a system did not return adds nothing; w_i = 1 unless given. Parameter: k.
  wsum  weighted sum of min-max normalised scores: score(d) = sum_i w_i * (s_i(d) - min_i) / (max_i - min_i),
        min/max over system i's list for that query, a document it did not return counts as 0 (its list's
        minimum); a list whose scores are all equal normalises to 1. Parameters: the weights (summing to 1).

Ranks inside each list and the order of the fused list are trec_eval's (score descending, ties by doc id
descending: `metrics.rank`), fused scores are rounded to 12 decimals so that sums of the same terms in another
order tie exactly, and the fused list is cut to `depth` documents.

The parameters are chosen on a dev split (`choose_params`: the grid point with the best mean NDCG@10, the
default k=60 / equal weights kept unless another point is strictly better), never on the split that is scored.
TREC run files (`qid Q0 docid rank score tag`) are written and read by `write_run` / `read_run`.
Pure numpy; no model is loaded here.
"""
from __future__ import annotations

import itertools
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bmretriever_jax.eval import metrics
from bmretriever_jax.util.errors import ConfigError, DataFormatError

Run = Dict[str, Dict[str, float]]
METHODS = ("rrf", "wsum")
DEFAULT_RRF_K = 60
DEPTH = 1000  # each system's list, and the fused list
RRF_GRID = (60, 1, 2, 5, 10, 20, 30, 40, 50, 80, 100, 150, 200)  # the default first: it wins ties
DECIMALS = 12


# ------------------------------------------------------------------------------------------------ fusion
def default_params(method: str, n_systems: int) -> dict:
    """k=60 for rrf; equal weights for wsum."""
    _check_method(method)
    if method == "rrf":
        return {"k": DEFAULT_RRF_K}
    return {"weights": [1.0 / n_systems] * n_systems}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"fusion={method!r}; allowed: {', '.join(METHODS)}")


def minmax(scores: np.ndarray) -> np.ndarray:
    """(s - min) / (max - min) of one list; all ones when every score is equal (and [] for [])."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        return scores
    lo, hi = scores.min(), scores.max()
    if hi == lo:
        return np.ones_like(scores)
    return (scores - lo) / (hi - lo)


def _query_matrix(runs: Sequence[Mapping[str, Mapping[str, float]]], qid: str):
    """-> (doc ids [m], ranks [n, m] (inf = not returned), min-max scores [n, m] (0 = not returned))."""
    docs: List[str] = []
    col: Dict[str, int] = {}
    for run in runs:
        for d in run.get(qid) or {}:
            if d not in col:
                col[d] = len(docs)
                docs.append(d)
    ranks = np.full((len(runs), len(docs)), np.inf)
    norm = np.zeros((len(runs), len(docs)))
    for i, run in enumerate(runs):
        scores = run.get(qid) or {}
        order = metrics.rank(scores)
        if not order:
            continue
        cols = np.fromiter((col[d] for d in order), np.int64, len(order))
        ranks[i, cols] = np.arange(1, len(order) + 1)
        norm[i, cols] = minmax(np.fromiter((scores[d] for d in order), np.float64, len(order)))
    return docs, ranks, norm


def _fused_scores(method: str, params: Mapping, ranks: np.ndarray, norm: np.ndarray) -> np.ndarray:
    n = ranks.shape[0]
    if method == "rrf":
        k = float(params.get("k", DEFAULT_RRF_K))
        w = np.asarray(params.get("weights") or [1.0] * n, np.float64)
        contrib = np.where(np.isinf(ranks), 0.0, 1.0 / (k + np.where(np.isinf(ranks), 0.0, ranks)))
    else:
        w = np.asarray(params.get("weights") or [1.0 / n] * n, np.float64)
        contrib = norm
    if w.shape != (n,):
        raise ConfigError(f"fusion weights {list(w)}: {len(w)} weight(s) for {n} systems")
    return np.round(w @ contrib, DECIMALS)


def _top(docs: Sequence[str], scores: np.ndarray, depth: int) -> Dict[str, float]:
    """The best `depth` documents in trec_eval order, as {doc id: score} (insertion order = rank order)."""
    if len(docs) > depth:  # candidates: everything scoring at least the depth-th best score (ties kept)
        cut = np.partition(scores, len(docs) - depth)[len(docs) - depth]
        keep = np.nonzero(scores >= cut)[0]
    else:
        keep = np.arange(len(docs))
    cand = {docs[j]: float(scores[j]) for j in keep}
    return {d: cand[d] for d in metrics.rank(cand)[:depth]}


def fuse(runs: Sequence[Mapping[str, Mapping[str, float]]], method: str = "rrf", params: Optional[Mapping] = None,
         *, depth: int = DEPTH) -> Run:
    """The fused run of `runs` (one per system, same queries): method "rrf" (params {"k": 60}, optionally
    {"weights": [...]}) or "wsum" (params {"weights": [w_1, ..., w_n]}, default equal). Every query of any run
    is in the result, with its top `depth` documents in trec_eval order."""
    _check_method(method)
    if not runs:
        raise ConfigError("fusion needs at least one run")
    params = dict(params or default_params(method, len(runs)))
    qids = list(dict.fromkeys(q for run in runs for q in run))
    out: Run = {}
    for qid in qids:
        docs, ranks, norm = _query_matrix(runs, qid)
        out[qid] = _top(docs, _fused_scores(method, params, ranks, norm), depth) if docs else {}
    return out


def rrf(runs, k: float = DEFAULT_RRF_K, *, weights: Optional[Sequence[float]] = None, depth: int = DEPTH) -> Run:
    """Reciprocal-rank fusion: sum over systems of w_i / (k + rank)."""
    return fuse(runs, "rrf", {"k": k, "weights": list(weights) if weights is not None else None}, depth=depth)


def wsum(runs, weights: Optional[Sequence[float]] = None, *, depth: int = DEPTH) -> Run:
    """Weighted sum of per-query min-max normalised scores (default: equal weights)."""
    return fuse(runs, "wsum", {"weights": list(weights) if weights is not None else None}, depth=depth)


# ------------------------------------------------------------------------------------- parameter choice
def weight_grid(n: int, step: Optional[float] = None) -> List[List[float]]:
    """Every weight vector of n non-negative multiples of `step` summing to 1, equal weights first (when they are
    on the grid, else prepended). Default step: 0.1 for 2-3 systems, 0.25 for 4, 0.5 beyond."""
    if n < 1:
        raise ConfigError("fusion needs at least one system")
    step = step or (0.1 if n <= 3 else 0.25 if n == 4 else 0.5)
    parts = int(round(1 / step))
    grid = [[round(c / parts, 10) for c in combo]
            for combo in _compositions(parts, n)]
    equal = [1.0 / n] * n
    grid = [g for g in grid if not np.allclose(g, equal)]
    return [equal] + grid


def _compositions(total: int, n: int):
    """All n-tuples of non-negative integers summing to total."""
    for cuts in itertools.combinations(range(total + n - 1), n - 1):
        bounds = (-1,) + cuts + (total + n - 1,)
        yield tuple(bounds[i + 1] - bounds[i] - 1 for i in range(n))


def param_grid(method: str, n_systems: int) -> List[dict]:
    """The candidates `choose_params` tries, the default first."""
    _check_method(method)
    if method == "rrf":
        return [{"k": k} for k in RRF_GRID]
    return [{"weights": w} for w in weight_grid(n_systems)]


def choose_params(dev_runs: Sequence[Mapping[str, Mapping[str, float]]], dev_qrels: Mapping[str, Mapping[str, int]],
                  method: str, *, grid: Optional[Sequence[Mapping]] = None, metric: str = "ndcg@10",
                  depth: int = DEPTH) -> Tuple[dict, float]:
    """-> (params, their mean `metric` on the dev queries): the grid point (default `param_grid`) with the best
    dev score, an earlier point kept on ties (the default comes first). Only dev runs and dev qrels go in: the
    split that is reported never influences the choice."""
    _check_method(method)
    grid = list(grid) if grid is not None else param_grid(method, len(dev_runs))
    m = re.fullmatch(r"([a-z]+)@(\d+)", metric)
    if not m:
        raise ConfigError(f"metric={metric!r}: expected e.g. ndcg@10")
    cutoff = min(int(m.group(2)), depth)
    qids = list(dev_qrels)
    matrices = {q: _query_matrix(dev_runs, q) for q in qids}
    best, best_score = None, -np.inf
    for params in grid:
        per_query = []
        for q in qids:
            docs, ranks, norm = matrices[q]
            top = _top(docs, _fused_scores(method, params, ranks, norm), cutoff) if docs else {}
            per_query.append(metrics.query_metrics(dev_qrels[q], top, (int(m.group(2)),))[metric])
        score = float(np.mean(per_query)) if per_query else 0.0
        if score > best_score:
            best, best_score = dict(params), score
    return best, best_score


def describe(method: str, params: Mapping, names: Sequence[str]) -> str:
    """"k=60" or "bm25 0.3 + model 0.7": the parameters as the table shows them."""
    if method == "rrf":
        w = params.get("weights")
        k = params.get("k", DEFAULT_RRF_K)
        return f"k={k:g}" + ("" if not w else " w=" + "/".join(f"{x:g}" for x in w))
    return " + ".join(f"{n} {w:g}" for n, w in zip(names, params["weights"]))


# ---------------------------------------------------------------------------------------------- run files
def safe_tag(name: str) -> str:
    """A run tag / file name from a system name: anything but letters, digits, . _ - becomes _."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def format_run(run: Mapping[str, Mapping[str, float]], tag: str, depth: Optional[int] = None) -> str:
    """TREC run text: one `qid Q0 docid rank score tag` line per retrieved document, ranks 1.. in trec_eval order,
    scores written exactly (Python's shortest round-trip repr)."""
    tag = safe_tag(tag)
    lines = []
    for qid, scores in run.items():
        for rank, d in enumerate(metrics.rank(scores)[:depth], 1):
            if not qid or not d or any(c.isspace() for c in qid + d):
                raise ValueError(f"query {qid!r} / document {d!r}: a TREC run file cannot hold ids with spaces")
            lines.append(f"{qid} Q0 {d} {rank} {float(scores[d])!r} {tag}\n")
    return "".join(lines)


def write_run(path: str, run: Mapping[str, Mapping[str, float]], tag: str, depth: Optional[int] = None) -> str:
    """Write a TREC run file atomically (see format_run); return path."""
    from bmretriever_jax.util.atomic import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = format_run(run, tag, depth)
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def read_run(path: str) -> Run:
    """A TREC run file -> {qid: {docid: score}} (the rank column is checked to be an integer; trec_eval, and
    this project's metrics, order by score)."""
    run: Run = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.split()
            if len(cols) != 6:
                raise DataFormatError(f"{path}:{lineno}: expected 6 columns (qid Q0 docid rank score tag), "
                                      f"got {len(cols)}")
            qid, _, doc, rank, score, _ = cols
            try:
                int(rank)
                value = float(score)
            except ValueError:
                raise DataFormatError(f"{path}:{lineno}: rank {rank!r} / score {score!r} is not a number") from None
            if doc in run.setdefault(qid, {}):
                raise DataFormatError(f"{path}:{lineno}: document {doc!r} listed twice for query {qid!r}")
            run[qid][doc] = value
    return run
