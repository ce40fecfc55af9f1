"""LLM-written hard negatives, STM's recipe: for a (query, positive) pair, a document from the same domain,
with similar terminology, that is NOT relevant to the query and is moderately challenging to tell apart;
the model outputs only the document text.

Input and output are training-pairs files (`data.pairs`). Each output pair is its input pair with the new
negatives (plain strings) put first (`mode="prepend"`, the default: the trainer's first hard negative is the
synthetic one, as in STM), after the existing ones ("append") or instead of them ("replace"). A pair without
an id gets "pair-<hash of query and positive>" so that runs are resumable (pairs already in the output are
skipped; new ones are appended per batch). `meta` (when it is an object or absent) records how many
synthetic negatives were added.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional

from tqdm.auto import tqdm

from bmretriever_jax.data.pairs import Pair, as_passage
from bmretriever_jax.synth.queries import Appender, batched, done_ids, item_seed, truncate_words

SYSTEM_PROMPT = "You write training data for a biomedical search engine."
PROMPT = """Query: {query}

Relevant document: {positive}

Write one hard negative document for this query: a passage from the same domain that uses terminology similar to \
the query and the relevant document, but that is NOT relevant to the query and does not answer it. It should be \
moderately challenging: a reader must look closely to see that it does not answer the query. Write it in the \
style of the relevant document, in at most {max_words} words.

Output only the document text."""

_PREFIXES = ("hard negative document:", "hard negative:", "negative document:", "document:", "passage:",
             "document text:")


def pair_key(pair: Pair) -> str:
    """The pair's id, or a stable id from its query and positive text."""
    if pair.id:
        return pair.id
    p = as_passage(pair.positive)
    h = hashlib.sha256(f"{pair.query}\x00{p['title']}\x00{p['text']}".encode()).hexdigest()[:16]
    return f"pair-{h}"


def negative_messages(pair: Pair, max_passage_words: int = 250) -> list[dict]:
    p = as_passage(pair.positive)
    positive = truncate_words(f"{p['title']}. {p['text']}" if p["title"] else p["text"], max_passage_words)
    n_words = max(40, min(max_passage_words, len(positive.split())))
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": PROMPT.format(query=pair.query, positive=positive, max_words=n_words)}]


def clean_document(text: str) -> str:
    """The document text of an answer: label prefixes, markdown emphasis and wrapping quotes removed."""
    t = (text or "").strip()
    changed = True
    while changed and t:
        changed = False
        low = t.lstrip("*_# ").lower()
        for pre in _PREFIXES:
            if low.startswith(pre):
                t = t.lstrip("*_# ")[len(pre):].lstrip("*_ \n")
                changed = True
                break
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1]
    return " ".join(t.split())


def generate_negatives(pairs: Iterable[Pair], backend, out: str, *, num_negatives: int = 1, mode: str = "prepend",
                       batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
                       seed: int = 0, max_passage_words: int = 250, model_name: str = "",
                       limit: Optional[int] = None, progress: bool = True) -> dict:
    """Append pairs with `num_negatives` synthetic hard negatives each to `out` (skipping pairs already there).

    -> {"pairs": total, "skipped", "written", "negatives": new negatives, "empty": empty generations}.
    """
    if mode not in ("prepend", "append", "replace"):
        raise ValueError(f"mode={mode!r}; allowed: prepend, append, replace")
    pairs = list(pairs)[:limit] if limit else list(pairs)
    seen = done_ids(out)
    todo = [p for p in pairs if pair_key(p) not in seen]
    writer = Appender(out)
    stats = {"pairs": len(pairs), "skipped": len(pairs) - len(todo), "written": 0, "negatives": 0, "empty": 0}
    with tqdm(total=len(pairs), initial=stats["skipped"], desc="synth negatives", unit="pair",
              disable=not progress) as bar:
        for batch in batched(todo, batch_size):
            rows = [(p, k) for p in batch for k in range(num_negatives)]
            answers = backend.chat([negative_messages(p, max_passage_words) for p, _ in rows],
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=[item_seed(seed, f"{pair_key(p)}#{k}") for p, k in rows])
            new = {pair_key(p): [] for p in batch}
            for (p, _), raw in zip(rows, answers):
                doc = clean_document(raw)
                if doc:
                    new[pair_key(p)].append(doc)
                else:
                    stats["empty"] += 1
            out_pairs = []
            for p in batch:
                synth = new[pair_key(p)]
                old = list(p.negatives)
                negatives = {"prepend": synth + old, "append": old + synth, "replace": synth or old}[mode]
                meta = p.meta
                if meta is None or isinstance(meta, dict):
                    meta = {**(meta or {}), "synthetic_negatives": len(synth)}
                    if model_name:
                        meta["negatives_model"] = model_name
                out_pairs.append(Pair(query=p.query, positive=p.positive, negatives=tuple(negatives),
                                      instruction=p.instruction, task=p.task, id=pair_key(p), meta=meta))
                stats["negatives"] += len(synth)
            writer.write(out_pairs)
            stats["written"] += len(out_pairs)
            bar.update(len(batch))
    return stats
