"""Text -> vectors, BMRetriever's way.

query   -> "{instruction}\\nQuery: {query}"
passage -> "Represent this passage\\npassage: {title} {text}"
tokenise without padding, truncate to max_length - 1, append EOS by hand, pad on the LEFT, run the
backbone, take the last token (or the masked mean), L2-normalise.

Behaviour at the edges (documented and tested): an empty text is encoded as the template alone (for
`encode_texts`, BOS + EOS); a text longer than max_length is truncated (the EOS is always kept);
max_length beyond the model's context raises.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bmretriever_jax.convert import hub
from bmretriever_jax.models import ModelConfig, encode
from bmretriever_jax.util.precision import resolve_dtype

from bmretriever_jax.text import (PASSAGE_TEMPLATE, QUERY_TEMPLATE, TASK_INSTRUCTIONS, char_budget,  # noqa: F401
                                  default_task, format_passage, format_query, instruction_for, pad_left, tokenize)


def embed_batch(cfg: ModelConfig, params, input_ids, attention_mask, *, pooling="last", normalize=True,
                dtype="auto", bidirectional=False, **fwd_kw) -> jax.Array:
    """[B, T] ids/mask -> [B, D] vectors (the `Encoder` module); the function training differentiates."""
    return encode(cfg, params, input_ids, attention_mask, pooling=pooling, normalize=normalize, dtype=dtype,
                  bidirectional=bidirectional, **fwd_kw)


def _bucket(n: int, max_length: int) -> int:
    """Round sequence lengths up to a few sizes so a corpus compiles a handful of programs, not hundreds."""
    for b in (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048):
        if n <= b:
            return min(b, max_length)
    return max_length


class Encoder:
    """A retriever: backbone params + tokenizer + pooling settings. Thread-compatible, not thread-safe."""

    def __init__(self, cfg: ModelConfig, params, tokenizer, *, max_length: int = 512, pooling: str = "last",
                 normalize: bool = True, dtype: str = "auto", bidirectional: bool = False,
                 source: str = "", instructions: Optional[Dict[str, str]] = None):
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling={pooling!r}; allowed: last, mean")
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: needs room for at least one token and EOS")
        if max_length > cfg.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds the model's context ({cfg.max_position_embeddings})")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.params = jax.tree.map(jnp.asarray, params)
        self.max_length, self.pooling, self.normalize = max_length, pooling, normalize
        self.dtype = resolve_dtype(dtype)
        self.bidirectional = bidirectional
        self.instructions = dict(TASK_INSTRUCTIONS, **(instructions or {}))
        self.source = source
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._fn = jax.jit(functools.partial(embed_batch, cfg, pooling=pooling, normalize=normalize,
                                             dtype=self.dtype, bidirectional=bidirectional))
        self._fingerprint = None

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str, *, max_length: Optional[int] = None, pooling: Optional[str] = None,
             normalize: Optional[bool] = None, dtype: str = "auto", bidirectional: Optional[bool] = None,
             quiet: bool = False) -> "Encoder":
        """From a model name, .gguf, transformers folder or `bmr export` folder (its bmretriever.json wins
        over the defaults; explicit arguments win over both)."""
        cfg, params, tok, folder = hub.load(name_or_path, quiet=quiet)
        s = hub.retriever_settings(folder)
        pick = lambda arg, key, default: arg if arg is not None else s.get(key, default)  # noqa: E731
        return cls(cfg, params, tok, max_length=pick(max_length, "max_length", min(512, cfg.max_position_embeddings)),
                   pooling=pick(pooling, "pooling", "last"), normalize=pick(normalize, "normalize", True),
                   dtype=dtype, bidirectional=pick(bidirectional, "bidirectional", False),
                   source=_source_id(folder), instructions=s.get("instructions"))

    @property
    def dim(self) -> int:
        return self.cfg.hidden_size

    @property
    def fingerprint(self) -> str:
        """Changes when weights, pooling, length, precision or attention change (keys vector caches)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([self.source, self.max_length, self.pooling, self.normalize, str(self.dtype),
                                 self.bidirectional, self.cfg.to_dict()], sort_keys=True, default=str).encode())
            if not self.source:  # in-memory params (e.g. mid-training): hash a sample of every leaf
                for leaf in jax.tree.leaves(self.params):
                    h.update(np.asarray(leaf).ravel()[:4096].tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def instruction(self, task_or_instruction: Optional[str]) -> str:
        if not task_or_instruction:
            return ""
        return self.instructions.get(task_or_instruction.lower(), task_or_instruction)

    # ------------------------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False,
                     desc: str = "encoding") -> np.ndarray:
        """Raw texts (no template) -> [n, d] float32, in input order. Sorted by length for speed."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if any(not isinstance(t, str) for t in texts):
            bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
            raise TypeError(f"text {bad} is {type(texts[bad]).__name__}, not str")
        seqs = tokenize(self.tokenizer, texts, self.max_length)
        order = np.argsort([-len(s) for s in seqs], kind="stable")
        out = np.zeros((len(texts), self.dim), np.float32)
        rows = self._batch_rows(batch_size)
        with tqdm(total=len(texts), desc=desc, disable=not progress, unit="text") as bar:
            for start in range(0, len(texts), rows):
                idx = order[start:start + rows]
                batch = [seqs[i] for i in idx]
                T = _bucket(max(len(s) for s in batch), self.max_length)
                ids, mask = pad_left(batch, T, self.pad_id, rows=rows)  # fixed rows: one compile per T
                out[idx] = self._vectors(ids, mask)[: len(idx)]
                bar.update(len(idx))
        return out

    def _batch_rows(self, batch_size: int) -> int:
        """Rows of every encoded batch (the last one padded to it)."""
        return batch_size

    def _vectors(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Padded ids / mask [rows, T] -> vectors [rows, d] float32 on the host."""
        return np.asarray(self._fn(self.params, ids, mask), np.float32)

    def encode_queries(self, queries: Sequence[str], instruction: Optional[str] = None, batch_size: int = 32,
                       progress: bool = False, *, task: Optional[str] = None) -> np.ndarray:
        """Queries -> [n, d] float32 vectors, each wrapped in BMRetriever's query template with an instruction:
        `task` names one of the model's tasks (scifact, pubmedqa, medquad, ...: `self.instructions`),
        `instruction` is a task name or the instruction text itself; neither = no instruction."""
        if task is not None:
            if instruction is not None:
                raise ValueError("give task= or instruction=, not both")
            if task.lower() not in self.instructions:
                raise ValueError(f"task={task!r}; allowed: {', '.join(sorted(self.instructions))} "
                                 "(or pass the text as instruction=)")
            instruction = task
        instr = self.instruction(instruction)
        return self.encode_texts([format_query(q, instr) for q in queries], batch_size, progress, "queries")

    def encode_passages(self, docs: Sequence, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Passages (strings, or {"title", "text"} records) -> [n, d] float32 vectors, in input order."""
        return self.encode_texts([format_passage(d) for d in docs], batch_size, progress, "passages")

    def similarity(self, a, b) -> np.ndarray:
        """Cosine similarity [len(a), len(b)] of two sets of vectors (as sentence-transformers' `similarity`);
        vectors from this encoder are L2-normalised, so this is their dot product."""
        a, b = np.atleast_2d(np.asarray(a, np.float32)), np.atleast_2d(np.asarray(b, np.float32))
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return a @ b.T


def _source_id(folder: str) -> str:
    """Identity of a model folder's weights: path + size + mtime of its safetensors files."""
    parts = [os.path.abspath(folder)]
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors") or f in ("bmretriever.json", "config.json"):
            st = os.stat(os.path.join(folder, f))
            parts.append(f"{f}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)
