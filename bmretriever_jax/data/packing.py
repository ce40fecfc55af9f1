"""Packed sequences: the texts of a batch placed several to a row, so a step computes text instead of padding.

A training batch of B queries and B*G passages becomes four arrays (`pack_pairs`):

    ids    [S * R, L] int32   token ids, `pad_id` where no text is
    seg    [S * R, L] int32   segment ids: 0 = padding, 1..K = the texts of the row, each contiguous
    q_slot [B]        int32   query j -> its slot in its shard's rows: row * K + (segment - 1)
    p_slot [B * G]    int32   passage j -> likewise

Queries and passages share the rows (L = the longer of the two cut lengths): short queries fill the ends that
long passages leave. The batch is split into S contiguous blocks (the shards of a batch-sharded array: one per
device holding a part of the batch); block s holds the queries and passages of pairs [s*B/S, (s+1)*B/S) and is
packed into its own R rows, so a device only ever attends over and pools its own texts
(`models.ops.gather_slots` puts the vectors back in the original order inside each block). Every text keeps
exactly the tokens it has unpacked (`text.tokenize`: cut to T-1 tokens + EOS, T its kind's cut length), and
nothing is ever dropped: a batch that does not fit the R rows chosen for the run is packed into the fallback
shape of one text per row, so a run compiles at most two shapes.

Rows are only well used when every block holds about the same number of tokens: the loaders order each global
batch with `balance_order` (pairs dealt to the blocks longest first, each to the least loaded block), which
changes which device holds a pair, never which pairs form the batch (the contrastive loss over the whole batch
does not depend on the order).

Placement is first-fit decreasing (longest first, ties by position), deterministic, so a batch is a pure
function of its texts.
"""
from __future__ import annotations

import heapq
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def _first_fit(lengths: Sequence[int], length: int, max_segments: int, max_rows: Optional[int]):
    """-> (row of each text, segment (1-based) of each text, rows used) or None if max_rows is exceeded."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: List[int] = []
    count: List[int] = []
    row = [0] * len(lengths)
    for i in order:
        n = lengths[i]
        if n > length:
            raise ValueError(f"a text of {n} tokens does not fit a packed row of {length}")
        for r in range(len(free)):
            if free[r] >= n and count[r] < max_segments:
                break
        else:
            if max_rows is not None and len(free) == max_rows:
                return None
            free.append(length)
            count.append(0)
            r = len(free) - 1
        free[r] -= n
        count[r] += 1
        row[i] = r
    # segments numbered in text order inside each row (placement order would also do; this reads better)
    seg = [0] * len(lengths)
    seen = [0] * len(free)
    for i in range(len(lengths)):
        seen[row[i]] += 1
        seg[i] = seen[row[i]]
    return row, seg, len(free)


def place(lengths: Sequence[int], length: int, max_segments: int) -> Tuple[List[int], List[int], int]:
    """Texts of these token counts -> (row of each text, segment (1-based) of each text, rows used):
    first-fit decreasing into as many rows as it takes."""
    return _first_fit(lengths, length, max_segments, None)


def rows_needed(lengths: Sequence[int], length: int, max_segments: int) -> int:
    """Rows that first-fit decreasing needs for texts of these token counts."""
    return _first_fit(lengths, length, max_segments, None)[2]


def write_rows(seqs: Sequence[Sequence[int]], row: Sequence[int], sid: Sequence[int], *, rows: int, length: int,
               pad_id: int, max_segments: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texts placed by `place` (the row and 1-based segment of each) -> ids and segment ids [rows, length], and
    each text's slot row * max_segments + segment - 1. Texts are written in the given order, so segments ascend
    along each row."""
    ids = np.full((rows, length), pad_id, np.int32)
    seg = np.zeros((rows, length), np.int32)
    slot = np.zeros((len(seqs),), np.int32)
    fill = [0] * rows
    for j, toks in enumerate(seqs):
        r, a = row[j], fill[row[j]]
        ids[r, a:a + len(toks)] = toks
        seg[r, a:a + len(toks)] = sid[j]
        fill[r] = a + len(toks)
        slot[j] = r * max_segments + sid[j] - 1
    return ids, seg, slot


def pack(seqs: Sequence[Sequence[int]], *, n_shards: int, rows: int, length: int, max_segments: int,
         pad_id: int) -> Optional[Dict[str, np.ndarray]]:
    """Pack token lists (see the module docstring) into n_shards blocks of `rows` rows of `length` tokens, at
    most `max_segments` texts a row. None when a block's texts do not fit its rows."""
    n = len(seqs)
    if n % n_shards:
        raise ValueError(f"{n} texts cannot be split into {n_shards} equal shards")
    per = n // n_shards
    ids = np.full((n_shards * rows, length), pad_id, np.int32)
    seg = np.zeros((n_shards * rows, length), np.int32)
    slot = np.zeros((n,), np.int32)
    for s in range(n_shards):
        block = seqs[s * per:(s + 1) * per]
        placed = _first_fit([len(t) for t in block], length, max_segments, rows)
        if placed is None:
            return None
        row, sid, _ = placed
        rows_of = slice(s * rows, (s + 1) * rows)
        ids[rows_of], seg[rows_of], slot[s * per:(s + 1) * per] = write_rows(
            block, row, sid, rows=rows, length=length, pad_id=pad_id, max_segments=max_segments)
    return {"ids": ids, "seg": seg, "slot": slot}


