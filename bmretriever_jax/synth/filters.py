"""Filters for LLM-made training data, each stage counted in a report.

Synthetic queries (one per pair, the source passage is the pair's positive):
  empty -> length (min/max words) -> meta (talks about "the passage" instead of asking: not self-contained)
  -> copied (word n-gram overlap with the source passage) -> duplicate
  (same normalised query seen before) -> consistency (round trip: the source passage must rank within the
  top k for its query under a retriever, over a corpus).
Synthetic hard negatives (each negative of each pair):
  empty -> length -> meta (talks about the task: "hard negative", "the query", "the relevant document")
  -> duplicate (same text as the positive or an earlier negative of the pair) -> copied
  (near-copy of the positive) -> lexical (the negative covers the query's content words at least as well as
  the positive does and almost all of them: it probably answers the query) -> retriever (the retriever
  scores it at or above the positive minus a margin: a likely false negative).

A retriever is the string "bm25" (`data.bm25`, the index of `eval.baselines`) or any object with
encode_queries(texts, instruction) / encode_passages(docs) (an `embed.Encoder`, MiniLM, a test fake).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from bmretriever_jax.data.bm25 import BM25Index
from bmretriever_jax.data.pairs import Pair, as_passage, doc_id, doc_keys

_WORD = re.compile(r"\w+", re.UNICODE)
# Short English function words: they carry no topic, so the lexical relevance check ignores them.
STOPWORDS = frozenset("""a an and are as at be been being but by can could did do does doing for from had has have
having how i if in into is it its itself may might more most no nor not of on or our should so some such than that
the their them then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your whether between about against during before after above below""".split())


# A query that mentions its source ("the passage supports the claim that ...") cannot be searched with.
META_PHRASES = ("the passage", "this passage", "the given passage", "the text", "this text", "the above",
                "the abstract", "this abstract", "the article", "this article")


# A "document" that talks about the task is the model failing to write one (small models do this a lot).
NEGATIVE_META_PHRASES = ("hard negative", "negative document", "the query", "this query", "relevant document",
                         "the relevant", "the document", "this document", "the passage", "this passage")


def mentions_source(text: str, phrases: Sequence[str] = META_PHRASES) -> bool:
    t = f" {normalize(text)} "
    return any(f" {p} " in t for p in phrases)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore)."""
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """Identity of a text up to case, punctuation and spacing (the duplicate key)."""
    return " ".join(words(text))


def passage_text(doc) -> str:
    p = as_passage(doc)
    return f"{p['title']} {p['text']}".strip()


def ngram_overlap(text: str, source: str, n: int = 4) -> float:
    """Fraction of `text`'s word n-grams that also occur in `source` (0..1).

    Texts shorter than n words count as one n-gram of their own length: "copied" then means the whole text
    occurs in the source as a contiguous word sequence.
    """
    a, b = words(text), words(source)
    if not a:
        return 0.0
    n = min(n, len(a))
    grams_a = [tuple(a[i:i + n]) for i in range(len(a) - n + 1)]
    grams_b = {tuple(b[i:i + n]) for i in range(len(b) - n + 1)}
    return sum(g in grams_b for g in grams_a) / len(grams_a)


def content_words(text: str) -> set[str]:
    """Words that carry the topic: no stop words, no 1-character tokens, crude plural folding."""
    out = set()
    for w in words(text):
        if w in STOPWORDS or len(w) < 2:
            continue
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def coverage(query: str, doc_text: str) -> float:
    """Fraction of the query's content words present in the document (1.0 for a query without any)."""
    q = content_words(query)
    if not q:
        return 1.0
    return len(q & content_words(doc_text)) / len(q)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FilterReport:
    """How many items survive each stage, in order. `unit` says what is counted (queries, negatives)."""

    unit: str
    start: int
    stages: list = dataclasses.field(default_factory=list)  # [(stage name, kept after it)]
    extra: dict = dataclasses.field(default_factory=dict)

    def add(self, name: str, kept: int) -> None:
        self.stages.append((name, int(kept)))

    @property
    def kept(self) -> int:
        return self.stages[-1][1] if self.stages else self.start

    def to_dict(self) -> dict:
        prev, rows = self.start, []
        for name, kept in self.stages:
            rows.append({"stage": name, "kept": kept, "dropped": prev - kept})
            prev = kept
        return {"unit": self.unit, "input": self.start, "kept": self.kept, "stages": rows, **self.extra}

    def format(self) -> str:
        lines = [f"{'stage':<14}{'kept':>8}{'dropped':>9}   ({self.unit})", f"{'input':<14}{self.start:>8}"]
        for row in self.to_dict()["stages"]:
            lines.append(f"{row['stage']:<14}{row['kept']:>8}{row['dropped']:>9}")
        for k, v in self.extra.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Retrievers
