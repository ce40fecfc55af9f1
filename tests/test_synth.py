"""Synthetic data: the OpenAI-compatible HTTP backend against a real local server, filters on hand-made cases
and on real SciFact documents, resumable query / negative generation, and instruction search."""
import argparse
import http.server
import json
import os
import socket
import threading
import time
import zlib

import numpy as np
import pytest

from bmretriever_jax.data.pairs import Pair, read_pairs
from bmretriever_jax.data.beir import load_beir
from bmretriever_jax.synth import filters
from bmretriever_jax.synth.backends import BackendError, JaxBackend, OpenAIBackend, chat_completions_url
from bmretriever_jax.synth.negatives import clean_document, generate_negatives, pair_key
from bmretriever_jax.synth.prompt_opt import (Candidate, optimize_instruction, pareto_front, write_instruction,
                                              write_report)
from bmretriever_jax.synth.queries import clean_line, generate_queries, rejected_path

SCIFACT = os.path.join(os.path.dirname(__file__), "..", "data", "scifact")


# ------------------------------------------------------------------------------------------------ server
class ChatServer:
    """A real HTTP server on 127.0.0.1 (port chosen by the OS) answering POST /v1/chat/completions with
    `respond(body) -> (status, json or text)`; every request body is recorded."""

    def __init__(self, respond):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if self.path != "/v1/chat/completions":
                    status, payload = 404, {"error": f"no route {self.path}"}
                else:
                    status, payload = respond(body)
                data = (json.dumps(payload) if not isinstance(payload, str) else payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text):
    return 200, {"id": "x", "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


@pytest.fixture
def server_factory():
    servers = []

    def make(respond):
        s = ChatServer(respond)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def echo(body):
    user = body["messages"][-1]["content"]
    return completion(f"echo {user} seed={body['seed']}\n\ntrailing")


def test_openai_backend_against_a_local_server(server_factory):
    srv = server_factory(echo)
    for base in (srv.url, srv.url + "/v1", srv.url + "/v1/"):
        assert chat_completions_url(base) == srv.url + "/v1/chat/completions"
    be = OpenAIBackend(srv.url + "/v1", "tiny-model", api_key="k123", concurrency=3)
    msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    out = be.chat(msgs, max_new_tokens=7, temperature=0.5, top_p=0.8, seed=10, stop=["\n\n"])
    assert out == [f"echo q{i} seed={10 + i}" for i in range(5)]   # in order, stop string applied
    assert len(srv.requests) == 5
    body = sorted(srv.requests, key=lambda r: r["body"]["seed"])[0]["body"]
    assert body["model"] == "tiny-model" and body["max_tokens"] == 7 and body["temperature"] == 0.5
    assert body["top_p"] == 0.8 and body["stop"] == ["\n\n"] and body["messages"] == msgs[0]
    assert srv.requests[0]["auth"] == "Bearer k123"
    assert be.chat(msgs[:2], seed=[4, 4]) == ["echo q0 seed=4\n\ntrailing", "echo q1 seed=4\n\ntrailing"]


def test_openai_backend_retries_then_succeeds(server_factory):
    calls = []

    def flaky(body):
        calls.append(1)
        return (503, {"error": "overloaded"}) if len(calls) <= 2 else completion("fine")

    srv = server_factory(flaky)
    be = OpenAIBackend(srv.url, "m", retries=3, backoff=0.01, concurrency=1)
    assert be.chat([[{"role": "user", "content": "hi"}]]) == ["fine"]
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(BackendError, match=r"after 2 attempt\(s\).*HTTP 503.*overloaded") as e:
        OpenAIBackend(srv.url, "m", retries=1, backoff=0.01).chat([[{"role": "user", "content": "hi"}]])
    assert srv.url in str(e.value)
    assert len(calls) == 2


def test_openai_backend_client_errors_are_not_retried(server_factory):
    srv = server_factory(lambda body: (400, {"error": {"message": "unknown model m"}}))
    with pytest.raises(BackendError, match="HTTP 400.*unknown model"):
        OpenAIBackend(srv.url, "m", retries=3, backoff=0.01).chat([[{"role": "user", "content": "hi"}]])
    assert len(srv.requests) == 1
    srv2 = server_factory(lambda body: (200, {"unexpected": True}))
    with pytest.raises(BackendError, match="unexpected response"):
        OpenAIBackend(srv2.url, "m").chat([[{"role": "user", "content": "hi"}]])


def test_openai_backend_clear_error_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.time()
    with pytest.raises(BackendError) as e:
        OpenAIBackend(url, "m", retries=2, backoff=0.01, timeout=2).chat([[{"role": "user", "content": "hi"}]])
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in msg and "is the server running" in msg
    assert "refused" in msg.lower() and "3 attempt" in msg
    assert time.time() - t0 < 5


def test_openai_backend_timeout_is_retried_and_reported(server_factory):
    def slow(body):
        time.sleep(0.6)
        return completion("late")

    srv = server_factory(slow)
    with pytest.raises(BackendError, match="timed out"):
        OpenAIBackend(srv.url, "m", retries=1, backoff=0.01, timeout=0.2).chat([[{"role": "user", "content": "x"}]])
    assert len(srv.requests) == 2


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    from hf_tiny import tiny_model_dir

    from bmretriever_jax.synth.generate import Generator

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tiny_model_dir(path, "llama")   # tied embeddings: generation works from the base-model checkpoint
    return Generator.load(path, dtype="float32", batch_size=4, quiet=True), path


def test_http_backend_serving_the_jax_backend(server_factory, tiny_generator):
    """A server whose answers come from the in-process JAX backend: both backends must then agree."""
    jb = JaxBackend(generator=tiny_generator[0])

    def respond(body):
        return completion(jb.chat([body["messages"]], max_new_tokens=body["max_tokens"],
                                  temperature=body["temperature"], top_p=body["top_p"], seed=[body["seed"]])[0])

    srv = server_factory(respond)
    msgs = [[{"role": "user", "content": "the claim of the gene"}], [{"role": "user", "content": "cell cancer"}]]
    direct = jb.chat(msgs, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert all(direct)
    over_http = OpenAIBackend(srv.url, "tiny", concurrency=2).chat(msgs, max_new_tokens=10, temperature=1.0,
                                                                   top_p=0.9, seed=3)
    assert over_http == direct


# ------------------------------------------------------------------------------------------------ filters
PASSAGE = {"title": "Aspirin and platelets", "id": "d1",
           "text": "Aspirin irreversibly inhibits cyclooxygenase in platelets, which lowers thromboxane production "
                   "and reduces the risk of myocardial infarction in adults over fifty."}


def test_text_helpers():
    assert filters.ngram_overlap("inhibits cyclooxygenase in platelets", PASSAGE["text"]) == 1.0
    assert filters.ngram_overlap("does aspirin prevent heart attacks in older adults", PASSAGE["text"]) == 0.0
    assert filters.ngram_overlap("aspirin", PASSAGE["text"]) == 1.0          # shorter than n: containment
    assert filters.normalize("  What IS aspirin?? ") == "what is aspirin"
    assert filters.content_words("What are the effects of aspirins on platelets?") == {"effect", "aspirin",
                                                                                      "platelet"}
    assert filters.coverage("aspirin platelets", "Platelets and aspirin.") == 1.0
    assert clean_line('**Question:** "How does aspirin affect platelets?"\nmore') == \
        "How does aspirin affect platelets?"
    assert clean_line("Claim 1: Aspirin lowers thromboxane.") == "Aspirin lowers thromboxane."
    assert clean_line("  \n\n") == ""
    assert clean_line("1. The claim is: \"Aspirin lowers thromboxane") == "Aspirin lowers thromboxane"
    assert clean_line("One scientific claim that the passage supports is that aspirin works.") == "Aspirin works."
    assert clean_line("A single sentence: Aspirin works.") == "Aspirin works."
    assert clean_line("The question of whether aspirin is useful") == "The question of whether aspirin is useful"
    assert filters.mentions_source("What does this passage say about X?") and not filters.mentions_source("Textual")
    assert clean_document('**Hard negative document:** "Ibuprofen  reversibly\ninhibits COX."') == \
        "Ibuprofen reversibly inhibits COX."


def _qpair(query, i, positive=PASSAGE):
    return Pair(query=query, positive=positive, task="pubmedqa", id=f"q{i}")


def test_query_filters_on_hand_made_cases():
    pairs = [
        _qpair("How does aspirin affect heart attack risk in older adults?", 0),       # kept
        _qpair("aspirin?", 1),                                                           # too short
        _qpair("Aspirin irreversibly inhibits cyclooxygenase in platelets, which lowers thromboxane", 2),  # copied
        _qpair("how does ASPIRIN affect heart-attack risk in older adults", 3),         # duplicate of 0
        _qpair("Which enzyme in platelets is blocked by aspirin?", 4),                   # kept
        _qpair(" ".join(["word"] * 70), 5),                                              # too long
        _qpair("The passage supports the claim that aspirin helps.", 6),                # talks about its source
    ]
    kept, report = filters.filter_queries(pairs, generated_empty=2)
    assert [p.id for p in kept] == ["q0", "q4"]
    d = report.to_dict()
    assert d["input"] == 9 and d["kept"] == 2
    assert [(s["stage"], s["kept"], s["dropped"]) for s in d["stages"]] == [
        ("empty", 7, 2), ("length", 5, 2), ("meta", 4, 1), ("copied", 3, 1), ("duplicate", 2, 1)]
    assert "duplicate" in report.format()


class BowEncoder:
    """Bag-of-words vectors (hashed word counts): a deterministic stand-in for a dense retriever where the
    query instruction's words take part in the match."""

    fingerprint = "bow-512"

    def __init__(self):
        self.passage_calls = 0
        self.query_texts = 0

    @staticmethod
    def vec(text):
        v = np.zeros(512, np.float32)
        for w in filters.words(text):
            v[zlib.crc32(w.encode()) % 512] += 1.0
        return v

    def encode_queries(self, texts, instruction="", batch_size=32):
        self.query_texts += len(texts)
        return np.stack([self.vec(f"{instruction} {t}") for t in texts])

    def encode_passages(self, docs, batch_size=32):
        self.passage_calls += 1
        return np.stack([self.vec(f"{d.get('title', '')} {d['text']}") for d in docs])


def test_negative_filters_on_hand_made_cases():
    q = "Does aspirin reduce myocardial infarction risk?"
    negs = (
        "Ibuprofen is a reversible cyclooxygenase inhibitor used for pain and fever in children and adults.",  # kept
        "too short",                                                                                     # length
        PASSAGE["text"],                                                                                 # duplicate
        "Aspirin irreversibly inhibits cyclooxygenase in platelets, which lowers thromboxane production and "
        "reduces the risk of stroke.",                                                                   # copied
        "Aspirin does reduce myocardial infarction risk: trials of low-dose aspirin show fewer infarctions.",  # lexical
        "Ibuprofen is a reversible cyclooxygenase inhibitor used for pain and fever in children and adults.",  # dup
        "Here is a hard negative document that uses the same words as the relevant document but is off topic.",  # meta
    )
    pair = Pair(query=q, positive=PASSAGE, negatives=negs, id="p0")
    other = Pair(query="Which statins lower LDL cholesterol in patients?", positive="Statins lower LDL cholesterol "
                 "by inhibiting HMG-CoA reductase in hepatocytes of treated patients.", id="p1",
                 negatives=("Bile acid sequestrants bind bile acids in the gut and are prescribed with diet changes.",))
    kept, report = filters.filter_negatives([pair, other])
    assert kept[0].negatives == (negs[0],) and kept[1].negatives == other.negatives
    assert [(s["stage"], s["kept"]) for s in report.to_dict()["stages"]] == [
        ("empty", 8), ("length", 7), ("meta", 6), ("duplicate", 4), ("copied", 3), ("lexical", 2)]

    # the retriever check: a negative the retriever prefers to the positive is a likely false negative
    tricky = Pair(query="aspirin platelets", positive={"title": "", "text": "platelets respond to many drugs"},
                  negatives=("aspirin and platelets and aspirin and platelets in a long review of drug effects",
                             "renal clearance of creatinine in elderly patients with chronic kidney disease"))
    for retriever in (BowEncoder(), "bm25"):
        kept, report = filters.filter_negatives([tricky], lexical=False, retriever=retriever)
        assert kept[0].negatives == (tricky.negatives[1],), retriever
        assert report.to_dict()["stages"][-1] == {"stage": "retriever", "kept": 1, "dropped": 1}
    kept, _ = filters.filter_negatives([tricky], lexical=False, retriever="bm25", min_words=20,
                                       drop_pairs_without_negatives=True)
    assert kept == []


def test_consistency_filter_ranks_source_passages():
    docs = {"a": {"title": "", "text": "zebra stripes pattern"}, "b": {"title": "", "text": "lion mane colour"},
            "c": {"title": "", "text": "zebra lion savanna"}}
    pairs = [Pair(query="zebra stripes", positive={"title": "", "text": "zebra stripes pattern", "id": "a"}, id="1"),
             Pair(query="lion mane", positive={"title": "", "text": "zebra lion savanna", "id": "c"}, id="2"),
             # positive without id, found by its text; a positive outside the corpus is added to the pool
             Pair(query="lion mane colour", positive="lion mane colour", id="3"),
             Pair(query="giraffe neck length", positive="giraffe neck length facts", id="4")]
    for retriever in ("bm25", BowEncoder()):
        kept, report = filters.filter_queries(pairs, min_words=1, max_copy_overlap=1.0, retriever=retriever,
                                              corpus=docs, top_k=1)
        assert [p.id for p in kept] == ["1", "3", "4"], retriever
        assert report.extra["consistency_pool"] == 4
        kept, _ = filters.filter_queries(pairs, min_words=1, max_copy_overlap=1.0, retriever=retriever, corpus=docs,
                                         top_k=2)
        assert [p.id for p in kept] == ["1", "2", "3", "4"]
    # no shared term under BM25 is no evidence: rank past the end
    ranks = filters.source_ranks(["unrelated words"], [0], list(docs.values()), "bm25")
    assert ranks.tolist() == [4]


def test_consistency_filter_on_real_scifact_with_bm25():
    """25 real SciFact train claims with their cited abstract, 25 controls paired with another claim's abstract,
    over a pool of 50 real documents: the filter keeps exactly the pairs whose abstract BM25 ranks in the top
    3 (checked against the evaluation's own BM25 search): nearly all real claims, few controls (chance: 3/50)."""
    from bmretriever_jax.eval.baselines import bm25_search

    corpus, queries, qrels = load_beir(SCIFACT, "train")
    claims = [(q, sorted(qrels[q])[0]) for q in sorted(qrels, key=int)][:25]
    pool_ids = list(dict.fromkeys(d for _, d in claims))
    pool_ids += [d for d in corpus if d not in pool_ids][:50 - len(pool_ids)]
    pool = {d: corpus[d] for d in pool_ids}
    assert len(pool) == 50

    def pair(q, d, tag):
        return Pair(query=queries[q], positive={**pool[d], "id": d}, id=f"{tag}{q}")

    real = [pair(q, d, "real") for q, d in claims]
    controls = [pair(q, claims[(i + 7) % 25][1], "ctrl") for i, (q, _) in enumerate(claims)
                if claims[(i + 7) % 25][1] not in qrels[q]]
    kept, report = filters.filter_queries(real + controls, min_words=1, max_copy_overlap=1.0, dedup=False,
                                          meta_phrases=(), retriever="bm25", corpus=pool, top_k=3)
    run = bm25_search(pool, {p.id: p.query for p in real + controls}, k=3)
    expected = [p.id for p in real + controls if p.positive["id"] in run[p.id]]
    assert [p.id for p in kept] == expected
    n_real = sum(p.id.startswith("real") for p in kept)
    n_ctrl = sum(p.id.startswith("ctrl") for p in kept)
    print(f"kept {n_real}/{len(real)} real claims, {n_ctrl}/{len(controls)} controls")
    assert n_real >= 20 and n_ctrl <= 3
    assert report.kept == len(kept)


# ------------------------------------------------------------------------------------------------ generation
class CannedBackend:
    """Answers from a function of the user message; counts calls; can fail after `fail_after` calls."""

    def __init__(self, answer, fail_after=None):
        self.answer, self.fail_after, self.calls, self.seen = answer, fail_after, 0, []

    def chat(self, messages_batch, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, stop=()):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise BackendError("simulated crash")
        self.calls += 1
        seeds = [seed + i for i in range(len(messages_batch))] if isinstance(seed, int) else list(seed)
        self.seen.extend(seeds)
        return [self.answer(m[-1]["content"], s) for m, s in zip(messages_batch, seeds)]


def _query_answer(prompt, seed):
    passage = prompt.split("Passage:\n", 1)[1].split("\n\nWrite", 1)[0]
    w = passage.split()
    if "EMPTY" in w:
        return "  "
    return f"Question: What is known about {w[0].strip('.')} and {w[-1].strip('.')} ({seed % 97})?"


def _corpus_items(n=7):
    items = [(f"d{i}", {"title": f"Title{i}", "text": f"word{i} alpha beta gamma delta end{i}"}) for i in range(n)]
    items[3] = ("d3", {"title": "", "text": "EMPTY makes the fake model answer nothing"})
    return items


def test_generate_queries_pairs_and_resume(tmp_path):
    items = _corpus_items()
    full = str(tmp_path / "full.jsonl")
    stats = generate_queries(items, CannedBackend(_query_answer), "question", full, batch_size=2, seed=1,
                             model_name="canned", progress=False)
    assert stats == {"items": 7, "skipped": 0, "written": 6, "empty": 1}
    pairs = read_pairs(full)
    assert [p.id for p in pairs] == [f"question:d{i}:0" for i in range(7) if i != 3]
    p0 = pairs[0]
    assert p0.query.startswith("What is known about Title0 and end0")
    assert p0.positive == {"title": "Title0", "text": items[0][1]["text"], "id": "d0"}
    assert p0.task == "pubmedqa" and p0.meta == {"source": "synth-queries", "style": "question", "model": "canned",
                                                  "doc_id": "d0"}
    assert json.loads(open(rejected_path(full)).read())["id"] == "question:d3:0"

    # interrupted after two batches, then resumed: the same file as the uninterrupted run
    part = str(tmp_path / "part.jsonl")
    with pytest.raises(BackendError):
        generate_queries(items, CannedBackend(_query_answer, fail_after=2), "question", part, batch_size=2, seed=1,
                         model_name="canned", progress=False)
    assert len(read_pairs(part)) == 3
    with open(part, "a") as f:
        f.write('{"query": "half a li')          # a line cut by the crash
    resumed = CannedBackend(_query_answer)
    stats = generate_queries(items, resumed, "question", part, batch_size=2, seed=1, model_name="canned",
                             progress=False)
    assert stats["skipped"] == 4 and stats["written"] == 3 and resumed.calls == 2
    assert open(part).read() == open(full).read()
    # everything done: nothing is generated again
    again = CannedBackend(_query_answer)
    assert generate_queries(items, again, "question", part, progress=False, seed=1)["skipped"] == 7
    assert again.calls == 0

    # the title style never shows the passage's title to the model
    seen = []
    generate_queries(items[:2], CannedBackend(lambda m, s: seen.append(m) or "A title"), "title",
                     str(tmp_path / "t.jsonl"), progress=False)
    assert all("Title0" not in m and "Title1" not in m for m in seen)
    assert read_pairs(str(tmp_path / "t.jsonl"))[0].task == "pretrain"


def test_generate_negatives_recipe_modes_and_resume(tmp_path):
    src = [Pair(query=f"query about topic {i}", positive={"title": f"T{i}", "text": f"relevant text {i}"},
                negatives=("mined negative",), task="scifact") for i in range(5)]
    src[2] = Pair(query="keep my id", positive="text two", id="mine", meta=["not", "a", "dict"])
    prompts = []

    def answer(prompt, seed):
        prompts.append(prompt)
        return "" if "topic 4" in prompt else f"Document: a related but irrelevant passage ({seed % 1000})."

    out = str(tmp_path / "hn.jsonl")
    stats = generate_negatives(src, CannedBackend(answer), out, num_negatives=2, batch_size=2, seed=0,
                               model_name="canned", progress=False)
    assert stats == {"pairs": 5, "skipped": 0, "written": 5, "negatives": 8, "empty": 2}
    got = read_pairs(out)
    assert [p.id for p in got] == [pair_key(p) for p in src] and got[2].id == "mine"
    assert len(got[0].negatives) == 3 and got[0].negatives[2] == "mined negative"      # prepended
    assert got[0].negatives[0].startswith("a related but irrelevant passage")
    assert got[0].negatives[0] != got[0].negatives[1]                                   # distinct seeds
    assert got[0].meta == {"synthetic_negatives": 2, "negatives_model": "canned"}
    assert got[2].meta == ["not", "a", "dict"]
    assert got[4].negatives == ("mined negative",) and got[4].meta["synthetic_negatives"] == 0
    p = prompts[0]
    for phrase in ("same domain", "similar", "NOT relevant", "moderately challenging", "Output only the document text"):
        assert phrase in p, phrase
    assert "query about topic 0" in p and "relevant text 0" in p
    # resume: nothing left to do
    again = CannedBackend(answer)
    assert generate_negatives(src, again, out, num_negatives=2, progress=False)["skipped"] == 5 and again.calls == 0
    replaced = str(tmp_path / "r.jsonl")
    generate_negatives(src[:1], CannedBackend(answer), replaced, mode="replace", progress=False)
    assert len(read_pairs(replaced)[0].negatives) == 1


def _cli(argv):
    from bmretriever_jax.cli.synth import add_commands

    p = argparse.ArgumentParser(prog="bmr")
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_commands(sub)
    a = p.parse_args(argv)
    a.fn(a)


def test_cli_synth_queries_and_negatives_over_http(server_factory, tmp_path, capsys):
    def respond(body):
        user = body["messages"][-1]["content"]
        if "hard negative" in user:
            return completion("Document: renal physiology of electrolyte handling in the distal tubule of adults.")
        passage = user.split("Passage:\n", 1)[1].split("\n\nWrite", 1)[0]
        return completion(f"Claim: {' '.join(passage.split()[:3])} changes outcomes in patients")

    srv = server_factory(respond)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(6):
            f.write(json.dumps({"_id": f"d{i}", "title": f"study {i}", "text": f"kinase{i} signalling in tumour cells "
                                f"of mouse model {i}"}) + "\n")
    out = str(tmp_path / "pairs.jsonl")
    _cli(["-q", "synth", "queries", "--corpus", str(corpus), "--style", "claim", "--out", out, "--limit", "4",
          "--base-url", srv.url + "/v1", "--llm", "served-model", "--filter", "--consistency", "bm25", "--top-k", "1"])
    pairs = read_pairs(out)
    assert len(pairs) == 4 and pairs[0].query == "study 0. kinase0 changes outcomes in patients"
    assert pairs[0].task == "scifact" and srv.requests[0]["body"]["model"] == "served-model"
    report = json.load(open(str(tmp_path / "pairs.filtered.report.json")))
    assert report["input"] == 4 and report["stages"][-1]["stage"] == "consistency@1"
    assert len(read_pairs(str(tmp_path / "pairs.filtered.jsonl"))) == report["kept"]

    hn = str(tmp_path / "hn.jsonl")
    _cli(["-q", "synth", "negatives", "--pairs", out, "--out", hn, "--base-url", srv.url, "--filter",
          "--retriever", "bm25"])
    got = read_pairs(hn)
    assert all(p.negatives[0].startswith("renal physiology") for p in got)
    assert len(read_pairs(str(tmp_path / "hn.filtered.jsonl"))) == 4
    _cli(["-q", "synth", "filter", "--kind", "queries", "--pairs", out, "--out", str(tmp_path / "f.jsonl"),
          "--retriever", "none"])
    assert "wrote 4 pairs" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ prompt search
TOPICS = [("alpha", "beta"), ("gamma", "delta"), ("kappa", "lambda"), ("sigma", "omega"), ("rho", "tau"),
          ("phi", "psi")]


def tiny_beir(folder):
    """Per topic: a relevant doc (topic words + "zebra") and a distractor (topic words twice). With the plain
    query, the distractor wins; an instruction containing "zebra" puts the relevant doc first."""
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        for i, (a, b) in enumerate(TOPICS):
            f.write(json.dumps({"_id": f"r{i}", "title": "", "text": f"zebra {a} {b}"}) + "\n")
            f.write(json.dumps({"_id": f"x{i}", "title": "", "text": f"{a} {a} {b} {b} extra"}) + "\n")
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        for i, (a, b) in enumerate(TOPICS):
            f.write(json.dumps({"_id": f"q{i}", "text": f"{a} {b}"}) + "\n")
    with open(os.path.join(folder, "qrels", "dev.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(len(TOPICS)):
            f.write(f"q{i}\tr{i}\t1\n")
    return folder


class ScriptedLLM:
    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def chat(self, messages_batch, **kw):
        self.prompts.append(messages_batch[0][-1]["content"])
        return [self.answers[(len(self.prompts) - 1) % len(self.answers)]]


def test_pareto_front_and_parent_weights():
    c = [Candidate(0, "a", "seed", status="evaluated", batch_scores=[0.5, 0.5]),
         Candidate(1, "b", "seed", status="evaluated", batch_scores=[0.9, 0.1]),
         Candidate(2, "c", "seed", status="evaluated", batch_scores=[0.4, 0.5]),    # dominated by a
         Candidate(3, "d", "seed", status="rejected_minibatch")]
    assert [x.id for x in pareto_front(c)] == [0, 1]


def test_optimize_prompt_picks_and_writes_the_best(tmp_path):
    data = tiny_beir(str(tmp_path / "tinybeir"))
    enc = BowEncoder()
    llm = ScriptedLLM(['Instruction: "Find passages for the query"', "ok", "Find passages for the query.",
                       "**Retrieve zebra passages that match the query**"])
    res = optimize_instruction(enc, data, llm, task="scifact", split="dev", budget=4, n_seeds=2, n_batches=2,
                               progress=False)
    cands = res["candidates"]
    assert [(c["origin"], c["status"]) for c in cands] == [
        ("seed", "evaluated"), ("seed", "evaluated"), ("reflection", "evaluated"), ("reflection", "invalid"),
        ("merge", "duplicate"), ("reflection", "evaluated")]
    assert res["winner"] == "Retrieve zebra passages that match the query"
    assert res["winner_score"] == pytest.approx(1.0)
    one_over_log3 = 1 / np.log2(3)   # the relevant doc at rank 2 for every query
    assert res["baseline"] == pytest.approx(one_over_log3) and cands[2]["score"] == pytest.approx(one_over_log3)
    assert cands[0]["instruction"] == "Given a scientific claim, retrieve documents that support or refute the claim"
    assert enc.passage_calls == 1                       # the corpus is encoded once
    assert enc.query_texts == 4 * len(TOPICS)           # each scored instruction encodes the dev queries once
    assert "Relevant passage: zebra" in llm.prompts[0] and "Retrieved instead:" in llm.prompts[0]
    assert "Two retrieval instructions" in llm.prompts[2]

    js, tsv = write_report(res, str(tmp_path / "report" / "opt"))
    lines = open(tsv).read().splitlines()
    assert len(lines) == 1 + len(cands) and lines[0].startswith("id\torigin")
    assert lines[-1].split("\t")[-1] == res["winner"] and lines[-1].split("\t")[-2] == "True"
    assert json.load(open(js))["winner"] == res["winner"]

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "bmretriever.json").write_text(json.dumps({"pooling": "last", "instructions": {"nfcorpus": "x y z"}}))
    write_instruction(str(folder), "scifact", res["winner"])
    saved = json.loads((folder / "bmretriever.json").read_text())
    assert saved == {"pooling": "last", "instructions": {"nfcorpus": "x y z", "scifact": res["winner"]}}


def test_cli_optimize_prompt_end_to_end(server_factory, tmp_path, tiny_generator):
    """A real (tiny) Encoder, an LLM over HTTP; the winner lands in bmretriever.json and Encoder.load uses it."""
    from bmretriever_jax.embed import Encoder

    _, model = tiny_generator
    data = tiny_beir(str(tmp_path / "tinybeir"))
    answers = iter(["Retrieve the gene passages for this claim", "Given a query, find the cell documents"] * 4)
    srv = server_factory(lambda body: completion(next(answers)))
    _cli(["-q", "optimize-prompt", "--model", model, "--data", data, "--split", "dev", "--task", "scifact",
          "--budget", "3", "--n-seeds", "1", "--n-batches", "2", "--base-url", srv.url, "--dtype", "float32",
          "--cache-dir", str(tmp_path / "vecs"), "--report", str(tmp_path / "opt")])
    res = json.load(open(tmp_path / "opt.json"))
    assert len([c for c in res["candidates"] if c["status"] != "duplicate"]) == 3
    best = max((c for c in res["candidates"] if c["status"] == "evaluated"), key=lambda c: (c["score"], -c["id"]))
    assert res["winner"] == best["instruction"]
    enc = Encoder.load(model, quiet=True)
    assert enc.instructions["scifact"] == res["winner"]
    os.remove(os.path.join(model, "bmretriever.json"))
