"""Prepared training data: pairs written once as memory-mapped Arrow (HF `datasets`), read without loading.

`bmr prepare ENTRY... --out DIR` turns what `data.train` takes (pairs JSONL files, builder names,
`pretrain:CORPUS.jsonl`) into

    DIR/manifest.json         format, sources (sha256), counts, shards, tokenizer, length statistics, text share
    DIR/pairs-00000/ ...      `Dataset.save_to_disk` shards (data-*.arrow, state.json, dataset_info.json)
    DIR/groups/               queries with several distinct positives (for padding negatives without a false one)

One row per pair, in source order: query, instruction, task, id, positive_title / positive_text,
negatives_title / negatives_text (lists), n_neg, pos_key (64-bit hash of the positive's text key,
`pairs.doc_keys`), query_key (hash of the query text). With `--tokenizer MODEL` also the token ids a training
run computes: q_ids (the query with its instruction template, as `train.step._texts` formats it, cut to
query_max_length as `text.tokenize` cuts), p_ids, n_ids and their lengths q_len, p_len, n_len.

`Prepared(DIR)` opens a folder (checking the manifest, every shard's files and sizes and the Arrow schema
first: a one-line `PreparedDataError` naming the file otherwise) and gives rows by index through
`pyarrow.Table.take` on the memory map: a reader's memory does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from bmretriever_jax.data.pairs import Pair, _norm, as_passage, iter_pairs
from bmretriever_jax.util.errors import ConfigError, InputPathError, OutputExistsError, UserError

FORMAT = "bmr-prepared-pairs"
VERSION = 1
MANIFEST = "manifest.json"
GROUPS = "groups"
SHARD_ROWS = 100_000  # pairs per save_to_disk shard (a few hundred MB of text)
TEXT_COLUMNS = ("query", "instruction", "task", "id", "positive_title", "positive_text", "negatives_title",
                "negatives_text", "n_neg", "pos_key", "query_key")
TOKEN_COLUMNS = ("q_ids", "p_ids", "n_ids", "q_len", "p_len", "n_len")


class PreparedDataError(UserError, ValueError):
    """A prepared folder is unreadable or inconsistent (corrupt file, wrong format); the message names the file."""


class MissingShardError(PreparedDataError, FileNotFoundError):
    """A file the manifest lists is not in the prepared folder."""


class TokenizerMismatchError(PreparedDataError):
    """The prepared token ids were made with another tokenizer than the run's model has."""


