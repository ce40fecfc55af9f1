"""A retrieval index on disk: `bmr index` builds it, `bmr search` (and `bmr.search`) query it.

Layout of an index folder (written as one folder through util.atomic.atomic_dir: it appears complete or not at
all, with checksums.json recording every file's size + sha256):

  index.json      the manifest: format, the corpus (path, sha256, documents), the default task, and one entry
                  per system: {"name", "kind": "dense"|"bm25", "dir", ...; dense: "fingerprint", "dim",
                  "max_length", "dtype"}
  docs.jsonl      the documents ({"_id", "title", "text"}, corpus order): titles and text to print
  dense-<i>/      vectors.npy + ids.json + vectors.json (util.vector_files: a sealed pair), one per dense model
  bm25/           bm25s' saved index (data.bm25: same tokenisation as the BM25 baseline)

Searching encodes the query with the indexed model, which must still be the model the vectors came from (its
fingerprint is compared), takes each system's top 1000 (exact: eval.search.topk_search, cosine, as
`bmr eval`), and fuses the lists (eval.fusion) when several systems are used.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from bmretriever_jax.eval import fusion
from bmretriever_jax.util.atomic import (atomic_dir, check_manifest, check_writable_dir, file_lock, sha256_file,
                                         remove_stale_temps)
from bmretriever_jax.util.errors import (ConfigError, DataFormatError, InputPathError, ModelSourceError,
                                         OutputExistsError)

FORMAT = 1
MANIFEST = "index.json"
DOCS = "docs.jsonl"


def corpus_file(path: str) -> str:
    """CORPUS.jsonl itself, or a BEIR folder's corpus.jsonl."""
    if os.path.isdir(path):
        path = os.path.join(path, "corpus.jsonl")
    if not os.path.isfile(path):
        raise InputPathError(f"{path}: no such corpus file (a corpus.jsonl of {{\"_id\", \"title\", \"text\"}} "
                             "lines, or a BEIR folder holding one)")
    return path


def _model_ref(name: str) -> str:
    """What the manifest records to load the model again: an absolute path for paths, the name for names."""
    return os.path.abspath(name) if os.path.exists(name) else name


