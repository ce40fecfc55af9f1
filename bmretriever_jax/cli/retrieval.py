"""`bmr index` and `bmr search`: retrieval for real use, without qrels (see docs/retrieval.md)."""
from __future__ import annotations

import json

from bmretriever_jax.cli.models import DTYPE_HELP, DTYPES
from bmretriever_jax.util.errors import ConfigError


def cmd_index(a):
    from bmretriever_jax.eval.index import Index, build_index

    out = build_index(a.corpus, a.model, a.out, task=a.task, max_length=a.max_length, dtype=a.dtype,
                      batch_size=a.batch_size, quiet=a.quiet)
    idx = Index(out)
    print(f"indexed {len(idx.doc_ids)} documents with {', '.join(idx.names)} in {out}")
    print(f'search it: bmr search {out} "your query"')


def _weights(text):
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: comma-separated numbers, one per system") from None


def cmd_search(a):
    from bmretriever_jax.eval.index import Index

    if not a.query.strip():  # before any model loads
        raise ConfigError("empty query: give the text to search for")
    idx = Index(a.index)
    res = idx.search([a.query], top_k=a.top_k, fusion_method=a.fusion, task=a.task, instruction=a.instruction,
                     systems=a.system, rrf_k=a.rrf_k, weights=_weights(a.weights))
    hits = res["results"][0]
    if a.json:
        print(json.dumps({"query": a.query, **{k: v for k, v in res.items() if k != "results"}, "results": hits},
                         indent=1, ensure_ascii=False))
        return
    how = res["systems"][0] if res["fusion"] is None else f"{res['fusion']} of {' + '.join(res['systems'])}"
    print(f"{len(hits)} of {len(idx.doc_ids)} documents ({how})")
    width = max([len(h["id"]) for h in hits] + [2])
    for h in hits:
        title = h["title"] or idx.docs[h["id"]].get("text", "")[:80]
        print(f"{h['rank']:>3}  {h['score']:.4f}  {h['id']:<{width}}  {title}")


def add_commands(sub) -> None:
    s = sub.add_parser("index", help="encode a corpus with models and/or BM25 into an index folder to search")
    s.add_argument("corpus", help="corpus.jsonl ({\"_id\", \"title\", \"text\"} lines) or a BEIR folder")
    s.add_argument("--model", action="append", required=True,
                   help="a model (gemma3-270m, a folder, runs/X/model, minilm) or bm25; repeat for several")
    s.add_argument("--out", required=True, help="the index folder (replaced if it is an index already)")
    s.add_argument("--task", default=None, help="default query task of searches (default: by corpus folder)")
    s.add_argument("--max-length", type=int, default=None)
    s.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    s.add_argument("--batch-size", type=int, default=32)
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser("search", help="ranked documents of an index for a query (fused over its systems)")
    s.add_argument("index", help="an index folder (made by the index command)")
    s.add_argument("query", help="the query text")
    s.add_argument("--top-k", type=int, default=10)
    s.add_argument("--fusion", choices=["rrf", "wsum"], default=None,
                   help="how several systems are fused (default rrf when the index holds several)")
    s.add_argument("--rrf-k", type=float, default=None, help="RRF's k (default 60)")
    s.add_argument("--weights", default=None, help="wsum (or rrf) weights, one per system in index order: 0.3,0.7")
    s.add_argument("--system", action="append", default=None,
                   help="search with this indexed system only (bm25, a model); repeat for several")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--task", default=None, help="query instruction by task name: scifact, pubmedqa, medquad, ...")
    g.add_argument("--instruction", default=None, help="the query instruction text itself")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.set_defaults(fn=cmd_search)
