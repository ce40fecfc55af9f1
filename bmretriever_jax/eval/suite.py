"""Evaluate several models on several data sets: the table behind `bmr eval`, the quickstarts and merge search."""
from __future__ import annotations

import os
import time
from typing import Dict

from bmretriever_jax.util import tables
from bmretriever_jax.convert.gguf import cache_root
from bmretriever_jax.data.beir import load_beir
from bmretriever_jax.embed import Encoder, default_task, instruction_for
from bmretriever_jax.util.errors import ConfigError, InputPathError
from bmretriever_jax.eval import fusion, metrics
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


def _split_exists(data_dir: str, split: str) -> bool:
    return os.path.isfile(os.path.join(data_dir, "qrels", f"{split}.tsv"))


def _system_runs(enc, name, data_dir, splits, instruction, cache_dir, quiet):
    """{split: run} of one system on a BEIR folder, each run the top DEPTH documents of every judged query.

    Dense models encode each split's queries separately (the test queries alone, in the same batches as before
    fusion existed); BM25 is deterministic per query, so one index serves every split."""
    from bmretriever_jax.eval.baselines import bm25_search
    from bmretriever_jax.eval.evaluate import retrieve

    loaded = {s: load_beir(data_dir, s) for s in splits}
    corpus = loaded[splits[0]][0]
    if enc is None:
        union = {q: t for s in splits for q, t in loaded[s][1].items()}
        run = bm25_search(corpus, union, k=fusion.DEPTH)
        return {s: {q: run[q] for q in loaded[s][1]} for s in splits}, {s: loaded[s][2] for s in splits}
    instr = "" if name == "minilm" else instruction_for(instruction if instruction is not None
                                                        else default_task(data_dir))
    runs = {s: retrieve(enc, corpus, loaded[s][1], instr, data_dir=data_dir, cache_dir=cache_dir, k=fusion.DEPTH,
                        progress=not quiet) for s in splits}
    return runs, {s: loaded[s][2] for s in splits}


def _fused_rows(method, runs, qrels, labels, data_dir, split, dev_split, quiet):
    """{row key: row} and {row key: fused test run} for one BEIR folder; parameters chosen on dev_split only."""
    names = [labels[m] for m in runs]
    systems = list(runs)
    t0 = time.time()
    if dev_split and dev_split in qrels:
        params, dev_score = fusion.choose_params([runs[m][dev_split] for m in systems], qrels[dev_split], method)
        note = f"{fusion.describe(method, params, names)} (chosen on {dev_split}: ndcg@10 {dev_score:.4f})"
    else:
        params = fusion.default_params(method, len(systems))
        note = f"{fusion.describe(method, params, names)} (default: no {dev_split or 'dev'} split)"
    fused = fusion.fuse([runs[m][split] for m in systems], method, params)
    row = metrics.evaluate_run(qrels[split], fused, metrics.DEFAULT_K, missing="zero")
    row["seconds"] = round(time.time() - t0, 1)
    row["fusion"] = note
    key = f"{method}({' + '.join(names)}) | {_data_name(data_dir)}"
    if not quiet:
        print(f"  {key}: ndcg@10={row['ndcg@10']:.4f}, recall@100={row['recall@100']:.4f}  [{note}]", flush=True)
    return key, row, fused, params


def evaluate_all(models, datasets, *, split="test", instruction=None, max_length=None, dtype="auto",
                 cache_dir=None, quiet=False, fusion_method=None, fusion_dev_split="dev", fuse=None,
                 save_runs=None) -> Dict[str, Dict[str, float]]:
    """models: names (bm25, minilm, gemma3-270m, paths); datasets: BEIR folders or STS .tsv files.
    -> {"model | data": {metric: value}} with NDCG@10 etc. (retrieval) or Spearman/Pearson (STS).

    fusion_method "rrf" / "wsum" adds a row per BEIR folder fusing the top-1000 lists of the systems in
    `fuse` (default: every named system; eval.fusion), its parameters chosen on `fusion_dev_split` when the
    folder has it (defaults otherwise; the row's "fusion" entry says which). Only fused systems retrieve for
    the dev split. save_runs: a folder that receives TREC run files
    <save_runs>/<data>/<split>/<system>.trec, fused runs included."""
    cache_dir = cache_dir or os.path.join(cache_root(), "vectors")  # $BMR_CACHE/vectors
    if fusion_method is not None:
        if fusion_method not in fusion.METHODS:
            raise ConfigError(f"--fusion {fusion_method}: allowed: {', '.join(fusion.METHODS)}")
        fuse = list(models) if fuse is None else list(fuse)
        unknown = [f for f in fuse if f not in models]
        if unknown:
            raise ConfigError(f"--fuse {','.join(unknown)}: not among the systems evaluated; allowed: "
                              f"{', '.join(models)}")
        if len(set(fuse)) < 2:
            raise ConfigError("--fusion needs at least two systems (models and/or baselines) to fuse")
        if fusion_dev_split == split:
            raise ConfigError(f"--fusion-dev-split {fusion_dev_split}: that is the split being scored; fusion "
                              "parameters are never chosen on it")
    elif fuse is not None:
        raise ConfigError("--fuse names the systems to fuse: give --fusion rrf|wsum with it")
    for d in datasets:  # every data set is read (and so checked) before any model loads
        if d.endswith(".tsv"):
            load_sts_tsv(d)
        elif not os.path.isdir(d):
            raise InputPathError(f"--data {d}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or an STS .tsv")
        else:
            load_beir(d, split)
    results = {}
    labels = model_labels(models)
    fused_systems = set(fuse or ())
    kept: Dict[str, Dict[str, dict]] = {}  # data -> model -> {split: run}
    kept_qrels: Dict[str, dict] = {}
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
            elif m in fused_systems or save_runs is not None:
                splits = [split] + ([fusion_dev_split] if m in fused_systems and _split_exists(d, fusion_dev_split)
                                    else [])
                runs, qrels = _system_runs(enc, m, d, splits, instruction, cache_dir, quiet)
                kept.setdefault(d, {})[m] = runs
                kept_qrels.setdefault(d, {}).update(qrels)  # a system outside `fuse` reads test only
                row = metrics.evaluate_run(qrels[split], runs[split], metrics.DEFAULT_K, missing="zero")
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
    for d, runs in kept.items():
        fused = {}
        if fusion_method is not None:
            key, row, fused_run, _ = _fused_rows(fusion_method, {m: runs[m] for m in fuse}, kept_qrels[d],
                                                 labels, d, split, fusion_dev_split, quiet)
            results[key] = row
            fused = {key.split(" | ")[0]: fused_run}
        if save_runs is not None:
            folder = os.path.join(save_runs, _data_name(d), split)
            for name, run in [*((labels[m], r[split]) for m, r in runs.items()), *fused.items()]:
                fusion.write_run(os.path.join(folder, fusion.safe_tag(name) + ".trec"), run, name)
            if not quiet:
                print(f"  runs: {folder}/", flush=True)
    return results


def print_table(results: Dict[str, Dict[str, float]]) -> str:
    cols = ["ndcg@10", "mrr@10", "recall@100", "spearman", "pearson", "tokens", "seconds", "fusion"]
    cols = [c for c in cols if any(c in r for r in results.values())]
    shown = {k: {c: (f"{v:.1f}" if c == "seconds" else v) for c, v in r.items()} for k, r in results.items()}
    table = tables.from_records(shown, cols, first="model | data")
    print(table)
    return table
