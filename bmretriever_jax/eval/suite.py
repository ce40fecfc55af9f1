"""Evaluate several models on several data sets: the table behind `bmr eval`, the quickstarts and merge search."""
from __future__ import annotations

import os
import time
from typing import Dict

from bmretriever_jax.util import tables
from bmretriever_jax.convert.gguf import cache_root
from bmretriever_jax.data.beir import load_beir
from bmretriever_jax.embed import Encoder, default_task, instruction_for
from bmretriever_jax.util.errors import InputPathError
from bmretriever_jax.eval.baselines import MiniLMEncoder
from bmretriever_jax.eval.evaluate import evaluate_bm25, evaluate_retrieval, evaluate_sts
from bmretriever_jax.eval.sts import load_sts_tsv


def _data_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def make_encoder(name: str, *, max_length=None, dtype="auto", quiet=False):
    if name == "minilm":
        return MiniLMEncoder()
    return Encoder.load(name, max_length=max_length, dtype=dtype, quiet=quiet)


def model_labels(models) -> Dict[str, str]:
    """Short distinct names for table rows: the folder name, with as many parent folders as it takes to tell
    models apart (runs/a/model and runs/b/model -> a/model, b/model)."""
    parts = {m: os.path.normpath(m).split(os.sep) for m in models}
    labels = {}
    for m, p in parts.items():
        n = 1
        while n < len(p) and any(q[-n:] == p[-n:] for o, q in parts.items() if o != m):
            n += 1
        labels[m] = "/".join(p[-n:])
    return labels


def evaluate_all(models, datasets, *, split="test", instruction=None, max_length=None, dtype="auto",
                 cache_dir=None, quiet=False) -> Dict[str, Dict[str, float]]:
    """models: names (bm25, minilm, gemma3-270m, paths); datasets: BEIR folders or STS .tsv files.
    -> {"model | data": {metric: value}} with NDCG@10 etc. (retrieval) or Spearman/Pearson (STS)."""
    cache_dir = cache_dir or os.path.join(cache_root(), "vectors")  # $BMR_CACHE/vectors
    for d in datasets:  # every data set is read (and so checked) before any model loads
        if d.endswith(".tsv"):
            load_sts_tsv(d)
        elif not os.path.isdir(d):
            raise InputPathError(f"--data {d}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or an STS .tsv")
        else:
            load_beir(d, split)
    results = {}
    labels = model_labels(models)
    for m in models:
        enc = None if m == "bm25" else make_encoder(m, max_length=max_length, dtype=dtype, quiet=quiet)
        label = labels[m]
        for d in datasets:
            t0 = time.time()
            key = f"{label} | {_data_name(d)}"
            if d.endswith(".tsv"):
                if enc is None:
                    continue  # BM25 has no sentence similarity
                row = evaluate_sts(enc, d)
            elif enc is None:
                row = evaluate_bm25(d, split)
            else:
                instr = instruction_for(instruction if instruction is not None else default_task(d))
                if m == "minilm":
                    instr = ""
                row = evaluate_retrieval(enc, d, split, instr, cache_dir=cache_dir, progress=not quiet)
            row = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            row["seconds"] = round(time.time() - t0, 1)
            results[key] = row
            if not quiet:
                print(f"  {key}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()
                                              if k in ("ndcg@10", "recall@100", "spearman")), flush=True)
    return results


def print_table(results: Dict[str, Dict[str, float]]) -> str:
    cols = ["ndcg@10", "mrr@10", "recall@100", "spearman", "pearson", "seconds"]
    cols = [c for c in cols if any(c in r for r in results.values())]
    shown = {k: {c: (f"{v:.1f}" if c == "seconds" else v) for c, v in r.items()} for k, r in results.items()}
    table = tables.from_records(shown, cols, first="model | data")
    print(table)
    return table
