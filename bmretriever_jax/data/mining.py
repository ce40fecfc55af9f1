"""Hard-negative mining: for each query, negatives from the top of a retriever's ranking.

BMRetriever takes hard negatives from the top-100 documents of a retriever; sentence-transformers'
`mine_hard_negatives` adds filters against false negatives. This module does both, with BM25 (bm25s,
English stop words, Snowball stemming) as the default retriever and any encoder as the dense one.

Selection, for each distinct query (pairs that share query text and instruction are mined once, and all
their positives are excluded for each of them):
  1. score every corpus document; leave out the query's positives (same id, or same text: see
     `pairs.doc_keys`) and the negatives the pairs already carry;
  2. window = the `top_k` best remaining documents (BMRetriever: 100; sentence-transformers: range_max);
     for BM25, documents sharing no term with the query (score 0) are not candidates;
  3. drop candidates too close to the positive (reference: the lowest score among the query's positives):
       absolute_margin m:  drop if score > pos - m                  (sentence-transformers' absolute_margin)
       relative_margin m:  drop if score > pos - |pos| * m          (sentence-transformers' relative_margin)
       max_score_ratio r:  drop if score >= r * pos                 (same as relative_margin 1 - r for pos > 0)
       max_score / min_score: drop if score > max_score / score < min_score
  4. skip the `skip_top` best survivors (sentence-transformers' range_min, which it also applies after the
     filters): the very top of a ranking holds most unlabelled positives;
  5. take `num_negatives` of the rest: the best ("top") or a uniform sample ("random", seeded per query,
     kept in score order). A query with fewer survivors gets fewer negatives; the loader pads.

Corpus: the given one (BEIR corpus.jsonl path, {id: {"title","text"}} dict, or list of documents), plus every
positive it does not contain; without one, the pool of all the pairs' positives (deduplicated).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from bmretriever_jax.data.beir import load_corpus
from bmretriever_jax.data.bm25 import BM25Index
from bmretriever_jax.data.pairs import Doc, Pair, as_passage, doc_id, doc_keys, read_pairs, resolve_instruction, \
    write_pairs
from bmretriever_jax.util.errors import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- corpus

class _DocIndex:
    """Documents with lookup by id and by text key, so positives can be found and excluded."""

    def __init__(self):
        self.docs: list[Doc] = []
        self.by_id: dict[str, int] = {}
        self.by_key: dict[str, list[int]] = {}

    def add(self, doc: Doc) -> int:
        idx = len(self.docs)
        self.docs.append(doc)
        if doc_id(doc) is not None:
            self.by_id.setdefault(doc_id(doc), idx)
        for key in set(doc_keys(doc)):
            self.by_key.setdefault(key, []).append(idx)
        return idx

    def find(self, doc: Doc) -> int | None:
        """Index of the document: same whole text first (ids are not always unique: MedQuAD repeats some
        with different answers), then same id, then same body text."""
        full, body = doc_keys(doc)
        if full in self.by_key:
            return self.by_key[full][0]
        if doc_id(doc) is not None and doc_id(doc) in self.by_id:
            return self.by_id[doc_id(doc)]
        return self.by_key[body][0] if body in self.by_key else None

    def matches(self, doc: Doc) -> set[int]:
        """Every index that is this document: same id, or either text key equal."""
        found = set()
        if doc_id(doc) is not None and doc_id(doc) in self.by_id:
            found.add(self.by_id[doc_id(doc)])
        for key in doc_keys(doc):
            found.update(self.by_key.get(key, ()))
        return found


def _corpus_docs(corpus: str | Mapping[str, Mapping[str, str]] | Sequence[Doc] | None) -> list[Doc]:
    if corpus is None:
        return []
    if isinstance(corpus, str):
        corpus = load_corpus(corpus)
    if isinstance(corpus, Mapping):
        return [{"title": d.get("title", ""), "text": d["text"], "id": i} for i, d in corpus.items()]
    return list(corpus)


# ---------------------------------------------------------------------------------------------------- scoring

def _doc_text(d: Doc) -> str:
    """"title text" of a document, the text BM25 indexes."""
    return " ".join(p for p in (as_passage(d)["title"], as_passage(d)["text"]) if p)


class _DenseScorer:
    """Inner products of encoder vectors (cosine when the encoder normalises), exact, blockwise."""

    def __init__(self, encoder: Any, docs: Sequence[Doc], corpus_embeddings: np.ndarray | None, n_given: int,
                 batch_size: int | None):
        self.encoder = encoder
        self.kw = {} if batch_size is None else {"batch_size": batch_size}
        if corpus_embeddings is None:
            vecs = self._encode_docs(docs)
        else:
            corpus_embeddings = np.asarray(corpus_embeddings, np.float32)
            if corpus_embeddings.ndim != 2 or corpus_embeddings.shape[0] != n_given:
                raise ValueError(f"corpus_embeddings has shape {corpus_embeddings.shape}; expected "
                                 f"[{n_given}, dim], one row per document of the given corpus, in its order")
            extra = docs[n_given:]  # positives missing from the given corpus
            vecs = corpus_embeddings if not extra else np.concatenate([corpus_embeddings, self._encode_docs(extra)])
        self.doc_vecs = vecs  # [n_docs, dim]

    def _encode_docs(self, docs: Sequence[Doc]) -> np.ndarray:
        return np.asarray(self.encoder.encode_passages([as_passage(d) for d in docs], **self.kw), np.float32)

    def encode_queries(self, queries: list[str], instructions: list[str]) -> np.ndarray:
        """[len(queries), dim]; one encoder call per distinct instruction."""
        out = None
        for instruction in dict.fromkeys(instructions):
            rows = [i for i, ins in enumerate(instructions) if ins == instruction]
            vecs = np.asarray(self.encoder.encode_queries([queries[i] for i in rows], instruction, **self.kw),
                              np.float32)
            if out is None:
                out = np.zeros((len(queries), vecs.shape[1]), np.float32)
            out[rows] = vecs
        return out

    def scores(self, query_vecs: np.ndarray) -> np.ndarray:
        """[n_queries, dim] -> [n_queries, n_docs] float32."""
        return query_vecs @ self.doc_vecs.T


# ---------------------------------------------------------------------------------------------------- selection

def _select(scores: np.ndarray, excluded: set[int], pos_score: float, *, top_k: int, skip_top: int,
            num_negatives: int, absolute_margin, relative_margin, max_score_ratio, max_score, min_score,
            sampling: str, rng: np.random.Generator, counts: dict, positive_scores_only: bool) -> list[int]:
    """Corpus indices of the negatives for one query; `scores` [n_docs].

    positive_scores_only: BM25 gives 0 to documents that share no term with the query; those are arbitrary
    documents, not hard negatives, so they never enter the window.
    """
    row = scores.astype(np.float64)  # a copy: the caller's block stays untouched
    if positive_scores_only:
        row[row <= 0] = -np.inf
    if excluded:
        row[list(excluded)] = -np.inf
    k = min(top_k, row.shape[0])
    window = np.argpartition(-row, k - 1)[:k]
    window = window[np.lexsort((window, -row[window]))]  # best first, ties by corpus order
    window = window[np.isfinite(row[window])]
    s = row[window]
    keep = np.ones(len(window), bool)
    for name, drop in (("absolute_margin", None if absolute_margin is None else s > pos_score - absolute_margin),
                       ("relative_margin", None if relative_margin is None
                        else s > pos_score - abs(pos_score) * relative_margin),
                       ("max_score_ratio", None if max_score_ratio is None else s >= max_score_ratio * pos_score),
                       ("max_score", None if max_score is None else s > max_score),
                       ("min_score", None if min_score is None else s < min_score)):
        if drop is not None:
            counts[name] += int((drop & keep).sum())
            keep &= ~drop
    survivors = window[keep][skip_top:]
    if sampling == "top" or len(survivors) <= num_negatives:
        chosen = survivors[:num_negatives]
    else:
        chosen = survivors[np.sort(rng.choice(len(survivors), size=num_negatives, replace=False))]
    return [int(i) for i in chosen]


def mine_hard_negatives(
    pairs: Sequence[Pair],
    corpus: str | Mapping[str, Mapping[str, str]] | Sequence[Doc] | None = None,
    *,
    retriever: Any = "bm25",
    num_negatives: int = 1,
    top_k: int = 100,
    skip_top: int = 0,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    max_score_ratio: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    instructions: Mapping[str, str] | None = None,
    corpus_embeddings: np.ndarray | None = None,
    batch_size: int | None = None,
    query_block: int = 256,
    progress: bool = False,
) -> list[Pair]:
    """Returns the pairs (same order) with mined negatives appended to any they already have.

    pairs: training pairs; corpus: see the module docstring (None = the pool of positives).
    retriever: "bm25", or an encoder (any object with encode_queries(texts, instruction) and
      encode_passages(docs) returning [n, dim] arrays): queries use `resolve_instruction(pair, instructions)`.
    corpus_embeddings: [len(corpus), dim] cached passage vectors of the given corpus, in its order (dense only).
    num_negatives, top_k, skip_top, margins, sampling: steps 2-5 of the module docstring; seed drives
      "random" sampling: one generator per distinct query, seeded by (seed, its position among the distinct
      queries), so the result does not depend on query_block.
    query_block: queries scored at once (memory: query_block x corpus size floats).
    progress: a progress bar over the queries (stderr).
    """
    if num_negatives < 1:
        raise ConfigError(f"num_negatives must be >= 1, got {num_negatives}")
    if top_k < 1 or skip_top < 0:
        raise ConfigError(f"need top_k >= 1 and skip_top >= 0, got top_k={top_k}, skip_top={skip_top}")
    if num_negatives > top_k - skip_top:
        raise ConfigError(f"cannot mine {num_negatives} negatives from a window of top_k={top_k} minus "
                         f"skip_top={skip_top} candidates")
    if sampling not in ("top", "random"):
        raise ConfigError(f"sampling must be 'top' or 'random', got {sampling!r}")
    if not pairs:
        return []
    dense = not isinstance(retriever, str)
    if not dense and retriever != "bm25":
        raise ValueError(f"retriever must be 'bm25' or an encoder object, got {retriever!r}")
    if corpus_embeddings is not None and not dense:
        raise ValueError("corpus_embeddings are for a dense retriever, not BM25")
    if corpus_embeddings is not None and corpus is None:
        raise ValueError("corpus_embeddings need the corpus they were computed from")

    index = _DocIndex()
    given = _corpus_docs(corpus)
    for d in given:
        index.add(d)
    n_given = len(given)
    positive_idx = []  # per pair: the corpus index of its positive (added to the corpus when missing)
    for p in pairs:
        i = index.find(p.positive)
        positive_idx.append(index.add(p.positive) if i is None else i)

    # Pairs with the same query text and instruction are one query with several positives (as SciFact's).
    groups: dict[tuple, list[int]] = {}
    for n, p in enumerate(pairs):
        groups.setdefault((p.query, p.instruction, p.task), []).append(n)
    group_members = list(groups.values())

    if dense:
        scorer = _DenseScorer(retriever, index.docs, corpus_embeddings, n_given, batch_size)
        query_instr = [resolve_instruction(pairs[m[0]], instructions) for m in group_members]
    else:
        scorer = BM25Index([_doc_text(d) for d in index.docs])  # data.bm25: stop words, Snowball stemming

    counts = dict.fromkeys(("absolute_margin", "relative_margin", "max_score_ratio", "max_score", "min_score"), 0)
    mined: list[list[int]] = [[] for _ in group_members]
    block = max(1, min(query_block, (1 << 26) // max(1, len(index.docs))))
    bar = tqdm(total=len(group_members), unit="query", desc="mining", disable=not progress, leave=False)
    for start in range(0, len(group_members), block):
        members_block = group_members[start:start + block]
        queries = [pairs[m[0]].query for m in members_block]
        if dense:
            scores = scorer.scores(scorer.encode_queries(queries, query_instr[start:start + block]))
        else:
            scores = scorer.scores(queries)
        for r, members in enumerate(members_block):
            g = start + r
            excluded = set()
            for m in members:
                excluded |= index.matches(pairs[m].positive) | {positive_idx[m]}
                for neg in pairs[m].negatives:
                    excluded |= index.matches(neg)
            pos_score = float(min(scores[r, positive_idx[m]] for m in members))
            rng = np.random.default_rng([seed, g])
            mined[g] = _select(scores[r], excluded, pos_score, top_k=top_k, skip_top=skip_top,
                               num_negatives=num_negatives, absolute_margin=absolute_margin,
                               relative_margin=relative_margin, max_score_ratio=max_score_ratio,
                               max_score=max_score, min_score=min_score, sampling=sampling, rng=rng,
                               counts=counts, positive_scores_only=not dense)
        bar.update(len(members_block))
    bar.close()

    out: list[Pair | None] = [None] * len(pairs)
    for members, chosen in zip(group_members, mined):
        for m in members:
            p = pairs[m]
            # Existing negatives were excluded from the candidates above, so appending never duplicates one.
            new = tuple(index.docs[i] for i in chosen)
            out[m] = Pair(query=p.query, positive=p.positive, negatives=tuple(p.negatives) + new,
                          instruction=p.instruction, task=p.task, id=p.id, meta=p.meta)
    short = sum(len(c) < num_negatives for c in mined)
    log.info("mined %d queries over %d documents (%s); filtered: %s; %d queries got fewer than %d negatives",
             len(group_members), len(index.docs), "dense" if dense else "bm25",
             {k: v for k, v in counts.items() if v}, short, num_negatives)
    return out


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `bmr mine` (and `python -m bmretriever_jax.data.mining`)."""
    parser.add_argument("pairs", help="input .jsonl(.gz) pairs")
    parser.add_argument("--out", required=True, help="output .jsonl(.gz) pairs with negatives, or a folder: the "
                                                     "pairs prepared for data.prepared (as `bmr prepare` writes)")
    parser.add_argument("--corpus", help="BEIR corpus.jsonl to mine from (default: the pool of positives)")
    parser.add_argument("--encoder", help="dense retriever: a name or path for bmretriever_jax.embed.Encoder.load "
                                          "(default: BM25)")
    parser.add_argument("--instructions", help="dense: JSON file {task: instruction} for pairs that name a task")
    parser.add_argument("--num-negatives", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--skip-top", type=int, default=0)
    parser.add_argument("--absolute-margin", type=float)
    parser.add_argument("--relative-margin", type=float)
    parser.add_argument("--max-score-ratio", type=float)
    parser.add_argument("--sampling", choices=("top", "random"), default="top")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    retriever: Any = "bm25"
    instructions = None
    if args.encoder:
        from bmretriever_jax.embed import Encoder  # jax: only for dense mining (`bmr --help` imports this module)

        retriever = Encoder.load(args.encoder, quiet=getattr(args, "quiet", False))
        if args.instructions:
            with open(args.instructions, encoding="utf-8") as f:
                instructions = json.load(f)
    pairs = mine_hard_negatives(
        read_pairs(args.pairs), args.corpus, retriever=retriever, num_negatives=args.num_negatives,
        top_k=args.top_k, skip_top=args.skip_top, absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin, max_score_ratio=args.max_score_ratio, sampling=args.sampling,
        seed=args.seed, instructions=instructions, progress=not getattr(args, "quiet", False))
    if not args.out.endswith((".jsonl", ".jsonl.gz", ".json", ".gz")):  # a folder: `bmr prepare`'s format
        from bmretriever_jax.data.prepared import describe, source_pairs, write_prepared

        _, sources = source_pairs([args.pairs])
        m = write_prepared(args.out, pairs, sources=sources, progress=False)
        print(f"wrote {m['count']} pairs to {args.out} (prepared: {describe(m)})")
        return 0
    n = write_pairs(args.out, pairs)
    print(f"wrote {n} pairs to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmretriever_jax.data.mining",
                                     description="Add hard negatives to a training-pairs file.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
