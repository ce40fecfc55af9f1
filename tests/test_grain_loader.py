"""The grain loader over a prepared folder (data/grain_loader.py) gives PairLoader's batches: the same items
batch for batch (negatives sampled, padded, dropped alike), 2 hosts = 1 host, a JSON state round trip and a
SIGKILLed process resume bit-identically, tokenized / packed batches from worker processes equal the in-process
ones, and a host's memory does not grow with the corpus."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import transformers

from bmretriever_jax.config import load_config
from bmretriever_jax.data.grain_loader import GrainPairLoader
from bmretriever_jax.data.loader import PairLoader
from bmretriever_jax.data.pairs import Pair
from bmretriever_jax.data.batches import _texts
from bmretriever_jax.data.pipeline import calibration_batches, pack_rows_from_lengths, training_loader
from bmretriever_jax.text import tokenize
from bmretriever_jax.data.prepared import Prepared, write_prepared
from bmretriever_jax.training.step import calibrate_packing, make_tokenize_fn
from hf_tiny import WORDS, save_tiny_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def _pairs(n=53, seed=0):
    """Pairs with 0..4 negatives, string and object documents, and queries with several positives."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = f"{WORDS[20 + i % 7]} query"  # repeats: queries with several positives
        doc = " ".join(rng.choice(WORDS, 6))
        pos = doc if i % 5 == 0 else {"title": WORDS[i % 20], "text": doc + f" d{i}", "id": f"d{i}"}
        negs = tuple(" ".join(rng.choice(WORDS, 5)) + f" n{i}{j}" for j in range(int(rng.integers(0, 5))))
        out.append(Pair(query=q, positive=pos, negatives=negs, task="scifact" if i % 2 else None,
                        instruction=None if i % 2 else "Find it"))
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pairs = _pairs()
    path = str(tmp_path_factory.mktemp("prep") / "p")
    write_prepared(path, pairs, sources=[], shard_rows=20)  # 3 shards
    return pairs, path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    save_tiny_tokenizer(d)
    return transformers.AutoTokenizer.from_pretrained(d)


def _items(loader, steps):
    return [next(loader) for _ in range(steps)]


@pytest.mark.parametrize("k,negatives,short", [(0, "random", "pad"), (3, "random", "pad"), (2, "first", "pad"),
                                               (2, "random", "drop")])
def test_same_batches_as_pairloader(prepared, k, negatives, short):
    pairs, path = prepared
    kw = dict(seed=3, num_negatives=k, negatives=negatives, short=short, drop_last=False)
    ref = PairLoader(pairs, 8, **kw)
    got = GrainPairLoader(path, 8, **kw)
    assert got.steps_per_epoch == ref.steps_per_epoch and got.dropped == ref.dropped
    steps = 2 * ref.steps_per_epoch + 1  # across epoch boundaries (the last batch of an epoch wraps)
    assert _items(got, steps) == _items(ref, steps)
    assert got.state() == ref.state()


def test_pure_function_of_seed_epoch_step(prepared):
    _, path = prepared
    a = _items(GrainPairLoader(path, 8, seed=1, num_negatives=2), 9)
    b = GrainPairLoader(path, 8, seed=1, num_negatives=2)
    assert a == _items(b, 9)
    assert b.batch_at(1, 2) == a[b.steps_per_epoch + 2]
    assert _items(GrainPairLoader(path, 8, seed=2, num_negatives=2), 2) != a[:2]


def test_two_hosts_equal_one_host(prepared):
    _, path = prepared
    kw = dict(seed=7, num_negatives=1, drop_last=False)
    one = _items(GrainPairLoader(path, 12, **kw), 7)
    hosts = [_items(GrainPairLoader(path, 12, process_index=p, process_count=2, **kw), 7) for p in range(2)]
    assert [a + b for a, b in zip(*hosts)] == one


def test_state_json_round_trip(prepared):
    _, path = prepared
    ref = _items(GrainPairLoader(path, 8, seed=0, num_negatives=3), 12)
    run = GrainPairLoader(path, 8, seed=0, num_negatives=3)
    _items(run, 5)
    saved = json.loads(json.dumps(run.state()))
    resumed = GrainPairLoader(path, 8, seed=0, num_negatives=3)
    resumed.restore(saved)
    assert _items(resumed, 7) == ref[5:]
    with pytest.raises(ValueError):
        resumed.restore({"epoch": 0, "step": 99})


