"""Loader items -> the fixed-shape arrays a train step takes: padded rows, or packed rows (`data/packing.py`)
with their calibration. No jax here (`text`, not `embed`): this runs in the input pipeline's workers."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np

from bmretriever_jax.config import RunConfig
from bmretriever_jax.data import packing
from bmretriever_jax.text import format_passage, format_query, instruction_for, pad_left, tokenize

BATCH_AXES = ("data", "fsdp")


def _texts(items: List[dict]) -> Tuple[List[str], List[str]]:
    queries = [format_query(it["query"], it.get("instruction") or instruction_for(it.get("task"))) for it in items]
    passages = [format_passage(d) for it in items for d in [it["positive"]] + list(it["negatives"])]
    return queries, passages


def batch_shards(mesh_or_sizes) -> int:
    """How many blocks a global batch is split into over the batch axes (data x fsdp): a Mesh or {axis: size}."""
    shape = dict(getattr(mesh_or_sizes, "shape", mesh_or_sizes))
    return math.prod(shape.get(a, 1) for a in BATCH_AXES)


def pack_length(run: RunConfig) -> int:
    """The length of a packed row: queries and passages share the rows. (Longer rows would only waste more
    at their ends: a row is the unit the shapes are counted in.)"""
    return max(run.model.query_max_length, run.model.max_length)


def make_tokenize_fn(tokenizer, run: RunConfig, *, pack_rows: int | None = None, n_local_shards: int = 1):
    """Loader items -> fixed-shape int32 arrays. Padded (data.packing off): queries q_ids / q_mask [B, Tq] and
    passages p_ids / p_mask [B*G, Tp], left padded. Packed: queries and passages together in ids / seg
    [n_local_shards * pack_rows, max(Tq, Tp)] with q_slot [B] and p_slot [B*G] (data/packing.py pack_pairs),
    pack_rows per shard from `calibrate_packing`; a batch that does not fit them takes the fallback of one
    text per row."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    Tq, Tp = run.model.query_max_length, run.model.max_length
    K, L = run.data.pack_max_segments, pack_length(run)

    def fn(items: List[dict]) -> Dict[str, np.ndarray]:
        queries, passages = _texts(items)
        q_tok, p_tok = tokenize(tokenizer, queries, Tq), tokenize(tokenizer, passages, Tp)
        if not run.data.packing:
            q_ids, q_mask = pad_left(q_tok, Tq, pad_id)
            p_ids, p_mask = pad_left(p_tok, Tp, pad_id)
            return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}
        return packing.pack_pairs(q_tok, p_tok, n_shards=n_local_shards, rows=pack_rows, length=L, max_segments=K,
                                  pad_id=pad_id)

    return fn


def rows_for_lengths(run: RunConfig, batches: List[Tuple[List[int], List[int]]], n_shards: int) -> int:
    """Packed rows per shard from the (query, passage) token counts of global batches in batch order."""
    sample = [[int(x) for x in packing.joint_blocks(q, p, n_shards)[0]] for q, p in batches]
    return packing.choose_rows(sample, n_shards=n_shards, length=pack_length(run),
                               max_segments=run.data.pack_max_segments, sigmas=run.data.pack_tail_sigmas)


def calibrate_packing(tokenizer, run: RunConfig, global_batches: List[List[dict]], n_shards: int) -> int:
    """Packed rows per shard for a run, from these global batches (a deterministic sample: the first batches
    of epoch 0, the same on every host), as `packing.choose_rows` sizes them."""
    lengths = []
    for items in global_batches:
        queries, passages = _texts(items)
        lengths.append(([len(t) for t in tokenize(tokenizer, queries, run.model.query_max_length)],
                        [len(t) for t in tokenize(tokenizer, passages, run.model.max_length)]))
    return rows_for_lengths(run, lengths, n_shards)
