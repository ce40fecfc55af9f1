"""A checkpoint restores on another topology with the same global batch: 8 devices mesh (4,2,1) -> a 4-device
process with mesh (2,2,1); 2 processes -> 1. Orbax reshards the arrays into the new mesh, the data position is
global, and the continued losses equal the uninterrupted run's. Another global batch stays a config change."""
import json
import os
import shutil

import numpy as np
import pytest

from bmretriever_jax.config import ConfigError, load_config
from bmretriever_jax.data.pairs import write_pairs
from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.parallel import sharding
from bmretriever_jax.training import make_mesh, train
from bmretriever_jax.util import treeutil
from hf_tiny import tiny_model_dir, tiny_pairs
from procs import bmr_train, child_env, free_port

STEPS, FIRST = 10, 5  # (train.save_every=FIRST)
# a constant schedule: a first run of FIRST steps (train.steps=FIRST on the command line) is the first FIRST
# steps of a STEPS run
COMMON = ["model.max_length=16", "model.query_max_length=8", "model.dtype=float32", "train.global_batch_size=8",
          "train.save_every=5", "train.log_every=1", "train.warmup_steps=0", "train.schedule=constant",
          "train.lr=3e-3", "lora.dropout=0.1"]
# another mesh sums in another order: the same run within float32 rounding. 2 processes -> 1 keeps the mesh shape
# (measured <= 1e-6 absolute); (4,2,1) -> (2,2,1) splits the batch and the features another way: the restored
# arrays are bit-identical, the losses then drift by rounding (full fine-tuning, measured 6e-6 on a loss of 2.77
# at the 5th step after the restore: 2.2e-6 relative); the first step after the restore stays within 1e-6
LOSS_TOL = {"same mesh": dict(rel=0, abs=1e-6), "new mesh": dict(rel=1e-5, abs=0)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("topology")
    model = tiny_model_dir(str(root / "model"), family="llama")
    pairs = str(root / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(64))
    return model, pairs


def _overrides(setup, out, *extra):
    model, pairs = setup
    return [f"model.name={model}", f"data.train=[{pairs}]", f"out={out}", *COMMON, *extra]





def _bmr(args, env):  # not quiet: the tests read the resume message
    return bmr_train(args, env, quiet=False)


def _finish(procs):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err.decode()[-3000:]
        outs.append(out.decode())
    return outs


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _trainable(run_dir):
    _, state, meta = ckpt.restore_params_only(os.path.join(run_dir, "checkpoints"))
    return treeutil.flatten(state["trainable"]), meta


def _assert_continues_like(ref_dir, run_dir, tol):
    ref, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    # the first step after the restore: the restored state is exact, only this step's sums are ordered anew
    assert got[FIRST + 1] == pytest.approx(ref[FIRST + 1], rel=1e-6, abs=0), (got[FIRST + 1], ref[FIRST + 1])
    for s in range(FIRST + 1, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], **tol), (s, got[s], ref[s], {k: got[k] - ref[k] for k in got})
    a, _ = _trainable(ref_dir)
    b, meta = _trainable(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    return meta


def test_eight_devices_4x2_restore_on_four_devices_2x2(setup, tmp_path):
    # full fine-tuning: the checkpoint holds FSDP-split weights (LoRA adapters are replicated), so the restore
    # really moves shards between layouts
    mesh8 = ["mesh.data=4", "mesh.fsdp=2", "lora.enabled=false", "train.lr=1e-3"]
    ref = tmp_path / "ref"
    train(load_config(None, _overrides(setup, ref, f"train.steps={STEPS}", *mesh8)), quiet=True)
    run = tmp_path / "run"
    train(load_config(None, _overrides(setup, run, f"train.steps={STEPS}", *mesh8)), quiet=True,
          max_steps_this_run=FIRST)
    assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == [FIRST]
    # Orbax reads the (4,2,1) checkpoint into the (2,2,1) layout of 4 devices bit for bit
    _, plain, _ = ckpt.restore_params_only(str(run / "checkpoints"))
    mesh4 = make_mesh(load_config(None, _overrides(setup, run, *mesh8[2:], "mesh.data=2", "mesh.fsdp=2")))
    assert mesh4.devices.shape == (2, 2, 1)
    shardings = sharding.tree_shardings(plain, mesh4)
    with ckpt.manager(str(run / "checkpoints"), async_save=False) as m:
        step, state4, data, _ = ckpt.restore(m, ckpt.abstract_state(plain, shardings), step=FIRST)
    assert step == FIRST and data == {"epoch": 0, "step": FIRST}  # 64 pairs, batch 8: the 6th batch is next
    flat4, flat = treeutil.flatten(state4["trainable"]), treeutil.flatten(plain["trainable"])
    split = 0
    for k, v in flat4.items():
        assert v.sharding.mesh.devices.shape == (2, 2, 1) and len(v.sharding.device_set) == 4, k
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat[k]), err_msg=k)
        split += any(ax is not None for ax in v.sharding.spec)
    assert split, "no array is split over the new mesh: the test would not exercise resharding"
    # another global batch is a config change: refused (one line naming it) unless allowed
    other = tmp_path / "other"
    shutil.copytree(run, other)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: 8 -> 16.*--allow-config-change"):
        train(load_config(None, _overrides(setup, other, f"train.steps={STEPS}", *mesh8,
                                           "train.global_batch_size=16")), quiet=True)
    train(load_config(None, _overrides(setup, other, f"train.steps={STEPS}", *mesh8, "train.global_batch_size=16")),
          quiet=True, max_steps_this_run=1, allow_config_change=True)
    (rec,) = [json.loads(line) for line in open(other / "config_changes.jsonl")]
    assert rec["changes"] == ["train.global_batch_size: 8 -> 16"]
    # a process with 4 devices, mesh (2, 2, 1): the mesh change needs no flag
    (out,) = _finish([_bmr(_overrides(setup, run, f"train.steps={STEPS}", *mesh8[2:], "mesh.data=2", "mesh.fsdp=2"),
                           child_env(4))])
    assert (f"resumed from step {FIRST} ({run}/checkpoints) (written on 8 devices, mesh (4, 2, 1), 1 process; "
            "now 4 devices, mesh (2, 2, 1), 1 process)") in out
    meta = _assert_continues_like(ref, run, LOSS_TOL["new mesh"])
    assert meta["topology"] == {"processes": 1, "devices": 4, "mesh": [2, 2, 1]}


def test_two_processes_restore_in_one(setup, tmp_path):
    """Written by 2 processes x 1 device (mesh (2,1,1)), continued by 1 process on 2 devices (the same mesh shape,
    one process): the continued losses equal those of the run made in one process throughout."""
    ref = tmp_path / "ref"
    train(load_config(None, _overrides(setup, ref, f"train.steps={STEPS}", "mesh.data=2")), quiet=True)
    run = tmp_path / "run"
    port = free_port()
    _finish([_bmr(_overrides(setup, run, f"train.steps={FIRST}", "mesh.data=2"),
                  child_env(1, BMR_COORDINATOR=f"127.0.0.1:{port}", BMR_NUM_PROCESSES="2", BMR_PROCESS_ID=str(i)))
             for i in range(2)])
    _, meta = _trainable(run)
    assert meta["topology"] == {"processes": 2, "devices": 2, "mesh": [2, 1, 1]}
    # (conftest's 8 fake devices; mesh.data=2 takes the first 2: one process, 2 devices)
    train(load_config(None, _overrides(setup, run, f"train.steps={STEPS}", "mesh.data=2")), quiet=True)
    _assert_continues_like(ref, run, LOSS_TOL["same mesh"])
