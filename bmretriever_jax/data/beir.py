"""Readers for retrieval data in the BEIR layout, with validation.

Layout (https://github.com/beir-cellar/beir):
  <dir>/corpus.jsonl       {"_id": str, "title": str (optional), "text": str} one JSON object a line
  <dir>/queries.jsonl      {"_id": str, "text": str}
  <dir>/qrels/<split>.tsv  "query-id  corpus-id  score", tab separated, optional header line

Every error names the file and line (`corpus.jsonl:17: ...`) so a broken data set is fixed in one look.
Qrels that point to documents or queries that do not exist are counted and reported in one warning (or
raise with `strict=True`); they are dropped, since no run can ever contain them and keeping them would only
lower recall silently. Queries without judgements in the split are dropped, as BEIR does.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import warnings
from typing import Iterator

from bmretriever_jax.util.errors import DataFormatError  # noqa: F401  (re-exported: beir.DataFormatError)

Corpus = dict[str, dict[str, str]]  # doc id -> {"title", "text"}
Queries = dict[str, str]            # query id -> text
Qrels = dict[str, dict[str, int]]   # query id -> {doc id: graded relevance}

QRELS_HEADER = ("query-id", "corpus-id", "score")


class DataWarning(UserWarning):
    """Something in a data set is suspicious but usable (dangling qrels, empty documents)."""


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yields (line number, text) of a UTF-8 text file (.gz too). A line that is not UTF-8 (a Latin-1 export, a
    binary file) raises DataFormatError naming path:line, the byte and the fix."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                      f"{e.start + 1}); if it is Latin-1, convert it: iconv -f latin1 -t utf-8 "
                                      f"{os.path.basename(path)}") from None


def jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for each non-blank line of a .jsonl (or .jsonl.gz) file; raises
    DataFormatError (a ValueError) naming path:line."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _string_field(obj: dict, field: str, path: str, lineno: int, *, required: bool = True) -> str:
    if field not in obj:
        if required:
            raise DataFormatError(f"{path}:{lineno}: missing field {field!r} (has {sorted(obj)})")
        return ""
    value = obj[field]
    if value is None and not required:
        return ""
    # Ids are sometimes written as JSON numbers; they are names, so keep their text.
    if field == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataFormatError(f"{path}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def load_corpus(path: str) -> Corpus:
    """Reads corpus.jsonl -> {doc id: {"title", "text"}} in file order. "title" may be absent (-> "").

    Warns (DataWarning) with a count when documents have both title and text empty.
    """
    corpus: Corpus = {}
    first_line: dict[str, int] = {}
    empty = []
    for lineno, obj in jsonl_records(path):
        doc_id = _string_field(obj, "_id", path, lineno)
        title = _string_field(obj, "title", path, lineno, required=False)
        text = _string_field(obj, "text", path, lineno)
        if doc_id in corpus:
            raise DataFormatError(f"{path}:{lineno}: duplicate _id {doc_id!r} (first on line {first_line[doc_id]})")
        first_line[doc_id] = lineno
        corpus[doc_id] = {"title": title, "text": text}
        if not title.strip() and not text.strip():
            empty.append(doc_id)
    if empty:
        warnings.warn(f"{path}: {len(empty)} document(s) have an empty title and text, e.g. {empty[:3]}",
                      DataWarning, stacklevel=2)
    return corpus


def load_queries(path: str) -> Queries:
    """Reads queries.jsonl -> {query id: text} in file order (other fields, e.g. metadata, are ignored)."""
    queries: Queries = {}
    first_line: dict[str, int] = {}
    empty = []
    for lineno, obj in jsonl_records(path):
        qid = _string_field(obj, "_id", path, lineno)
        text = _string_field(obj, "text", path, lineno)
        if qid in queries:
            raise DataFormatError(f"{path}:{lineno}: duplicate _id {qid!r} (first on line {first_line[qid]})")
        first_line[qid] = lineno
        queries[qid] = text
        if not text.strip():
            empty.append(qid)
    if empty:
        warnings.warn(f"{path}: {len(empty)} quer(y/ies) with empty text, e.g. {empty[:3]}", DataWarning,
                      stacklevel=2)
    return queries


def load_qrels(path: str) -> Qrels:
    """Reads a qrels tsv -> {query id: {doc id: int score}}. The header line is optional.

    A (query, doc) pair listed twice with different scores is an error; the same score twice is tolerated.
    """
    qrels: Qrels = {}
    for lineno, line in text_lines(path):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if lineno == 1 and tuple(c.strip().lower() for c in cols) == QRELS_HEADER:
            continue
        if len(cols) != 3:
            raise DataFormatError(f"{path}:{lineno}: expected 3 tab-separated columns "
                                  f"(query-id, corpus-id, score), got {len(cols)}: {line[:80]!r}")
        qid, doc_id, score_text = (c.strip() for c in cols)
        if not qid or not doc_id:
            raise DataFormatError(f"{path}:{lineno}: empty query-id or corpus-id")
        try:
            score = int(score_text)
        except ValueError:
            # Some exports write 1.0; accept integral floats, refuse anything else.
            try:
                value = float(score_text)
            except ValueError:
                value = float("nan")
            if not value.is_integer():
                raise DataFormatError(f"{path}:{lineno}: score must be an integer, got {score_text!r}") from None
            score = int(value)
        previous = qrels.setdefault(qid, {}).get(doc_id)
        if previous is not None and previous != score:
            raise DataFormatError(f"{path}:{lineno}: pair ({qid}, {doc_id}) judged twice: {previous} and {score}")
        qrels[qid][doc_id] = score
    return qrels


def load_beir(data_dir: str, split: str = "test", *, strict: bool = False) -> tuple[Corpus, Queries, Qrels]:
    """Loads a BEIR folder: (corpus {id: {title, text}}, queries {id: text}, qrels {qid: {docid: int}}).

    Only queries judged in `split` are returned. Qrels naming unknown queries or documents are dropped and
    counted in one DataWarning; with strict=True they raise DataFormatError instead.
    """
    corpus = load_corpus(os.path.join(data_dir, "corpus.jsonl"))
    all_queries = load_queries(os.path.join(data_dir, "queries.jsonl"))
    qrels_path = os.path.join(data_dir, "qrels", f"{split}.tsv")
    if not os.path.exists(qrels_path):
        have = sorted(f[:-4] for f in os.listdir(os.path.join(data_dir, "qrels")) if f.endswith(".tsv"))
        raise FileNotFoundError(f"{qrels_path}: no such split {split!r}; splits here: {have}")
    raw = load_qrels(qrels_path)

    unknown_queries = [q for q in raw if q not in all_queries]
    unknown_docs = {(q, d) for q, judged in raw.items() for d in judged if d not in corpus}
    if unknown_queries or unknown_docs:
        n_pairs_unknown_q = sum(len(raw[q]) for q in unknown_queries)
        message = (f"{qrels_path}: {len(unknown_queries)} unknown query id(s) ({n_pairs_unknown_q} judgement(s), "
                   f"e.g. {unknown_queries[:3]}); {len(unknown_docs)} judgement(s) of unknown document(s) "
                   f"(e.g. {sorted(d for _, d in unknown_docs)[:3]})")
        if strict:
            raise DataFormatError(message)
        warnings.warn(message + "; dropped", DataWarning, stacklevel=2)

    qrels: Qrels = {}
    for qid, judged in raw.items():
        if qid not in all_queries:
            continue
        kept = {d: s for d, s in judged.items() if d in corpus}
        if kept:
            qrels[qid] = kept
    if raw and not qrels:
        raise DataFormatError(f"{qrels_path}: none of its {sum(map(len, raw.values()))} judgement(s) names a query of "
                              f"queries.jsonl and a document of corpus.jsonl (e.g. {next(iter(raw))!r}): "
                              "are the ids from another data set?")
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return corpus, queries, qrels


def corpus_digest(data_dir: str) -> str:
    """sha256 of corpus.jsonl's bytes (hex, 16 chars): part of the key of cached corpus vectors."""
    h = hashlib.sha256()
    with open(os.path.join(data_dir, "corpus.jsonl"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def subset_beir(src: str, dst: str, n_docs: int, seed: int = 0, splits=None) -> str:
    """A smaller copy of a BEIR folder: every document judged in `splits` (default: every split) + seeded
    random others up to n_docs, all queries and those splits' qrels. Keeps a run within minutes on 2 CPU
    cores (the quickstart's corpora, dev sets for merge search); written once, then reused."""
    if os.path.exists(os.path.join(dst, "corpus.jsonl")):
        return dst
    os.makedirs(os.path.join(dst, "qrels"), exist_ok=True)
    judged = set()
    for f in os.listdir(os.path.join(src, "qrels")):
        if splits is not None and f[:-len(".tsv")] not in splits:
            continue
        with open(os.path.join(src, "qrels", f)) as fh:
            judged |= {line.split("\t")[1] for line in list(fh)[1:] if line.strip()}
        shutil.copy(os.path.join(src, "qrels", f), os.path.join(dst, "qrels", f))
    shutil.copy(os.path.join(src, "queries.jsonl"), dst)
    with open(os.path.join(src, "corpus.jsonl")) as fh:
        lines = [line for line in fh if line.strip()]
    ids = [json.loads(line)["_id"] for line in lines]
    others = [i for i, d in enumerate(ids) if d not in judged]
    random.Random(seed).shuffle(others)
    keep = {i for i, d in enumerate(ids) if d in judged} | set(others[:max(0, n_docs - len(judged))])
    with open(os.path.join(dst, "corpus.jsonl"), "w") as fh:
        fh.writelines(lines[i] for i in sorted(keep))
    return dst
