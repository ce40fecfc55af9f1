"""Retrieval and STS evaluation of any encoder (duck-typed Encoder protocol) and of BM25.

Corpus vectors are cached on disk, one .npy per chunk of `chunk_size` documents (each written atomically,
with a size + sha256 record beside it) plus a manifest, in a folder keyed by the encoder's fingerprint, its
max length and the corpus content; encoding an interrupted corpus resumes at the first missing chunk, a
chunk that fails its checksum is re-encoded with a warning, and a second evaluation encodes no document. Chunks are
memory-mapped back and streamed into the exact top-k search, so the corpus need not fit in memory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from bmretriever_jax.util import tables
from bmretriever_jax.util.atomic import CacheWarning, atomic_write, check_file, remove_stale_temps, write_checksum
from bmretriever_jax.data.beir import Corpus, corpus_digest, load_beir
from bmretriever_jax.eval import metrics
from bmretriever_jax.eval.baselines import MiniLMEncoder, bm25_search
from bmretriever_jax.eval.search import topk_search
from bmretriever_jax.eval.sts import cosine_rows, load_sts_tsv

MANIFEST = "manifest.json"


def _cache_key(encoder, data_dir: str, doc_ids: Sequence[str], chunk_size: int) -> dict[str, Any]:
    ids_sha = hashlib.sha256("\n".join(doc_ids).encode()).hexdigest()[:16]
    return {"fingerprint": str(encoder.fingerprint), "max_length": getattr(encoder, "max_length", None),
            "corpus_sha256": corpus_digest(data_dir), "doc_ids_sha256": ids_sha, "n_docs": len(doc_ids),
            "chunk_size": chunk_size}


def _chunk_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"chunk_{i:05d}.npy")


def _load_chunk(path: str, rows: int) -> np.ndarray | None:
    """The cached chunk if it is complete, matches its sha256 and is [rows, d] float32, else None.

    A chunk that exists but fails a check (truncated, zeroed on disk behind a valid header, no checksum
    record because the writer died between the two files) is re-encoded with a CacheWarning.
    """
    if not os.path.exists(path):
        return None
    # Always the full hash: a chunk costs ~0.7 ms/MB to hash against the seconds it took to encode.
    reason = check_file(path, full=True)
    if reason is None:
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            reason = "not a readable .npy file"
        else:
            if arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != np.float32:
                reason = f"holds {arr.dtype}{list(arr.shape)}, expected float32[{rows}, d]"
    if reason:
        warnings.warn(f"{path}: {reason}; re-encoding it", CacheWarning, stacklevel=3)
        return None
    return arr


def cached_corpus_vectors(encoder, corpus: Corpus, data_dir: str, cache_dir: str | None, *,
                          chunk_size: int = 1024, batch_size: int = 32, progress: bool = True) -> list[np.ndarray]:
    """Corpus vectors as a list of [<=chunk_size, d] float32 chunks (memory-mapped when cached), corpus order.

    Without cache_dir everything is encoded in memory. With it, chunks live in
    <cache_dir>/<dataset>-<key>/chunk_#####.npy (+ chunk_#####.npy.sha256.json) next to
    manifest.json; only missing chunks are encoded.
    """
    doc_ids = list(corpus)
    n_chunks = -(-len(doc_ids) // chunk_size)
    bounds = [(i * chunk_size, min((i + 1) * chunk_size, len(doc_ids))) for i in range(n_chunks)]
    if cache_dir is None:
        return [encoder.encode_passages([corpus[d] for d in doc_ids[a:b]], batch_size=batch_size) for a, b in bounds]

    key = _cache_key(encoder, data_dir, doc_ids, chunk_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(data_dir))}-{digest}")
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            found = json.load(f)
        if found.get("key") != key:
            raise RuntimeError(f"{manifest_path}: cache key mismatch (hash collision or edited manifest); "
                               f"delete {folder}")
    else:
        with atomic_write(manifest_path, "w") as f:
            json.dump({"key": key, "dataset": os.path.abspath(data_dir), "created": time.time()}, f, indent=1)
    remove_stale_temps(folder)  # temporaries of runs that were killed mid-write

    chunks = []
    bar = tqdm(total=len(doc_ids), desc=f"corpus {os.path.basename(os.path.normpath(data_dir))}", unit="doc",
               disable=not progress)
    for i, (a, b) in enumerate(bounds):
        path = _chunk_path(folder, i)
        arr = _load_chunk(path, b - a)
        if arr is None:
            vecs = np.asarray(encoder.encode_passages([corpus[d] for d in doc_ids[a:b]], batch_size=batch_size),
                              dtype=np.float32)  # no inner bar: the chunk bar above counts the documents
            if vecs.shape[0] != b - a:
                raise ValueError(f"encoder returned {vecs.shape[0]} vectors for {b - a} passages")
            # Data first, then its checksum record: a chunk is used only when both are there and agree.
            with atomic_write(path) as f:
                np.save(f, vecs)
            write_checksum(path)
            arr = np.load(path, mmap_mode="r")
        chunks.append(arr)
        bar.update(b - a)
    bar.close()
    return chunks


def retrieve(encoder, corpus: Corpus, queries: Mapping[str, str], instruction: str, *, data_dir: str,
             cache_dir: str | None = None, k: int = 1000, batch_size: int = 32, chunk_size: int = 1024,
             similarity: str = "cos", search_dtype: str = "float32",
             block_size: int = 65536, progress: bool = True) -> dict[str, dict[str, float]]:
    """Dense retrieval run {query id: {doc id: score}} with the top min(k, N) documents per query."""
    doc_ids = list(corpus)
    if not doc_ids:
        raise ValueError(f"{data_dir}: empty corpus")
    chunks = cached_corpus_vectors(encoder, corpus, data_dir, cache_dir, chunk_size=chunk_size,
                                   batch_size=batch_size, progress=progress)
    query_ids = list(queries)
    q_vecs = np.asarray(encoder.encode_queries([queries[q] for q in query_ids], instruction,
                                               batch_size=batch_size), dtype=np.float32)
    scores, idx = topk_search(q_vecs, iter(chunks), min(k, len(doc_ids)), block_size=block_size,
                              similarity=similarity, dtype=search_dtype)
    return {qid: {doc_ids[j]: float(s) for j, s in zip(idx[r], scores[r]) if j >= 0}
            for r, qid in enumerate(query_ids)}


def evaluate_retrieval(encoder, beir_dir: str, split: str = "test", instruction: str = "", *,
                       cache_dir: str | None = None, k_values: Iterable[int] = metrics.DEFAULT_K,
                       batch_size: int = 32, chunk_size: int = 1024, similarity: str = "cos",
                       search_dtype: str = "float32", progress: bool = True) -> dict[str, float]:
    """Mean metrics {"ndcg@10": ..., ...} of `encoder` on a BEIR folder's split (every judged query counts)."""
    k_values = tuple(k_values)
    corpus, queries, qrels = load_beir(beir_dir, split)
    run = retrieve(encoder, corpus, queries, instruction, data_dir=beir_dir, cache_dir=cache_dir,
                   k=max(k_values), batch_size=batch_size, chunk_size=chunk_size, similarity=similarity,
                   search_dtype=search_dtype, progress=progress)
    return metrics.evaluate_run(qrels, run, k_values, missing="zero")