def _tiny_run(path, packing, workers=0, k=1):
    return load_config(None, ["model.name=tiny", f"data.prepared={path}", f"data.packing={str(packing).lower()}", f"data.workers={workers}",
                              f"data.num_negatives={k}", "model.max_length=12", "model.query_max_length=8",
                              "train.global_batch_size=8", "data.pack_max_segments=4",
                              "data.pack_calibration_batches=3", "train.seed=4"])


@pytest.mark.parametrize("packing", [False, True])
def test_tokenized_batches_from_workers_equal_pairloader(prepared, tokenizer, packing):
    """training_loader (calibration on global batches, tokenize_fn in 2 grain workers) == PairLoader + the same
    tokenize_fn in this process; host 1 of 2 with 2 local shards (4 batch shards in all)."""
    pairs, path = prepared
    run = _tiny_run(path, packing, workers=2)
    loader = training_loader(run, tokenizer, process_index=1, process_count=2, n_shards=4)
    balance = 4 if packing else 0  # packed: global batches ordered for the 4 blocks (packing.balance_order)
    ref = PairLoader(pairs, 8, seed=4, num_negatives=1, drop_last=False, process_index=1, process_count=2,
                     balance_shards=balance)
    if packing:
        one_host = PairLoader(pairs, 8, seed=4, num_negatives=1, drop_last=False, balance_shards=balance)
        rows = calibrate_packing(tokenizer, run, calibration_batches(one_host, 3), 4)
        assert loader.pack_rows == rows
        ref.tokenize_fn = make_tokenize_fn(tokenizer, run, pack_rows=rows, n_local_shards=2)
    else:
        ref.tokenize_fn = make_tokenize_fn(tokenizer, run)
    try:
        for _ in range(2 * ref.steps_per_epoch):
            got, want = next(loader), next(ref)
            assert sorted(got) == sorted(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
            if packing:
                assert "seg" in got and "q_slot" in got
    finally:
        loader.close()


@pytest.mark.parametrize("padded", [False, True], ids=["own-negatives", "some-padded-with-other-positives"])
def test_pack_rows_from_prepared_lengths(prepared, tokenizer, tmp_path, padded):
    """Calibrating from the stored token lengths (no tokenizing) picks calibrate_packing's rows, and a tokenized
    folder's balanced order (weights from those lengths, negatives as chosen) matches the tokenized texts."""
    pairs, _ = prepared
    full = pairs if padded else [p for p in pairs if len(p.negatives) >= 2]
    assert padded == any(len(p.negatives) < 2 for p in full)
    path = str(tmp_path / "tok")
    write_prepared(path, full, sources=[], tokenizer=tokenizer, tokenizer_name="tiny", max_length=12,
                   query_max_length=8)
    for negatives in ("random", "first"):
        run = load_config(None, ["model.name=tiny", f"data.prepared={path}", "data.packing=true", "data.num_negatives=2",
                                 f"data.negatives={negatives}", "model.max_length=12", "model.query_max_length=8",
                                 "train.global_batch_size=8", "data.pack_max_segments=3"])
        loader = GrainPairLoader(path, 8, seed=0, num_negatives=2, negatives=negatives, drop_last=False,
                                 balance_shards=2)
        rows = pack_rows_from_lengths(Prepared(path), loader, run, 2, 5)
        assert rows == calibrate_packing(tokenizer, run, calibration_batches(loader, 5), 2)
        hb = loader._host_batch(False, 0, 1)
        for step in range(3):  # the stored lengths are the tokenized items' lengths
            idx = hb.global_indices(0, step)
            q, p = _texts(hb.items_at(0, idx))
            want = [len(t) for t in tokenize(tokenizer, q, 8)], [len(t) for t in tokenize(tokenizer, p, 12)]
            got = hb.token_lengths(idx, 0)
            assert ([x for x, _ in got], [y for _, ys in got for y in ys]) == want


KILL_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import psutil
    from bmretriever_jax.data.grain_loader import GrainPairLoader

    if __name__ == "__main__":  # grain's workers start with spawn and import this file
        path, log, state = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        loader = GrainPairLoader(path, 8, seed=5, num_negatives=2, worker_count=2, prefetch=2)
        loader.restore(state)
        with open(log, "a") as f:
            while True:
                batch = next(loader)
                kids = [p.pid for p in psutil.Process().children(recursive=True)]
                digest = hashlib.sha256(json.dumps(batch, sort_keys=True).encode()).hexdigest()
                f.write(json.dumps({"state": loader.state(), "digest": digest, "kids": kids}) + "\\n")
                f.flush()
""")


def _digest(batch) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(batch, sort_keys=True).encode()).hexdigest()


def test_sigkill_resume_bit_identical(prepared, tmp_path):
    """A process iterating with 2 grain workers is SIGKILLed; its workers exit, and a new loader restored from
    the last state it recorded (what a checkpoint holds) yields exactly the batches the dead one would have."""
    import psutil

    _, path = prepared
    log = str(tmp_path / "log.jsonl")
    script = str(tmp_path / "run.py")
    with open(script, "w") as f:
        f.write(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    proc = subprocess.Popen([sys.executable, script, path, log, json.dumps({"epoch": 1, "step": 2})], env=env)
    deadline = time.time() + 240
    lines = []
    while time.time() < deadline and len(lines) < 4 and proc.poll() is None:
        time.sleep(0.5)
        lines = open(log).read().splitlines() if os.path.exists(log) else []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(lines) >= 4, "the child produced no batches"
    recs = [json.loads(line) for line in open(log).read().splitlines() if line.endswith("}")]
    kids = recs[-1]["kids"]
    assert len(kids) >= 2
    end = time.time() + 20
    while time.time() < end and any(psutil.pid_exists(k) and psutil.Process(k).status() != "zombie" for k in kids):
        time.sleep(0.5)
    assert not any(psutil.pid_exists(k) and psutil.Process(k).status() != "zombie" for k in kids), \
        "grain workers outlived the SIGKILLed process"
    # the reference: one uninterrupted in-process loader
    ref = GrainPairLoader(path, 8, seed=5, num_negatives=2)
    ref.restore({"epoch": 1, "step": 2})
    digests = [_digest(next(ref)) for _ in range(len(recs) + 3)]
    assert [r["digest"] for r in recs] == digests[:len(recs)]
    resumed = GrainPairLoader(path, 8, seed=5, num_negatives=2)
    resumed.restore(recs[1]["state"])
    assert [_digest(next(resumed)) for _ in range(len(recs) + 1)] == digests[2:len(recs) + 3]


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import psutil

    def anon():  # resident anonymous memory: what the process holds itself, not file pages mapped from the cache
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    from bmretriever_jax.data.grain_loader import GrainPairLoader
    proc = psutil.Process()
    base, base_anon = proc.memory_info().rss, anon()
    loader = GrainPairLoader(sys.argv[1], 64, seed=0, num_negatives=0)
    for _ in range(20):
        next(loader)
    full = proc.memory_full_info()
    print(json.dumps({"rss": full.rss - base, "uss": full.uss, "anon": anon() - base_anon}))
""")


