"""`bmr serve`: real uvicorn servers (in a thread, and one in a subprocess for SIGTERM) queried over HTTP with httpx,
raw sockets and the official `openai` client.

Tiny random models of every family serve the parity and no-compile tests; a stub backend (no model, a gate that
holds the device thread) makes overload, disconnects, deadlines and failing batches deterministic."""
import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from hf_tiny import tiny_model_dir
from procs import free_port

import openai  # noqa: E402  (the test extra has it: a missing package fails, never skips)
import uvicorn  # noqa: E402

from bmretriever_jax.serve.app import ServedModel, ServerState, ServeSettings, create_app, load_models  # noqa: E402
from bmretriever_jax.serve.metrics import CompileCounter  # noqa: E402

FAMILIES = ("gemma3", "gpt_neox", "gemma", "llama", "qwen3", "mistral")
MAX_LENGTH = 32
QUERIES = ["the gene cell query", "cancer drug patients risk", "blood heart brain virus covid vaccine study"]
DOCS = ["immune response of the mouse", "the a of in and to is for with on by as at from that this are was be it "
        "claim query passage represent retrieve documents given scientific support refute gene protein cell",
        "dose effect"]


class ThreadServer:
    """uvicorn on a free port in a thread, with the app's lifespan (warm-up on start, drain on stop)."""

    def __init__(self, state, ready=True):
        self.state, self.wait_ready = state, ready
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                http="h11")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t < 60, "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        while self.wait_ready and httpx.get(self.url + "/health").status_code != 200:
            assert time.time() - t < 600 and not self.state.warmup_error, self.state.warmup_error
            time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


# ----------------------------------------------------------------------------------------------------
# Tiny models of every family
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_models")
    models = []
    for i, fam in enumerate(FAMILIES):  # gemma3: 2 lengths x 2 batch sizes; the others 1 x 2 (compile time)
        spec = f"{fam}={tiny_model_dir(str(root / fam), fam, seed=i)}"
        models += load_models([spec], max_length=MAX_LENGTH, dtype="float32", batch_sizes=[1, 4],
                              seq_buckets=[16] if fam == "gemma3" else [MAX_LENGTH])
    state = ServerState(models, ServeSettings(max_wait_ms=2))
    with ThreadServer(state) as srv:
        yield srv


def test_warmup_compiles_every_shape_and_requests_compile_nothing(family_server):
    """Every (rows, length) bucket is compiled before /health says ok; then requests of every size and length, on
    both APIs and every model, compile nothing (counted from jax's compile events)."""
    state = family_server.state
    assert state.request_path_compiles() == 0
    before = CompileCounter.count()
    client = family_server.client()
    long_text = " ".join(["gene"] * 60)  # > MAX_LENGTH tokens: truncated, longest bucket
    for fam in FAMILIES:
        b = state.models[fam].backend
        assert len(b._compiled) == len(b.shapes()) == (4 if fam == "gemma3" else 2)
        for texts in (["cell"], QUERIES, DOCS + QUERIES, [long_text], [long_text] * 5 + ["x"]):
            client.embeddings.create(input=texts, model=fam)
            httpx.post(family_server.url + "/embed", json={"inputs": texts, "model": fam, "prompt_name": "query"})
        assert set(b.shapes_used) == set(b.shapes()), fam  # every compiled shape ran
    assert CompileCounter.count() == before
    assert state.request_path_compiles() == 0
    metrics = httpx.get(family_server.url + "/metrics").text
    assert "bmr_request_path_compiles_total 0.0" in metrics
    # the counter does count compiles (positive control)
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready()
    assert CompileCounter.count() > before