# ----------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def source_ranks(queries: Sequence[str], sources: Sequence[int], docs: Sequence[Mapping[str, str]], retriever,
                 instruction: str = "", *, doc_vectors: Optional[np.ndarray] = None,
                 batch_size: int = 32) -> np.ndarray:
    """Rank (1 = best) of each query's source document docs[sources[i]] among all `docs` under `retriever`.

    Rank = 1 + the number of documents scored strictly higher. Under BM25 a source sharing no term with its
    query (score 0) gets rank len(docs) + 1: no evidence is not agreement. Dense scores are cosines.
    doc_vectors: precomputed passage vectors [len(docs), d] (e.g. a cached corpus) to skip encoding.
    """
    sources = np.asarray(sources, np.int64)
    ranks = np.zeros(len(queries), np.int64)
    if isinstance(retriever, str):
        if retriever != "bm25":
            raise ValueError(f"unknown retriever {retriever!r}: 'bm25' or an encoder object")
        index = BM25Index([passage_text(d) for d in docs])
        for i, q in enumerate(queries):
            s = index.scores([q])[0]
            src = s[sources[i]]
            ranks[i] = 1 + int((s > src).sum()) if src > 0 else len(docs) + 1
        return ranks
    if doc_vectors is None:
        doc_vectors = retriever.encode_passages([as_passage(d) for d in docs], batch_size=batch_size)
    dv = _unit(doc_vectors)
    qv = _unit(retriever.encode_queries(list(queries), instruction, batch_size=batch_size))
    for a in range(0, len(queries), 1024):
        s = qv[a:a + 1024] @ dv.T                                                          # [b, N]
        src = s[np.arange(s.shape[0]), sources[a:a + 1024]]
        ranks[a:a + 1024] = 1 + (s > src[:, None]).sum(1)
    return ranks


# ----------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------
def _as_pair(p) -> Pair:
    return p if isinstance(p, Pair) else Pair.from_json(p)


def filter_queries(pairs: Iterable, *, min_words: int = 3, max_words: int = 64, max_copy_overlap: float = 0.6,
                   copy_ngram: int = 4, dedup: bool = True, meta_phrases: Sequence[str] = META_PHRASES,
                   retriever: Any = None,
                   corpus: Optional[Mapping[str, Mapping[str, str]]] = None, top_k: int = 10,
                   instruction: str = "", doc_vectors: Optional[np.ndarray] = None,
                   generated_empty: int = 0) -> tuple[list[Pair], FilterReport]:
    """Synthetic (query, source passage) pairs -> (kept pairs, report).

    corpus {doc id: {"title", "text"}}: the pool the round-trip check ranks against (positives found in it
    by their "id" or their text; positives not in it are added). retriever None skips the check.
    generated_empty: outputs the generator already dropped as empty (counted in the report's first stage).
    """
    pairs = [_as_pair(p) for p in pairs]
    report = FilterReport("queries", len(pairs) + generated_empty)
    pairs = [p for p in pairs if p.query.strip()]
    report.add("empty", len(pairs))
    pairs = [p for p in pairs if min_words <= len(words(p.query)) <= max_words]
    report.add("length", len(pairs))
    if meta_phrases:
        pairs = [p for p in pairs if not mentions_source(p.query, meta_phrases)]
        report.add("meta", len(pairs))
    pairs = [p for p in pairs if ngram_overlap(p.query, passage_text(p.positive), copy_ngram) <= max_copy_overlap]
    report.add("copied", len(pairs))
    if dedup:
        seen, kept = set(), []
        for p in pairs:
            key = normalize(p.query)
            if key not in seen:
                seen.add(key)
                kept.append(p)
        pairs = kept
        report.add("duplicate", len(pairs))
    if retriever is not None and pairs:
        docs, sources = _source_pool(pairs, corpus or {})
        ranks = source_ranks([p.query for p in pairs], sources, docs, retriever, instruction,
                             doc_vectors=doc_vectors if len(docs) == len(corpus or {}) else None)
        pairs = [p for p, r in zip(pairs, ranks) if r <= top_k]
        report.add(f"consistency@{top_k}", len(pairs))
        report.extra["consistency_pool"] = len(docs)
    return pairs, report


def _source_pool(pairs: Sequence[Pair], corpus: Mapping[str, Mapping[str, str]]):
    """-> (docs: the corpus + positives missing from it, index of each pair's positive in docs)."""
    ids = list(corpus)
    docs = [corpus[d] for d in ids]
    by_id = {d: i for i, d in enumerate(ids)}
    by_text = {}
    for i, d in enumerate(docs):
        for key in doc_keys(d):
            by_text.setdefault(key, i)
    sources = []
    for p in pairs:
        did = doc_id(p.positive)
        if did is not None and did in by_id:
            sources.append(by_id[did])
            continue
        keys = doc_keys(p.positive)
        hit = next((by_text[k] for k in keys if k in by_text), None)
        if hit is None:
            hit = len(docs)
            docs.append(as_passage(p.positive))
            for k in keys:
                by_text[k] = hit
        sources.append(hit)
    return docs, sources