# ----------------------------------------------------------------------------------------------------
# Keys, hashes
# ----------------------------------------------------------------------------------------------------
def key_hash(text: str) -> int:
    """A signed 64-bit hash of a string (document identity keys, query texts)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def vocab_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, sorted) and its special tokens' ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Sources: what data.train takes, as a stream of pairs
# ----------------------------------------------------------------------------------------------------
def _files_of(path: str) -> List[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return [path]


def _stream_pretrain(corpus_path: str) -> Iterator[Pair]:
    """`builders.pretrain_pairs_from_beir` without holding the corpus: the same pairs, in file order."""
    from bmretriever_jax.data.beir import _string_field, jsonl_records
    from bmretriever_jax.data.builders import pretrain_pair
    from bmretriever_jax.util.errors import DataFormatError

    first_line: Dict[str, int] = {}
    for lineno, obj in jsonl_records(corpus_path):
        doc_id = _string_field(obj, "_id", corpus_path, lineno)
        title = _string_field(obj, "title", corpus_path, lineno, required=False)
        text = _string_field(obj, "text", corpus_path, lineno)
        if doc_id in first_line:
            raise DataFormatError(f"{corpus_path}:{lineno}: duplicate _id {doc_id!r} (first on line {first_line[doc_id]})")
        first_line[doc_id] = lineno
        pair = pretrain_pair(doc_id, title, text)
        if pair is not None:
            yield pair


def source_pairs(entries: Sequence[str]) -> Tuple[Iterator[Pair], List[dict]]:
    """(a stream of the pairs of data.train-style entries, [{"entry", "path", "bytes", "sha256"}] of the files
    read). Paths are checked (and hashed) before any pair is read."""
    from bmretriever_jax.data import builders

    names = ", ".join(sorted(builders.BUILDERS))
    if not entries:
        raise ConfigError(f"no sources: give pairs JSONL files or builder names ({names}), or pretrain:CORPUS.jsonl")
    plan, sources = [], []
    for entry in entries:
        if os.path.exists(entry) and not os.path.isdir(entry):
            plan.append(("file", entry))
            files = [entry]
        elif entry.startswith("pretrain:"):
            path = entry.split(":", 1)[1]
            if not os.path.isfile(path):
                raise InputPathError(f"{entry}: no such corpus file")
            plan.append(("pretrain", path))
            files = [path]
        elif entry in builders.BUILDERS:
            plan.append(("builder", entry))
            files = _files_of(builders._default(builders.BUILDERS[entry][1]))
            if entry == "medquad":
                files += _files_of(builders._default(builders.MEDQUAD_HELDOUT))
        elif os.sep in entry or entry.endswith((".jsonl", ".gz", ".json")):
            raise InputPathError(f"{entry}: no such file")
        else:
            raise ConfigError(f"{entry!r} is neither a file nor a builder; builders: {names}, pretrain:CORPUS.jsonl")
        for f in files:
            if os.path.exists(f):
                sources.append({"entry": entry, "path": os.path.abspath(f), "bytes": os.path.getsize(f),
                                "sha256": file_sha256(f)})

    def stream():
        for kind, what in plan:
            if kind == "file":
                yield from iter_pairs(what)
            elif kind == "pretrain":
                yield from _stream_pretrain(what)
            else:
                yield from builders.build(what)

    return stream(), sources


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def _features(tokenized: bool):
    import datasets

    s, i32, i64 = datasets.Value("string"), datasets.Value("int32"), datasets.Value("int64")
    f = {"query": s, "instruction": s, "task": s, "id": s, "positive_title": s, "positive_text": s,
         "negatives_title": datasets.List(s), "negatives_text": datasets.List(s), "n_neg": i32, "pos_key": i64,
         "query_key": i64}
    if tokenized:
        f.update({"q_ids": datasets.List(i32), "p_ids": datasets.List(i32), "n_ids": datasets.List(datasets.List(i32)),
                  "q_len": i32, "p_len": i32, "n_len": datasets.List(i32)})
    return datasets.Features(f)


def _save(cols: Dict[str, list], features, path: str) -> None:
    """Columns -> one save_to_disk folder. The Arrow table is built by pyarrow from the lists in one call
    (`Dataset.from_dict` would encode every value in Python first: most of the time of a large corpus)."""
    import datasets
    import pyarrow as pa

    table = pa.table({c: cols[c] for c in features}, schema=features.arrow_schema)
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).save_to_disk(path)


def _percentiles(x) -> Dict[str, float]:
    x = np.asarray(x)
    if not x.size:
        return {"count": 0}
    p = np.percentile(x, [50, 90, 99])
    return {"count": int(x.size), "mean": round(float(x.mean()), 2), "p50": float(p[0]), "p90": float(p[1]),
            "p99": float(p[2]), "max": int(x.max())}


def text_share_estimate(lengths: Sequence[int], length: int, *, texts_per_shard: int = 64, max_segments: int = 16,
                        blocks: int = 64, seed: int = 0) -> Dict[str, float]:
    """Share of computed tokens that are text, padded (every text its own row of `length`) vs packed with
    data/packing.py (seeded random blocks of `texts_per_shard` texts, each packed first-fit into the rows the
    neediest block takes: the static shape a run compiles)."""
    from bmretriever_jax.data import packing

    lengths = np.asarray(lengths)
    if not lengths.size:
        return {}
    rng = np.random.default_rng(seed)
    m = min(texts_per_shard, lengths.size)
    sample = [lengths[rng.choice(lengths.size, m, replace=False)].tolist() for _ in range(blocks)]
    rows = packing.choose_rows(sample, n_shards=1, length=length, max_segments=max_segments)
    text = sum(sum(b) for b in sample)
    return {"padded": round(text / (len(sample) * m * length), 4), "packed": round(text / (len(sample) * rows * length), 4),
            "rows_per_shard": rows, "texts_per_shard": m, "length": length, "max_segments": max_segments}


def write_prepared(out: str, pairs: Iterable[Pair], *, sources: List[dict], tokenizer=None,
                   tokenizer_name: Optional[str] = None, max_length: int = 512, query_max_length: int = 64,
                   shard_rows: int = SHARD_ROWS, texts_per_shard: int = 64, overwrite: bool = False,
                   progress: bool = False) -> dict:
    """Writes pairs (any iterable: streamed shard by shard) as a prepared folder; returns the manifest."""
    import datasets

    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
        if not os.path.exists(os.path.join(out, MANIFEST)):
            raise OutputExistsError(f"{out}: not a prepared folder (no {MANIFEST}); refusing to replace it")
        shutil.rmtree(out)
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    datasets.disable_progress_bars()
    tokenized = tokenizer is not None
    features = _features(tokenized)
    if tokenized:
        from bmretriever_jax.embed import format_passage, format_query, instruction_for, tokenize
    qk_all, pk_all = [], []
    stats: Dict[str, list] = {"q_chars": [], "p_chars": [], "n_neg": [], "q_len": [], "p_len": []}
    shards, n, t0 = [], 0, time.time()

    def flush(cols):
        nonlocal n
        if not cols["query"]:
            return
        rows = len(cols["query"])
        if tokenized:
            queries = [format_query(q, ins or instruction_for(task))
                       for q, ins, task in zip(cols["query"], cols["instruction"], cols["task"])]
            passages = [format_passage({"title": t, "text": x}) for t, x in zip(cols["positive_title"], cols["positive_text"])]
            negs = [format_passage({"title": t, "text": x}) for ts, xs in zip(cols["negatives_title"], cols["negatives_text"])
                    for t, x in zip(ts, xs)]
            q_ids = tokenize(tokenizer, queries, query_max_length)
            p_ids = tokenize(tokenizer, passages, max_length)
            flat = tokenize(tokenizer, negs, max_length) if negs else []
            n_ids, at = [], 0
            for k in cols["n_neg"]:
                n_ids.append(flat[at:at + k])
                at += k
            cols.update(q_ids=q_ids, p_ids=p_ids, n_ids=n_ids, q_len=[len(t) for t in q_ids],
                        p_len=[len(t) for t in p_ids], n_len=[[len(t) for t in ts] for ts in n_ids])
            stats["q_len"] += cols["q_len"]
            stats["p_len"] += cols["p_len"] + [len(t) for t in flat]
        name = f"pairs-{len(shards):05d}"
        _save(cols, features, os.path.join(tmp, name))
        files = sorted(f for f in os.listdir(os.path.join(tmp, name)))
        shards.append({"path": name, "rows": rows,
                       "files": {f: os.path.getsize(os.path.join(tmp, name, f)) for f in files}})
        n += rows
        if progress:
            print(f"prepare: {n} pairs ({time.time() - t0:.0f} s)", flush=True)

    def empty():
        return {c: [] for c in TEXT_COLUMNS}

    cols = empty()
    for pair in pairs:
        pos = as_passage(pair.positive)
        negs = [as_passage(d) for d in pair.negatives]
        pk, qk = key_hash(_norm(f"{pos['title']} {pos['text']}")), key_hash(pair.query)  # doc_keys(positive)[0]
        cols["query"].append(pair.query)
        cols["instruction"].append(pair.instruction)
        cols["task"].append(pair.task)
        cols["id"].append(pair.id)
        cols["positive_title"].append(pos["title"])
        cols["positive_text"].append(pos["text"])
        cols["negatives_title"].append([d["title"] for d in negs])
        cols["negatives_text"].append([d["text"] for d in negs])
        cols["n_neg"].append(len(negs))
        cols["pos_key"].append(pk)
        cols["query_key"].append(qk)
        pk_all.append(pk)
        qk_all.append(qk)
        stats["q_chars"].append(len(pair.query))
        stats["p_chars"].append(len(pos["title"]) + len(pos["text"]))
        stats["n_neg"].append(len(negs))
        if len(cols["query"]) == shard_rows:
            flush(cols)
            cols = empty()
    flush(cols)
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError("no training pairs in the sources")

    # queries with several distinct positives: a padded negative must be none of them (PairLoader._random_other)
    qk, pk = np.asarray(qk_all, np.int64), np.asarray(pk_all, np.int64)
    del qk_all, pk_all
    order = np.lexsort((pk, qk))
    qs, ps = qk[order], pk[order]
    distinct = np.ones(len(qs), bool)
    distinct[1:] = (qs[1:] != qs[:-1]) | (ps[1:] != ps[:-1])
    qs, ps = qs[distinct], ps[distinct]
    starts = np.flatnonzero(np.r_[True, qs[1:] != qs[:-1]])
    sizes = np.diff(np.r_[starts, len(qs)])
    multi = starts[sizes > 1]
    g_keys = [ps[s:s + z].tolist() for s, z in zip(multi, sizes[sizes > 1])]
    _save({"query_key": qs[multi].tolist(), "pos_keys": g_keys},
          datasets.Features({"query_key": datasets.Value("int64"), "pos_keys": datasets.List(datasets.Value("int64"))}),
          os.path.join(tmp, GROUPS))
    groups_files = {f: os.path.getsize(os.path.join(tmp, GROUPS, f)) for f in sorted(os.listdir(os.path.join(tmp, GROUPS)))}

    manifest = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "count": n, "sources": sources, "shards": shards,
        "groups": {"path": GROUPS, "rows": len(multi), "files": groups_files},
        "columns": list(features),
        "tokenizer": None,
        "stats": {"query_chars": _percentiles(stats["q_chars"]), "passage_chars": _percentiles(stats["p_chars"]),
                  "negatives_per_pair": _percentiles(stats["n_neg"])},
    }
    if tokenized:
        manifest["tokenizer"] = {"name": tokenizer_name, "vocab_sha256": vocab_hash(tokenizer),
                                 "vocab_size": len(tokenizer.get_vocab()), "max_length": max_length,
                                 "query_max_length": query_max_length}
        manifest["stats"]["query_tokens"] = _percentiles(stats["q_len"])
        manifest["stats"]["passage_tokens"] = _percentiles(stats["p_len"])
        manifest["text_share"] = {
            "queries": text_share_estimate(stats["q_len"], query_max_length, texts_per_shard=texts_per_shard),
            "passages": text_share_estimate(stats["p_len"], max_length, texts_per_shard=texts_per_shard)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, out)
    return manifest


def prepare(entries: Sequence[str], out: str, *, tokenizer_name: Optional[str] = None, max_length: int = 512,
            query_max_length: int = 64, shard_rows: int = SHARD_ROWS, overwrite: bool = False, quiet: bool = False,
            texts_per_shard: int = 64) -> dict:
    """`bmr prepare`: data.train-style entries -> a prepared folder (see the module docstring)."""
    if max_length < 2 or query_max_length < 2:
        raise ConfigError(f"--max-length {max_length} / --query-max-length {query_max_length}: allowed: >= 2")
    pairs, sources = source_pairs(entries)
    tokenizer = None
    if tokenizer_name:
        tokenizer = load_tokenizer(tokenizer_name, quiet=quiet)
    return write_prepared(out, pairs, sources=sources, tokenizer=tokenizer, tokenizer_name=tokenizer_name,
                          max_length=max_length, query_max_length=query_max_length, shard_rows=shard_rows,
                          overwrite=overwrite, progress=not quiet, texts_per_shard=texts_per_shard)


def load_tokenizer(name: str, quiet: bool = True):
    """The tokenizer of a model name / folder (`convert.hub.resolve`)."""
    import transformers

    from bmretriever_jax.convert import hub

    return transformers.AutoTokenizer.from_pretrained(hub.resolve(name, quiet=quiet))


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise InputPathError(f"data.prepared: {path}: no such folder (make one with `bmr prepare`)")
    if not os.path.isfile(mpath):
        raise MissingShardError(f"{mpath}: missing: {path} is not a prepared folder (make one with `bmr prepare`)")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreparedDataError(f"{mpath}: corrupt manifest ({e}); prepare the folder again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PreparedDataError(f"{mpath}: not a `bmr prepare` manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") != VERSION:
        raise PreparedDataError(f"{mpath}: format version {m.get('version')}, this bmr reads {VERSION}; prepare again")
    for key in ("count", "shards", "groups"):
        if key not in m:
            raise PreparedDataError(f"{mpath}: corrupt manifest (no {key!r}); prepare the folder again")
    return m


_MAPS: Dict[str, Any] = {}  # file -> its mmap (one mapping per file and process)


def _map(f: str):
    """A read-only memory map of a file, advised MADV_RANDOM (no read-ahead around each row read): the pages a
    process touches are the pages it reads. `release_pages` unmaps them again (they stay in the page cache)."""
    import mmap

    key = os.path.realpath(f)
    if key not in _MAPS:
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mm.madvise(mmap.MADV_RANDOM)
        _MAPS[key] = mm
    return _MAPS[key]


def release_pages() -> None:
    """Drop this process's mapped pages of every prepared file (MADV_DONTNEED on a read-only file mapping: the
    data stays valid and is read back from the page cache or disk on the next access). Bounds the file-backed
    RSS of a long random walk over a corpus larger than memory."""
    import mmap

    for mm in _MAPS.values():
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def _check_files(path: str, listed: dict) -> None:
    for name, size in listed["files"].items():
        f = os.path.join(path, listed["path"], name)
        if not os.path.isfile(f):
            raise MissingShardError(f"{f}: missing (listed in {os.path.join(path, MANIFEST)}); copy the whole "
                                    "prepared folder or prepare it again")
        if os.path.getsize(f) != size:
            raise PreparedDataError(f"{f}: {os.path.getsize(f)} bytes, the manifest says {size} (truncated or "
                                    "changed); prepare the folder again")


def _open_shard(path: str, listed: dict, columns: Sequence[str]):
    """The memory-mapped pyarrow table of one save_to_disk folder, after checking its files against the manifest."""
    import pyarrow as pa

    _check_files(path, listed)
    tables = []
    for name in sorted(listed["files"]):
        if not name.endswith(".arrow"):
            continue
        f = os.path.join(path, listed["path"], name)
        try:
            tables.append(pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(_map(f)))).read_all())
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            raise PreparedDataError(f"{f}: corrupt Arrow file ({str(e).splitlines()[0]}); prepare the folder again") from None
    if not tables:  # save_to_disk of no rows writes no Arrow file
        return None if listed["rows"] == 0 else _raise_missing(path, listed)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PreparedDataError(f"{os.path.join(path, listed['path'])}: columns {missing} missing; prepare again")
    if table.num_rows != listed["rows"]:
        raise PreparedDataError(f"{os.path.join(path, listed['path'])}: {table.num_rows} rows, the manifest says "
                                f"{listed['rows']}; prepare the folder again")
    return table


def _raise_missing(path: str, listed: dict):
    raise MissingShardError(f"{os.path.join(path, listed['path'])}: no Arrow file, the manifest says {listed['rows']} "
                            "rows; prepare the folder again")


class Prepared:
    """A prepared folder opened for random access (memory-mapped Arrow; nothing of the corpus is copied)."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)
        import pyarrow as pa

        tables = [_open_shard(path, s, TEXT_COLUMNS) for s in self.manifest["shards"]]
        self.table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if self.table.num_rows != self.manifest["count"]:
            raise PreparedDataError(f"{os.path.join(path, MANIFEST)}: count {self.manifest['count']}, the shards hold "
                                    f"{self.table.num_rows} rows; prepare the folder again")
        _check_files(path, self.manifest["groups"])
        release_pages()  # the record batch headers read while opening
        self._batches = self.table.to_batches()  # zero-copy views of the memory map
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])[:-1]
        self._groups = None
        self._pos_key = self.table.column("pos_key")

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def tokenizer(self) -> Optional[dict]:
        return self.manifest.get("tokenizer")

    def rows(self, indices: Sequence[int], columns: Sequence[str]) -> Dict[str, list]:
        """{column: [values of the rows at `indices`, in that order]}. Taken record batch by record batch:
        `Table.take` would first concatenate each column's chunks, i.e. copy the whole corpus into memory."""
        import pyarrow as pa

        idx = np.asarray(indices, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index outside [0, {len(self)})")
        out: Dict[str, list] = {c: [None] * len(idx) for c in columns}
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for b in np.unique(which):
            at = np.flatnonzero(which == b)
            got = self._batches[b].select(list(columns)).take(pa.array(idx[at] - self._starts[b]))
            for c in columns:
                values = got.column(c).to_pylist()
                col = out[c]
                for pos, v in zip(at.tolist(), values):
                    col[pos] = v
        return out

    def column_numpy(self, name: str) -> np.ndarray:
        """A whole numeric column as numpy (a copy: 4-8 bytes a pair; for n_neg, pos_key)."""
        return self.table.column(name).to_numpy()

    def pos_key(self, i: int) -> int:
        return self._pos_key[i].as_py()

    def query_positives(self, query_key: int, pos_key: int) -> set:
        """Hashes of all positives of the pairs with this query (the pair's own if the query has one)."""
        if self._groups is None:
            g = _open_shard(self.path, self.manifest["groups"], ("query_key", "pos_keys"))
            self._groups = (np.zeros(0, np.int64), None) if g is None else \
                (g.column("query_key").to_numpy(), g.column("pos_keys"))
        keys, lists = self._groups
        at = int(np.searchsorted(keys, query_key))
        if at < len(keys) and keys[at] == query_key:
            return set(lists[at].as_py())
        return {pos_key}


def check_tokenizer(path: str, manifest: dict, tokenizer, model_name: str) -> None:
    """TokenizerMismatchError if the folder was tokenized with another vocabulary than `tokenizer`'s."""
    tok = manifest.get("tokenizer")
    if not tok:
        return
    if tok.get("vocab_sha256") != vocab_hash(tokenizer):
        raise TokenizerMismatchError(
            f"{os.path.join(path, MANIFEST)}: tokenized for {tok.get('name')!r} (vocab sha256 "
            f"{str(tok.get('vocab_sha256'))[:12]}), but model.name {model_name!r} has another tokenizer; prepare "
            f"again with --tokenizer {model_name}, or without --tokenizer")


def open_for_run(run, tokenizer=None) -> Prepared:
    """The run's data.prepared folder, checked (files, schema, tokenizer) before any model loads."""
    p = Prepared(run.data.prepared)
    if p.tokenizer:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(run.model.name)
        check_tokenizer(run.data.prepared, p.manifest, tokenizer, run.model.name)
    return p


def token_lengths_match(manifest: dict, run) -> bool:
    """Whether the stored token lengths are the ones this run's tokenize_fn computes (same cut lengths)."""
    tok = manifest.get("tokenizer") or {}
    return bool(tok) and tok.get("max_length") == run.model.max_length and \
        tok.get("query_max_length") == run.model.query_max_length


def describe(manifest: dict) -> str:
    s = manifest["stats"]
    line = (f"{manifest['count']} pairs in {len(manifest['shards'])} shard(s); query chars p50 "
            f"{s['query_chars'].get('p50')}, passage chars p50 {s['passage_chars'].get('p50')}")
    if manifest.get("tokenizer"):
        q, p = s["query_tokens"], s["passage_tokens"]
        ts = manifest["text_share"]
        line += (f"; tokens ({manifest['tokenizer']['name']}) query p50/p90/p99/max {q['p50']:.0f}/{q['p90']:.0f}/"
                 f"{q['p99']:.0f}/{q['max']}, passage {p['p50']:.0f}/{p['p90']:.0f}/{p['p99']:.0f}/{p['max']}; text share "
                 f"passages padded {ts['passages']['padded']:.1%} -> packed {ts['passages']['packed']:.1%}")
    return line


def run_cli(args: Any) -> int:
    m = prepare(args.sources, args.out, tokenizer_name=args.tokenizer, max_length=args.max_length,
                query_max_length=args.query_max_length, shard_rows=args.shard_rows, overwrite=args.overwrite,
                quiet=getattr(args, "quiet", False), texts_per_shard=args.texts_per_shard)
    print(f"prepared {args.out}: {describe(m)}")
    return 0