def test_packed_batches_fill_rows_and_never_compute_more_than_padded(family_server):
    """A batch's texts are packed into the compiled (rows, length) shape that computes the fewest tokens: each text
    keeps its own tokens in one segment of one row, and no batch computes more tokens than one text per row."""
    b = family_server.state.models["gemma3"].backend  # lengths 16, 32; rows 1, 4
    assert b.pack
    seqs = [[5 + i] * 7 for i in range(8)]
    chunks = b._packed_chunks(seqs)
    assert [c[0] for c in chunks] == [(4, 16)]  # 2 a row; padded: 8 rows of 16, two batches of 4
    (_, ids, seg, (members, slots)), = chunks
    assert sorted(members.tolist()) == list(range(8))
    for j, i in enumerate(members):
        r, k = divmod(int(slots[j]), b.max_segments)
        assert ids[r][seg[r] == k + 1].tolist() == seqs[i]
    rng = np.random.default_rng(0)
    for _ in range(100):
        seqs = [[1] * int(n) for n in rng.integers(1, MAX_LENGTH + 1, size=rng.integers(1, 20))]
        packed = sum(r * T for (r, T), *_ in b._packed_chunks(seqs))
        T = b._fit(max(len(t) for t in seqs))
        assert packed <= sum(r for r, _ in b.plan(len(seqs), T)) * T


def test_packed_batches_keep_to_the_token_budget(family_server):
    """A packed batch holds at most the largest compiled shape's tokens, so long texts never queue a batch of
    several chunks that every text in it waits for; the texts left over stay queued, in order."""
    import collections

    from bmretriever_jax.serve.batcher import Batcher, Job

    b = family_server.state.models["gemma3"].backend
    budget = b.token_budget()
    assert budget == max(r * T for r, T in b.shapes()) == 4 * MAX_LENGTH

    class Waiting:
        def done(self):
            return False

    q = collections.deque(Job([1] * 30, str(i), Waiting(), None) for i in range(20))
    chosen = Batcher({"m": b})._form(q, b, b.bucket(30), b.max_rows(b.bucket(30)))
    assert len(chosen) == budget // 30 and sum(len(j.ids) for j in chosen) <= budget
    assert [j.text for j in q] == [str(i) for i in range(len(chosen), 20)]


def test_unpacked_backend_gives_the_same_vectors(tmp_path):
    """`bmr serve --no-pack`: one text per row, padded to its length bucket; the same vectors as packed rows."""
    from bmretriever_jax.serve.batcher import Job

    spec = f"m={tiny_model_dir(str(tmp_path / 'm'), 'llama', seed=3)}"
    padded, packed = (load_models([spec], max_length=MAX_LENGTH, dtype="float32", batch_sizes=[1, 4],
                                  seq_buckets=[16], pack=p)[0].backend for p in (False, True))
    assert not padded.pack and packed.pack
    texts = DOCS + QUERIES
    out = []
    for b in (padded, packed):
        b.warmup()
        jobs = [Job(ids, t, None, None) for ids, t in zip(b.tokenize(texts), texts)]
        prepared = b.prepare(jobs)
        out.append(b.finish(b.launch(prepared), len(jobs)))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)
    ref = padded.encoder.encode_texts(texts)
    cos = (out[0] * ref).sum(-1) / np.linalg.norm(out[0], axis=-1) / np.linalg.norm(ref, axis=-1)
    assert 1 - cos.min() <= 1e-6


