"""Retrieval-instruction search (STM's prompt optimisation, GEPA-style) scored by NDCG@10 on a dev split.

The query instruction is the only thing that changes between candidates, so the corpus is encoded once
(and cached on disk by the encoder's fingerprint when cache_dir is given) and every candidate costs one
encoding of the dev queries.

Loop (budget = number of candidates scored, seeds included):
  1. seeds: the model's current instruction for the task (bmretriever.json), the task's entry of
     BMRetriever's table (embed.TASK_INSTRUCTIONS), then the table's other instructions, all scored on every
     dev query; the dev queries are split into `n_batches` fixed mini-batches.
  2. parent: sampled from the Pareto front over mini-batches (a candidate is on the front if no other
     candidate is at least as good on every batch and better on one), weighted by the number of batches on
     which it is best (GEPA).
  3. proposal: the LLM reflects on the parent's failures on one mini-batch (the query, a relevant passage,
     the passage retrieved instead) and writes a new instruction; every third proposal instead merges two
     front candidates; a plain rewrite when the mini-batch has no failure.
  4. the proposal is scored on that mini-batch; only if it does at least as well as its parent there is it
     scored on the whole dev split and added to the pool.
The winner is the pool's best mean NDCG@10 on the dev split (earlier candidates win ties); every
candidate, its origin, parent and scores go to a TSV and a JSON report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from bmretriever_jax.embed import TASK_INSTRUCTIONS
from bmretriever_jax.eval import metrics
from bmretriever_jax.data.beir import load_beir
from bmretriever_jax.eval.evaluate import cached_corpus_vectors
from bmretriever_jax.eval.search import topk_search
from bmretriever_jax.synth.filters import normalize
from bmretriever_jax.synth.queries import clean_line, truncate_words

METRIC = "ndcg@10"
SYSTEM_PROMPT = ("You improve the task instruction of a dense retrieval model. The model embeds the text "
                 "\"{instruction}\\nQuery: {query}\" and retrieves the passages whose embeddings are closest.")
REFLECT_PROMPT = """Current instruction: "{instruction}"

Task: {task}. With this instruction, the right passage was not ranked first for these queries:
{failures}
Think about what these queries ask for and what the relevant passages have in common, then write a better \
instruction: one sentence that says what kind of query is given and which passages to retrieve.

Output only the new instruction."""
REWRITE_PROMPT = """Current instruction: "{instruction}"

Task: {task}. Rewrite this retrieval instruction so that it describes more precisely what kind of query is given \
and which passages to retrieve. One sentence.

Output only the new instruction."""
MERGE_PROMPT = """Two retrieval instructions for the task {task} each work well on different queries:
1. "{a}"
2. "{b}"
Write one instruction, one sentence, that combines the strengths of both.

