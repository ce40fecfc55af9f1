"""BEIR / STS readers, the corpus-vector cache, evaluation wiring and the MedQuAD benchmark cut."""
import gzip
import json
import os
import zlib

import numpy as np
import pytest
from scipy import stats

from bmretriever_jax.util.atomic import CacheWarning
from bmretriever_jax.data import medquad
from bmretriever_jax.eval import evaluate, metrics
from bmretriever_jax.data.beir import DataFormatError, DataWarning, load_beir
from bmretriever_jax.eval.sts import load_sts_tsv

DATA = os.path.join(os.path.dirname(__file__), "..", "data")


def write_beir(root, corpus, queries, qrels, split="test"):
    os.makedirs(root / "qrels", exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return str(root)


def small_corpus(n=10):
    return [{"_id": f"d{i}", "title": f"title {i}", "text": f"text number {i} about topic {i % 3}"} for i in range(n)]


# ------------------------------------------------------------------------------------------- readers

def test_valid_folder_loads(tmp_path):
    root = write_beir(tmp_path, small_corpus(4), [{"_id": "q1", "text": "topic 1"}, {"_id": "q2", "text": "x"}],
                      [("q1", "d1", 1), ("q1", "d2", 0)])
    corpus, queries, qrels = load_beir(root, "test", strict=True)
    assert list(corpus) == ["d0", "d1", "d2", "d3"] and corpus["d1"]["title"] == "title 1"
    assert queries == {"q1": "topic 1"}  # q2 has no judgement in this split: dropped
    assert qrels == {"q1": {"d1": 1, "d2": 0}}


def test_malformed_json_names_file_and_line(tmp_path):
    root = write_beir(tmp_path, small_corpus(2), [{"_id": "q1", "text": "a"}], [("q1", "d1", 1)])
    with open(os.path.join(root, "corpus.jsonl"), "a") as f:
        f.write('{"_id": "d9", "text": "oops"\n')
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:3: invalid JSON"):
        load_beir(root)


@pytest.mark.parametrize("bad, pattern", [
    ({"_id": "d5", "title": "t"}, r"corpus\.jsonl:3: missing field 'text'"),
    ({"title": "t", "text": "x"}, r"corpus\.jsonl:3: missing field '_id'"),
    ({"_id": "d5", "text": 7}, r"corpus\.jsonl:3: field 'text' must be a string"),
    ({"_id": "d0", "text": "again"}, r"corpus\.jsonl:3: duplicate _id 'd0' \(first on line 1\)"),
])
def test_corpus_field_errors(tmp_path, bad, pattern):
    root = write_beir(tmp_path, small_corpus(2) + [bad], [{"_id": "q1", "text": "a"}], [("q1", "d1", 1)])
    with pytest.raises(DataFormatError, match=pattern):
        load_beir(root)


def test_query_and_qrels_errors(tmp_path):
    root = write_beir(tmp_path, small_corpus(2), [{"_id": "q1"}], [("q1", "d1", 1)])
    with pytest.raises(DataFormatError, match=r"queries\.jsonl:1: missing field 'text'"):
        load_beir(root)
    root = write_beir(tmp_path, small_corpus(2), [{"_id": "q1", "text": "a"}], [("q1", "d1", "high")])
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: score must be an integer"):
        load_beir(root)
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: expected 3 tab-separated columns"):
        load_beir(root)
    (tmp_path / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td1\t2\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: pair \(q1, d1\) judged twice"):
        load_beir(root)
    with pytest.raises(FileNotFoundError, match="splits here: \\['test'\\]"):
        load_beir(root, "dev")


def test_unknown_qrels_are_counted_dropped_or_strict(tmp_path):
    root = write_beir(tmp_path, small_corpus(3), [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}],
                      [("q1", "d1", 1), ("q1", "gone1", 1), ("q2", "gone2", 2), ("ghost", "d0", 1),
                       ("ghost", "d2", 1)])
    with pytest.warns(DataWarning, match=r"1 unknown query id\(s\) \(2 judgement\(s\).*2 judgement\(s\) of unknown"):
        corpus, queries, qrels = load_beir(root)
    assert qrels == {"q1": {"d1": 1}}       # q2 lost its only judgement, so it is dropped too
    assert set(queries) == {"q1"}
    with pytest.raises(DataFormatError, match="unknown query"):
        load_beir(root, strict=True)


def test_empty_documents_are_allowed_with_a_warning(tmp_path):
    docs = small_corpus(2) + [{"_id": "blank", "title": "", "text": "  "}, {"_id": "notitle", "text": "ok"}]
    root = write_beir(tmp_path, docs, [{"_id": "q1", "text": "a"}], [("q1", "blank", 1)])
    with pytest.warns(DataWarning, match="1 document"):
        corpus, _, _ = load_beir(root)
    assert corpus["blank"] == {"title": "", "text": "  "} and corpus["notitle"]["title"] == ""


def test_shipped_data_sets_load_strictly():
    for name, split, n_docs, n_queries in [("scifact", "test", 5183, 300), ("pubmedqa_pqal", "test", 1000, 500),
                                           ("medquad", "test", 4000, 300), ("medquad", "dev", 4000, 155)]:
        corpus, queries, qrels = load_beir(os.path.join(DATA, name), split, strict=True)
        assert (len(corpus), len(queries)) == (n_docs, n_queries), name
    s1, s2, gold = load_sts_tsv(os.path.join(DATA, "biosses", "biosses.tsv"))
    assert len(s1) == len(s2) == 100 and gold.min() >= 0 and gold.max() <= 4


def test_sts_reader_errors(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("id\tsentence1\tsentence2\tscore\n1\ta\tb\t2.5\n2\tc\td\tlots\n")
    with pytest.raises(DataFormatError, match=r"s\.tsv:3: score is not a number"):
        load_sts_tsv(str(p))
    p.write_text("id\tsentence1\tscore\n1\ta\t2.5\n")
    with pytest.raises(DataFormatError, match=r"s\.tsv:1: header lacks column\(s\) \['sentence2'\]"):
        load_sts_tsv(str(p))


# ------------------------------------------------------------------------------ cache and evaluation

class CountingEncoder:
    """Hashed bag-of-words vectors [n, 64]; counts what it encodes; can fail after a number of calls."""

    def __init__(self, fail_after_calls=None):
        self.fingerprint = "counting-bow-64"
        self.max_length = 128
        self.passages = 0
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def _vec(self, text):
        v = np.zeros(64, np.float32)
        for w in text.lower().split():
            v[zlib.crc32(w.encode()) % 64] += 1.0
        return v

    def encode_texts(self, texts):
        return np.stack([self._vec(t) for t in texts]) if texts else np.zeros((0, 64), np.float32)

    def encode_queries(self, texts, instruction, batch_size=32):
        return self.encode_texts([f"{instruction} {t}" for t in texts])

    def encode_passages(self, docs, batch_size=32):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.passages += len(docs)
        return self.encode_texts([f"{d['title']} {d['text']}" for d in docs])


@pytest.fixture
def toy_beir(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    corpus = [{"_id": f"d{i}", "title": "", "text": " ".join(rng.choice(words, 6))} for i in range(50)]
    queries, qrels = [], []
    for q in range(12):
        target = corpus[int(rng.integers(50))]
        queries.append({"_id": f"q{q}", "text": " ".join(target["text"].split()[:3])})
        qrels.append((f"q{q}", target["_id"], 1))
    return write_beir(tmp_path / "toy", corpus, queries, qrels)


def test_cache_second_run_encodes_no_passage(toy_beir, tmp_path):
    cache = str(tmp_path / "cache")
    enc = CountingEncoder()
    first = evaluate.evaluate_retrieval(enc, toy_beir, "test", "find", cache_dir=cache, k_values=(1, 10),
                                        chunk_size=8)
    assert enc.passages == 50 and enc.calls == 7
    again = CountingEncoder()
    second = evaluate.evaluate_retrieval(again, toy_beir, "test", "find", cache_dir=cache, k_values=(1, 10),
                                         chunk_size=8)
    assert again.passages == 0 and second == first
    # The same numbers as a brute-force run scored by the metric code.
    corpus, queries, qrels = load_beir(toy_beir)
    ids = list(corpus)
    c = again.encode_passages([corpus[d] for d in ids])
    q = again.encode_queries(list(queries.values()), "find")
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    run = {qid: {ids[j]: float(cos[r, j]) for j in range(len(ids))} for r, qid in enumerate(queries)}
    expect = metrics.evaluate_run(qrels, run, (1, 10))
    for name, value in expect.items():
        assert first[name] == pytest.approx(value, abs=1e-6), name
    # Another encoder fingerprint gets its own cache folder.
    other = CountingEncoder()
    other.fingerprint = "another"
    evaluate.evaluate_retrieval(other, toy_beir, "test", "find", cache_dir=cache, k_values=(10,), chunk_size=8)
    assert other.passages == 50 and len(os.listdir(cache)) == 2


def test_interrupted_encoding_resumes_at_the_next_missing_chunk(toy_beir, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_retrieval(CountingEncoder(fail_after_calls=3), toy_beir, cache_dir=cache, chunk_size=8)
    (folder,) = os.listdir(cache)
    assert sorted(os.listdir(os.path.join(cache, folder))) == [
        f"chunk_0000{i}.npy{s}" for i in range(3) for s in ("", ".sha256.json")] + ["manifest.json"]
    # A truncated chunk (e.g. the disk filled up) is re-encoded, not trusted.
    with open(os.path.join(cache, folder, "chunk_00001.npy"), "r+b") as f:
        f.truncate(100)
    enc = CountingEncoder()
    with pytest.warns(CacheWarning, match=r"chunk_00001\.npy: .*truncated"):
        resumed = evaluate.evaluate_retrieval(enc, toy_beir, cache_dir=cache, chunk_size=8)
    assert enc.calls == 5 and enc.passages == 50 - 16   # chunks 1, 3, 4, 5, 6 (the last has 2 docs)
    fresh = evaluate.evaluate_retrieval(CountingEncoder(), toy_beir, cache_dir=None, chunk_size=8)
    assert resumed == fresh


def test_evaluate_sts_matches_scipy(tmp_path):
    rows = [("1", "the cell divides", "cells divide quickly", 3.5), ("2", "protein binds dna", "the cell divides", 0.5),
            ("3", "gene expression rises", "expression of the gene rises", 4.0), ("4", "a b c", "d e f", 0.0),
            ("5", "tumour grows", "the tumour grows fast", 3.0)]
    p = tmp_path / "sts.tsv"
    p.write_text("id\tsentence1\tsentence2\tscore\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    enc = CountingEncoder()
    got = evaluate.evaluate_sts(enc, str(p))
    a = enc.encode_texts([r[1] for r in rows]).astype(np.float64)  # evaluate_sts takes cosines in float64
    b = enc.encode_texts([r[2] for r in rows]).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    gold = [r[3] for r in rows]
    assert got["spearman"] == pytest.approx(stats.spearmanr(cos, gold).statistic, abs=1e-12)
    assert got["pearson"] == pytest.approx(stats.pearsonr(cos, gold).statistic, abs=1e-12)


def test_bm25_goes_through_the_same_metrics(toy_beir):
    result = evaluate.evaluate_bm25(toy_beir, k_values=(1, 10))
    assert set(result) == {f"{m}@{k}" for m in metrics.MEASURES for k in (1, 10)}
    assert result["recall@10"] > 0.5  # queries are copied from their target documents
    table = evaluate.format_table({"bm25": result})
    assert table.splitlines()[0].startswith("| | ndcg@1") and "| bm25 |" in table


# ---------------------------------------------------------------------------------------- MedQuAD cut

def _synthetic_medquad(path):
    pairs = []
    for doc in range(40):
        source = "GHR" if doc % 2 else "GARD"
        focus = f"disease {doc // 2}"  # two documents per focus: they must be held out together
        for sec in range(1, 4):
            answer = f"answer about {focus} section {sec} from {source}"
            if sec == 3:
                answer = "This condition is inherited in an autosomal recessive pattern."  # shared boilerplate
            pairs.append({"id": f"{source}_{doc:07d}_Sec{sec}", "question": f"Question {sec} on {focus} ?",
                          "answer": answer, "focus": focus, "source": source})
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return pairs


def test_medquad_cut_holds_out_whole_topics(tmp_path):
    src = str(tmp_path / "pairs.jsonl.gz")
    pairs = _synthetic_medquad(src)
    summary = medquad.build_medquad_benchmark(src, str(tmp_path / "mq"), seed=3, n_dev=4, n_test=6, corpus_size=70)
    again = medquad.build_medquad_benchmark(src, str(tmp_path / "mq2"), seed=3, n_dev=4, n_test=6, corpus_size=70)
    assert summary == again
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/dev.tsv", "qrels/test.tsv", "heldout_documents.txt"):
        assert (tmp_path / "mq" / name).read_bytes() == (tmp_path / "mq2" / name).read_bytes()

    heldout = medquad.load_heldout_documents(str(tmp_path / "mq" / "heldout_documents.txt"))
    train = list(medquad.training_pairs(pairs, heldout))
    train_questions = {p["question"].lower() for p in train}
    train_foci = {p["focus"] for p in train}
    seen = set()
    for split in ("dev", "test"):
        corpus, queries, qrels = load_beir(str(tmp_path / "mq"), split, strict=True)
        assert len(corpus) == 70
        assert len(queries) >= {"dev": 4, "test": 6}[split]
        for qid, text in queries.items():
            assert text.lower() not in train_questions and "autosomal" not in corpus[next(iter(qrels[qid]))]["text"]
            assert text.split(" on ")[1][:-2] not in train_foci  # the topic itself is unseen in training
            assert not (set(qrels[qid]) & seen)                   # dev and test never share an answer
        seen |= {d for judged in qrels.values() for d in judged}
    assert medquad.document_id("CancerGov_0000001_1_Sec3") == "CancerGov_0000001_1"
    with pytest.raises(ValueError, match="not a MedQuAD pair id"):
        medquad.document_id("no-section")


def test_shipped_medquad_heldout_is_disjoint_from_training():
    root = os.path.join(DATA, "medquad")
    heldout = medquad.load_heldout_documents(os.path.join(root, "heldout_documents.txt"))
    pairs = medquad.read_pairs(os.path.join(DATA, "medquad_train", "pairs.jsonl.gz"))
    train_q = {" ".join(p["question"].lower().split()) for p in medquad.training_pairs(pairs, heldout)}
    _, queries, qrels = load_beir(root, "test", strict=True)
    assert not any(" ".join(q.lower().split()) in train_q for q in queries.values())
    assert all(medquad.document_id(d) in heldout for judged in qrels.values() for d in judged)


def test_subset_beir_keeps_every_judged_document_of_the_chosen_splits(tmp_path):
    import os

    from bmretriever_jax.data.beir import load_beir
    from bmretriever_jax.util import paths
    from bmretriever_jax.data.beir import subset_beir

    src = paths.shipped_data("scifact")
    dev = subset_beir(src, str(tmp_path / "dev300"), 300, splits=("dev",))
    corpus, queries, qrels = load_beir(dev, "dev")
    assert len(corpus) == 300 and os.listdir(os.path.join(dev, "qrels")) == ["dev.tsv"]
    assert {d for q in qrels.values() for d in q} <= set(corpus)  # every judged document is there
    full_corpus, _, full_qrels = load_beir(src, "dev")
    assert qrels == full_qrels
    again = subset_beir(src, str(tmp_path / "dev300b"), 300, splits=("dev",))  # seeded: the same documents
    assert set(load_beir(again, "dev")[0]) == set(corpus)


def test_model_labels_tell_models_with_the_same_folder_name_apart():
    from bmretriever_jax.eval.suite import model_labels

    got = model_labels(["bm25", "gemma3-270m", "runs/q/literature/model", "runs/q/consumer/model", "runs/x/model/"])
    assert got == {"bm25": "bm25", "gemma3-270m": "gemma3-270m", "runs/q/literature/model": "literature/model",
                   "runs/q/consumer/model": "consumer/model", "runs/x/model/": "x/model"}