@pytest.mark.parametrize("fam", FAMILIES)
def test_served_vectors_equal_encoder(family_server, fam):
    """OpenAI (base64 default and float) and TEI answers == Encoder.encode_queries / encode_passages (fp32)."""
    state = family_server.state
    m = state.models[fam]
    enc = m.backend.encoder
    ref_q = enc.encode_queries(QUERIES, instruction=m.instruction)
    ref_d = enc.encode_passages(DOCS)
    ref_s = enc.encode_queries(QUERIES, instruction="scifact")
    client = family_server.client()

    def cos_dist(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return 1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    r = client.embeddings.create(input=QUERIES, model=fam, extra_body={"input_type": "query"})  # base64 on the wire
    assert [d.index for d in r.data] == [0, 1, 2]
    got_q = np.array([d.embedding for d in r.data])
    assert cos_dist(got_q, ref_q).max() <= 1e-6
    np.testing.assert_allclose(np.linalg.norm(got_q, axis=1), 1, atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(s) for s in enc.tokenizer([f"{m.instruction}\nQuery: {q}" for q in QUERIES])
                                        ["input_ids"]) + len(QUERIES)  # + the EOS of each
    r = client.embeddings.create(input=DOCS, model=fam, encoding_format="float")
    assert cos_dist([d.embedding for d in r.data], ref_d).max() <= 1e-6
    r = client.embeddings.create(input=QUERIES, model=fam, extra_body={"input_type": "query", "instruction": "scifact"})
    assert cos_dist([d.embedding for d in r.data], ref_s).max() <= 1e-6
    # TEI
    tei = httpx.post(family_server.url + "/embed", json={"inputs": QUERIES, "model": fam, "prompt_name": "query"})
    assert tei.status_code == 200 and cos_dist(tei.json(), ref_q).max() <= 1e-6
    tei = httpx.post(family_server.url + "/embed", json={"inputs": QUERIES, "model": fam, "prompt_name": "scifact"})
    assert cos_dist(tei.json(), ref_s).max() <= 1e-6
    tei = httpx.post(family_server.url + "/embed", json={"inputs": DOCS[0], "model": fam})
    assert np.asarray(tei.json()).shape == (1, enc.dim) and cos_dist(tei.json(), ref_d[:1]).max() <= 1e-6


def test_served_vectors_equal_bmr_encode(family_server, tmp_path):
    from bmretriever_jax.cli.main import main

    m = family_server.state.models["gemma3"]
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps({"_id": str(i), "text": q}) + "\n" for i, q in enumerate(QUERIES)))
    assert main(["-q", "encode", "--model", m.source.split("=")[-1], "--input", str(inp), "--out", str(tmp_path / "v"),
                 "--kind", "query", "--instruction", m.instruction, "--max-length", str(MAX_LENGTH),
                 "--dtype", "float32"]) == 0
    ref = np.load(tmp_path / "v" / "vectors.npy")
    r = family_server.client().embeddings.create(input=QUERIES, model="gemma3", extra_body={"input_type": "query"})
    got = np.array([d.embedding for d in r.data])
    assert (1 - (got * ref).sum(1)).max() <= 1e-6


def test_dimensions_normalize_and_truncation(family_server):
    url, client = family_server.url, family_server.client()
    full = np.array(client.embeddings.create(input=DOCS, model="llama", encoding_format="float").data[0].embedding)
    short = np.array(client.embeddings.create(input=DOCS, model="llama", dimensions=16,
                                              encoding_format="float").data[0].embedding)
    assert short.shape == (16,)
    np.testing.assert_allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-6)
    b64 = httpx.post(url + "/v1/embeddings", json={"input": DOCS, "model": "llama", "encoding_format": "base64"}).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), full, atol=1e-7)
    raw = np.array(httpx.post(url + "/embed", json={"inputs": DOCS[0], "model": "llama", "normalize": False}).json()[0])
    assert abs(np.linalg.norm(raw) - 1) > 1e-3  # pooled, not normalised
    np.testing.assert_allclose(raw / np.linalg.norm(raw), full, atol=1e-6)
    tei16 = httpx.post(url + "/embed", json={"inputs": DOCS[0], "model": "llama", "dimensions": 16}).json()[0]
    np.testing.assert_allclose(tei16, short, atol=1e-6)
    long_text = " ".join(["gene"] * 60)
    r = httpx.post(url + "/embed", json={"inputs": [long_text], "model": "llama", "truncate": False})
    assert r.status_code == 422 and "truncate" in r.json()["error"]
    assert httpx.post(url + "/embed", json={"inputs": [long_text], "model": "llama"}).status_code == 200
    r = httpx.post(url + "/embed", json={"inputs": "x", "model": "llama", "truncation_direction": "Left"})
    assert r.status_code == 422
    r = client.models.list()
    assert [m.id for m in r.data] == list(FAMILIES)


# ----------------------------------------------------------------------------------------------------
# A stub backend: deterministic vectors, a gate that holds the device thread, a text that fails its batch
# ----------------------------------------------------------------------------------------------------
class StubBackend:
    kind, normalized, normalize_default, dim, max_length = "stub", False, True, 8, 16
    seq_buckets = [16]
    rows = {16: [1, 4]}

    def __init__(self, warm_gate=None):
        self.gate = threading.Event()
        self.gate.set()
        self.warm_gate = warm_gate
        self.ran, self.started = [], threading.Event()
        self.encoder = None

    def shapes(self):
        return [(1, 16), (4, 16)]

    def warmup(self, progress=None):
        if self.warm_gate is not None:
            self.warm_gate.wait(30)

    def tokenize(self, texts):
        return [[2] + [3] * min(len(t.split()), 14) + [1] for t in texts]

    def untruncated_lengths(self, texts):
        return [len(t.split()) + 2 for t in texts]

    def bucket(self, n):
        return 16

    def max_rows(self, T):
        return 4

    def prepare(self, jobs):
        return list(jobs), 16 * len(jobs)

    def launch(self, prepared):
        jobs = prepared[0]
        self.started.set()
        assert self.gate.wait(30)
        if any("boom" in j.text for j in jobs):
            raise RuntimeError("the device caught fire\nsecond line")
        self.ran.extend(j.text for j in jobs)
        return np.array([[len(j.text), 1, 2, 3, 4, 5, 6, 7] for j in jobs], np.float32)

    def finish(self, handle, n):
        return handle[:n]


