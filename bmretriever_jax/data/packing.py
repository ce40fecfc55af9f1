"""Packed sequences: the texts of a batch placed several to a row, so a step computes text instead of padding.

A batch of N tokenized texts (queries, or passages) becomes three arrays:

    ids  [S * R, L] int32   token ids, `pad_id` where no text is
    seg  [S * R, L] int32   segment ids: 0 = padding, 1..K = the texts of the row, each contiguous
    slot [N]        int32   text j -> its slot in its shard's rows: row * K + (segment - 1)

The N texts are split into S contiguous blocks (the shards of a batch-sharded array: one per device holding
a part of the batch), and each block is packed into its own R rows, so a device only ever attends over and
pools its own texts (`models.ops.gather_slots` puts the vectors back in the original order inside each block).
Every text keeps exactly the tokens it has unpacked (`embed.tokenize`: cut to L-1 tokens + EOS), and nothing is
ever dropped: a batch that does not fit the R rows chosen for the run is packed into the fallback shape of one
text per row, so a run compiles at most two shapes per kind.

Placement is first-fit decreasing (longest first, ties by position), deterministic, so a batch is a pure
function of its texts.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

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


def rows_needed(lengths: Sequence[int], length: int, max_segments: int) -> int:
    """Rows that first-fit decreasing needs for texts of these token counts."""
    return _first_fit(lengths, length, max_segments, None)[2]


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
        fill = [0] * rows
        for j, toks in enumerate(block):  # text order, so segments ascend along each row
            r = s * rows + row[j]
            a = fill[row[j]]
            ids[r, a:a + len(toks)] = toks
            seg[r, a:a + len(toks)] = sid[j]
            fill[row[j]] = a + len(toks)
            slot[s * per + j] = row[j] * max_segments + sid[j] - 1
    return {"ids": ids, "seg": seg, "slot": slot}


def choose_rows(batches_lengths: Sequence[Sequence[int]], *, n_shards: int, length: int, max_segments: int,
                sigmas: float = 6.0) -> int:
    """The packed row count per shard for a run, from the token counts of sampled global batches (in batch
    order): the rows each shard of each sample needs, and then room for the tail: max(the most needed, mean +
    `sigmas` standard deviations). A batch beyond it takes the fallback shape (one text per row), which on a pod
    may not fit where the packed step does; 6 sigmas makes that about a one-in-a-billion event per shard and
    step for a normal tail (the needs of many small texts add up to a sum of many independent lengths);
    `sigmas` 0 = the most any sample needed. Never more rows than a shard has texts (the padded shape)."""
    needs, per = [], 1
    for lengths in batches_lengths:
        per = len(lengths) // n_shards
        needs += [rows_needed(lengths[s * per:(s + 1) * per], length, max_segments) for s in range(n_shards)]
    if not needs:
        return 1
    tail = float(np.mean(needs) + sigmas * np.std(needs))
    return min(max(per, 1), max(1, max(needs), int(np.ceil(tail - 1e-9))))


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
                 sigmas: float = 6.0) -> Dict:
    """What a run's step computes on data of this profile: rows per shard (packed: the most any shard of
    `batches` seeded sample batches needs, as `train.step.calibrate_packing` picks them; padded: one text per
    row), computed and text tokens per step (text: the profile's mean lengths cut at the row lengths)."""
    rng = np.random.default_rng(seed)
    out = {"packed": packed}
    for kind, n, T in (("query", global_batch, query_length), ("passage", global_batch * group, passage_length)):
        lengths = np.minimum(np.asarray(profile[kind]), T)
        text = float(lengths.mean()) * n
        if packed:
            sample = [list(rng.choice(lengths, size=n)) for _ in range(batches)]
            rows = choose_rows(sample, n_shards=n_shards, length=T, max_segments=max_segments, sigmas=sigmas)
        else:
            rows = n // n_shards
        out[kind] = {"rows_per_shard": int(rows), "rows": int(rows * n_shards), "length": T,
                     "computed_tokens": int(rows * n_shards * T), "text_tokens": text}
    out["computed_tokens"] = out["query"]["computed_tokens"] + out["passage"]["computed_tokens"]
    out["text_tokens"] = out["query"]["text_tokens"] + out["passage"]["text_tokens"]
    out["text_share"] = out["text_tokens"] / out["computed_tokens"]
    return out
