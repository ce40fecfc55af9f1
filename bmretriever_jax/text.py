"""The text side of encoding, with no jax: BMRetriever's templates and instructions, tokenizing (truncate to
max_length - 1, append EOS by hand) and left padding. The input pipeline's worker processes import this (and
not `embed`), so they start without loading jax.

query   -> "{instruction}\\nQuery: {query}"
passage -> "Represent this passage\\npassage: {title} {text}"
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence

import numpy as np

# BMRetriever's task instructions (its evaluation code and mteb's BMRetriever settings); keys are the task
# names used by the data builders and `bmr eval`.
TASK_INSTRUCTIONS = {
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "nfcorpus": "Given a question, retrieve relevant documents that best answer the question",
    "trec-covid": "Given a query on COVID-19, retrieve documents that answer the query",
    "scidocs": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "pubmedqa": "Given a biomedical question, retrieve documents that answer the question",
    "medquad": "Given a consumer health question, retrieve passages that answer the question",
    "consumer-health": "Given a consumer health question, retrieve passages that answer the question",
    "biosses": "Retrieve semantically similar text",
    "pretrain": "Given a title of a biomedical article, retrieve its abstract",
}
PASSAGE_TEMPLATE = "Represent this passage\npassage: {title} {text}"
QUERY_TEMPLATE = "{instruction}\nQuery: {query}"


def instruction_for(task_or_instruction: Optional[str]) -> str:
    """A task name from TASK_INSTRUCTIONS, or a literal instruction."""
    if not task_or_instruction:
        return ""
    return TASK_INSTRUCTIONS.get(task_or_instruction.lower(), task_or_instruction)


def default_task(path: str) -> str:
    """Task name of a shipped data folder (its instruction: TASK_INSTRUCTIONS)."""
    name = os.path.basename(os.path.normpath(path)).lower()
    for task in ("scifact", "pubmedqa", "medquad", "biosses", "nfcorpus", "trec-covid", "scidocs"):
        if name.startswith(task.split("-")[0]):
            return task
    return ""


def format_query(query: str, instruction: str) -> str:
    return QUERY_TEMPLATE.format(instruction=instruction, query=query) if instruction else query


def format_passage(doc) -> str:
    if isinstance(doc, str):
        return PASSAGE_TEMPLATE.format(title="", text=doc).replace("passage:  ", "passage: ")
    title, text = (doc.get("title") or "").strip(), (doc.get("text") or "").strip()
    return PASSAGE_TEMPLATE.format(title=title, text=text).replace("passage:  ", "passage: ").rstrip()


@functools.lru_cache(maxsize=8)
def _longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers: the longest vocabulary entry (a byte-level or
    byte-fallback entry spells at least as many characters as it covers)."""
    return max(1, max(len(t) for t in tokenizer.get_vocab()))


def char_budget(tokenizer, max_length: int) -> int:
    """Characters that surely hold more than `max_length` tokens: texts are cut to this before tokenizing, so a
    30 MB one-line document costs what its first tokens cost (the cut is far past the last token kept)."""
    return (max_length + 16) * _longest_token_chars(tokenizer)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> List[List[int]]:
    """Token ids per text: tokenizer's own special tokens (BOS), truncated to max_length - 1, + EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: last-token pooling needs one")
    budget = char_budget(tokenizer, max_length)
    enc = tokenizer([t[:budget] for t in texts], add_special_tokens=True, truncation=True, max_length=max_length - 1,
                    padding=False, return_attention_mask=False)["input_ids"]
    return [ids + [eos] for ids in enc]


def pad_left(seqs: Sequence[Sequence[int]], length: int, pad_id: int, rows: Optional[int] = None):
    """-> input_ids, attention_mask [rows, length] int32, left padded (extra rows are all padding)."""
    rows = rows or len(seqs)
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, s in enumerate(seqs):
        s = s[-length:]
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = 1
    return ids, mask
