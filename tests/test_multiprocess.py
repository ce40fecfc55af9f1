"""Two local processes with jax.distributed (CPU collectives) train to the same parameters as one process
with 2 fake devices, score the dev split on both processes' devices with the same numbers, and their
checkpoint restores in a single process."""
import json
import os
import subprocess
import sys

import numpy as np

from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.util import treeutil
from bmretriever_jax.data.pairs import write_pairs
from hf_tiny import tiny_beir, tiny_model_dir, tiny_pairs
from procs import child_env, free_port




def _args(model, pairs, out, steps=4, dev=None):
    return ["-q", "train", "/dev/null", f"model.name={model}", f"data.train=[{pairs}]", f"out={out}",
            "model.max_length=16", "model.query_max_length=8", "model.dtype=float32", "train.global_batch_size=8",
            f"train.steps={steps}", "train.save_every=2", "train.log_every=1", "train.lr=1e-3", "mesh.data=2"] + \
        ([f"data.dev={dev}", "data.dev_split=dev", "train.eval_every=2"] if dev else [])



def test_two_processes_equal_one(tmp_path):
    model = tiny_model_dir(str(tmp_path / "model"), family="llama")
    pairs = str(tmp_path / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(32))
    dev = tiny_beir(str(tmp_path / "beir"))
    cmd = [sys.executable, "-m", "bmretriever_jax.cli"]
    # one process, 2 fake devices
    r = subprocess.run(cmd + _args(model, pairs, tmp_path / "one", dev=dev), env=child_env(2), capture_output=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    # two processes, 1 device each
    port = free_port()
    procs = [subprocess.Popen(cmd + _args(model, pairs, tmp_path / "two", dev=dev), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=child_env(1, BMR_COORDINATOR=f"127.0.0.1:{port}", BMR_NUM_PROCESSES="2",
                                       BMR_PROCESS_ID=str(i)))
             for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    # the 2-process checkpoint restores in this (single) process
    _, a, meta = ckpt.restore_params_only(str(tmp_path / "one" / "checkpoints"))
    _, b, _ = ckpt.restore_params_only(str(tmp_path / "two" / "checkpoints"))
    fa, fb = treeutil.flatten(a["trainable"]), treeutil.flatten(b["trainable"])
    assert fa.keys() == fb.keys() and meta["config"]["mesh"]["data"] == 2
    for k in fa:
        np.testing.assert_allclose(np.asarray(fb[k]), np.asarray(fa[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    # only host 0 wrote the exported model and the metrics log: 4 steps + dev at steps 0, 2, 4
    assert os.path.exists(tmp_path / "two" / "model" / "model.safetensors")
    rows = {n: [json.loads(x) for x in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two")}
    assert len(rows["two"]) == 7
    dev_rows = {n: [r for r in rs if "dev_ndcg@10" in r] for n, rs in rows.items()}
    assert [r["step"] for r in dev_rows["two"]] == [0, 2, 4]
    for a_row, b_row in zip(dev_rows["one"], dev_rows["two"]):  # both processes encoded their rows
        for k in ("dev_ndcg@10", "dev_recall@100"):
            assert abs(a_row[k] - b_row[k]) <= 1e-6, (k, a_row, b_row)


def _uneven_pairs(path):
    """Short pairs with every sixth passage long: under rows calibrated on a light first batch, some batches
    overflow on one host only."""
    pairs = tiny_pairs(32)
    for i, p in enumerate(pairs):
        if i % 6 == 5:
            p["positive"]["text"] += " " + " ".join(["alpha"] * 30)
    write_pairs(path, pairs)


def _fallbacks(stdout: str):
    """(batches in the fallback shape, packed batches trained) from `bmr train`'s line about them."""
    import re

    m = re.search(r"(\d+) of (\d+) packed batches took the fallback shape", stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


PACKED = ["model.max_length=32", "model.query_max_length=8", "data.packing=true", "data.pack_tail_sigmas=0",
          "data.pack_calibration_batches=1", "data.pack_max_segments=8", "data.pack_balance=false",
          "data.num_negatives=0", "train.seed=9"]


def test_packed_fallback_is_agreed_by_every_process(tmp_path):
    """When one host's texts overflow the packed rows and the other's do not, both send the fallback shape
    (training/loop.py PackedShapeAgreement, via jax.distributed's key-value store): 2 processes train to the
    parameters of 1 process with 2 devices, where one loader sees the whole batch."""
    import transformers

    from bmretriever_jax.config import load_config
    from bmretriever_jax.data import packing
    from bmretriever_jax.data.pipeline import training_loader
    from bmretriever_jax.training.loop import load_training_pairs

    model = tiny_model_dir(str(tmp_path / "model"), family="llama")
    pairs = str(tmp_path / "pairs.jsonl")
    _uneven_pairs(pairs)
    over = [f"model.name={model}", f"data.train=[{pairs}]", "train.global_batch_size=8", *PACKED]
    run = load_config(None, over)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    fell = []
    for p in range(2):  # the situation: the hosts' own decisions differ on some batch
        loader = training_loader(run, tok, load_training_pairs(run), process_index=p, process_count=2, n_shards=2)
        fell.append([packing.is_fallback(next(loader)) for _ in range(4)])
    assert fell[0] != fell[1] and any(fell[0]) and not all(fell[0]), fell
    args = _args(model, pairs, None) + PACKED  # PACKED's lengths override _args' (later wins)
    cmd = [sys.executable, "-m", "bmretriever_jax.cli"]
    one = [a if not a.startswith("out=") else f"out={tmp_path / 'one'}" for a in args]
    r = subprocess.run(cmd + one, env=child_env(2), capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    said = [_fallbacks(r.stdout.decode())]
    port = free_port()
    two = [a if not a.startswith("out=") else f"out={tmp_path / 'two'}" for a in args]
    procs = [subprocess.Popen(cmd + two, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=child_env(1, BMR_COORDINATOR=f"127.0.0.1:{port}", BMR_NUM_PROCESSES="2",
                                            BMR_PROCESS_ID=str(i))) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
        said.append(_fallbacks(out.decode()))
    # the 1-process run and both processes trained the same batches in the fallback shape
    assert said[0] == said[1] == said[2] and said[0][0] > 0, said
    _, a, _ = ckpt.restore_params_only(str(tmp_path / "one" / "checkpoints"))
    _, b, _ = ckpt.restore_params_only(str(tmp_path / "two" / "checkpoints"))
    fa, fb = treeutil.flatten(a["trainable"]), treeutil.flatten(b["trainable"])
    for k in fa:
        np.testing.assert_allclose(np.asarray(fb[k]), np.asarray(fa[k]), rtol=1e-5, atol=1e-7, err_msg=k)
