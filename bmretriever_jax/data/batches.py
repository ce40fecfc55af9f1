"""Loader items -> the fixed-shape arrays a train step takes: padded rows, or packed rows (`data/packing.py`)
with their calibration. No jax here beyond what `embed` imports: this runs in the input pipeline's workers."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np

from bmretriever_jax.config import RunConfig
from bmretriever_jax.data import packing
from bmretriever_jax.embed import format_passage, format_query, instruction_for, pad_left, tokenize

BATCH_AXES = ("data", "fsdp")


def _texts(items: List[dict]) -> Tuple[List[str], List[str]]:
    queries = [format_query(it["query"], it.get("instruction") or instruction_for(it.get("task"))) for it in items]
    passages = [format_passage(d) for it in items for d in [it["positive"]] + list(it["negatives"])]
    return queries, passages


def batch_shards(mesh_or_sizes) -> int:
    """How many blocks a global batch is split into over the batch axes (data x fsdp): a Mesh or {axis: size}."""
    shape = dict(getattr(mesh_or_sizes, "shape", mesh_or_sizes))
    return math.prod(shape.get(a, 1) for a in BATCH_AXES)


def make_tokenize_fn(tokenizer, run: RunConfig, *, pack_rows: Tuple[int, int] | None = None, n_local_shards: int = 1):
    """Loader items -> fixed-shape int32 arrays. Padded (data.packing off): queries q_ids / q_mask [B, Tq] and
    passages p_ids / p_mask [B*G, Tp], left padded. Packed: q_ids / q_seg [n_local_shards * Rq, Tq] with
    q_slot [B] and p_ids / p_seg / p_slot likewise (data/packing.py), Rq, Rp = pack_rows per shard (from
    `calibrate_packing`); a batch that does not fit them takes the fallback of one text per row."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    Tq, Tp = run.model.query_max_length, run.model.max_length
    K = run.data.pack_max_segments

    def fn(items: List[dict]) -> Dict[str, np.ndarray]:
        queries, passages = _texts(items)
        q_tok, p_tok = tokenize(tokenizer, queries, Tq), tokenize(tokenizer, passages, Tp)
        if not run.data.packing:
            q_ids, q_mask = pad_left(q_tok, Tq, pad_id)
            p_ids, p_mask = pad_left(p_tok, Tp, pad_id)
            return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}
        out = {}
        for name, toks, T, rows in (("q", q_tok, Tq, pack_rows[0]), ("p", p_tok, Tp, pack_rows[1])):
            packed = packing.pack(toks, n_shards=n_local_shards, rows=rows, length=T, max_segments=K, pad_id=pad_id)
            if packed is None:  # the fallback shape: one text per row
                packed = packing.pack(toks, n_shards=n_local_shards, rows=len(toks) // n_local_shards, length=T,
                                      max_segments=K, pad_id=pad_id)
            out.update({f"{name}_ids": packed["ids"], f"{name}_seg": packed["seg"], f"{name}_slot": packed["slot"]})
        return out

    return fn


def calibrate_packing(tokenizer, run: RunConfig, global_batches: List[List[dict]], n_shards: int) -> Tuple[int, int]:
    """Packed rows per shard (queries, passages) for a run: the most any shard of these global batches needs
    (a deterministic sample: the first batches of epoch 0, the same on every host)."""
    K = run.data.pack_max_segments
    q_lengths, p_lengths = [], []
    for items in global_batches:
        queries, passages = _texts(items)
        q_lengths.append([len(t) for t in tokenize(tokenizer, queries, run.model.query_max_length)])
        p_lengths.append([len(t) for t in tokenize(tokenizer, passages, run.model.max_length)])
    return (packing.choose_rows(q_lengths, n_shards=n_shards, length=run.model.query_max_length, max_segments=K,
                                sigmas=run.data.pack_tail_sigmas),
            packing.choose_rows(p_lengths, n_shards=n_shards, length=run.model.max_length, max_segments=K,
                                sigmas=run.data.pack_tail_sigmas))
