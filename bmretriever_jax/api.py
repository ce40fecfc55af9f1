"""The Python API: what the `bmr` command does, callable from a notebook or a script.

    import bmretriever_jax as bmr

    model = bmr.load("gemma3-270m")                     # a name, .gguf, transformers folder, run or export
    q = model.encode_queries(["Vitamin D prevents fractures."], task="scifact")
    d = model.encode_passages([{"title": "Vitamin D", "text": "A trial of vitamin D ..."}])
    scores = model.similarity(q, d)                     # cosine, [n_queries, n_passages]

    bmr.train("configs/quickstart.yaml", {"train.steps": 10, "out": "runs/try"})
    bmr.evaluate(["runs/try/model", "bm25"], ["data/scifact"], fusion="rrf")   # + the fused row
    bmr.index("data/scifact/corpus.jsonl", ["runs/try/model", "bm25"], "idx")
    bmr.search("idx", "Vitamin D prevents fractures.", top_k=5)
    bmr.merge("merge.yaml", "runs/merged")
    bmr.export("runs/try", "runs/try-st", format="sentence-transformers")

Every function raises a `bmretriever_jax.UserError` subclass (with a one-line message naming the file, line or
parameter) for bad input, as the command line prints it.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

from bmretriever_jax.config import load_config
from bmretriever_jax.embed import Encoder

Overrides = Union[Mapping[str, object], Sequence[str], None]


def load(name_or_path: str, *, max_length: Optional[int] = None, pooling: Optional[str] = None,
         dtype: str = "auto", quiet: bool = True) -> Encoder:
    """A retriever ready to encode: `gemma3-270m`, `smollm2-135m` (packaged GGUFs), a `.gguf` file, a transformers
    folder, a training run folder (`runs/x`, its newest checkpoint) or a `bmr export` / `bmr merge` folder.

    Returns an `Encoder` with `encode_queries(texts, task=|instruction=)`, `encode_passages(docs)`,
    `similarity(a, b)`, `dim` and `max_length`. A folder's `bmretriever.json` (written by training, merging and
    export) sets pooling, length and instructions; the arguments here win over it. `dtype="auto"` computes in
    bf16 where the hardware has bf16 units, else float32."""
    return Encoder.load(name_or_path, max_length=max_length, pooling=pooling, dtype=dtype,
                        quiet=quiet)


def _override_list(overrides: Overrides) -> list:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import json

        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


def train(config: Optional[str], overrides: Overrides = None, *, quiet: bool = False,
          allow_config_change: bool = False) -> dict:
    """`bmr train CONFIG key=value ...`: contrastive training from a YAML config (`configs/`), with overrides as
    a dict ({"train.steps": 100, "lora.rank": 8}) or "key=value" strings. Resumes a run whose `out` folder holds
    checkpoints. Returns the final metrics (loss, steps, dev NDCG@10 where configured); the trained model is
    in OUT/model (load it with `load(OUT)`)."""
    from bmretriever_jax.training import train as _train

    run = load_config(config, _override_list(overrides))
    return _train(run, quiet=quiet, allow_config_change=allow_config_change)


def evaluate(models: Union[str, Sequence[str]], data: Union[str, Sequence[str]], *, split: str = "test",
             instruction: Optional[str] = None, max_length: Optional[int] = None, dtype: str = "auto",
             cache_dir: Optional[str] = None, quiet: bool = True, fusion: Optional[str] = None,
             fusion_dev_split: str = "dev", fuse: Optional[Sequence[str]] = None,
             save_runs: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """`bmr eval`: every model (a name or path as `load` takes, or the baselines "bm25" and "minilm") on every
    data set (BEIR folders: NDCG@10, recall@100, ...; STS .tsv files: Spearman). Returns
    {"model | data": {metric: value}}; corpus vectors are cached, so a second call re-encodes nothing.
    `fusion="rrf"|"wsum"` adds a row per BEIR folder fusing the systems of `fuse` (default all of them; parameters
    chosen on `fusion_dev_split`, k=60 / equal weights where there is none; the row's "fusion" entry says which);
    `save_runs` a folder for TREC run files."""
    from bmretriever_jax.eval.suite import evaluate_all

    models = [models] if isinstance(models, str) else list(models)
    data = [data] if isinstance(data, str) else list(data)
    fuse = [fuse] if isinstance(fuse, str) else fuse
    return evaluate_all(models, data, split=split, instruction=instruction, max_length=max_length, dtype=dtype,
                        cache_dir=cache_dir, quiet=quiet, fusion_method=fusion, fusion_dev_split=fusion_dev_split,
                        fuse=fuse, save_runs=save_runs)


def index(corpus: str, models: Union[str, Sequence[str]], out: str, *, task: Optional[str] = None,
          max_length: Optional[int] = None, dtype: str = "auto", batch_size: int = 32, quiet: bool = True) -> str:
    """`bmr index`: the documents of `corpus` (a corpus.jsonl or a BEIR folder) encoded by every model of
    `models` ("bm25" for a BM25 index) into the folder `out`, with a manifest of the models and the corpus'
    sha256. Returns `out`, the argument `search` takes."""
    from bmretriever_jax.eval.index import build_index

    models = [models] if isinstance(models, str) else list(models)
    return build_index(corpus, models, out, task=task, max_length=max_length, dtype=dtype, batch_size=batch_size,
                       quiet=quiet)


_OPEN_INDEXES: dict = {}


def search(index: str, query: Union[str, Sequence[str]], *, top_k: int = 10, fusion: Optional[str] = None,
           task: Optional[str] = None, instruction: Optional[str] = None, systems: Optional[Sequence[str]] = None,
           rrf_k: Optional[float] = None, weights: Optional[Sequence[float]] = None) -> list:
    """`bmr search`: the `top_k` documents of an index for a query, as [{"rank", "id", "title", "score"}]
    (a list of such lists for a list of queries). An index of several systems is fused (rrf, k=60, unless
    `fusion`/`rrf_k`/`weights` say otherwise); `systems` picks some of them. The opened index and its models
    stay loaded for the next call."""
    import os

    from bmretriever_jax.eval.index import MANIFEST, Index

    try:
        stamp = os.stat(os.path.join(index, MANIFEST)).st_mtime_ns
    except OSError:
        stamp = None
    key = (os.path.abspath(index), stamp)
    if stamp is None or key not in _OPEN_INDEXES:
        _OPEN_INDEXES.clear()
        _OPEN_INDEXES[key] = Index(index)  # raises the one-line error when it is not an index
    res = _OPEN_INDEXES[key].search([query] if isinstance(query, str) else list(query), top_k=top_k,
                                    fusion_method=fusion, task=task, instruction=instruction, systems=systems,
                                    rrf_k=rrf_k, weights=weights)["results"]
    return res[0] if isinstance(query, str) else res


def merge(config, out: str, *, seed: int = 0, tokenizer_source: Optional[str] = None, quiet: bool = True) -> str:
    """`bmr merge`: a mergekit-format config (path, YAML text or dict: merge_method linear / task_arithmetic /
    ties / dare_ties / dare_linear / slerp / model_stock, base_model, models) streamed leaf by leaf into the new
    model folder `out`. Returns `out`."""
    from bmretriever_jax.merging.folder import merge_to_folder

    return merge_to_folder(config, out, seed=seed, tokenizer_source=tokenizer_source, quiet=quiet)


def export(source: str, out: str, format: str = "hf", *, step: Optional[int] = None,
           instruction: Optional[str] = None, max_length: Optional[int] = None, dtype: str = "float32",
           base_model: Optional[str] = None, quiet: bool = True) -> str:
    """`bmr export`: a run, checkpoint, model folder or name -> a folder for transformers (`hf`),
    sentence-transformers or PEFT, which gives the same vectors as `load(source)`. Returns `out`."""
    from bmretriever_jax.convert.export import export as _export

    return _export(source, out, format, step=step, instruction=instruction, max_length=max_length, dtype=dtype,
                   base_model=base_model, quiet=quiet)


__all__ = ["Encoder", "load", "train", "evaluate", "index", "search", "merge", "export"]