Output only the new instruction."""


@dataclasses.dataclass
class Candidate:
    id: int
    instruction: str
    origin: str                       # seed | reflection | rewrite | merge
    parents: tuple = ()
    status: str = "pending"           # evaluated | rejected_minibatch | duplicate | invalid
    minibatch: Optional[int] = None
    minibatch_score: Optional[float] = None
    parent_minibatch_score: Optional[float] = None
    score: Optional[float] = None     # mean METRIC over all dev queries
    batch_scores: Optional[list] = None
    pareto: bool = False
    winner: bool = False
    raw: str = ""                     # the LLM's answer before cleaning

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["parents"] = list(self.parents)
        return d


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


class DevScorer:
    """Per-query METRIC of an instruction on a BEIR split; corpus vectors computed once, query scores memoised."""

    def __init__(self, encoder, beir_dir: str, split: str, *, cache_dir: Optional[str] = None, batch_size: int = 32,
                 k: int = 100):
        self.encoder, self.batch_size = encoder, batch_size
        self.corpus, queries, self.qrels = load_beir(beir_dir, split)
        self.queries = {q: queries[q] for q in self.qrels if q in queries}
        if not self.queries:
            raise ValueError(f"{beir_dir}: no judged queries in split {split!r}")
        self.doc_ids = list(self.corpus)
        self.chunks = cached_corpus_vectors(encoder, self.corpus, beir_dir, cache_dir, batch_size=batch_size)
        self.k = min(k, len(self.doc_ids))
        self._memo: dict = {}   # instruction -> {query id: (metric, top doc ids)}
        self.query_encodings = 0

    def score(self, instruction: str, qids: Sequence[str]) -> dict:
        """{query id: METRIC} for `qids` (only queries not scored before under this instruction are encoded)."""
        memo = self._memo.setdefault(instruction, {})
        todo = [q for q in qids if q not in memo]
        if todo:
            self.query_encodings += len(todo)
            qv = np.asarray(self.encoder.encode_queries([self.queries[q] for q in todo], instruction,
                                                        batch_size=self.batch_size), np.float32)
            scores, idx = topk_search(qv, iter(self.chunks), self.k, similarity="cos")
            for r, q in enumerate(todo):
                run = {self.doc_ids[j]: float(s) for j, s in zip(idx[r], scores[r]) if j >= 0}
                m = metrics.query_metrics(self.qrels[q], run, (10,))[METRIC]
                memo[q] = (m, metrics.rank(run)[:10])
        return {q: memo[q][0] for q in qids}

    def failures(self, instruction: str, qids: Sequence[str], n: int) -> list[str]:
        """Up to n failure descriptions (lowest METRIC first, perfect queries excluded) for the LLM."""
        per = self.score(instruction, qids)
        worst = [q for q in sorted(qids, key=lambda q: per[q]) if per[q] < 1.0][:n]
        out = []
        for i, q in enumerate(worst, 1):
            rel = [d for d, r in sorted(self.qrels[q].items(), key=lambda kv: -kv[1]) if r > 0 and d in self.corpus]
            top = self._memo[instruction][q][1]
            wrong = next((d for d in top if self.qrels[q].get(d, 0) <= 0), None)
            lines = [f"{i}. Query: {self.queries[q]}"]
            if rel:
                lines.append(f"   Relevant passage: {_snippet(self.corpus[rel[0]])}")
            if wrong is not None:
                lines.append(f"   Retrieved instead: {_snippet(self.corpus[wrong])}")
            out.append("\n".join(lines))
        return out


def _snippet(doc: dict, n_words: int = 40) -> str:
    title = doc.get("title", "")
    return truncate_words(f"{title}. {doc['text']}" if title else doc["text"], n_words)


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    """Evaluated candidates not dominated on the per-batch scores."""
    pool = [c for c in cands if c.status == "evaluated"]
    front = []
    for c in pool:
        v = np.asarray(c.batch_scores)
        dominated = any(np.all(np.asarray(o.batch_scores) >= v) and np.any(np.asarray(o.batch_scores) > v)
                        for o in pool if o is not c)
        if not dominated:
            front.append(c)
    return front


def _pick_parent(front: Sequence[Candidate], rng: random.Random) -> Candidate:
    """GEPA's rule: weight = number of mini-batches on which the candidate is (one of) the best of the front."""
    scores = np.asarray([c.batch_scores for c in front])                                   # [n, batches]
    best = scores.max(0)
    weights = [int((scores[i] >= best).sum()) for i in range(len(front))]
    if sum(weights) == 0:
        weights = [1] * len(front)
    return rng.choices(list(front), weights=weights, k=1)[0]


def seed_instructions(task: str, current: Optional[str] = None) -> list[str]:
    """The model's current instruction, the task's table entry, then the other distinct table entries."""
    seen, out = set(), []
    for s in [current, TASK_INSTRUCTIONS.get(task)] + list(TASK_INSTRUCTIONS.values()):
        if s and normalize(s) not in seen:
            seen.add(normalize(s))
            out.append(s)
    return out


