"""Hard-negative mining on a real SciFact subset (BM25) and with a small deterministic dense encoder."""
import os
import re
import warnings
import zlib

import bm25s
import numpy as np
import pytest
import Stemmer

from bmretriever_jax.data.builders import scifact_train_pairs
from bmretriever_jax.data.mining import mine_hard_negatives
from bmretriever_jax.data.pairs import Pair
from bmretriever_jax.data.beir import load_corpus

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # the shipped data


@pytest.fixture(scope="module")
def scifact():
    """(pairs, corpus): 120 SciFact train pairs; their positives + 600 other abstracts + one duplicate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = scifact_train_pairs(os.path.join(DATA, "scifact"))[:120]
    full = load_corpus(os.path.join(DATA, "scifact", "corpus.jsonl"))
    wanted = {p.positive["id"] for p in pairs} | set(list(full)[:600])
    corpus = {i: d for i, d in full.items() if i in wanted}
    # The same abstract under another id and title: text identity must keep it out of pair 1's negatives
    # (BM25 ranks pair 1's positive first, so its copy would be the top negative).
    dup = pairs[1].positive
    corpus["dup-" + dup["id"]] = {"title": "A different title", "text": dup["text"]}
    return pairs, corpus


def _groups(pairs):
    groups = {}
    for p in pairs:
        groups.setdefault(p.query, []).append(p)
    return groups


@pytest.fixture(scope="module")
def bm25_ranking(scifact):
    """query -> [(doc id, score)] best first, all documents, via bm25s' own retrieve() (independent path)."""
    pairs, corpus = scifact
    ids = list(corpus)
    stemmer = Stemmer.Stemmer("english")
    texts = [f"{corpus[i]['title']} {corpus[i]['text']}" for i in ids]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    queries = list(_groups(pairs))
    docs, scores = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False),
                                      k=len(ids), show_progress=False)
    return {q: [(ids[d], float(s)) for d, s in zip(docs[n], scores[n])] for n, q in enumerate(queries)}


def _candidates(pairs, ranking, query):
    """The ranking without the query's positives (by id, and the duplicate) and without zero scores."""
    positives = {p.positive["id"] for p in _groups(pairs)[query]}
    positives |= {"dup-" + i for i in positives}
    return [(d, s) for d, s in ranking[query] if d not in positives and s > 0]


def _ids(pair):
    return [n["id"] for n in pair.negatives]


def test_bm25_top_negatives_follow_the_bm25_ranking(scifact, bm25_ranking):
    pairs, corpus = scifact
    mined = mine_hard_negatives(pairs, corpus, num_negatives=5, top_k=100)
    assert [(p.query, p.positive, p.task, p.id) for p in mined] == [(p.query, p.positive, p.task, p.id) for p in pairs]
    for pair in mined:
        assert _ids(pair) == [d for d, _ in _candidates(pairs, bm25_ranking, pair.query)[:5]]
        assert all(set(n) == {"title", "text", "id"} and n == dict(corpus[n["id"]], id=n["id"])
                   for n in pair.negatives)


def test_never_returns_a_positive(scifact):
    pairs, corpus = scifact
    groups = _groups(pairs)
    assert max(len(g) for g in groups.values()) >= 2  # the subset has queries with several positives
    mined = mine_hard_negatives(pairs, corpus, num_negatives=20, top_k=60, sampling="random", seed=0)
    for pair in mined:
        own = groups[pair.query]
        pos_ids = {p.positive["id"] for p in own}
        pos_texts = {p.positive["text"] for p in own}
        assert 0 < len(pair.negatives) <= 20  # fewer only if fewer than 20 abstracts share a term with the claim
        assert not set(_ids(pair)) & (pos_ids | {"dup-" + i for i in pos_ids})
        assert not {n["text"] for n in pair.negatives} & pos_texts
    assert sum(len(p.negatives) == 20 for p in mined) > 0.9 * len(mined)
    # Pool corpus (no corpus given): the other pairs' positives, never the query's own.
    pooled = mine_hard_negatives(pairs, None, num_negatives=3)
    every_positive = {p.positive["id"] for p in pairs}
    for pair in pooled:
        assert set(_ids(pair)) <= every_positive - {p.positive["id"] for p in groups[pair.query]}


def test_skip_top(scifact):
    pairs, corpus = scifact
    base = mine_hard_negatives(pairs, corpus, num_negatives=8, top_k=50)
    skipped = mine_hard_negatives(pairs, corpus, num_negatives=5, top_k=50, skip_top=3)
    for b, s in zip(base, skipped):
        assert _ids(s) == _ids(b)[3:8]


@pytest.mark.parametrize("name,value,keep", [
    ("relative_margin", 0.1, lambda s, pos: s <= pos - abs(pos) * 0.1),
    ("absolute_margin", 3.0, lambda s, pos: s <= pos - 3.0),
    ("max_score_ratio", 0.8, lambda s, pos: s < 0.8 * pos),
])
def test_margins(scifact, bm25_ranking, name, value, keep):
    pairs, corpus = scifact
    top_k = 40
    mined = mine_hard_negatives(pairs, corpus, num_negatives=3, top_k=top_k, **{name: value})
    filtered_somewhere = False
    for pair in mined:
        scores = dict(bm25_ranking[pair.query])
        pos = min(scores[p.positive["id"]] for p in _groups(pairs)[pair.query])
        window = _candidates(pairs, bm25_ranking, pair.query)[:top_k]
        # Exactly the best 3 of the window's candidates that clear the margin, in score order.
        expected = [d for d, s in window if keep(s, pos)][:3]
        assert _ids(pair) == expected
        filtered_somewhere |= expected != [d for d, _ in window[:3]]
    assert filtered_somewhere  # the margin removed candidates for some query (the test is not vacuous)