def stub_state(**settings):
    backend = StubBackend(settings.pop("warm_gate", None))
    model = ServedModel("stub", backend, "Given a claim, retrieve", {"scifact": "scifact instruction"})
    return ServerState([model], ServeSettings(**settings)), backend


def post_in_thread(url, body, out, headers=None):
    def go():
        try:
            out.append(httpx.post(url, json=body, timeout=60, headers=headers))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_bad_input_answers_and_one_line_logs(caplog):
    state, _ = stub_state(max_inputs=4, max_input_chars=50, max_body_bytes=2000)
    caplog.set_level(logging.WARNING, logger="bmr.serve")
    with ThreadServer(state) as srv:
        u = srv.url + "/v1/embeddings"
        cases = [
            (httpx.post(u, content=b"{not json"), 400),
            (httpx.post(u, content=b"[1, 2]"), 422),
            (httpx.post(u, json={"model": "stub"}), 422),                       # no input
            (httpx.post(u, json={"input": {"a": 1}}), 422),
            (httpx.post(u, json={"input": ["ok", 3.5]}), 422),
            (httpx.post(u, json={"input": "x", "dimensions": "many"}), 422),
            (httpx.post(u, json={"input": []}), 400),
            (httpx.post(u, json={"input": ["ok", ""]}), 400),
            (httpx.post(u, json={"input": [[1, 2, 3]]}), 400),                  # token ids
            (httpx.post(u, json={"input": "x", "encoding_format": "int8"}), 400),
            (httpx.post(u, json={"input": "x", "dimensions": 9}), 400),
            (httpx.post(u, json={"input": "x", "dimensions": 0}), 400),
            (httpx.post(u, json={"input": "x", "input_type": "question"}), 400),
            (httpx.post(u, json={"input": "x", "input_type": "document", "instruction": "scifact"}), 400),
            (httpx.post(u, json={"input": ["a"] * 5}), 413),
            (httpx.post(u, json={"input": "a" * 51}), 413),
            (httpx.post(u, json={"input": ["aaaa"] * 4, "pad": "x" * 3000}), 413),  # body too large
            (httpx.post(u, json={"input": "x", "model": "nope"}), 404),
            (httpx.post(srv.url + "/embed", json={"inputs": "x", "prompt_name": "nope"}), 422),
            (httpx.post(srv.url + "/embed", content=b"{"), 400),
            (httpx.post(srv.url + "/embed", json={"inputs": ["a"] * 5}), 413),
        ]
        for i, (r, status) in enumerate(cases):
            assert r.status_code == status, (i, r.status_code, r.text)
            body = r.json()
            msg = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
            assert msg and "\n" not in msg, (i, msg)
        assert "check_embedding_ctx_length=False" in cases[8][0].json()["error"]["message"]
        assert cases[17][0].json()["error"]["code"] == "model_not_found"
        # the openai client maps them to its exceptions
        c = srv.client()
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(input="x", model="stub", encoding_format="int8")
        with pytest.raises(openai.NotFoundError):
            c.embeddings.create(input="x", model="nope")
        with pytest.raises(openai.APIStatusError) as e:
            c.embeddings.create(input=["a"] * 5, model="stub")
        assert e.value.status_code == 413
        # still serving
        assert httpx.get(srv.url + "/health").status_code == 200
        assert len(c.embeddings.create(input=["fine", "also fine"], model="stub").data) == 2
    errors = [r for r in caplog.records if r.name == "bmr.serve" and r.levelno >= logging.WARNING]
    assert len(errors) >= len(cases) + 3
    assert all("\n" not in r.getMessage() for r in errors)


