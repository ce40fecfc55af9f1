"""MedQuAD retrieval benchmark (BEIR layout) cut from the MedQuAD training pairs by whole source documents.

A MedQuAD pair id is "<source document>_Sec<n>" (e.g. "CancerGov_0000001_1_Sec3" belongs to the document
"CancerGov_0000001_1"). Documents are held out whole, and documents that share a focus (the disease or
topic, case-insensitive) or an identical question are held out together: otherwise "What is (are) Kaposi
Sarcoma ?" could be a test query and, from another source's page, a training pair.

  queries   distinct held-out questions (whitespace/case-normalised), dev and test from disjoint documents;
            dropped: questions with an empty focus ("What is (are)  ?") and questions whose answer is
            boilerplate shared by several foci ("This condition is inherited in an autosomal recessive
            pattern ..." answers 340 different diseases: no retriever can tell which one was meant).
  corpus    every distinct answer of the held-out documents + a seeded sample of the other answers, up to
            `corpus_size` documents (identical answers are one document; title is empty: the answer alone).
  qrels     query -> every held-out answer given for that question (score 1).
  heldout_documents.txt  held-out source document ids, one a line: training builders must skip pairs whose
            document_id() is listed (see `training_pairs`).

    python -m bmretriever_jax.data.medquad --pairs data/medquad_train/pairs.jsonl.gz --out data/medquad
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from collections import defaultdict
from typing import Iterable, Iterator

from bmretriever_jax.data.beir import jsonl_records

HELDOUT_FILE = "heldout_documents.txt"


def document_id(pair_id: str) -> str:
    """Source document of a MedQuAD pair id: "GHR_0000048_Sec5" -> "GHR_0000048"."""
    head, sep, _ = pair_id.rpartition("_Sec")
    if not sep or not head:
        raise ValueError(f"not a MedQuAD pair id (expected '<document>_Sec<n>'): {pair_id!r}")
    return head


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def read_pairs(path: str) -> list[dict]:
    """MedQuAD pairs from a .jsonl or .jsonl.gz file; each needs id, question, answer, focus (errors name line)."""
    pairs = []
    for lineno, row in jsonl_records(path):
        for field in ("id", "question", "answer", "focus"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{path}:{lineno}: missing or non-string field {field!r}")
        document_id(row["id"])
        pairs.append(row)
    return pairs


def load_heldout_documents(path: str) -> set[str]:
    """Ids in heldout_documents.txt (one a line; blank lines and '#' comments ignored)."""
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


def training_pairs(pairs: Iterable[dict], heldout: set[str]) -> Iterator[dict]:
    """The pairs whose source document is not held out."""
    return (p for p in pairs if document_id(p["id"]) not in heldout)


def _document_groups(pairs: list[dict]) -> list[list[str]]:
    """Connected components of documents linked by a shared normalised focus or question, deterministic order."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for p in pairs:
        doc = "D" + document_id(p["id"])
        find(doc)
        if _norm(p["focus"]):
            union(doc, "F" + _norm(p["focus"]))
        union(doc, "Q" + _norm(p["question"]))
    groups: dict[str, list[str]] = defaultdict(list)
    for node in parent:
        if node.startswith("D"):
            groups[find(node)].append(node[1:])
    return sorted(sorted(g) for g in groups.values())