def balance_order(costs: Sequence[float], n_shards: int) -> np.ndarray:
    """A permutation of a global batch's B pairs that gives each of the n_shards contiguous blocks B/n_shards
    pairs of about equal total cost (tokens): pairs are dealt longest first (ties by position) to the least
    loaded block that still has room; each block keeps its pairs in batch order. Deterministic."""
    B = len(costs)
    if n_shards <= 1 or B % n_shards:
        return np.arange(B)
    per = B // n_shards
    heap = [(0.0, s) for s in range(n_shards)]
    members: List[List[int]] = [[] for _ in range(n_shards)]
    for i in sorted(range(B), key=lambda i: (-float(costs[i]), i)):
        load, s = heapq.heappop(heap)
        members[s].append(i)
        if len(members[s]) < per:
            heapq.heappush(heap, (load + float(costs[i]), s))
    return np.concatenate([np.sort(m) for m in members]).astype(np.int64)


def joint_blocks(q: Sequence, p: Sequence, n_shards: int) -> Tuple[list, np.ndarray, np.ndarray]:
    """Queries [B] and passages [B*G] -> (the texts in block order: block s = its queries, then its passages;
    each query's and each passage's position in that list)."""
    B, BG = len(q), len(p)
    if B % n_shards or BG % n_shards:
        raise ValueError(f"{B} queries / {BG} passages cannot be split into {n_shards} equal shards")
    bq, bp = B // n_shards, BG // n_shards
    seqs: list = []
    q_pos, p_pos = np.zeros(B, np.int64), np.zeros(BG, np.int64)
    for s in range(n_shards):
        q_pos[s * bq:(s + 1) * bq] = np.arange(len(seqs), len(seqs) + bq)
        seqs += list(q[s * bq:(s + 1) * bq])
        p_pos[s * bp:(s + 1) * bp] = np.arange(len(seqs), len(seqs) + bp)
        seqs += list(p[s * bp:(s + 1) * bp])
    return seqs, q_pos, p_pos


def pack_pairs(q_tok: Sequence[Sequence[int]], p_tok: Sequence[Sequence[int]], *, n_shards: int, rows: int,
               length: int, max_segments: int, pad_id: int) -> Dict[str, np.ndarray]:
    """A training batch's tokenized queries and passages -> {ids, seg, q_slot, p_slot} (module docstring),
    in `rows` rows per shard, or in the fallback shape (one text per row) when they do not fit (rows 0: always)."""
    seqs, q_pos, p_pos = joint_blocks(q_tok, p_tok, n_shards)
    out = pack(seqs, n_shards=n_shards, rows=rows, length=length, max_segments=max_segments,
               pad_id=pad_id) if rows > 0 else None
    if out is None:
        out = pack(seqs, n_shards=n_shards, rows=len(seqs) // n_shards, length=length, max_segments=max_segments,
                   pad_id=pad_id)
    return {"ids": out["ids"], "seg": out["seg"], "q_slot": out["slot"][q_pos], "p_slot": out["slot"][p_pos]}


def is_fallback(batch: Dict[str, np.ndarray]) -> bool:
    """Whether a `pack_pairs` batch took the fallback shape (one text per row)."""
    return batch["ids"].shape[0] == len(batch["q_slot"]) + len(batch["p_slot"])


