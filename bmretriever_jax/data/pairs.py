"""Training pairs: one JSON object a line (`.jsonl`, or `.jsonl.gz`), validated line by line.

    {"query": str,                                    # required, non-empty
     "positive": str | {"title": str, "text": str},   # required, non-empty
     "negatives": [str | {"title", "text"}, ...],     # optional hard negatives, best first
     "instruction": str,                              # optional: the query instruction itself
     "task": str,                                     # optional: key into the task-instruction table
     "id": str,                                       # optional: provenance (query id, source pair id)
     "meta": any JSON}                                # optional: carried along, never interpreted

A document given as an object may also carry "id" (its corpus id): hard-negative mining uses it to keep a
query's positives out of its negatives even when two corpus entries share a text. "title" may be omitted
(-> ""). `instruction` wins over `task` when both are given (see `resolve_instruction`).

Unknown keys are errors, not silently dropped: a file that says "negative" instead of "negatives" would
otherwise train without its hard negatives and nobody would notice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Union

from bmretriever_jax.data.beir import DataFormatError

Doc = Union[str, dict]  # str, or {"title": str, "text": str, "id": str (optional)}

PAIR_KEYS = ("query", "positive", "negatives", "instruction", "task", "id", "meta")
DOC_KEYS = ("title", "text", "id")


class PairsFormatError(DataFormatError):
    """A pairs file is malformed; the message starts with `path:line:` and names the field."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One training example: a query, its positive document, optional hard negatives and instruction."""

    query: str
    positive: Doc
    negatives: tuple[Doc, ...] = ()
    instruction: str | None = None
    task: str | None = None
    id: str | None = None
    meta: Any = None

    def to_json(self) -> dict:
        """The JSON object of this pair; optional fields that are unset are left out."""
        obj: dict[str, Any] = {"query": self.query, "positive": self.positive}
        if self.negatives:
            obj["negatives"] = list(self.negatives)
        for key in ("instruction", "task", "id", "meta"):
            value = getattr(self, key)
            if value is not None:
                obj[key] = value
        return obj

    @classmethod
    def from_json(cls, obj: Any, where: str = "<pair>") -> "Pair":
        """Validates a decoded JSON object; errors start with `where:` (e.g. "pairs.jsonl:17")."""
        if not isinstance(obj, dict):
            raise PairsFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(PAIR_KEYS))
        if unknown:
            raise PairsFormatError(f"{where}: unknown field(s) {unknown}; allowed: {list(PAIR_KEYS)}")
        if "query" not in obj:
            raise PairsFormatError(f"{where}: missing field 'query'")
        query = obj["query"]
        if not isinstance(query, str):
            raise PairsFormatError(f"{where}: field 'query' must be a string, got {type(query).__name__}")
        if not query.strip():
            raise PairsFormatError(f"{where}: field 'query' is empty")
        if "positive" not in obj:
            raise PairsFormatError(f"{where}: missing field 'positive'")
        positive = _check_doc(obj["positive"], "positive", where)
        negatives = obj.get("negatives", [])
        if negatives is None:
            negatives = []
        if not isinstance(negatives, list):
            raise PairsFormatError(f"{where}: field 'negatives' must be a list, got {type(negatives).__name__}")
        negatives = tuple(_check_doc(d, f"negatives[{i}]", where) for i, d in enumerate(negatives))
        optional = {}
        for key in ("instruction", "task", "id"):
            value = obj.get(key)
            if value is not None and not isinstance(value, str):
                raise PairsFormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
            optional[key] = value
        if optional["task"] is not None and not optional["task"].strip():
            raise PairsFormatError(f"{where}: field 'task' is empty")
        return cls(query=query, positive=positive, negatives=negatives, meta=obj.get("meta"), **optional)


