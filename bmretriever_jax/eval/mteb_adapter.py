"""MTEB 2.x behind a thin adapter: any of our encoders as an MTEB model, and the shipped data as local
MTEB tasks so `mteb.evaluate` runs offline.

    from bmretriever_jax.embed import Encoder
    from bmretriever_jax.eval.mteb_adapter import MTEBModel, local_retrieval_task
    model = MTEBModel(Encoder.load("gemma3-270m"))
    res = mteb.evaluate(model, [local_retrieval_task("data/scifact", "test", task="scifact")], cache=None)

Query prompts: the task's instruction from our table (embed.TASK_INSTRUCTIONS, keyed by our task name),
passages: BMRetriever's passage template; STS (no prompt type): the raw sentences, as our `evaluate_sts`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

from bmretriever_jax.data.beir import load_beir


LOCAL_TASK_INSTRUCTIONS: Dict[str, str] = {}  # MTEB task name -> our task name (instruction)


def _mteb():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mteb  # noqa: F401

    return mteb


def MTEBModel(encoder, *, name: str = "bmretriever-jax/local", task_instructions: Optional[Dict[str, str]] = None,
              batch_size: int = 32):
    """Wrap an object with encode_queries / encode_passages / encode_texts as an MTEB 2.x encoder."""
    _mteb()
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta
    from mteb.types import PromptType

    class _Model(AbsEncoder):
        def __init__(self):
            self.encoder = encoder
            # task name (MTEB's) -> our task name or literal instruction
            self.task_instructions = dict(task_instructions or {})
            self.mteb_model_meta = ModelMeta(
                loader=None, name=name, revision="local", release_date=None, languages=["eng-Latn"],
                n_parameters=None, memory_usage_mb=None, max_tokens=getattr(encoder, "max_length", None),
                embed_dim=getattr(encoder, "dim", None), license=None, open_weights=True,
                public_training_code=None, public_training_data=None, framework=["JAX"],
                similarity_fn_name="cosine", use_instructions=True, training_datasets=None)

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
            rows = []
            for batch in inputs:
                n = len(batch["text"])
                titles = batch.get("title") or [""] * n
                bodies = batch.get("body") or batch["text"]
                rows += [{"text": t, "title": ti or "", "body": b} for t, ti, b in zip(batch["text"], titles, bodies)]
            if prompt_type == PromptType.query:
                instr = self.task_instructions.get(task_metadata.name,
                                                   LOCAL_TASK_INSTRUCTIONS.get(task_metadata.name, ""))
                return self.encoder.encode_queries([r["text"] for r in rows], instr, batch_size=batch_size)
            if prompt_type == PromptType.document:
                return self.encoder.encode_passages([{"title": r["title"], "text": r["body"]} for r in rows],
                                                    batch_size=batch_size)
            return self.encoder.encode_texts([r["text"] for r in rows], batch_size=batch_size)

    return _Model()


_GENERAL = dict(
    description="A local copy of a shipped bmretriever-jax data set.",
    reference=None, dataset={"path": "local", "revision": "local"}, category="t2t", eval_langs=["eng-Latn"],
    date=None, dialect=[], domains=["Medical", "Academic"], task_subtypes=[], license="not specified",
    annotations_creators="expert-annotated", modalities=["text"], sample_creation="found", bibtex_citation="",
)


def local_retrieval_task(beir_dir: str, split: str = "test", *, task: str = "", name: Optional[str] = None):
    """An MTEB retrieval task over a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."""
    _mteb()
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    task_name = name or f"Local{os.path.basename(os.path.normpath(beir_dir)).title().replace('_', '')}"

    class _Task(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name=task_name, main_score="ndcg_at_10",
                                eval_splits=[split], **_GENERAL)

        def load_data(self, num_proc: Optional[int] = None, **kwargs: Any) -> None:
            corpus, queries, qrels = load_beir(beir_dir, split)
            data = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": queries[q]} for q in qrels]),
                corpus=Dataset.from_list([{"id": d, "title": v["title"], "text": v["text"]}
                                          for d, v in corpus.items()]),
                relevant_docs={q: dict(v) for q, v in qrels.items()}, top_ranked=None)
            self.dataset = {"default": {split: data}}
            self.data_loaded = True

    LOCAL_TASK_INSTRUCTIONS[task_name] = task  # read by MTEBModel for the query instruction
    return _Task()


def ndcg_at_10(model_result, task_name: str, split: str = "test") -> float:
    for tr in model_result.task_results:
        if tr.task_name == task_name:
            return float(tr.scores[split][0]["ndcg_at_10"])
    raise KeyError(task_name)