def build_index(corpus: str, models: Sequence[str], out: str, *, task: Optional[str] = None,
                max_length: Optional[int] = None, dtype: str = "auto", batch_size: int = 32,
                chunk_size: int = 1024, quiet: bool = True) -> str:
    """Index the documents of `corpus` (CORPUS.jsonl or a BEIR folder) with every model of `models` ("bm25" for
    BM25) into the folder `out` (replaced when it is an index already); return `out`."""
    from tqdm.auto import tqdm

    from bmretriever_jax.data.beir import load_corpus
    from bmretriever_jax.embed import default_task
    from bmretriever_jax.eval.baselines import passage_text
    from bmretriever_jax.eval.suite import make_encoder
    from bmretriever_jax.util.vector_files import write_vectors

    models = list(models)
    if not models:
        raise ConfigError("name at least one --model (a model, or bm25)")
    if len(set(models)) != len(models):
        raise ConfigError(f"--model {' '.join(models)}: a model is named twice")
    path = corpus_file(corpus)
    docs = load_corpus(path)
    if not docs:
        raise DataFormatError(f"{path}: no documents")
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputExistsError(f"{out}: --out names an existing file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MANIFEST)):
        raise OutputExistsError(f"{out}: exists and is not an index (no {MANIFEST}); name a new folder")
    parent = os.path.dirname(os.path.abspath(out))
    check_writable_dir(parent, "--out")
    ids = list(docs)
    task = task if task is not None else default_task(os.path.dirname(os.path.abspath(path)))
    manifest = {"format": FORMAT, "created": time.time(), "task": task,
                "corpus": {"path": os.path.abspath(path), "sha256": sha256_file(path), "documents": len(ids)},
                "systems": []}
    with file_lock(out):
        remove_stale_temps(parent, os.path.basename(os.path.normpath(out)))
        with atomic_dir(out) as tmp:
            with open(os.path.join(tmp, DOCS), "w", encoding="utf-8") as f:
                for d in ids:
                    f.write(json.dumps({"_id": d, **docs[d]}, ensure_ascii=False) + "\n")
            for i, m in enumerate(models):
                if m == "bm25":
                    from bmretriever_jax.data.bm25 import B, K1, BM25Index

                    bm25 = BM25Index([passage_text(docs[d]) for d in ids])
                    bm25.retriever.save(os.path.join(tmp, "bm25"), show_progress=False)
                    manifest["systems"].append({"name": "bm25", "kind": "bm25", "dir": "bm25", "k1": K1, "b": B})
                    continue
                enc = make_encoder(m, max_length=max_length, dtype=dtype, quiet=quiet)
                vecs = []
                with tqdm(total=len(ids), desc=f"encoding with {os.path.basename(os.path.normpath(m))}",
                          unit="doc", disable=quiet) as bar:
                    for a in range(0, len(ids), chunk_size):
                        part = [docs[d] for d in ids[a:a + chunk_size]]
                        vecs.append(np.asarray(enc.encode_passages(part, batch_size=batch_size), np.float32))
                        bar.update(len(part))
                sub = f"dense-{i}"
                write_vectors(os.path.join(tmp, sub), np.concatenate(vecs), ids)
                manifest["systems"].append({
                    "name": _model_ref(m), "kind": "dense", "dir": sub, "fingerprint": str(enc.fingerprint),
                    "dim": int(vecs[0].shape[1]), "max_length": getattr(enc, "max_length", None),
                    "dtype": str(getattr(enc, "dtype", "float32")) if m != "minilm" else None})
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
    return out


class Index:
    """An index folder opened for searching: `Index(path).search(["query"], top_k=10)`. Models load on first use."""

    def __init__(self, path: str):
        self.path = path
        man_path = os.path.join(path, MANIFEST)
        if not os.path.isdir(path) or not os.path.isfile(man_path):
            raise InputPathError(f"{path}: not an index (no {MANIFEST}); make one with "
                                 f"`bmr index CORPUS.jsonl --model M --out {path}`")
        reason = check_manifest(path)
        if reason:
            raise DataFormatError(f"{path}: {reason}; the index is damaged or incomplete: run `bmr index` again")
        try:
            with open(man_path) as f:
                self.manifest = json.load(f)
            self.systems: List[dict] = list(self.manifest["systems"])
        except (ValueError, KeyError, TypeError):
            raise DataFormatError(f"{man_path}: unreadable index manifest") from None
        if self.manifest.get("format") != FORMAT:
            raise DataFormatError(f"{man_path}: index format {self.manifest.get('format')}, this version reads "
                                  f"{FORMAT}")
        self.docs: Dict[str, dict] = {}
        with open(os.path.join(path, DOCS), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                self.docs[rec.pop("_id")] = rec
        self.doc_ids = list(self.docs)
        from bmretriever_jax.eval.suite import model_labels

        labels = model_labels([s["name"] for s in self.systems])
        for s in self.systems:
            s["label"] = labels[s["name"]]
        self._loaded: Dict[str, object] = {}

    @property
    def names(self) -> List[str]:
        return [s["label"] for s in self.systems]

    def select(self, names: Optional[Sequence[str]]) -> List[dict]:
        """The systems named (by label or as indexed: bm25, a model name or path), every system when None."""
        if not names:
            return list(self.systems)
        out = []
        for n in names:
            hit = [s for s in self.systems if n in (s["label"], s["name"]) or
                   (os.path.exists(n) and os.path.abspath(n) == s["name"])]
            if not hit:
                raise ModelSourceError(f"{self.path}: holds {', '.join(self.names)}; no system {n!r} "
                                       "(index it with `bmr index ... --model`)")
            out.append(hit[0])
        return out

    # ------------------------------------------------------------------------------------------------
    def _system(self, s: dict):
        if s["dir"] in self._loaded:
            return self._loaded[s["dir"]]
        folder = os.path.join(self.path, s["dir"])
        if s["kind"] == "bm25":
            obj = _load_bm25(folder, len(self.doc_ids))
        else:
            from bmretriever_jax.eval.suite import make_encoder
            from bmretriever_jax.util.vector_files import read_vectors

            vecs, ids = read_vectors(folder)
            if ids != self.doc_ids:
                raise DataFormatError(f"{folder}: its ids are not the index's documents; run `bmr index` again")
            name = s["name"]
            enc = make_encoder(name, max_length=s.get("max_length"), dtype=s.get("dtype") or "auto", quiet=True)
            if str(enc.fingerprint) != s["fingerprint"]:
                raise ModelSourceError(f"{self.path}: model {name} is not the one indexed (fingerprint "
                                       f"{enc.fingerprint} != {s['fingerprint']}: weights, length or precision "
                                       "changed); run `bmr index` again")
            obj = (enc, vecs)
        self._loaded[s["dir"]] = obj
        return obj

    def system_runs(self, queries: Sequence[str], systems: Sequence[dict], instruction: str,
                    depth: int = fusion.DEPTH) -> List[Dict[str, Dict[str, float]]]:
        """One run per system: {query number as str: {doc id: score}} with each system's top `depth`."""
        from bmretriever_jax.eval.search import topk_search

        runs = []
        k = min(depth, len(self.doc_ids))
        for s in systems:
            obj = self._system(s)
            if s["kind"] == "bm25":
                hits, scores = obj.top_k(list(queries), k)
                runs.append({str(r): {self.doc_ids[int(j)]: float(v) for j, v in zip(hits[r], scores[r]) if v > 0}
                             for r in range(len(queries))})
                continue
            enc, vecs = obj
            instr = "" if s["name"] == "minilm" else instruction  # MiniLM takes no instruction (as in bmr eval)
            q = np.asarray(enc.encode_queries(list(queries), instr), np.float32)
            top_s, top_i = topk_search(q, iter([vecs]), k, similarity="cos", dtype="float32")
            runs.append({str(r): {self.doc_ids[j]: float(v) for j, v in zip(top_i[r], top_s[r]) if j >= 0}
                         for r in range(len(queries))})
        return runs

    def search(self, queries: Sequence[str], *, top_k: int = 10, fusion_method: Optional[str] = None,
               task: Optional[str] = None, instruction: Optional[str] = None,
               systems: Optional[Sequence[str]] = None, rrf_k: Optional[float] = None,
               weights: Optional[Sequence[float]] = None) -> dict:
        """-> {"systems", "fusion", "params", "instruction", "results": [[{"rank", "id", "title", "score"}, ...]
        per query]}. Several systems are fused (rrf by default, k=60 / equal weights unless given)."""
        from bmretriever_jax.embed import instruction_for

        queries = [queries] if isinstance(queries, str) else list(queries)
        if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
            raise ConfigError("empty query: give the text to search for")
        if top_k < 1:
            raise ConfigError(f"--top-k {top_k}: must be at least 1")
        if task is not None and instruction is not None:
            raise ConfigError("give --task or --instruction, not both")
        chosen = self.select(systems)
        if fusion_method is not None and len(chosen) < 2:
            raise ConfigError(f"--fusion {fusion_method}: {self.path} holds only {', '.join(self.names)}; "
                              "fusion needs two or more systems (`bmr index ... --model M --model bm25`)")
        method = fusion_method or ("rrf" if len(chosen) > 1 else None)
        instr = instruction_for(instruction if instruction is not None else
                                task if task is not None else self.manifest.get("task") or "")
        runs = self.system_runs(queries, chosen, instr)
        params = None
        if method is None:
            final = runs[0]
        else:
            params = fusion.default_params(method, len(chosen))
            if rrf_k is not None:
                if method != "rrf":
                    raise ConfigError("--rrf-k goes with --fusion rrf")
                params["k"] = rrf_k
            if weights is not None:
                if len(weights) != len(chosen):
                    raise ConfigError(f"--weights: {len(weights)} weight(s) for {len(chosen)} systems "
                                      f"({', '.join(s['label'] for s in chosen)})")
                params["weights"] = [float(w) for w in weights]
            final = fusion.fuse(runs, method, params)
        from bmretriever_jax.eval import metrics

        results = []
        for r in range(len(queries)):
            scores = final.get(str(r), {})
            results.append([{"rank": i + 1, "id": d, "title": self.docs[d].get("title", ""), "score": scores[d]}
                            for i, d in enumerate(metrics.rank(scores)[:top_k])])
        return {"systems": [s["label"] for s in chosen], "fusion": method, "params": params,
                "instruction": instr, "results": results}


def _load_bm25(folder: str, n: int):
    """A data.bm25.BM25Index around bm25s' saved index (the tokenisation stays BM25Index's own)."""
    import logging

    import bm25s
    import Stemmer

    from bmretriever_jax.data.bm25 import BM25Index

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    idx = BM25Index.__new__(BM25Index)
    idx._bm25s, idx._stemmer, idx.n = bm25s, Stemmer.Stemmer("english"), n
    idx.retriever = bm25s.BM25.load(folder, show_progress=False)
    return idx
