"""The training loop on a tiny model: learning, LoRA-only optimizer state, exact resume after SIGKILL,
NaN handling and config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.util import treeutil
from bmretriever_jax.config import ConfigError, load_config
from bmretriever_jax.data.pairs import write_pairs
from bmretriever_jax.training import NonFiniteLoss, train
from hf_tiny import tiny_beir, tiny_model_dir, tiny_pairs

HERE = os.path.dirname(__file__)


def _setup(tmp_path, n_pairs=64):
    model = tiny_model_dir(str(tmp_path / "model"))
    pairs = str(tmp_path / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(n_pairs))
    return model, pairs


def _run_cfg(tmp_path, model, pairs, *extra):
    overrides = [f"model.name={model}", f"data.train=[{pairs}]", f"out={tmp_path / 'run'}", "model.max_length=16",
                 "model.query_max_length=8", "train.global_batch_size=8", "train.log_every=1", "train.warmup_steps=2",
                 "train.lr=3e-3", "mesh.data=1", *extra]
    return load_config(None, overrides)


def test_learns_and_only_adapters_are_trained(tmp_path):
    model, pairs = _setup(tmp_path)
    train(_run_cfg(tmp_path, model, pairs, "train.steps=40", "train.save_every=40", "train.lr=1e-3",
                   "train.temperature=0.05"), quiet=True)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-8:]])
    # 8 queries x 16 passages: chance is ln(16) = 2.77; the model must beat it, not just shrink the logits
    assert last < 0.6 * first and last < np.log(16) - 0.15, (first, last)
    # the checkpoint (and so the optimizer state) holds adapters only
    _, state, _ = ckpt.restore_params_only(str(tmp_path / "run" / "checkpoints"))
    paths = treeutil.flatten(state["trainable"])
    assert paths and all(p.split("/")[-1] in ("lora_a", "lora_b") for p in paths)
    opt_leaves = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    opt_paths = [jax.tree_util.keystr(p) for p, _ in opt_leaves]
    assert any("lora_a" in p for p in opt_paths)
    assert not [p for p in opt_paths if "embed" in p or "kernel" in p or "scale" in p]
    # the exported model loads and encodes
    from bmretriever_jax.embed import Encoder

    enc = Encoder.load(str(tmp_path / "run" / "model"), dtype="float32")
    v = enc.encode_queries(["gene protein query"], "scifact")
    assert v.shape == (1, 64) and np.isfinite(v).all()


def _final_trainable(run_dir):
    _, state, _ = ckpt.restore_params_only(os.path.join(run_dir, "checkpoints"))
    return treeutil.flatten(state["trainable"])


def test_resume_after_sigkill_is_exact(tmp_path):
    model, pairs = _setup(tmp_path)
    common = ["train.steps=12", "train.save_every=2", "model.dtype=float32", "lora.dropout=0.1"]
    # uninterrupted reference
    ref_dir = tmp_path / "ref"
    train(_run_cfg(tmp_path, model, pairs, *common, f"out={ref_dir}"), quiet=True)
    # killed run: a subprocess, SIGKILLed once a checkpoint past step 4 exists
    run_dir = tmp_path / "killed"
    args = [f"model.name={model}", f"data.train=[{pairs}]", f"out={run_dir}", "model.max_length=16",
            "model.query_max_length=8", "train.global_batch_size=8", "train.log_every=1", "train.warmup_steps=2",
            "train.lr=3e-3", "mesh.data=1", *common]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    proc = subprocess.Popen([sys.executable, "-m", "bmretriever_jax.cli", "-q", "train", "/dev/null", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [int(d) for d in os.listdir(ck) if d.isdigit()] if ck.exists() else []
        if steps and max(steps) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(d) for d in os.listdir(ck) if d.isdigit())
    assert killed_at < 12
    train(_run_cfg(tmp_path, model, pairs, *common, f"out={run_dir}"), quiet=True)
    a, b = _final_trainable(ref_dir), _final_trainable(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, pairs = _setup(tmp_path)
    cfg = _run_cfg(tmp_path, model, pairs, "train.steps=4", "train.save_every=1", "train.lr=1e30", "train.clip=0",
                   "train.warmup_steps=0")
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        train(cfg, quiet=True)
    step, state, _ = ckpt.restore_params_only(str(tmp_path / "run" / "checkpoints"))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state["trainable"]))


def test_config_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: x\ntrain:\n  steps: 3\n  stepz: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: train.stepz: unknown key; allowed: .*steps"):
        load_config(str(p))
    p.write_text("train:\n  schedule: wavy\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: train.schedule: 'wavy' is not one of linear, cosine, constant"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.steps=many"])


def test_lora_regex_matching_nothing(tmp_path):
    model, pairs = _setup(tmp_path, 16)
    cfg = _run_cfg(tmp_path, model, pairs, "train.steps=1", "lora.targets=[layers/nothing/here]")
    with pytest.raises(ValueError, match="layers/nothing/here"):
        train(cfg, quiet=True)


def test_batch_not_divisible_by_the_mesh_is_one_line_before_the_model_loads(tmp_path):
    """8 fake devices, mesh.data=-1 -> 8 batch shards: a global batch of 4 cannot be split (jax would raise an
    IndivisibleError deep in the first step, after the model loaded)."""
    _, pairs = _setup(tmp_path, 16)
    cfg = _run_cfg(tmp_path, "no-such-model", pairs, "train.steps=1", "mesh.data=-1", "train.global_batch_size=4")
    with pytest.raises(ConfigError, match=r"train.global_batch_size 4: the mesh \(data 8 x fsdp 1 on 8 devices\) "
                                          r"splits a batch 8 ways; allowed: a multiple of 8"):
        train(cfg, quiet=True)


def test_malformed_pairs_file(tmp_path):
    model, _ = _setup(tmp_path, 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": ""}\n')
    cfg = _run_cfg(tmp_path, model, str(bad), "train.steps=1")
    with pytest.raises(ValueError, match=r"bad.jsonl:2:.*positive"):
        train(cfg, quiet=True)


@pytest.mark.parametrize("mesh", [("mesh.data=1", "mesh.fsdp=1"), ("mesh.data=2", "mesh.fsdp=4")],
                         ids=["1-device", "data2-fsdp4"])
def test_dev_metrics_before_during_and_after_training(tmp_path, mesh):
    """data.dev + train.eval_every: the untrained model is scored at step 0 (the baseline), then every
    eval_every steps and at the end; the final numbers come back from train(). Encoded on the training mesh
    (training/deveval.py), they equal the host Encoder's on the same weights (untrained; exported)."""
    model, pairs = _setup(tmp_path)
    dev = tiny_beir(str(tmp_path / "beir"))
    res = train(_run_cfg(tmp_path, model, pairs, "train.steps=4", "train.save_every=4", "train.eval_every=2",
                         f"data.dev={dev}", "data.dev_split=dev", "model.dtype=float32", *mesh), quiet=True)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    dev_rows = [r for r in rows if "dev_ndcg@10" in r]
    assert [r["step"] for r in dev_rows] == [0, 2, 4]
    assert all(0.0 <= r["dev_ndcg@10"] <= 1.0 for r in dev_rows)
    assert res["dev_ndcg@10"] == dev_rows[-1]["dev_ndcg@10"]
    # step 0 is the untrained backbone: the same number as evaluating it directly
    from bmretriever_jax.embed import Encoder, instruction_for
    from bmretriever_jax.eval.evaluate import evaluate_retrieval

    enc = Encoder.load(model, max_length=16, dtype="float32", quiet=True)
    base = evaluate_retrieval(enc, dev, "dev", instruction_for(None))["ndcg@10"]  # no data.dev_task, no task name
    assert dev_rows[0]["dev_ndcg@10"] == pytest.approx(base, abs=1e-6)
    trained = Encoder.load(str(tmp_path / "run" / "model"), max_length=16, dtype="float32", quiet=True)
    final = evaluate_retrieval(trained, dev, "dev", instruction_for(None))
    for k in ("ndcg@10", "recall@100"):
        assert res[f"dev_{k}"] == pytest.approx(final[k], abs=1e-6), k