def _check_doc(doc: Any, field: str, where: str) -> Doc:
    if isinstance(doc, str):
        if not doc.strip():
            raise PairsFormatError(f"{where}: field {field!r} is empty")
        return doc
    if not isinstance(doc, dict):
        raise PairsFormatError(f"{where}: field {field!r} must be a string or an object with 'title' and "
                               f"'text', got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(DOC_KEYS))
    if unknown:
        raise PairsFormatError(f"{where}: field {field!r} has unknown key(s) {unknown}; allowed: {list(DOC_KEYS)}")
    if "text" not in doc:
        raise PairsFormatError(f"{where}: field {field!r} is missing 'text'")
    for key in DOC_KEYS:
        if key in doc and not isinstance(doc[key], str):
            raise PairsFormatError(f"{where}: field {field!r}: {key!r} must be a string, "
                                   f"got {type(doc[key]).__name__}")
    if not (doc.get("title", "") + doc["text"]).strip():
        raise PairsFormatError(f"{where}: field {field!r} is empty (no title and no text)")
    return dict(doc)


# ---------------------------------------------------------------------------------------------------- documents

def as_passage(doc: Doc) -> dict[str, str]:
    """{"title", "text"} view of a document (what `Encoder.encode_passages` takes); a string is all text."""
    if isinstance(doc, str):
        return {"title": "", "text": doc}
    return {"title": doc.get("title", ""), "text": doc["text"]}


def doc_id(doc: Doc) -> str | None:
    return doc.get("id") if isinstance(doc, dict) else None


def _norm(text: str) -> str:
    # Identity up to whitespace: the same abstract exported twice often differs only in line breaks.
    return " ".join(text.split())


def doc_keys(doc: Doc) -> tuple[str, str]:
    """Two identity keys of a document: its whole text ("title text") and its body text alone.

    Two documents are "the same text" if either key matches: a positive written as a bare abstract string
    is the same document as the corpus entry {"title": ..., "text": that abstract}.
    """
    p = as_passage(doc)
    return _norm(f"{p['title']} {p['text']}"), _norm(p["text"])


def resolve_instruction(pair: Pair, instructions: Mapping[str, str] | None = None) -> str:
    """The query instruction of a pair: its own `instruction`, else `instructions[pair.task]`.

    Raises ValueError if the pair has a task that the table does not know, or neither field.
    """
    if pair.instruction is not None:
        return pair.instruction
    if pair.task is not None:
        if instructions is None or pair.task not in instructions:
            known = sorted(instructions) if instructions else []
            raise ValueError(f"pair {pair.id or pair.query[:60]!r}: no instruction for task {pair.task!r} "
                             f"(known tasks: {known})")
        return instructions[pair.task]
    raise ValueError(f"pair {pair.id or pair.query[:60]!r} has neither 'instruction' nor 'task'")


# ---------------------------------------------------------------------------------------------------- files

@contextlib.contextmanager
def _open_text(path: str | os.PathLike, mode: str, gz: bool | None = None):
    if not (gz if gz is not None else str(path).endswith(".gz")):
        with open(path, mode, encoding="utf-8") as f:
            yield f
        return
    with open(path, mode + "b") as raw:
        # filename="" and mtime=0 keep the gzip header free of the (temporary) name and the clock: the same
        # pairs give the same bytes, so built files can be compared by checksum.
        with gzip.GzipFile(filename="", fileobj=raw, mode=mode + "b", mtime=0) as z:
            with io.TextIOWrapper(z, encoding="utf-8") as f:
                yield f


def iter_pairs(path: str | os.PathLike) -> Iterator[Pair]:
    """Yields validated pairs from a .jsonl / .jsonl.gz file; blank lines are skipped.

    Raises PairsFormatError (a ValueError) with `path:line: ...` naming the field at the first bad line.
    """
    with _open_text(path, "r") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairsFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield Pair.from_json(obj, where)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """All pairs of a .jsonl / .jsonl.gz file (see `iter_pairs`)."""
    return list(iter_pairs(path))


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair | dict]) -> int:
    """Writes pairs (Pair or plain dicts, validated) as JSONL (gzip if the name ends in .gz); returns the count.

    Writes to a temporary file and renames it, so a crash never leaves a half-written pairs file behind.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    try:
        with _open_text(tmp, "w", gz=path.endswith(".gz")) as f:
            for i, pair in enumerate(pairs):
                if not isinstance(pair, Pair):
                    pair = Pair.from_json(pair, f"pairs[{i}]")
                f.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n