def optimize_instruction(encoder, beir_dir: str, proposer, *, task: str, split: str = "dev", budget: int = 12,
                         n_seeds: Optional[int] = None, seeds: Optional[Sequence[str]] = None, n_batches: int = 4,
                         cache_dir: Optional[str] = None, rng_seed: int = 0, n_failures: int = 4,
                         max_new_tokens: int = 64, temperature: float = 0.7, batch_size: int = 32,
                         current: Optional[str] = None, progress: bool = True) -> dict:
    """Search the query instruction of `task` maximising NDCG@10 on `beir_dir`'s `split`.

    encoder: any object with encode_queries / encode_passages / fingerprint. proposer: a chat backend
    (`synth.backends`). n_seeds: how many seed instructions to score (default: up to half the budget).
    -> {"winner": str, "winner_score": float, "baseline": the first seed's score, "candidates": [dict, ...]}.
    """
    if budget < 1:
        raise ValueError(f"budget={budget}: must be >= 1")
    scorer = DevScorer(encoder, beir_dir, split, cache_dir=cache_dir, batch_size=batch_size)
    rng = random.Random(rng_seed)
    qids = list(scorer.queries)
    rng.shuffle(qids)
    n_batches = max(1, min(n_batches, len(qids)))
    batches = [qids[i::n_batches] for i in range(n_batches)]
    all_seeds = list(seeds) if seeds else seed_instructions(task, current)
    n_seeds = n_seeds if n_seeds is not None else max(1, budget // 2)
    all_seeds = all_seeds[:max(1, min(n_seeds, budget))]

    cands: list[Candidate] = []
    known = set()
    bar = tqdm(total=budget, desc="instruction search", unit="cand", disable=not progress)

    def batch_score(instruction: str, b: int) -> float:
        return float(np.mean(list(scorer.score(instruction, batches[b]).values())))

    def full_eval(c: Candidate) -> None:
        per = scorer.score(c.instruction, qids)
        c.batch_scores = [float(np.mean([per[q] for q in b])) for b in batches]
        c.score = float(np.mean([per[q] for q in qids]))
        c.status = "evaluated"

    for s in all_seeds:
        c = Candidate(len(cands), s, "seed")
        full_eval(c)
        cands.append(c)
        known.add(normalize(s))
        bar.update(1)

    scored = len(cands)
    attempts, step = 0, 0
    while scored < budget and attempts < 3 * budget and proposer is not None:
        attempts += 1
        step += 1
        front = pareto_front(cands)
        b = (step - 1) % n_batches
        if step % 3 == 0 and len(front) >= 2:
            pa, pb = rng.sample(front, 2)
            origin, parents = "merge", (pa.id, pb.id)
            msg = MERGE_PROMPT.format(task=task, a=pa.instruction, b=pb.instruction)
            parent_mb = max(batch_score(pa.instruction, b), batch_score(pb.instruction, b))
        else:
            parent = _pick_parent(front, rng)
            parents = (parent.id,)
            fails = scorer.failures(parent.instruction, batches[b], n_failures)
            if fails:
                origin = "reflection"
                msg = REFLECT_PROMPT.format(instruction=parent.instruction, task=task, failures="\n".join(fails))
            else:
                origin = "rewrite"
                msg = REWRITE_PROMPT.format(instruction=parent.instruction, task=task)
            parent_mb = batch_score(parent.instruction, b)
        raw = proposer.chat([[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": msg}]],
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95,
                            seed=rng_seed * 1000003 + step)[0]
        text = clean_line(raw)
        c = Candidate(len(cands), text, origin, parents, minibatch=b, parent_minibatch_score=parent_mb, raw=raw)
        cands.append(c)
        if not (3 <= len(text.split()) <= 80):
            c.status = "invalid"
            continue
        if normalize(text) in known:
            c.status = "duplicate"
            continue
        known.add(normalize(text))
        scored += 1
        bar.update(1)
        c.minibatch_score = batch_score(text, b)
        if c.minibatch_score >= c.parent_minibatch_score:
            full_eval(c)
        else:
            c.status = "rejected_minibatch"
    bar.close()

    evaluated = [c for c in cands if c.status == "evaluated"]
    win = max(evaluated, key=lambda c: (c.score, -c.id))
    win.winner = True
    for c in pareto_front(cands):
        c.pareto = True
    return {"task": task, "split": split, "metric": METRIC, "budget": budget, "n_queries": len(qids),
            "n_batches": n_batches, "winner": win.instruction, "winner_score": win.score,
            "baseline": cands[0].score, "baseline_instruction": cands[0].instruction,
            "query_encodings": scorer.query_encodings, "candidates": [c.row() for c in cands]}


def write_report(result: dict, prefix: str) -> tuple[str, str]:
    """<prefix>.json (everything) and <prefix>.tsv (one candidate a line); returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    cols = ["id", "origin", "parents", "status", "minibatch", "minibatch_score", "parent_minibatch_score", "score",
            "batch_scores", "pareto", "winner", "instruction"]
    with open(prefix + ".tsv", "w") as f:
        f.write("\t".join(cols) + "\n")
        for c in result["candidates"]:
            row = [",".join(map(str, c["parents"])) if k == "parents" else
                   ",".join(f"{x:.4f}" for x in c["batch_scores"]) if k == "batch_scores" and c[k] else
                   " ".join(str(c[k]).split()) if k == "instruction" else _fmt(c[k]) for k in cols]
            f.write("\t".join(row) + "\n")
    return prefix + ".json", prefix + ".tsv"


def write_instruction(folder: str, task: str, instruction: str) -> str:
    """Store the instruction under bmretriever.json "instructions"[task] in a model folder (other keys kept);
    `Encoder.load` reads it, so embed / eval / export use it. Returns the file path."""
    path = os.path.join(folder, "bmretriever.json")
    settings = {}
    if os.path.exists(path):
        with open(path) as f:
            settings = json.load(f)
    settings.setdefault("instructions", {})[task] = instruction
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)
    return path