def build_medquad_benchmark(pairs_path: str, out_dir: str, *, seed: int = 0, n_dev: int = 150, n_test: int = 300,
                            corpus_size: int = 4000) -> dict:
    """Writes corpus.jsonl, queries.jsonl, qrels/{dev,test}.tsv, heldout_documents.txt, build.json to out_dir.

    Returns the build summary (also in build.json). Deterministic for a given input file and seed.
    """
    pairs = read_pairs(pairs_path)
    by_doc: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_doc[document_id(p["id"])].append(p)

    # One corpus document per distinct answer text, named after the first pair (file order) that gives it.
    answer_id: dict[str, str] = {}
    answer_text: dict[str, str] = {}
    answer_foci: dict[str, set[str]] = defaultdict(set)
    for p in pairs:
        key = _norm(p["answer"])
        if not key:
            continue
        answer_id.setdefault(key, p["id"])
        answer_text.setdefault(answer_id[key], p["answer"].strip())
        answer_foci[key].add(_norm(p["focus"]))

    def usable(p: dict) -> bool:
        key = _norm(p["answer"])
        return bool(_norm(p["focus"]) and _norm(p["question"]) and key and len(answer_foci[key]) == 1)

    def group_queries(docs: list[str]) -> dict[str, list[dict]]:
        """Normalised question -> its pairs, for questions all of whose pairs are usable."""
        qs: dict[str, list[dict]] = defaultdict(list)
        for d in docs:
            for p in by_doc[d]:
                qs[_norm(p["question"])].append(p)
        return {q: ps for q, ps in qs.items() if all(usable(p) for p in ps)}

    groups = _document_groups(pairs)
    random.Random(seed).shuffle(groups)
    splits: dict[str, dict[str, list[dict]]] = {"test": {}, "dev": {}}
    targets = {"test": n_test, "dev": n_dev}
    heldout: list[str] = []
    for docs in groups:
        split = next((s for s in ("test", "dev") if len(splits[s]) < targets[s]), None)
        if split is None:
            break
        qs = group_queries(docs)
        if not qs:  # nothing to ask: leave the documents to training
            continue
        splits[split].update(qs)
        heldout += docs

    heldout_set = set(heldout)
    heldout_answers = sorted({answer_id[_norm(p["answer"])] for d in heldout for p in by_doc[d] if _norm(p["answer"])})
    if len(heldout_answers) > corpus_size:
        raise ValueError(f"corpus_size {corpus_size} < {len(heldout_answers)} held-out answers")
    others = sorted(set(answer_text) - set(heldout_answers))
    distractors = random.Random(seed + 1).sample(others, corpus_size - len(heldout_answers))
    corpus_ids = sorted(set(heldout_answers) | set(distractors))

    os.makedirs(os.path.join(out_dir, "qrels"), exist_ok=True)
    with open(os.path.join(out_dir, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for cid in corpus_ids:
            f.write(json.dumps({"_id": cid, "title": "", "text": answer_text[cid]}, ensure_ascii=False) + "\n")
    counts = {}
    with open(os.path.join(out_dir, "queries.jsonl"), "w", encoding="utf-8") as fq:
        for split in ("dev", "test"):
            n_judged = 0
            with open(os.path.join(out_dir, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as fr:
                fr.write("query-id\tcorpus-id\tscore\n")
                for _, ps in sorted(splits[split].items(), key=lambda kv: kv[1][0]["id"]):
                    # "q_" keeps query ids distinct from corpus ids (BEIR drops hits whose id equals the query's).
                    qid = "q_" + ps[0]["id"]
                    fq.write(json.dumps({"_id": qid, "text": ps[0]["question"].strip(),
                                         "metadata": {"qtype": ps[0].get("qtype", ""), "split": split}},
                                        ensure_ascii=False) + "\n")
                    for cid in sorted({answer_id[_norm(p["answer"])] for p in ps}):
                        fr.write(f"{qid}\t{cid}\t1\n")
                        n_judged += 1
            counts[split] = {"queries": len(splits[split]), "judgements": n_judged}
    with open(os.path.join(out_dir, HELDOUT_FILE), "w", encoding="utf-8") as f:
        f.write("".join(d + "\n" for d in sorted(heldout_set)))

    with open(pairs_path, "rb") as f:
        source_sha = hashlib.sha256(f.read()).hexdigest()
    summary = {"source": os.path.basename(pairs_path), "source_sha256": source_sha, "seed": seed,
               "targets": {"dev": n_dev, "test": n_test}, "splits": counts, "corpus": len(corpus_ids),
               "heldout_answers": len(heldout_answers), "heldout_documents": len(heldout_set),
               "heldout_pairs": sum(len(by_doc[d]) for d in heldout_set), "pairs": len(pairs)}
    with open(os.path.join(out_dir, "build.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Cut the MedQuAD retrieval benchmark (BEIR layout).")
    ap.add_argument("--pairs", default="data/medquad_train/pairs.jsonl.gz")
    ap.add_argument("--out", default="data/medquad")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dev", type=int, default=150)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--corpus-size", type=int, default=4000)
    args = ap.parse_args(argv)
    summary = build_medquad_benchmark(args.pairs, args.out, seed=args.seed, n_dev=args.dev, n_test=args.test,
                                      corpus_size=args.corpus_size)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