# ----------------------------------------------------------------------------------------------------
# Negatives
# ----------------------------------------------------------------------------------------------------
def filter_negatives(pairs: Iterable, *, min_words: int = 8, max_copy_overlap: float = 0.6, copy_ngram: int = 4,
                     meta_phrases: Sequence[str] = NEGATIVE_META_PHRASES, lexical: bool = True,
                     min_coverage: float = 0.8, retriever: Any = None,
                     instruction: str = "", margin: float = 0.0, drop_pairs_without_negatives: bool = False,
                     batch_size: int = 32) -> tuple[list[Pair], FilterReport]:
    """Pairs with (synthetic) hard negatives -> (pairs with the surviving negatives, report over negatives).

    lexical: drop a negative whose query coverage (fraction of the query's content words it contains) is
    >= min_coverage and >= the positive's coverage. retriever: drop a negative scored >= score(positive) -
    margin for the query (cosine for encoders, BM25 over all positives and negatives of `pairs`).
    Pairs left without negatives are kept (without them) unless drop_pairs_without_negatives.
    """
    pairs = [_as_pair(p) for p in pairs]
    negs = [list(p.negatives) for p in pairs]
    report = FilterReport("negatives", sum(map(len, negs)))

    def stage(name, keep_fn):
        # keep_fn(pair index, pair, negative, its index in the pair's current list, that list)
        for i, p in enumerate(pairs):
            negs[i] = [n for j, n in enumerate(negs[i]) if keep_fn(i, p, n, j, negs[i])]
        report.add(name, sum(map(len, negs)))

    stage("empty", lambda i, p, n, j, ns: bool(passage_text(n).strip()))
    stage("length", lambda i, p, n, j, ns: len(words(passage_text(n))) >= min_words)
    if meta_phrases:
        stage("meta", lambda i, p, n, j, ns: not mentions_source(passage_text(n), meta_phrases))

    def not_duplicate(i, p, n, j, ns):
        keys = set(doc_keys(n))
        if keys & set(doc_keys(p.positive)):
            return False
        return not any(keys & set(doc_keys(m)) for m in ns[:j])

    stage("duplicate", not_duplicate)
    stage("copied", lambda i, p, n, j, ns: ngram_overlap(passage_text(n), passage_text(p.positive), copy_ngram)
          <= max_copy_overlap)
    if lexical:
        def not_lexically_relevant(i, p, n, j, ns):
            c = coverage(p.query, passage_text(n))
            return not (c >= min_coverage and c >= coverage(p.query, passage_text(p.positive)))

        stage("lexical", not_lexically_relevant)
    if retriever is not None:
        keep = _retriever_keep(pairs, negs, retriever, instruction, margin, batch_size)
        stage("retriever", lambda i, p, n, j, ns: keep[i][j])
    out = []
    for p, ns in zip(pairs, negs):
        if ns or not drop_pairs_without_negatives:
            out.append(dataclasses.replace(p, negatives=tuple(ns)))
    report.extra["pairs_with_negatives"] = sum(1 for ns in negs if ns)
    report.extra["pairs_out"] = len(out)
    return out, report


def _retriever_keep(pairs, negs, retriever, instruction, margin, batch_size) -> list[list[bool]]:
    """keep[i][j]: whether negs[i][j] scores below its positive (minus margin) for pairs[i].query."""
    keep = [[True] * len(ns) for ns in negs]
    if isinstance(retriever, str):
        if retriever != "bm25":
            raise ValueError(f"unknown retriever {retriever!r}: 'bm25' or an encoder object")
        texts, index_of = [], {}
        for p, ns in zip(pairs, negs):
            for d in (p.positive, *ns):
                t = passage_text(d)
                if t not in index_of:
                    index_of[t] = len(texts)
                    texts.append(t)
        bm25 = BM25Index(texts)
        for i, (p, ns) in enumerate(zip(pairs, negs)):
            if not ns:
                continue
            s = bm25.scores([p.query])[0]
            pos = s[index_of[passage_text(p.positive)]]
            keep[i] = [bool(s[index_of[passage_text(n)]] < pos - margin) for n in ns]
        return keep
    rows = [i for i, ns in enumerate(negs) if ns]
    if not rows:
        return keep
    qv = _unit(retriever.encode_queries([pairs[i].query for i in rows], instruction, batch_size=batch_size))
    pv = _unit(retriever.encode_passages([as_passage(pairs[i].positive) for i in rows], batch_size=batch_size))
    flat = [(r, i, j) for r, i in enumerate(rows) for j in range(len(negs[i]))]
    nv = _unit(retriever.encode_passages([as_passage(negs[i][j]) for _, i, j in flat], batch_size=batch_size))
    pos = (qv * pv).sum(-1)
    for (r, i, j), v in zip(flat, nv):
        keep[i][j] = bool(float(qv[r] @ v) < pos[r] - margin)
    return keep
