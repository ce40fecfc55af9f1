"""`bmr synth queries|negatives|filter` and `bmr optimize-prompt`: argument parsing over synth/ (synth/pipeline.py)."""
from __future__ import annotations

import json
import os

from bmretriever_jax.util.errors import ConfigError


def _add_llm_args(s, default_batch: int, default_new: int) -> None:
    g = s.add_argument_group("LLM backend")
    g.add_argument("--llm", default="smollm2-135m",
                   help="local model (smollm2-135m, gemma3-270m, .gguf, folder) or, with --base-url, the server's "
                        "model name")
    g.add_argument("--base-url", default=os.environ.get("BMR_LLM_BASE_URL"),
                   help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (default $BMR_LLM_BASE_URL; "
                        "unset = run --llm in-process with JAX)")
    g.add_argument("--api-key-env", default="BMR_LLM_API_KEY", help="environment variable holding the API key")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    g.add_argument("--retries", type=int, default=3)
    g.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight")
    g.add_argument("--llm-dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    g.add_argument("--batch-size", type=int, default=default_batch, help="prompts per generation batch")
    g.add_argument("--max-new-tokens", type=int, default=default_new)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)


def _backend(a):
    from bmretriever_jax.synth.pipeline import make_llm

    return make_llm(a.llm, base_url=a.base_url, api_key=os.environ.get(a.api_key_env), timeout=a.timeout,
                    retries=a.retries, concurrency=a.concurrency, dtype=a.llm_dtype, batch_size=a.batch_size,
                    quiet=a.quiet)


def cmd_synth_queries(a):
    from bmretriever_jax.synth import pipeline as pl
    from bmretriever_jax.synth.queries import count_rejected, generate_queries, read_corpus_items

    items = read_corpus_items(a.corpus, a.limit)
    stats = generate_queries(items, _backend(a), a.style, a.out, per_passage=a.per_passage,
                             batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                             top_p=a.top_p, seed=a.seed, max_passage_words=a.max_passage_words, task=a.task,
                             model_name=a.llm, progress=not a.quiet)
    print(json.dumps(stats))
    if a.filter:
        out = a.filtered_out or pl.stem(a.out) + ".filtered.jsonl"
        pl.run_filter("queries", a.out, out, retriever=pl.make_retriever(a.consistency, a.quiet),
                      corpus_path=a.corpus, top_k=a.top_k, instruction=pl.instruction_for_pairs(a.out, None),
                      quiet=a.quiet,
                      generated_empty=count_rejected(a.out))


def cmd_synth_negatives(a):
    from bmretriever_jax.synth import pipeline as pl
    from bmretriever_jax.data.pairs import read_pairs
    from bmretriever_jax.synth.negatives import generate_negatives

    stats = generate_negatives(read_pairs(a.pairs), _backend(a), a.out, num_negatives=a.num_negatives,
                               mode=a.mode, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                               temperature=a.temperature, top_p=a.top_p, seed=a.seed, limit=a.limit,
                               model_name=a.llm, progress=not a.quiet)
    print(json.dumps(stats))
    if a.filter:
        out = a.filtered_out or pl.stem(a.out) + ".filtered.jsonl"
        pl.run_filter("negatives", a.out, out, retriever=pl.make_retriever(a.retriever, a.quiet),
                      instruction=pl.instruction_for_pairs(a.out, None), quiet=a.quiet)


def cmd_synth_filter(a):
    from bmretriever_jax.synth import pipeline as pl

    if a.kind == "queries" and a.retriever not in (None, "none") and not a.corpus:
        raise ConfigError("the consistency check of queries needs --corpus")
    pl.run_filter(a.kind, a.pairs, a.out, retriever=pl.make_retriever(a.retriever, a.quiet), corpus_path=a.corpus,
                  top_k=a.top_k, instruction=pl.instruction_for_pairs(a.pairs, a.instruction), report_path=a.report,
                  quiet=a.quiet, min_words=a.min_words)


def cmd_optimize_prompt(a):
    from bmretriever_jax.convert import hub
    from bmretriever_jax.embed import default_task
    from bmretriever_jax.eval.suite import make_encoder
    from bmretriever_jax.synth.prompt_opt import optimize_instruction, write_instruction, write_report

    task = a.task or default_task(a.data)
    if not task:
        raise ConfigError("cannot tell the task from the data folder name; pass --task")
    encoder = make_encoder(a.model, max_length=a.max_length, dtype=a.dtype, quiet=a.quiet)
    folder = None if a.model == "minilm" else hub.resolve(a.model, quiet=True)
    current = hub.retriever_settings(folder).get("instructions", {}).get(task) if folder else None
    from bmretriever_jax.convert.gguf import cache_root

    cache_dir = a.cache_dir or os.path.join(cache_root(), "vectors")  # $BMR_CACHE/vectors
    res = optimize_instruction(encoder, a.data, _backend(a), task=task, split=a.split, budget=a.budget,
                               n_seeds=a.n_seeds, n_batches=a.n_batches, cache_dir=cache_dir, rng_seed=a.seed,
                               max_new_tokens=a.max_new_tokens, temperature=a.temperature, current=current,
                               progress=not a.quiet)
    prefix = a.report or os.path.join("runs", "prompt_opt", f"{os.path.basename(os.path.normpath(a.data))}-{task}")
    js, tsv = write_report(res, prefix)
    for c in res["candidates"]:
        score = "" if c["score"] is None else f"{c['score']:.4f}"
        print(f"{c['id']:>3} {c['origin']:<10} {c['status']:<18} {score:>7}  {c['instruction'][:90]}")
    print(f"baseline {res['baseline']:.4f} -> winner {res['winner_score']:.4f}: {res['winner']}")
    print(f"report: {tsv} and {js}")
    if folder and not a.no_write:
        path = write_instruction(folder, task, res["winner"])
        print(f"wrote instructions[{task!r}] to {path}")


def add_commands(sub) -> None:
    """Adds `synth` (queries / negatives / filter) and `optimize-prompt` to the `bmr` subparsers."""
    s = sub.add_parser("synth", help="LLM-made training data: synthetic queries, hard negatives, filtering")
    ss = s.add_subparsers(dest="synth_cmd", required=True)

    q = ss.add_parser("queries", help="generate queries (question/claim/title) for corpus passages -> pairs")
    q.add_argument("--corpus", required=True, help="BEIR corpus.jsonl")
    q.add_argument("--style", choices=["question", "claim", "title"], default="question")
    q.add_argument("--out", required=True, help="pairs .jsonl (appended to: an interrupted run resumes)")
    q.add_argument("--limit", type=int, default=None, help="first N passages of the corpus")
    q.add_argument("--per-passage", type=int, default=1)
    q.add_argument("--task", default=None, help="task of the pairs (default by style: pubmedqa, scifact, pretrain)")
    q.add_argument("--max-passage-words", type=int, default=300)
    q.add_argument("--filter", action="store_true", help="then filter (empty, length, copied, duplicate, consistency)")
    q.add_argument("--filtered-out", default=None, help="default <out>.filtered.jsonl")
    q.add_argument("--consistency", default="bm25", help="round-trip retriever: bm25 | none | model name/folder")
    q.add_argument("--top-k", type=int, default=10, help="consistency: source passage must rank within top k")
    _add_llm_args(q, default_batch=8, default_new=64)
    q.set_defaults(fn=cmd_synth_queries)

    n = ss.add_parser("negatives", help="generate hard negatives for (query, positive) pairs (STM recipe)")
    n.add_argument("--pairs", required=True, help="input pairs .jsonl[.gz]")
    n.add_argument("--out", required=True, help="pairs .jsonl with negatives (appended to: resumable)")
    n.add_argument("--num-negatives", type=int, default=1)
    n.add_argument("--mode", choices=["prepend", "append", "replace"], default="prepend",
                   help="where the synthetic negatives go relative to existing ones")
    n.add_argument("--limit", type=int, default=None, help="first N pairs")
    n.add_argument("--filter", action="store_true", help="then filter the negatives")
    n.add_argument("--filtered-out", default=None, help="default <out>.filtered.jsonl")
    n.add_argument("--retriever", default="bm25", help="false-negative check: bm25 | none | model name/folder")
    _add_llm_args(n, default_batch=4, default_new=256)
    n.set_defaults(fn=cmd_synth_negatives)

    f = ss.add_parser("filter", help="filter synthetic queries or negatives of a pairs file, with a report")
    f.add_argument("--kind", choices=["queries", "negatives"], required=True)
    f.add_argument("--pairs", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--corpus", default=None, help="queries: corpus.jsonl the round-trip check ranks against")
    f.add_argument("--retriever", default="bm25", help="bm25 | none | model name/folder")
    f.add_argument("--top-k", type=int, default=10)
    f.add_argument("--instruction", default=None, help="task name or instruction for dense retrievers")
    f.add_argument("--min-words", type=int, default=None)
    f.add_argument("--report", default=None, help="report JSON (default <out>.report.json)")
    f.set_defaults(fn=cmd_synth_filter)

    o = sub.add_parser("optimize-prompt", help="search the query instruction maximising NDCG@10 on a dev split")
    o.add_argument("--model", required=True, help="the retriever (model name or folder)")
    o.add_argument("--data", required=True, help="BEIR folder with qrels/<split>.tsv")
    o.add_argument("--split", default="dev")
    o.add_argument("--task", default=None, help="task key the instruction is stored under (default: by data)")
    o.add_argument("--budget", type=int, default=12, help="candidates scored, seeds included")
    o.add_argument("--n-seeds", type=int, default=None, help="seed instructions scored (default: budget // 2)")
    o.add_argument("--n-batches", type=int, default=4, help="dev mini-batches of the Pareto front")
    o.add_argument("--max-length", type=int, default=None)
    o.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    o.add_argument("--cache-dir", default=None, help="corpus vector cache (default $BMR_CACHE/vectors, i.e. ~/.cache/bmretriever_jax/vectors)")
    o.add_argument("--report", default=None, help="report prefix (.tsv/.json; default runs/prompt_opt/<data>-<task>)")
    o.add_argument("--no-write", action="store_true", help="do not write the winner into the model's bmretriever.json")
    _add_llm_args(o, default_batch=1, default_new=64)
    o.set_defaults(fn=cmd_optimize_prompt)