def to_fallback(batch: Dict[str, np.ndarray], *, n_shards: int, max_segments: int,
                pad_id: int) -> Dict[str, np.ndarray]:
    """A packed batch re-packed into the fallback shape, the same texts (read back from the rows by their slots).
    On several hosts, one host's fallback makes every host's batch take it: shapes must agree."""
    if is_fallback(batch):
        return batch
    ids, seg = batch["ids"], batch["seg"]
    R = ids.shape[0] // n_shards

    def texts(slots):
        per = len(slots) // n_shards
        out = []
        for j, slot in enumerate(slots):
            row, k = divmod(int(slot), max_segments)
            r = (j // per) * R + row
            out.append(ids[r][seg[r] == k + 1].tolist())
        return out

    return pack_pairs(texts(batch["q_slot"]), texts(batch["p_slot"]), n_shards=n_shards, rows=0,
                      length=ids.shape[1], max_segments=max_segments, pad_id=pad_id)


def choose_rows(batches_lengths: Sequence[Sequence[int]], *, n_shards: int, length: int, max_segments: int,
                sigmas: float = 6.0) -> int:
    """The packed row count per shard for a run, from the token counts of sampled global batches (in batch
    order, split into n_shards contiguous blocks). Each sampled block needs some rows (first-fit decreasing):
    at least its load (tokens / length) rounded up, plus the placement's overhead, the whole rows it needs
    beyond that. Rows = the most any block needed, or room for the tail of the load if more: the load's mean +
    `sigmas` standard deviations, rounded up, + the largest overhead seen. A batch beyond it takes the
    fallback shape (one text per row), which on a pod may not fit where the packed step does; 6 sigmas makes
    that about a one-in-a-billion event per block and step for a normal tail (a block's load is a sum of many
    lengths); `sigmas` 0 = the most any sample needed. Never more rows than a shard has texts (the padded
    shape)."""
    needs, loads, per = [], [], 1
    for lengths in batches_lengths:
        per = len(lengths) // n_shards
        for s in range(n_shards):
            block = list(lengths[s * per:(s + 1) * per])
            needs.append(rows_needed(block, length, max_segments))
            loads.append(sum(block) / length)
    if not needs:
        return 1
    needs_a, loads_a = np.asarray(needs, float), np.asarray(loads, float)
    tail = 0
    if sigmas > 0:
        overhead = float((needs_a - np.ceil(loads_a - 1e-9)).max())
        tail = int(np.ceil(loads_a.mean() + sigmas * loads_a.std() - 1e-9) + overhead)
    return min(max(per, 1), max(1, int(needs_a.max()), tail))


def text_share(seg: np.ndarray) -> float:
    """Fraction of the computed tokens that are text (not padding)."""
    return float((seg > 0).mean()) if seg.size else 0.0


# ----------------------------------------------------------------------------------------------------
# Planning without the data: shapes and text share from a length profile
# ----------------------------------------------------------------------------------------------------
PROFILES_FILE = "length_profiles.json"  # in the repository's data/ (benchmarks/length_profiles.py writes it)


def load_profile(name: str) -> Dict[str, List[int]]:
    """Token lengths (EOS included) of queries and passages: a profile of data/length_profiles.json
    ("pretrain", "finetune"), or the path of such a JSON ({"query": [...], "passage": [...]})."""
    import json
    import os

    from bmretriever_jax.util import paths
    from bmretriever_jax.util.errors import ConfigError, InputPathError

    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise InputPathError(f"data.length_profile: {name}: no such file")
        with open(name, encoding="utf-8") as f:
            prof = json.load(f)
    else:
        with open(os.path.join(paths.data_dir(), PROFILES_FILE), encoding="utf-8") as f:
            profiles = json.load(f)["profiles"]
        if name not in profiles:
            raise ConfigError(f"data.length_profile: {name!r}; allowed: {', '.join(sorted(profiles))} or a .json path")
        prof = profiles[name]
    return {"query": list(prof["query"]), "passage": list(prof["passage"])}


def plan_packing(profile: Dict[str, List[int]], *, global_batch: int, group: int, n_shards: int, query_length: int,
                 passage_length: int, max_segments: int, packed: bool, batches: int = 32, seed: int = 0,
                 sigmas: float = 6.0, balance: bool = True) -> Dict:
    """What a run's step computes on data of this profile. "row_groups": [(rows, length)] over all shards:
    padded, B query rows of query_length and B*G passage rows of passage_length; packed, the S*R shared rows
    of max(query_length, passage_length) tokens that `choose_rows` picks from `batches` seeded sample batches
    (ordered by `balance_order` when `balance`, as the loaders do), as a run calibrates them. Computed and
    text tokens per step (text: the profile's mean lengths cut at each kind's cut length)."""
    rng = np.random.default_rng(seed)
    B, BG = global_batch, global_batch * group
    q_len = np.minimum(np.asarray(profile["query"]), query_length)
    p_len = np.minimum(np.asarray(profile["passage"]), passage_length)
    text = float(q_len.mean()) * B + float(p_len.mean()) * BG
    out: Dict = {"packed": packed, "text_tokens": text}
    if packed:
        L = max(query_length, passage_length)
        sample = []
        for _ in range(batches):
            q, p = rng.choice(q_len, size=B), rng.choice(p_len, size=(B, group))
            if balance:
                o = balance_order(q + p.sum(1), n_shards)
                q, p = q[o], p[o]
            sample.append([int(x) for x in joint_blocks(list(q), list(p.reshape(-1)), n_shards)[0]])
        rows = choose_rows(sample, n_shards=n_shards, length=L, max_segments=max_segments, sigmas=sigmas)
        out.update(rows_per_shard=int(rows), row_groups=[(int(rows * n_shards), L)])
    else:
        out["row_groups"] = [(B, query_length), (BG, passage_length)]
    out["computed_tokens"] = int(sum(n * T for n, T in out["row_groups"]))
    out["text_share"] = text / out["computed_tokens"]
    return out
