"""Synthetic queries for corpus passages, BMRetriever's way: an instruct LLM writes a question, a claim or a
title that a passage answers / supports / is titled by; (query, passage) becomes a training pair.

Output: the training-pairs format (`data.pairs`), one pair per line, with the passage (and its corpus id) as
the positive, `task` set to the style's retrieval task (its instruction comes from embed.TASK_INSTRUCTIONS),
`id` = "<style>:<doc id>:<k>" and `meta` = {"source": "synth-queries", "style", "model", "doc_id"}.
Runs are resumable: items whose id is already in the output (or in the `<out>.rejected.jsonl` side file,
where empty generations are recorded) are skipped and new pairs are appended after each batch. Every item
has its own sampling seed derived from (seed, item id), so a resumed run writes what an uninterrupted one
would have.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Iterator, Optional, Sequence

from tqdm.auto import tqdm

from bmretriever_jax.data.beir import load_corpus
from bmretriever_jax.data.pairs import Pair

SYSTEM_PROMPT = "You are a biomedical expert who writes search queries for a retrieval data set."

# The passage comes first and the request last: SmolLM2-135M follows a request placed after the passage far
# more often than one placed before it (measured on SciFact abstracts: it echoes the request otherwise).
STYLES = {
    "question": {
        "task": "pubmedqa",
        "prompt": ("Passage:\n{passage}\n\nWrite one question that a researcher or clinician could ask and that this "
                   "passage answers. The question must make sense on its own. Output only the question."),
    },
    "claim": {
        "task": "scifact",
        "prompt": ("Passage:\n{passage}\n\nWrite one short scientific claim, a single sentence, about a finding of "
                   "this passage. Output only the claim."),
    },
    "title": {
        "task": "pretrain",
        "prompt": ("Passage:\n{passage}\n\nWrite a short title for the scientific article this passage comes from. "
                   "Output only the title."),
    },
}

_LABEL = re.compile(r"^\s*[*_#>\-\s]*(?:question|claim|title|query|answer|output|document|passage|hard negative|"
                    r"negative document|(?:new |improved |better |rewritten )?instruction)"
                    r"\s*(?:\d+\s*)?[:.\-]\s*[*_]*\s*", re.IGNORECASE)
# Small models wrap the answer in a sentence: "The claim is: ...", "One scientific claim that the passage
# supports is that ...", "Here is a question: ...". The wrapper goes, the answer stays.
_PREAMBLE = re.compile(r"^(?:here is |here's |sure[,!.]? )?(?:the |one |a |an |my )?(?:possible |scientific |"
                       r"short |concise |suggested |new |improved |single )*(?:claim|question|title|query|"
                       r"instruction|sentence)\b(?!\s+of\b)[^:\"\n]{0,80}?(?:\bis\b\s*(?:that\b)?\s*:?|:)\s*",
                       re.IGNORECASE)
_NUMBERING = re.compile(r"^(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")


# ----------------------------------------------------------------------------------------------------
# Shared by queries and negatives: seeds, cleaning, resumable JSONL output
# ----------------------------------------------------------------------------------------------------
def item_seed(seed: int, item_id: str) -> int:
    """A stable per-item seed (independent of batch composition, order and resumption)."""
    return int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def clean_line(text: str) -> str:
    """The first non-empty line of an LLM answer, without list numbering, "Question:"-style labels, "The claim
    is:"-style wrappers, markdown and quotes."""
    for line in (text or "").strip().splitlines():
        line = _NUMBERING.sub("", line.strip())
        line = _LABEL.sub("", line).strip().strip("*_").strip()
        unwrapped = _PREAMBLE.sub("", line, count=1)
        if unwrapped != line and unwrapped:
            line = unwrapped[0].upper() + unwrapped[1:]
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
            line = line[1:-1].strip()
        elif line[:1] in "\"\u201c" and line.count(line[0]) == 1:
            line = line[1:].strip()  # an opening quote whose closing one was cut off by the token limit
        line = line.strip("\u201c\u201d").strip()
        if line:
            return " ".join(line.split())
    return ""


def truncate_words(text: str, max_words: int) -> str:
    w = text.split()
    return text if len(w) <= max_words else " ".join(w[:max_words]) + " ..."


def rejected_path(out: str) -> str:
    return f"{out}.rejected.jsonl"


