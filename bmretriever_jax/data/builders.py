"""Training-pair builders for the data sets this project ships (and any BEIR folder).

    pretrain_pairs_from_beir(corpus.jsonl)      title -> abstract (BMRetriever's unsupervised stage); untitled
                                                documents: opening sentence -> the rest
    scifact_train_pairs(dir)                    SciFact claim -> abstract, qrels/train.tsv only
    pubmedqa_train_pairs(dir)                   PubMedQA PQA-L question -> abstract, qrels/train.tsv only
    medquad_pairs(pairs.jsonl.gz, exclude_documents=...)   consumer-health question -> answer
    build(name, ...) / python -m bmretriever_jax.data.builders NAME --out pairs.jsonl

Supervised pairs carry `task` (scifact / pubmedqa / medquad), the key the embedder looks its instruction
up with. Pre-training pairs carry their `instruction` text, since no benchmark task describes them.
Builders never read a test split: `beir_train_pairs` refuses split "test" and checks that the training
queries share no id and no text with the test queries of the same folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import warnings
from typing import Callable

from bmretriever_jax.util import paths
from bmretriever_jax.data.pairs import Pair, write_pairs
from bmretriever_jax.util.errors import ConfigError
from bmretriever_jax.data.beir import DataWarning, jsonl_records, load_beir, load_corpus

log = logging.getLogger(__name__)

# The repository's data folder (the quickstart's default source); an installed package passes paths instead.
DATA_DIR: str | None = None  # None: the shipped data (paths.data_dir: the repository's data/ or $BMR_DATA_DIR)

# Ours: BMRetriever does not publish the instruction of its title -> abstract pairs.
PRETRAIN_INSTRUCTION = "Given the title of a biomedical article, retrieve its abstract"


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


# For documents without a title (PubMedQA's contexts, MedQuAD's answers): the opening sentence -> the rest, the
# inverse cloze task (Lee et al. 2019) restricted to the lead, which in abstracts and answers states the topic.
LEAD_INSTRUCTION = "Given the opening sentence of a biomedical text, retrieve the rest of the text"
LEAD_MIN_WORDS = (5, 12)  # the opening sentence and the rest need at least this many words to make a pair
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
# a full stop after these ends no sentence ("U.S. Food", "et al. (2019)", "vs. 10", "Fig. 2")
_ABBREVIATIONS = {"e.g.", "i.e.", "al.", "vs.", "u.s.", "u.k.", "st.", "dr.", "fig.", "figs.", "no.", "ca.",
                  "approx.", "ref.", "refs.", "resp.", "cf.", "mr.", "mrs.", "ms.", "prof.", "inc.", "ltd.", "jr."}


def lead_split(text: str):
    """(first sentence, the rest) of a text, or None: when either is shorter than LEAD_MIN_WORDS, and when the
    opening sentence is a question. A question lead would be a query, not unlabelled text: many of MedQuAD's
    answers open with their own question ("What are the signs and symptoms of X?"), which is what its test
    queries ask."""
    text = text.strip()
    for m in _SENTENCE_END.finditer(text):
        lead = text[:m.start()].strip()
        if lead.split()[-1].lower() in _ABBREVIATIONS:
            continue
        rest = text[m.end():].strip()
        if lead.endswith("?") or len(lead.split()) < LEAD_MIN_WORDS[0] or len(rest.split()) < LEAD_MIN_WORDS[1]:
            return None
        return lead, rest
    return None


def pretrain_pair(doc_id: str, title: str, text: str, *, instruction: str = PRETRAIN_INSTRUCTION,
                  lead: bool = True, lead_instruction: str = LEAD_INSTRUCTION) -> Pair | None:
    """One unlabelled document -> its pre-training pair: title -> text (`instruction`); without a title (and
    `lead`), opening sentence -> the rest (`lead_instruction`); None when there is nothing to pair (no text, no title
    and no usable lead, or a title that is the text: the pair would teach string matching)."""
    title, text = title.strip(), text.strip()
    if not text:
        return None
    if title:
        if _norm(title) == _norm(text):
            return None
        return Pair(query=title, positive={"title": "", "text": text, "id": doc_id}, instruction=instruction,
                    id=doc_id)
    split = lead_split(text) if lead else None
    if split is None:
        return None
    return Pair(query=split[0], positive={"title": "", "text": split[1], "id": doc_id},
                instruction=lead_instruction, id=doc_id)


def pretrain_pairs_from_beir(corpus_path: str, *, instruction: str = PRETRAIN_INSTRUCTION,
                             lead: bool = True, lead_instruction: str = LEAD_INSTRUCTION) -> list[Pair]:
    """Pre-training pairs from a BEIR corpus.jsonl, in file order: title -> abstract (BMRetriever's first
    stage), and for documents without a title, opening sentence -> the rest (`lead=False`: skip them).

    Documents without a text are skipped (nothing to pair), and so are documents whose title is their text
    (the pair would teach string matching) and untitled ones whose lead or rest is too short (LEAD_MIN_WORDS).
    """
    pairs = []
    skipped = 0
    for doc_id, doc in load_corpus(corpus_path).items():
        pair = pretrain_pair(doc_id, doc["title"], doc["text"], instruction=instruction, lead=lead,
                             lead_instruction=lead_instruction)
        if pair is None:
            skipped += 1
        else:
            pairs.append(pair)
    log.info("%s: %d pre-training pairs, %d documents skipped", corpus_path, len(pairs), skipped)
    return pairs


def beir_train_pairs(data_dir: str, *, task: str, split: str = "train", min_score: int = 1) -> list[Pair]:
    """Query -> judged document pairs of one non-test split of a BEIR folder: one pair per judgement.

    Judgements with score < min_score are not positives and are left out. A query with k relevant documents
    gives k pairs (in a batch, its other positives then act as negatives of each other: rare, and the price
    of keeping every judgement). Order: the qrels file's.

    Test hygiene: raises ValueError for split "test" and if the split shares a query id with the folder's
    qrels/test.tsv; training queries whose text equals a test query's text (case and whitespace aside) are
    dropped with a DataWarning. SciFact has two: train claims 871 and 1291 repeat test claims 870 and 1292
    word for word, with the same cited abstract.
    """
    if split == "test":
        raise ValueError(f"{data_dir}: refusing to build training pairs from the test split")
    corpus, queries, qrels = load_beir(data_dir, split, strict=True)
    test_path = os.path.join(data_dir, "qrels", "test.tsv")
    duplicates: set[str] = set()
    if os.path.exists(test_path):
        _, test_queries, _ = load_beir(data_dir, "test", strict=False)
        shared_ids = sorted(set(queries) & set(test_queries))
        if shared_ids:
            raise ValueError(f"{data_dir}: split {split!r} shares {len(shared_ids)} query id(s) with the test "
                             f"split, e.g. {shared_ids[:3]}")
        test_texts = {_norm(t) for t in test_queries.values()}
        duplicates = {q for q, t in queries.items() if _norm(t) in test_texts}
        if duplicates:
            warnings.warn(f"{data_dir}: dropped {len(duplicates)} {split} quer(y/ies) whose text is also a test "
                          f"query: {sorted(duplicates)[:5]}", DataWarning, stacklevel=2)
    # A dev split carved out of train (SciFact: qrels/dev.tsv, 100 train claims) is held out of training.
    dev_path = os.path.join(data_dir, "qrels", "dev.tsv")
    if split != "dev" and os.path.exists(dev_path):
        _, _, dev_qrels = load_beir(data_dir, "dev", strict=False)
        duplicates |= set(dev_qrels)
    pairs = []
    for qid, judged in qrels.items():
        if qid in duplicates:
            continue
        for doc_id, score in judged.items():
            if score < min_score:
                continue
            doc = corpus[doc_id]
            pairs.append(Pair(query=queries[qid], positive={"title": doc["title"], "text": doc["text"], "id": doc_id},
                              task=task, id=qid))
    log.info("%s/%s: %d pairs from %d queries", data_dir, split, len(pairs), len({p.id for p in pairs}))
    return pairs


def scifact_train_pairs(data_dir: str) -> list[Pair]:
    """SciFact claim -> abstract pairs from qrels/train.tsv: 809 claims, 919 judgements; 917 pairs from
    807 claims once the two claims that repeat test claims are dropped (see `beir_train_pairs`), less the
    100 claims of qrels/dev.tsv (a seeded sample of train claims held out for dev evaluation)."""
    return beir_train_pairs(data_dir, task="scifact", split="train")


def pubmedqa_train_pairs(data_dir: str) -> list[Pair]:
    """PubMedQA PQA-L question -> its abstract (conclusion removed), the 500 train judgements (train_cv)."""
    return beir_train_pairs(data_dir, task="pubmedqa", split="train")


# ---------------------------------------------------------------------------------------------------- MedQuAD

_SECTION = re.compile(r"_Sec\d+$")


def medquad_document_id(pair_id: str) -> str:
    """Source document of a MedQuAD pair: "GHR_0000001_Sec3" -> "GHR_0000001" (one XML file, one URL)."""
    return _SECTION.sub("", pair_id)


def read_id_list(path: str) -> set[str]:
    """Ids from a text file: first whitespace-separated field of each line; blank lines and #-comments skipped."""
    ids = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                ids.add(line.split()[0])
    return ids


