"""BM25 over a list of texts: the one index behind the BM25 baseline (eval.baselines), BM25 hard-negative mining
(data.mining) and the BM25 filters of synthetic data (synth.filters).

bm25s defaults: Lucene variant, k1 = 1.5, b = 0.75; texts lower-cased, English stop words removed, Snowball
(PyStemmer) English stemming, queries tokenised the same way.
"""
from __future__ import annotations

import logging
from typing import Sequence, Tuple

import numpy as np

K1 = 1.5
B = 0.75


class BM25Index:
    """idx = BM25Index(texts); idx.scores(queries) -> [Q, N] scores; idx.top_k(queries, k) -> (ids, scores)."""

    def __init__(self, texts: Sequence[str], k1: float = K1, b: float = B):
        # imported here: bm25s imports jax when it is installed (~2 s), and `bmr --help` imports data.mining
        import bm25s
        import Stemmer

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        self._bm25s = bm25s
        self._stemmer = Stemmer.Stemmer("english")
        self.n = len(texts)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(self._tokenize(list(texts)), show_progress=False)

    def _tokenize(self, texts: list, return_ids: bool = True):
        return self._bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, return_ids=return_ids,
                                    show_progress=False)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """[len(queries), N] float32 BM25 scores of every indexed text (0 where no term is shared)."""
        out = np.zeros((len(queries), self.n), np.float32)
        for row, toks in enumerate(self._tokenize(list(queries), return_ids=False)):
            if toks:  # a query of stop words only has no tokens, and bm25s refuses an empty list
                out[row] = self.retriever.get_scores(list(toks))
        return out

    def top_k(self, queries: Sequence[str], k: int) -> Tuple[np.ndarray, np.ndarray]:
        """(indices, scores), each [len(queries), min(k, N)]: every query's best texts, best first (bm25s'
        selection, ties as bm25s breaks them)."""
        return self.retriever.retrieve(self._tokenize(list(queries)), k=min(k, self.n), show_progress=False,
                                       n_threads=0)