def _repair_tail(path: str) -> None:
    """A run killed mid-write can leave a last line without its newline: drop it (it is regenerated)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        cut = f.read().rfind(b"\n") + 1
        f.truncate(cut)


def done_ids(out: str) -> set:
    """Ids already handled by an earlier run: pairs in `out` and entries of its rejected side file."""
    ids = set()
    for path, key in ((out, "id"), (rejected_path(out), "id")):
        _repair_tail(path)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        ids.add(json.loads(line)[key])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{path}:{n}: not a record of an earlier run (no {key!r}); "
                                         "use another --out or remove the file") from None
    return ids


class Appender:
    """Appends validated pairs / rejection records to `out` / `<out>.rejected.jsonl`, flushed per call."""

    def __init__(self, out: str):
        if out.endswith(".gz"):
            raise ValueError(f"{out}: resumable output is plain .jsonl (compress it afterwards)")
        os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
        self.out = out

    def write(self, pairs: Sequence[Pair], rejected: Sequence[dict] = ()) -> None:
        if pairs:
            with open(self.out, "a", encoding="utf-8") as f:
                for p in pairs:
                    Pair.from_json(p.to_json(), f"pair {p.id}")  # validate before anything is written
                    f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
        if rejected:
            with open(rejected_path(self.out), "a", encoding="utf-8") as f:
                for r in rejected:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")


def batched(items: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def read_corpus_items(path: str, limit: Optional[int] = None) -> list[tuple[str, dict]]:
    """BEIR corpus.jsonl -> [(doc id, {"title", "text"})] in file order, documents with text only."""

    items = [(d, doc) for d, doc in load_corpus(path).items() if doc.get("text", "").strip()]
    return items[:limit] if limit else items


# ----------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------
def query_messages(doc: dict, style: str, max_passage_words: int = 300) -> list[dict]:
    """The chat prompt asking for one query of `style` for `doc` ({"title", "text"})."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; allowed: {', '.join(STYLES)}")
    text = doc.get("text", "")
    title = doc.get("title", "")
    # a title-style prompt must not show the title it is asked to write
    passage = text if style == "title" or not title else f"{title}. {text}"
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": STYLES[style]["prompt"].format(passage=truncate_words(passage,
                                                                                           max_passage_words))}]


def generate_queries(corpus: Iterable[tuple[str, dict]], backend, style: str, out: str, *, per_passage: int = 1,
                     batch_size: int = 16, max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9,
                     seed: int = 0, max_passage_words: int = 300, task: Optional[str] = None, model_name: str = "",
                     progress: bool = True) -> dict:
    """Write synthetic (query, passage) pairs for corpus items [(doc id, {"title", "text"})] to `out`.

    -> {"items": total, "skipped": already done, "written": new pairs, "empty": new empty generations}.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; allowed: {', '.join(STYLES)}")
    task = task or STYLES[style]["task"]
    items = [(f"{style}:{d}:{k}", d, doc) for d, doc in corpus for k in range(per_passage)]
    seen = done_ids(out)
    todo = [it for it in items if it[0] not in seen]
    writer = Appender(out)
    stats = {"items": len(items), "skipped": len(items) - len(todo), "written": 0, "empty": 0}
    with tqdm(total=len(items), initial=stats["skipped"], desc=f"synth {style} queries", unit="query",
              disable=not progress) as bar:
        for batch in batched(todo, batch_size):
            answers = backend.chat([query_messages(doc, style, max_passage_words) for _, _, doc in batch],
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=[item_seed(seed, iid) for iid, _, _ in batch], stop=("\n\n",))
            pairs, rejected = [], []
            for (iid, d, doc), raw in zip(batch, answers):
                q = clean_line(raw)
                if not q:
                    rejected.append({"id": iid, "reason": "empty", "output": raw})
                    continue
                positive = {"title": doc.get("title", ""), "text": doc["text"], "id": d}
                pairs.append(Pair(query=q, positive=positive, task=task, id=iid,
                                  meta={"source": "synth-queries", "style": style, "model": model_name, "doc_id": d}))
            writer.write(pairs, rejected)
            stats["written"] += len(pairs)
            stats["empty"] += len(rejected)
            bar.update(len(batch))
    return stats


def count_rejected(out: str, reason: str = "empty") -> int:
    path = rejected_path(out)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip() and json.loads(line).get("reason") == reason)
