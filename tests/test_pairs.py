"""Training pairs: the JSONL format and its validation, the builders on the real data, and the batch loader."""
import gzip
import json
import os
import re
import warnings

import numpy as np
import pytest

from bmretriever_jax.data import builders
from bmretriever_jax.data.loader import PairLoader
from bmretriever_jax.data.pairs import Pair, PairsFormatError, read_pairs, resolve_instruction, write_pairs
from bmretriever_jax.data.beir import DataWarning, load_qrels
from bmretriever_jax.util.errors import ConfigError


# the shipped data sets, found from the repository (a missing file fails the test that reads it)
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


# ---------------------------------------------------------------------------------------------------- format

GOOD = [
    {"query": "q1", "positive": "plain text doc"},
    {"query": "q2", "positive": {"title": "T", "text": "body", "id": "d2"},
     "negatives": ["n1", {"title": "", "text": "n2"}], "instruction": "Given a claim", "task": "scifact",
     "id": "x2", "meta": {"source": "unit"}},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    assert write_pairs(path, [Pair.from_json(GOOD[0]), GOOD[1]]) == 2
    pairs = read_pairs(path)
    assert [p.to_json() for p in pairs] == GOOD
    assert pairs[1].negatives == ("n1", {"title": "", "text": "n2"})
    assert pairs[1].positive == {"title": "T", "text": "body", "id": "d2"}
    if suffix == ".jsonl.gz":
        with gzip.open(path, "rt") as f:
            assert json.loads(f.readline()) == GOOD[0]
        # Same pairs -> same bytes (no timestamp or temporary name in the gzip header).
        first = path.read_bytes()
        write_pairs(path, pairs)
        assert path.read_bytes() == first
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


BAD_LINES = [
    ('{"query": "q", "positive": "p"', "invalid JSON"),
    ('{"query": "q", "positive": ""}', "'positive' is empty"),
    ('{"query": "q", "positive": {"title": " ", "text": ""}}', "'positive' is empty"),
    ('{"positive": "p"}', "missing field 'query'"),
    ('{"query": "q"}', "missing field 'positive'"),
    ('{"query": "  ", "positive": "p"}', "'query' is empty"),
    ('{"query": 7, "positive": "p"}', "'query' must be a string"),
    ('{"query": "q", "positive": 3}', "'positive' must be a string or an object"),
    ('{"query": "q", "positive": {"title": "t"}}', "'positive' is missing 'text'"),
    ('{"query": "q", "positive": {"title": 1, "text": "x"}}', "'positive': 'title' must be a string"),
    ('{"query": "q", "positive": "p", "negatives": "n"}', "'negatives' must be a list"),
    ('{"query": "q", "positive": "p", "negatives": ["ok", 5]}', "'negatives[1]' must be a string or an object"),
    ('{"query": "q", "positive": "p", "negatives": ["ok", ""]}', "'negatives[1]' is empty"),
    ('{"query": "q", "positive": "p", "instruction": ["x"]}', "'instruction' must be a string"),
    ('{"query": "q", "positive": "p", "task": 3}', "'task' must be a string"),
    ('{"query": "q", "positive": "p", "negative": ["n"]}', "unknown field(s) ['negative']"),
    ('["q", "p"]', "expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_malformed_line_names_path_line_and_field(tmp_path, line, message, suffix):
    path = tmp_path / f"bad{suffix}"
    text = json.dumps(GOOD[0]) + "\n\n" + line + "\n" + json.dumps(GOOD[1]) + "\n"  # bad line is line 3
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    with pytest.raises(ValueError) as err:
        read_pairs(path)
    assert isinstance(err.value, PairsFormatError)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_write_validates_dicts(tmp_path):
    with pytest.raises(ValueError, match=r"pairs\[1\]: field 'positive' is empty"):
        write_pairs(tmp_path / "p.jsonl", [GOOD[0], {"query": "q", "positive": " "}])
    assert not (tmp_path / "p.jsonl").exists()


def test_resolve_instruction():
    table = {"scifact": "Given a scientific claim, retrieve documents that support or refute the claim"}
    assert resolve_instruction(Pair("q", "p", task="scifact"), table) == table["scifact"]
    assert resolve_instruction(Pair("q", "p", instruction="own", task="scifact"), table) == "own"
    with pytest.raises(ValueError, match="no instruction for task 'nfcorpus'"):
        resolve_instruction(Pair("q", "p", task="nfcorpus"), table)
    with pytest.raises(ValueError, match="neither"):
        resolve_instruction(Pair("q", "p"), table)


# ---------------------------------------------------------------------------------------------------- builders

def test_scifact_train_pairs_never_test():
    d = os.path.join(DATA, "scifact")
    with pytest.warns(DataWarning, match=r"dropped 2 train quer.*\['1291', '871'\]"):
        pairs = builders.scifact_train_pairs(d)
    train, test = load_qrels(f"{d}/qrels/train.tsv"), load_qrels(f"{d}/qrels/test.tsv")
    assert len(train) == 809 and sum(map(len, train.values())) == 919
    dev = load_qrels(f"{d}/qrels/dev.tsv")
    assert len(dev) == 100 and set(dev) <= set(train) and sum(map(len, dev.values())) == 110
    # One pair per train judgement: 919, minus the judgements of claims 871 and 1291 (one each), whose text
    # is word for word that of test claims 870 and 1292, minus the 110 judgements of the 100 dev claims.
    assert len(pairs) == 807 and len({p.id for p in pairs}) == 707
    assert {p.id for p in pairs} == set(train) - {"871", "1291"} - set(dev)
    assert not {p.id for p in pairs} & set(test)
    assert all(p.task == "scifact" and p.positive["id"] in train[p.id] for p in pairs)
    assert sorted((p.id, p.positive["id"]) for p in pairs) == sorted(
        (q, doc) for q, judged in train.items() if q not in ("871", "1291") and q not in dev for doc in judged)
    with pytest.raises(ValueError, match="refusing"):
        builders.beir_train_pairs(d, task="scifact", split="test")


def test_pubmedqa_train_pairs():
    d = os.path.join(DATA, "pubmedqa_pqal")
    pairs = builders.pubmedqa_train_pairs(d)
    assert len(pairs) == 500 and len({p.id for p in pairs}) == 500
    with open(os.path.join(d, "pairs.jsonl")) as f:
        rows = {r["pmid"]: r for r in map(json.loads, f)}
    for p in pairs:
        # PQA-L's own split label agrees: only train_cv questions, each paired with its own abstract.
        assert rows[p.id]["split"] == "train_cv"
        assert p.query == rows[p.id]["question"] and p.positive["id"] == p.id and p.task == "pubmedqa"
        assert p.positive["text"] == rows[p.id]["context"]


def test_pretrain_pairs(tmp_path):
    pairs = builders.pretrain_pairs_from_beir(os.path.join(DATA, "scifact", "corpus.jsonl"))
    assert len(pairs) == 5183  # every SciFact document has a title and a text
    assert pairs[0].query and pairs[0].positive["title"] == "" and pairs[0].instruction
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [
        {"_id": "a", "title": "A title", "text": "An abstract."},
        {"_id": "b", "title": "", "text": "No title."},
        {"_id": "c", "title": "Only title", "text": "  "},
        {"_id": "d", "text": "Title field absent."},
        {"_id": "e", "title": "Same", "text": " same "}]) + "\n")
    got = builders.pretrain_pairs_from_beir(str(corpus), instruction="custom")
    assert [(p.id, p.query, p.positive["text"], p.instruction) for p in got] == [
        ("a", "A title", "An abstract.", "custom")]


def test_untitled_documents_pair_their_opening_sentence_with_the_rest(tmp_path):
    rest = "It spreads in hospitals. Treatment depends on the strain and on the patient's condition today."
    docs = [
        {"_id": "u", "title": "", "text": "Acinetobacter is often resistant to many antibiotics. " + rest},
        {"_id": "short-lead", "title": "", "text": "See below. " + rest},  # a 2-word lead says nothing
        {"_id": "short-rest", "title": "", "text": "Acinetobacter is often resistant to many antibiotics. Yes."},
        {"_id": "one-sentence", "title": "", "text": "Acinetobacter is often resistant to many antibiotics"},
        {"_id": "t", "title": "A title", "text": "Acinetobacter is often resistant to many antibiotics. " + rest}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    got = builders.pretrain_pairs_from_beir(str(corpus))
    assert [(p.id, p.query, p.positive["text"], p.instruction) for p in got] == [
        ("u", "Acinetobacter is often resistant to many antibiotics.", rest, builders.LEAD_INSTRUCTION),
        ("t", "A title", docs[-1]["text"], builders.PRETRAIN_INSTRUCTION)]
    assert [p.id for p in builders.pretrain_pairs_from_beir(str(corpus), lead=False)] == ["t"]
    # `bmr pairs pretrain --instruction A --lead-instruction B`: each kind of pair gets its own
    out = tmp_path / "own.jsonl"
    assert builders.main(["pretrain", "--source", str(corpus), "--out", str(out), "--instruction", "A",
                          "--lead-instruction", "B"]) == 0
    assert [(p.id, p.instruction) for p in read_pairs(out)] == [("u", "B"), ("t", "A")]
    with pytest.raises(ConfigError, match="--lead-instruction applies to pretrain only"):
        builders.main(["scifact", "--out", str(out), "--lead-instruction", "B"])
    # the prepared-data stream (bmr prepare) makes the very same pairs
    from bmretriever_jax.data.prepared import _stream_pretrain
    assert list(_stream_pretrain(str(corpus))) == got
    # no split after an abbreviation or inside a number; a question never becomes a lead
    split = builders.lead_split
    tail = " The rest of the text has to be long enough to make a pair of its own here."
    assert split("A dose of 1.5 mg was given to every patient." + tail)[0] == "A dose of 1.5 mg was given to every patient."
    for lead in ("Approved by the U.S. Food and Drug Administration in May.", "Smith et al. (2019) saw it in mice.",
                 "The rates were 12% vs. 10% in the two arms.", "Drugs, e.g. Aspirin, thin the blood quickly.",
                 "Shown in Fig. 2 for all of the patients."):
        assert split(lead + tail) == (lead, tail.strip()), lead
    assert split("What are the signs and symptoms of Alopecia?" + tail) is None


def test_untitled_shipped_corpora_make_pairs_without_their_test_questions():
    """PubMedQA's contexts and MedQuAD's answers (untitled): most make a pair. MedQuAD's answers that open with
    their own question ("What are the signs and symptoms of X?", what its test and dev queries ask) make none."""
    import re

    def norm(q):
        return re.sub(r"[^a-z0-9 ]", "", _norm(q)).strip()

    for name, min_share in (("pubmedqa_pqal", 0.9), ("medquad", 0.5)):
        path = os.path.join(DATA, name, "corpus.jsonl")
        pairs = builders.pretrain_pairs_from_beir(path)
        n_docs = sum(1 for _ in open(path))
        assert len(pairs) >= min_share * n_docs, (name, len(pairs), n_docs)
        assert not [p.query for p in pairs if p.query.endswith("?")]
        queries = {norm(json.loads(line)["text"]) for line in open(os.path.join(DATA, name, "queries.jsonl"))}
        assert not [p.query for p in pairs if norm(p.query) in queries]


@pytest.fixture(scope="module")
def medquad_rows():
    with gzip.open(os.path.join(DATA, "medquad_train", "pairs.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in f]


def _norm(s):
    return " ".join(s.split()).lower()


def test_medquad_excludes_heldout_documents(tmp_path, medquad_rows):
    path = os.path.join(DATA, "medquad_train", "pairs.jsonl.gz")
    assert len(medquad_rows) == 16007
    everything = builders.medquad_pairs(path, exclude_documents=None)
    assert len(everything) == 16007 and everything[0].task == "medquad"

    doc_of = {r["id"]: re.sub(r"_Sec\d+$", "", r["id"]) for r in medquad_rows}
    by_url = next(r for r in medquad_rows if r["source"] == "CancerGov")
    # Documents that repeat a question / an answer found in other documents, so both text rules have work.
    questions, answers = {}, {}
    for r in medquad_rows:
        questions.setdefault(_norm(r["question"]), set()).add(doc_of[r["id"]])
        answers.setdefault(_norm(r["answer"]), set()).add(doc_of[r["id"]])
    first = {"GHR_0000001", doc_of[by_url["id"]]}
    shared_q = next(r for r in medquad_rows if r["source"] == "GARD"
                    and questions[_norm(r["question"])] - first - {doc_of[r["id"]]})
    shared_a = next(r for r in medquad_rows if r["source"] == "GHR"
                    and doc_of[r["id"]] not in first | questions[_norm(shared_q["question"])]
                    and answers[_norm(r["answer"])] - first - {doc_of[r["id"]], doc_of[shared_q["id"]]})
    heldout = tmp_path / "heldout_documents.txt"
    # One document by id, one by URL, two by a pair id of theirs.
    heldout.write_text(f"# held-out documents\nGHR_0000001\n{by_url['url']}\n{shared_q['id']}\n{shared_a['id']}\n\n")
    docs = {"GHR_0000001", doc_of[by_url["id"]], doc_of[shared_q["id"]], doc_of[shared_a["id"]]}
    assert len(docs) == 4

    held = [r for r in medquad_rows if doc_of[r["id"]] in docs]
    held_q, held_a = {_norm(r["question"]) for r in held}, {_norm(r["answer"]) for r in held}
    rest = [r for r in medquad_rows if doc_of[r["id"]] not in docs]
    no_q = [r["id"] for r in rest if _norm(r["question"]) not in held_q]
    no_qa = [r["id"] for r in rest if _norm(r["question"]) not in held_q and _norm(r["answer"]) not in held_a]
    assert len(rest) > len(no_q) > len(no_qa)  # each rule has something to remove

    pairs = builders.medquad_pairs(path, exclude_documents=str(heldout))  # default: documents + same questions
    assert [p.id for p in pairs] == no_q
    assert not {doc_of[p.id] for p in pairs} & docs and not {_norm(p.query) for p in pairs} & held_q
    strict = builders.medquad_pairs(path, exclude_documents=str(heldout), exclude_same_answers=True)
    assert [p.id for p in strict] == no_qa and not {_norm(p.positive["text"]) for p in strict} & held_a
    only_docs = builders.medquad_pairs(path, exclude_documents=str(heldout), exclude_same_questions=False)
    assert [p.id for p in only_docs] == [r["id"] for r in rest]

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("doc-1\ndoc-2\n")
    with pytest.raises(ValueError, match="none of its 2 ids"):
        builders.medquad_pairs(path, exclude_documents=str(wrong))


def test_medquad_training_pairs_avoid_the_benchmark(medquad_rows):
    bench = os.path.join(DATA, "medquad")
    heldout = builders.read_id_list(os.path.join(bench, "heldout_documents.txt"))
    pairs = builders.medquad_pairs(os.path.join(DATA, "medquad_train", "pairs.jsonl.gz"),
                                   exclude_documents=os.path.join(bench, "heldout_documents.txt"))
    held = [r for r in medquad_rows if re.sub(r"_Sec\d+$", "", r["id"]) in heldout]
    assert held and len(pairs) == len(medquad_rows) - len(held)  # the benchmark already groups shared questions
    with open(os.path.join(bench, "queries.jsonl")) as f:
        test_queries = {_norm(json.loads(line)["text"]) for line in f}
    assert not {_norm(p.query) for p in pairs} & test_queries
    assert not {re.sub(r"_Sec\d+$", "", p.id) for p in pairs} & heldout


def test_build_and_cli(tmp_path):
    out = tmp_path / "scifact.jsonl.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert builders.main(["scifact", "--source", os.path.join(DATA, "scifact"), "--out", str(out)]) == 0
        assert len(read_pairs(out)) == 807
        pairs = builders.build("pubmedqa", os.path.join(DATA, "pubmedqa_pqal"))
    assert len(pairs) == 500
    with pytest.raises(ValueError, match="unknown builder"):
        builders.build("nfcorpus")


def test_build_medquad_requires_heldout_list(tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "DATA_DIR", str(tmp_path))
    (tmp_path / "medquad_train").mkdir()
    (tmp_path / "medquad_train" / "pairs.jsonl.gz").write_bytes(gzip.compress(
        b'{"id": "GHR_0000001_Sec1", "question": "What is X ?", "answer": "X is a disease."}\n'
        b'{"id": "GHR_0000002_Sec1", "question": "What is Y ?", "answer": "Y is a gene."}\n'))
    with pytest.raises(FileNotFoundError, match="held-out document list"):
        builders.build("medquad")
    assert len(builders.build("medquad", exclude_documents=None)) == 2
    (tmp_path / "medquad").mkdir()
    (tmp_path / "medquad" / "heldout_documents.txt").write_text("GHR_0000002\n")
    assert [p.id for p in builders.build("medquad")] == ["GHR_0000001_Sec1"]
    out = tmp_path / "m.jsonl"
    assert builders.main(["medquad", "--no-exclude", "--out", str(out)]) == 0 and len(read_pairs(out)) == 2


# ---------------------------------------------------------------------------------------------------- loader

def _toy_pairs(n=53):
    # Negatives from 0 to 4 per pair; pairs 0 and 1 share a query (one query, two positives).
    pairs = []
    for i in range(n):
        query = "q0" if i < 2 else f"q{i}"
        negs = [f"neg {i}.{j}" for j in range(i % 5)]
        pairs.append(Pair(query=query, positive={"title": f"t{i}", "text": f"pos {i}"}, negatives=tuple(negs),
                          task="toy"))
    return pairs


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def test_loader_deterministic_and_sized():
    pairs = _toy_pairs()
    a = PairLoader(pairs, 8, seed=3, num_negatives=2)
    b = PairLoader(pairs, 8, seed=3, num_negatives=2)
    assert a.steps_per_epoch == 6  # 53 // 8, the last 5 pairs of each epoch dropped
    batches = _take(a, 14)
    assert batches == _take(b, 14)
    assert _take(PairLoader(pairs, 8, seed=4, num_negatives=2), 2) != batches[:2]
    for batch in batches:
        assert len(batch) == 8
        for item in batch:
            assert len(item["negatives"]) == 2 and item["task"] == "toy"
            assert set(item["positive"]) == {"title", "text"}
            own = pairs[item["index"]]
            assert item["query"] == own.query and item["positive"]["text"] == own.positive["text"]
    assert a.state() == {"epoch": 2, "step": 2}


def test_loader_restore_gives_identical_batches():
    pairs = _toy_pairs()
    reference = _take(PairLoader(pairs, 8, seed=0, num_negatives=3), 20)
    for k in (0, 4, 5, 6, 11):  # within an epoch, at and across epoch boundaries (6 steps an epoch)
        run = PairLoader(pairs, 8, seed=0, num_negatives=3)
        _take(run, k)
        state = json.loads(json.dumps(run.state()))  # what a checkpoint stores
        resumed = PairLoader(pairs, 8, seed=0, num_negatives=3)
        resumed.restore(state)
        assert _take(resumed, 5) == reference[k:k + 5] == _take(run, 5)
    with pytest.raises(ValueError):
        resumed.restore({"epoch": 0, "step": resumed.steps_per_epoch})


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_host_slices_concatenate_to_global_batch(drop_last):
    pairs = _toy_pairs()
    one = PairLoader(pairs, 12, seed=7, num_negatives=1, drop_last=drop_last)
    hosts = [PairLoader(pairs, 12, seed=7, num_negatives=1, process_index=p, process_count=3,
                        drop_last=drop_last) for p in range(3)]
    assert one.steps_per_epoch == (4 if drop_last else 5)
    for _ in range(2 * one.steps_per_epoch + 1):
        slices = [next(h) for h in hosts]
        assert all(len(s) == 4 for s in slices)
        assert sum(slices, []) == next(one)
    with pytest.raises(ValueError, match="multiple of process_count"):
        PairLoader(pairs, 10, seed=0, process_count=3)


def test_loader_epochs_reshuffle_and_cover():
    pairs = _toy_pairs()
    loader = PairLoader(pairs, 10, seed=1, num_negatives=0, drop_last=False)
    assert loader.steps_per_epoch == 6
    epochs = []
    for _ in range(3):
        seen = [item["index"] for _ in range(loader.steps_per_epoch) for item in next(loader)]
        assert len(seen) == 60 and set(seen) == set(range(53))  # the last batch is completed from the start
        assert seen[53:] == seen[:7]
        epochs.append(seen[:53])
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(item["negatives"] == [] for item in next(loader))


def test_loader_negatives_pad_sample_and_drop():
    pairs = _toy_pairs()
    loader = PairLoader(pairs, 53, seed=2, num_negatives=3, drop_last=True)
    epoch0, epoch1 = next(loader), next(loader)
    positives = {p.positive["text"] for p in pairs}
    for item in epoch0:
        own = pairs[item["index"]]
        texts = [n["text"] for n in item["negatives"]]
        have = list(own.negatives)
        if len(have) >= 3:
            assert set(texts) <= set(have) and len(set(texts)) == 3
            assert texts == sorted(texts, key=have.index)  # a subsample keeps the ranking order
        else:
            assert texts[:len(have)] == have
            padding = texts[len(have):]
            assert padding and set(padding) <= positives
            assert own.positive["text"] not in padding
            if own.query == "q0":  # a query's other positive is never used as its negative
                assert not {"pos 0", "pos 1"} & set(padding)
    # Pairs with 4 negatives get a different subsample of 3 in some epoch.
    pick = {e: {i["index"]: [n["text"] for n in i["negatives"]] for i in b} for e, b in ((0, epoch0), (1, epoch1))}
    rich = [i for i, p in enumerate(pairs) if len(p.negatives) == 4]
    assert any(pick[0][i] != pick[1][i] for i in rich)
    first = PairLoader(pairs, 53, seed=2, num_negatives=3, negatives="first")
    assert all([n["text"] for n in i["negatives"]] == list(pairs[i["index"]].negatives[:3])
               for i in next(first) if len(pairs[i["index"]].negatives) >= 3)

    dropped = PairLoader(pairs, 4, seed=2, num_negatives=3, short="drop")
    assert dropped.dropped == 33 and len(dropped.pairs) == 20  # 20 of the 53 pairs have 3 or 4 negatives
    assert all(len(dropped.pairs[i["index"]].negatives) >= 3 for _ in range(5) for i in next(dropped))


def test_loader_tokenize_fn():
    pairs = _toy_pairs()

    def tokenize(batch):
        return {"query_len": np.array([len(i["query"]) for i in batch], np.int32),
                "index": np.array([i["index"] for i in batch], np.int32)}

    loader = PairLoader(pairs, 6, seed=5, num_negatives=1, tokenize_fn=tokenize, process_index=1, process_count=2)
    out = next(loader)
    assert out["query_len"].shape == (3,)
    np.testing.assert_array_equal(out["index"], loader.global_indices(0, 0)[3:6])