def medquad_pairs(pairs_path: str, *, exclude_documents: str | None, exclude_same_questions: bool = True,
                  exclude_same_answers: bool = False) -> list[Pair]:
    """MedQuAD question -> answer pairs from the {"id","question","answer",...} jsonl(.gz), in file order.

    exclude_documents: a file listing held-out source documents, one a line, by document id
    ("GHR_0000001"), URL, or any pair id of the document ("GHR_0000001_Sec3"); every pair of those
    documents is left out. It is a required argument on purpose: pass None to use every pair. An id list
    that matches no pair at all raises (it is in some other format, and training would leak silently).
    exclude_same_questions: also leave out pairs of other documents that ask a held-out question (case and
      whitespace aside): MedQuAD repeats "What is (are) X ?" across sources, and such a pair would put a
      test query in training. (data/medquad holds out such documents together, so there it removes nothing.)
    exclude_same_answers: also leave out pairs whose answer equals a held-out answer. Off by default: the
      repeated answers are boilerplate ("This condition is inherited in an autosomal recessive pattern..."
      answers 331 inheritance questions), which the benchmark never uses as a positive, and dropping them
      would remove most inheritance questions from training. Turn it on for a held-out list whose queries
      may have such answers as positives.
    """
    rows = []
    for lineno, row in jsonl_records(pairs_path):
        for field in ("id", "question", "answer"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{pairs_path}:{lineno}: field {field!r} missing or empty")
        rows.append(row)

    held = set()
    if exclude_documents is not None:
        names = read_id_list(exclude_documents)
        names |= {medquad_document_id(n) for n in names}
        held = {i for i, r in enumerate(rows)
                if medquad_document_id(r["id"]) in names or r.get("url") in names}
        if names and not held:
            raise ValueError(f"{exclude_documents}: none of its {len(names)} ids names a document of "
                             f"{pairs_path} (expected ids like {medquad_document_id(rows[0]['id'])!r})")
    held_questions = {_norm(rows[i]["question"]) for i in held}
    held_answers = {_norm(rows[i]["answer"]) for i in held}

    pairs = []
    overlapping = 0
    for i, r in enumerate(rows):
        if i in held:
            continue
        if (exclude_same_questions and _norm(r["question"]) in held_questions) or \
                (exclude_same_answers and _norm(r["answer"]) in held_answers):
            overlapping += 1
            continue
        positive = {"title": "", "text": r["answer"].strip(), "id": r["id"]}
        pairs.append(Pair(query=r["question"].strip(), positive=positive, task="medquad", id=r["id"]))
    log.info("%s: %d pairs kept, %d in held-out documents, %d more sharing a held-out question/answer",
             pairs_path, len(pairs), len(held), overlapping)
    return pairs


# ---------------------------------------------------------------------------------------------------- registry

def _default(*parts: str) -> str:
    return os.path.join(DATA_DIR or paths.data_dir(), *parts)


BUILDERS: dict[str, tuple[Callable[..., list[Pair]], str]] = {
    # name -> (builder taking the source path first, default source under the repository's data/)
    "pretrain": (pretrain_pairs_from_beir, "scifact/corpus.jsonl"),
    "scifact": (scifact_train_pairs, "scifact"),
    "pubmedqa": (pubmedqa_train_pairs, "pubmedqa_pqal"),
    "medquad": (medquad_pairs, "medquad_train/pairs.jsonl.gz"),
}
MEDQUAD_HELDOUT = "medquad/heldout_documents.txt"


def build(name: str, source: str | None = None, **kwargs) -> list[Pair]:
    """Runs the builder `name` (one of BUILDERS) on `source` (default: the repository's data/ copy).

    For "medquad", `exclude_documents` defaults to data/medquad/heldout_documents.txt and must exist unless
    passed explicitly (None = no exclusion).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown builder {name!r}; known: {sorted(BUILDERS)}")
    fn, default_source = BUILDERS[name]
    source = source or _default(default_source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{name}: source {source} does not exist (pass it explicitly)")
    if name == "medquad" and "exclude_documents" not in kwargs:
        heldout = _default(MEDQUAD_HELDOUT)
        if not os.path.exists(heldout):
            raise FileNotFoundError(f"medquad: held-out document list {heldout} does not exist; pass "
                                    f"exclude_documents=PATH, or None to train on every pair")
        kwargs["exclude_documents"] = heldout
    return fn(source, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `bmr pairs` (and `python -m bmretriever_jax.data.builders`)."""
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz")
    parser.add_argument("--source", help="corpus.jsonl (pretrain), BEIR folder (scifact, pubmedqa) or "
                                         "pairs.jsonl.gz (medquad); default: the repository's data/ copy (data/README.md lists it)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--exclude-documents", help=f"medquad: held-out document list (default data/{MEDQUAD_HELDOUT})")
    group.add_argument("--no-exclude", action="store_true", help="medquad: keep every pair")
    parser.add_argument("--instruction", help="pretrain: the query instruction of title -> text pairs")
    parser.add_argument("--lead-instruction", help="pretrain: the query instruction of opening sentence -> rest "
                                                   "pairs (untitled documents)")
    parser.add_argument("--max-pairs", type=int, help="keep a seeded random sample of at most N pairs (e.g. to "
                                                      "balance a large source against small ones)")
    parser.add_argument("--seed", type=int, default=0, help="with --max-pairs: the sample's seed")


def run(args: argparse.Namespace) -> int:
    kwargs = {}
    if args.name == "medquad":
        if args.no_exclude:
            kwargs["exclude_documents"] = None
        elif args.exclude_documents:
            kwargs["exclude_documents"] = args.exclude_documents
    elif args.exclude_documents or args.no_exclude:
        raise ConfigError("--exclude-documents / --no-exclude apply to medquad only")
    for flag, value in (("instruction", args.instruction), ("lead_instruction", args.lead_instruction)):
        if value:
            if args.name != "pretrain":
                raise ConfigError(f"--{flag.replace('_', '-')} applies to pretrain only (the others name their task)")
            kwargs[flag] = value
    pairs = build(args.name, args.source, **kwargs)
    if args.max_pairs is not None:
        if args.max_pairs < 1:
            raise ConfigError(f"--max-pairs {args.max_pairs}: allowed: >= 1")
        if args.max_pairs < len(pairs):  # a seeded sample, kept in the source's order
            keep = sorted(random.Random(args.seed).sample(range(len(pairs)), args.max_pairs))
            pairs = [pairs[i] for i in keep]
    n = write_pairs(args.out, pairs)
    print(f"{args.name}: wrote {n} pairs to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmretriever_jax.data.builders",
                                     description="Build a training-pairs JSONL file.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
