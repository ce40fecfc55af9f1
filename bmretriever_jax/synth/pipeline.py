"""The synthetic-data steps as plain functions (an LLM backend, the filters with their report, the instruction a
pairs file is scored with), shared by `bmr synth` / `bmr optimize-prompt` and the synthetic-data quickstart."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax

from bmretriever_jax.convert.gguf import cache_root
from bmretriever_jax.data.beir import load_corpus
from bmretriever_jax.data.pairs import iter_pairs, read_pairs, write_pairs
from bmretriever_jax.embed import instruction_for
from bmretriever_jax.eval.suite import make_encoder
from bmretriever_jax.synth.backends import make_backend
from bmretriever_jax.synth.filters import filter_negatives, filter_queries


def enable_compile_cache() -> None:
    """Persist XLA programs across runs (~/.cache/bmretriever_jax/xla): the generator compiles one program per
    prompt-length bucket, 20-50 s each on 2 CPU cores, and a resumed or repeated run should not pay again.
    A cache directory configured by the user (JAX_COMPILATION_CACHE_DIR) wins."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def make_llm(llm: str = "smollm2-135m", *, base_url: Optional[str] = None, api_key: Optional[str] = None,
             quiet: bool = False, **kw):
    """The chat backend for `llm`: an OpenAI-compatible server at base_url, else the model in-process (JAX, with
    the persistent compile cache on)."""
    if not base_url:
        enable_compile_cache()
    return make_backend(llm, base_url=base_url, api_key=api_key, quiet=quiet, **kw)


def make_retriever(spec: str, quiet: bool):
    """'bm25' | 'none' | a model name or folder (an Encoder) | 'minilm'."""
    if spec in (None, "", "none"):
        return None
    if spec == "bm25":
        return "bm25"
    return make_encoder(spec, quiet=quiet)


def stem(path: str) -> str:
    for ext in (".jsonl.gz", ".jsonl", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def run_filter(kind: str, pairs_path: str, out: str, *, retriever, corpus_path=None, top_k=10, instruction="",
                report_path=None, quiet=False, generated_empty=0, min_words=None):
    pairs = read_pairs(pairs_path)
    if kind == "queries":
        corpus = load_corpus(corpus_path) if corpus_path else None
        kw = {} if min_words is None else {"min_words": min_words}
        kept, report = filter_queries(pairs, retriever=retriever, corpus=corpus, top_k=top_k, instruction=instruction,
                                      generated_empty=generated_empty, **kw)
    else:
        kw = {} if min_words is None else {"min_words": min_words}
        kept, report = filter_negatives(pairs, retriever=retriever, instruction=instruction, **kw)
    write_pairs(out, kept)
    report_path = report_path or stem(out) + ".report.json"
    with open(report_path, "w") as f:
        json.dump({"pairs_file": pairs_path, "output_file": out, **report.to_dict()}, f, indent=1)
    if not quiet:
        print(report.format())
    print(f"wrote {len(kept)} pairs to {out} (report: {report_path})")


def instruction_for_pairs(pairs_path: str, explicit):
    """The query instruction to score pairs with: --instruction, else the first pair's task/instruction."""
    if explicit:
        return instruction_for(explicit)
    for p in iter_pairs(pairs_path):
        return p.instruction if p.instruction is not None else instruction_for(p.task or "")
    return ""