def evaluate_bm25(beir_dir: str, split: str = "test", *,
                  k_values: Iterable[int] = metrics.DEFAULT_K) -> dict[str, float]:
    """BM25 (bm25s, stop words + Snowball stemming) scored by the same metric code as the dense models."""
    k_values = tuple(k_values)
    corpus, queries, qrels = load_beir(beir_dir, split)
    run = bm25_search(corpus, queries, k=max(k_values))
    return metrics.evaluate_run(qrels, run, k_values, missing="zero")


def evaluate_sts(encoder, tsv: str) -> dict[str, float]:
    """{"spearman", "pearson"} between cosine(encode_texts(s1), encode_texts(s2)) and the gold scores."""
    from scipy import stats  # not a dependency of the package (the test extra has it); ~1.5 s

    s1, s2, gold = load_sts_tsv(tsv)
    # encode_texts: no template, no instruction (the protocol gives it no batch_size argument).
    vecs = np.asarray(encoder.encode_texts(list(s1) + list(s2)), dtype=np.float64)
    cos = cosine_rows(vecs[:len(s1)], vecs[len(s1):])
    return {"spearman": float(stats.spearmanr(cos, gold).statistic),
            "pearson": float(stats.pearsonr(cos, gold).statistic)}


def format_table(results: Mapping[str, Any], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """Markdown table. `results` is {row name: {metric: value}} or one {metric: value} dict (one row)."""
    if results and all(isinstance(v, (int, float)) for v in results.values()):
        results = {"": results}
    return tables.from_records(results, columns, digits=digits, markdown=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Baselines from the command line: python -m bmretriever_jax.eval.evaluate --model bm25 --data data/scifact."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", choices=("bm25", "minilm"), required=True)
    p.add_argument("--data", nargs="*", default=[], help="BEIR folders")
    p.add_argument("--split", default="test")
    p.add_argument("--sts", nargs="*", default=[], help="STS tsv files (MiniLM only)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--k", default="1,10,100")
    args = p.parse_args(argv)
    ks = tuple(int(k) for k in args.k.split(","))
    results: dict[str, dict[str, float]] = {}
    encoder = None
    if args.model == "minilm":
        encoder = MiniLMEncoder()
    for d in args.data:
        t0 = time.time()
        if encoder is None:
            row = evaluate_bm25(d, args.split, k_values=ks)
        else:
            row = evaluate_retrieval(encoder, d, args.split, cache_dir=args.cache_dir, k_values=ks)
        results[f"{args.model} {os.path.basename(os.path.normpath(d))}"] = {**row, "seconds": f"{time.time() - t0:.1f}"}
    for tsv in args.sts:
        if encoder is None:
            raise SystemExit("--sts needs --model minilm")
        results[f"{args.model} {os.path.basename(tsv)}"] = evaluate_sts(encoder, tsv)
    print(format_table(results))


if __name__ == "__main__":
    main()