def _synthetic(n):
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(97)]
    for i in range(n):
        yield Pair(query=f"title {i} " + WORDS[i % len(WORDS)], positive={"title": "", "text": texts[i % 97] + f" {i}"},
                   instruction="Given a title, retrieve its abstract")


def test_rss_does_not_grow_with_the_corpus(tmp_path):
    """Iterating a 10x larger prepared corpus costs (almost) no more memory: 20k vs 200k pairs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    script = str(tmp_path / "rss.py")
    with open(script, "w") as f:
        f.write(RSS_SCRIPT)
    got = {}
    for n in (20_000, 200_000):
        path = str(tmp_path / f"p{n}")
        write_prepared(path, _synthetic(n), sources=[], shard_rows=50_000)
        out = subprocess.run([sys.executable, script, path], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        got[n] = json.loads(out.stdout.strip().splitlines()[-1])
    # 200k pairs are ~60 MB of Arrow; the epoch's permutation (8 bytes a pair) is the only per-pair memory. The
    # Arrow shards are memory-mapped: their pages, read from the page cache, count in RSS (and USS) as the kernel
    # maps them in around each read (fault-around, readahead), an amount that varies from run to run and that the
    # kernel can drop at any time. Anonymous memory is what loading the corpus would grow.
    assert got[200_000]["anon"] - got[20_000]["anon"] < 25e6, got