def test_full_queue_429_then_recovers():
    state, backend = stub_state(max_queue=3)
    with ThreadServer(state) as srv:
        u = srv.url + "/v1/embeddings"
        backend.gate.clear()
        out = []
        threads = [post_in_thread(u, {"input": "first"}, out)]
        assert backend.started.wait(10)  # the device thread holds "first"
        threads += [post_in_thread(u, {"input": ["a", "b", "c"]}, out)]
        t = time.time()
        while state.batcher.queued < 3:
            assert time.time() - t < 10
            time.sleep(0.01)
        r = httpx.post(u, json={"input": "one too many"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            srv.client().embeddings.create(input="again", model="stub")
        assert httpx.post(srv.url + "/embed", json={"inputs": "tei too"}).status_code == 429
        backend.gate.set()
        for th in threads:
            th.join(30)
        assert sorted(r.status_code for r in out) == [200, 200]
        assert httpx.post(u, json={"input": "after"}).status_code == 200
        assert 'bmr_request_failure_total{err="overloaded"} 3.0' in httpx.get(srv.url + "/metrics").text


def test_503_while_warming_up():
    gate = threading.Event()
    state, _ = stub_state(warm_gate=gate)
    with ThreadServer(state, ready=False) as srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading" and "retry-after" in h.headers
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        gate.set()
        t = time.time()
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.time() - t < 10
            time.sleep(0.05)
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}).status_code == 200


def test_disconnected_client_frees_its_work():
    state, backend = stub_state()
    with ThreadServer(state) as srv:
        backend.gate.clear()
        out = []
        first = post_in_thread(srv.url + "/v1/embeddings", {"input": "holds the device"}, out)
        assert backend.started.wait(10)
        body = json.dumps({"input": ["gone one", "gone two"]}).encode()
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        t = time.time()
        while state.batcher.queued < 2:
            assert time.time() - t < 10
            time.sleep(0.01)
        s.close()
        t = time.time()
        while 'err="dropped"} 1.0' not in httpx.get(srv.url + "/metrics").text:
            assert time.time() - t < 10, "the handler did not notice the disconnect"
            time.sleep(0.05)
        backend.gate.set()
        first.join(30)
        assert out[0].status_code == 200
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": "next"}).status_code == 200
        assert "gone one" not in " ".join(backend.ran) and "gone two" not in " ".join(backend.ran)
        assert state.batcher.dropped == 2


def test_deadline_503_drops_work_and_failed_batch_is_500():
    state, backend = stub_state(request_timeout=0.5)
    with ThreadServer(state) as srv:
        backend.gate.clear()
        out = []
        first = post_in_thread(srv.url + "/v1/embeddings", {"input": "slow"}, out)
        assert backend.started.wait(10)
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "late"})
        assert r.status_code == 503 and "retry-after" in r.headers and r.json()["error"]["code"] == "timeout"
        backend.gate.set()
        first.join(30)
        assert "late" not in " ".join(backend.ran)
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "boom"})
        assert r.status_code == 500 and "\n" not in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": "fine"}).status_code == 200