def test_random_sampling_is_seeded(scifact, bm25_ranking):
    pairs, corpus = scifact
    kw = dict(num_negatives=4, top_k=30, sampling="random")
    a = mine_hard_negatives(pairs, corpus, seed=1, **kw)
    assert [_ids(p) for p in a] == [_ids(p) for p in mine_hard_negatives(pairs, corpus, seed=1, **kw)]
    b = mine_hard_negatives(pairs, corpus, seed=2, **kw)
    assert sum(_ids(x) != _ids(y) for x, y in zip(a, b)) > len(pairs) // 2
    for pair in a:
        window = [d for d, _ in _candidates(pairs, bm25_ranking, pair.query)[:30]]
        assert set(_ids(pair)) <= set(window)
        assert _ids(pair) == sorted(_ids(pair), key=window.index)  # kept in score order
    # Random is not top: the sample reaches below the first 4 of the window.
    top = mine_hard_negatives(pairs, corpus, num_negatives=4, top_k=30)
    assert [_ids(p) for p in top] != [_ids(p) for p in a]


def test_existing_negatives_are_kept_and_not_mined_again(scifact, bm25_ranking):
    pairs, corpus = scifact
    first = _candidates(pairs, bm25_ranking, pairs[5].query)[0][0]
    given = Pair(pairs[5].query, pairs[5].positive, negatives=("an LLM-written hard negative",
                                                               dict(corpus[first], id=first)), task="scifact")
    mined = mine_hard_negatives([given] + pairs[6:20], corpus, num_negatives=2)
    assert mined[0].negatives[:2] == given.negatives
    assert len(mined[0].negatives) == 4 and first not in [n["id"] for n in mined[0].negatives[2:]]


def test_parameter_checks(scifact):
    pairs, corpus = scifact
    with pytest.raises(ValueError, match="num_negatives"):
        mine_hard_negatives(pairs, corpus, num_negatives=0)
    with pytest.raises(ValueError, match="window"):
        mine_hard_negatives(pairs, corpus, num_negatives=5, top_k=10, skip_top=6)
    with pytest.raises(ValueError, match="sampling"):
        mine_hard_negatives(pairs, corpus, sampling="hardest")
    with pytest.raises(ValueError, match="retriever"):
        mine_hard_negatives(pairs, corpus, retriever="splade")
    with pytest.raises(ValueError, match="dense"):
        mine_hard_negatives(pairs, corpus, corpus_embeddings=np.zeros((len(corpus), 4)))
    assert mine_hard_negatives([], corpus) == []


# ---------------------------------------------------------------------------------------------------- dense

class HashEncoder:
    """Hashed bag of words, L2-normalised: a deterministic stand-in for `embed.Encoder`."""

    fingerprint = "hash-bow-512"

    def __init__(self, dim=512):
        self.dim = dim
        self.instructions = []
        self.passages_encoded = 0

    def _vec(self, text):
        v = np.zeros(self.dim, np.float32)
        for tok in re.findall(r"\w\w+", text.lower()):
            v[zlib.crc32(tok.encode()) % self.dim] += 1.0
        return v / max(np.linalg.norm(v), 1e-6)

    def encode_queries(self, texts, instruction):
        self.instructions.append(instruction)
        return np.stack([self._vec(t) for t in texts])

    def encode_passages(self, docs):
        self.passages_encoded += len(docs)
        return np.stack([self._vec(f"{d['title']} {d['text']}") for d in docs])


def test_dense_mining_is_exact_top_k(scifact):
    pairs, corpus = scifact
    table = {"scifact": "Given a scientific claim, retrieve documents that support or refute the claim"}
    enc = HashEncoder()
    mined = mine_hard_negatives(pairs, corpus, retriever=enc, num_negatives=4, top_k=100, instructions=table,
                                query_block=7)
    assert set(enc.instructions) == {table["scifact"]} and enc.passages_encoded == len(corpus)
    ids = list(corpus)
    doc_vecs = enc.encode_passages([corpus[i] for i in ids])
    for pair in mined[::7]:
        scores = doc_vecs @ enc._vec(pair.query)
        positives = {p.positive["id"] for p in _groups(pairs)[pair.query]}
        ranked = [ids[i] for i in np.argsort(-scores, kind="stable")
                  if ids[i] not in positives | {"dup-" + p for p in positives}]
        assert _ids(pair) == ranked[:4]

    # Cached corpus vectors: the same negatives; only the positive missing from the corpus is encoded.
    missing = pairs[3].positive["id"]
    smaller = {i: d for i, d in corpus.items() if i != missing}
    cache = HashEncoder().encode_passages([smaller[i] for i in smaller])
    enc2 = HashEncoder()
    again = mine_hard_negatives(pairs, smaller, retriever=enc2, num_negatives=4, instructions=table,
                                corpus_embeddings=cache)
    assert enc2.passages_encoded == 1
    assert [_ids(p) for p in again] == [_ids(p) for p in mined]
    with pytest.raises(ValueError, match="corpus_embeddings has shape"):
        mine_hard_negatives(pairs, smaller, retriever=enc2, instructions=table, corpus_embeddings=cache[:-1])
    with pytest.raises(ValueError, match="no instruction for task 'scifact'"):
        mine_hard_negatives(pairs, corpus, retriever=HashEncoder())