def test_api_key():
    state, _ = stub_state(api_key="sekret")
    with ThreadServer(state) as srv:
        u = srv.url + "/v1/embeddings"
        assert httpx.post(u, json={"input": "x"}).status_code == 401
        r = httpx.post(u, json={"input": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.post(srv.url + "/embed", json={"inputs": "x"}).status_code == 401
        assert httpx.post(u, json={"input": "x"}, headers={"Authorization": "Bearer sekret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").embeddings.create(input="x", model="stub")
        assert len(srv.client(api_key="sekret").embeddings.create(input="x", model="stub").data) == 1
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key


def test_metrics_exposition():
    state, _ = stub_state()
    with ThreadServer(state) as srv:
        for n in (1, 3, 4):
            httpx.post(srv.url + "/v1/embeddings", json={"input": ["t"] * n})
        text = httpx.get(srv.url + "/metrics").text
        for name in ("bmr_request_count_total", "bmr_request_success_total", "bmr_batch_next_size_bucket",
                     "bmr_queue_size", "bmr_request_duration_bucket", "bmr_request_queue_duration_bucket",
                     "bmr_batch_inference_duration_bucket", "bmr_embed_count_total", "bmr_ready 1.0"):
            assert name in text, name
        info = httpx.get(srv.url + "/info").json()
        assert info["models"][0]["id"] == "stub" and info["batches"] >= 3


def test_cli_errors_are_one_line(capsys):
    from bmretriever_jax.cli.main import main

    assert main(["serve", "/no/such/model"]) == 2
    assert main(["serve", "x", "--batch-sizes", "0,4"]) == 2
    err = capsys.readouterr().err
    assert err.count("bmr serve: error:") == 2


# ----------------------------------------------------------------------------------------------------
# SIGTERM: a real `bmr serve` process
# ----------------------------------------------------------------------------------------------------
def test_sigterm_finishes_in_flight_and_exits_0(tmp_path):
    model = tiny_model_dir(str(tmp_path / "m"), "gpt_neox")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "bmretriever_jax.cli", "serve", model, "--port", str(port),
                             "--max-length", "16", "--seq-buckets", "16", "--batch-sizes", "1,8", "--dtype", "float32",
                             "--max-wait-ms", "1500"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() - t < 300
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        out = []
        th = post_in_thread(url + "/v1/embeddings", {"input": ["in flight", "when the signal comes"]}, out)
        time.sleep(0.5)  # queued: the batcher waits up to 1.5 s for more texts
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections
            httpx.post(url + "/v1/embeddings", json={"input": "too late"}, timeout=5)
        th.join(60)
        assert proc.wait(60) == 0
        assert out and not isinstance(out[0], Exception), out
        assert out[0].status_code == 200 and len(out[0].json()["data"]) == 2
        log = proc.stdout.read().decode()
        assert "finishing the requests in flight" in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------------------------------
# docs/serving.md: its curl lines and its openai snippet run against a live server
# ----------------------------------------------------------------------------------------------------
def _doc_snippets(name=os.path.join("docs", "serving.md")):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
    blocks, lang, body = [], None, []
    for line in open(path, encoding="utf-8").read().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    curls = [c.strip() for lang, code in blocks for c in code.replace("\\\n", " ").splitlines()
             if c.strip().startswith("curl ")]
    pys = [code for lang, code in blocks if lang == "py"]
    return curls, pys


def test_docs_examples_run_against_a_server(tmp_path):
    curls, pys = _doc_snippets()
    assert len(curls) == 2 and len(pys) == 1
    backend = StubBackend()
    state = ServerState([ServedModel("merged", backend, "Given a claim, retrieve", {})], ServeSettings())
    with ThreadServer(state) as srv:
        for cmd in curls:
            r = subprocess.run(cmd.replace("http://127.0.0.1:8000", srv.url), shell=True, capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            vecs = [d["embedding"] for d in out["data"]] if isinstance(out, dict) else out
            assert len(vecs) == 1 and len(vecs[0]) == backend.dim, r.stdout
        script = tmp_path / "snippet.py"
        script.write_text(pys[0].replace("http://127.0.0.1:8000", srv.url))
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert len(np.array(r.stdout.strip().strip("[]").split(), dtype=float)) == 2
    assert any(t.startswith("Given a claim, retrieve\nQuery: Vitamin D") for t in backend.ran)  # input_type=query
    assert any(t.startswith("Represent this passage\npassage: Vitamin D") for t in backend.ran)


def test_readme_serving_examples_run_against_a_server(tmp_path):
    curls, pys = _doc_snippets("README.md")
    assert len(curls) == 1 and len(pys) == 1
    backend = StubBackend()
    state = ServerState([ServedModel("merged", backend, "Given a claim, retrieve", {})], ServeSettings())
    with ThreadServer(state) as srv:
        r = subprocess.run(curls[0].replace("http://127.0.0.1:8000", srv.url), shell=True, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["data"][0]["embedding"]) == backend.dim
        script = tmp_path / "snippet.py"
        script.write_text(pys[0].replace("http://127.0.0.1:8000", srv.url))
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.strip()) == backend.dim
    assert any(t.startswith("Given a claim, retrieve\nQuery: Vitamin D") for t in backend.ran)
