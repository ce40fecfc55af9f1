"""Orbax checkpoints with named items (`state`: arrays, `data`: iterator position, `meta`: JSON), restored
into an abstract tree after a check that names every mismatching parameter path. The abstract tree carries the
restoring run's shardings (`abstract_state`), so a checkpoint written on one mesh / process count restores on
another: Orbax reshards the arrays while reading."""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bmretriever_jax.util import remote, treeutil
from bmretriever_jax.util.errors import ConfigError, UserError


class CheckpointMismatch(ConfigError):
    """The checkpoint holds another model (paths or shapes differ): a config problem, never a fallback."""


class NoUsableCheckpoint(UserError):
    """Every checkpoint of a run failed to restore."""


def manager(directory: str, *, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
    """Orbax's manager of a run's checkpoints: a local folder, or a URL Orbax writes itself (gs://, ...)."""
    return ocp.CheckpointManager(
        directory if remote.is_url(directory) else os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, data: Dict, meta: Dict) -> None:
    """Save `step` now (the loop decides when: force=True skips Orbax's own save policy, whose preemption check
    would also advance JAX's preemption step counter with checkpoint steps instead of the loop's ids)."""
    mngr.save(step, force=True, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data),
                                                        meta=ocp.args.JsonSave(meta)))


def abstract_state(state, shardings):
    """The restore target: each leaf's shape and dtype with the sharding it has in *this* run. Orbax reads into
    it whatever mesh or process count wrote the checkpoint (each process reads only its devices' slices)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _paths(tree) -> Dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {treeutil.path_str(p): leaf for p, leaf in flat}


def check_compatible(stored_tree, abstract) -> None:
    """Raise naming every path missing, unexpected or with a different shape."""
    stored = {k: tuple(v.shape) for k, v in _paths(stored_tree).items()}
    wanted = {k: tuple(v.shape) for k, v in _paths(abstract).items()}
    problems = [f"  {k}: missing in checkpoint" for k in sorted(set(wanted) - set(stored))]
    problems += [f"  {k}: in checkpoint but not expected" for k in sorted(set(stored) - set(wanted))]
    problems += [f"  {k}: checkpoint shape {stored[k]}, expected {wanted[k]}"
                 for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
    if problems:
        raise CheckpointMismatch("checkpoint does not match the configured model:\n" + "\n".join(problems[:20]) +
                         (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _restore_step(mngr: ocp.CheckpointManager, abstract_state, step: int):
    md = mngr.item_metadata(step)
    if md is None or md["state"] is None:  # (JSON items have no array metadata: only `state` is checked here)
        raise FileNotFoundError(f"step {step}: item metadata missing (an interrupted or damaged save)")
    check_compatible(md["state"].tree, abstract_state)
    r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                   data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return step, r["state"], r["data"], r["meta"]


def restore(mngr: ocp.CheckpointManager, abstract_state, step: Optional[int] = None, *,
            warn: Callable[[str], None] = print):
    """-> (step, state, data, meta) of `step`, or of the newest checkpoint that restores; None if there is none.

    Without `step`, a checkpoint that fails to restore (a truncated array file, missing metadata: what a crash
    or a full disk leaves) is reported in one line through `warn`, moved to `<dir>-damaged/`, and the previous
    step is tried. A checkpoint of another model (CheckpointMismatch) is never skipped: that is a config error.
    """
    if step is not None:
        return _restore_step(mngr, abstract_state, step)
    damaged: List[int] = []
    result = None
    for s in sorted(mngr.all_steps(), reverse=True):
        try:
            result = _restore_step(mngr, abstract_state, s)
            break
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read a step means: use the one before
            damaged.append(s)
            why = (str(e).strip().splitlines() or [""])[0][:200]
            warn(f"checkpoint step {s} cannot be restored ({type(e).__name__}: {why}); trying the previous one")
    if damaged:
        _set_aside(mngr, damaged)
        if result is None:
            raise NoUsableCheckpoint(f"{mngr.directory}: none of the checkpoints (steps {sorted(damaged)}) can be "
                                     f"restored; they were moved to {mngr.directory}-damaged/. Rerun to start over")
        warn(f"resuming from step {result[0]}; the damaged step(s) {sorted(damaged)} are in {mngr.directory}-damaged/")
    return result


def _set_aside(mngr: ocp.CheckpointManager, steps: List[int]) -> None:
    """Move damaged step folders out of the manager's directory (so later saves of those steps do not collide)."""
    root = os.fspath(mngr.directory)  # a local folder or a URL
    if jax.process_index() == 0:  # one process moves them; the others wait for it (a shared file system)
        aside = root.rstrip("/") + "-damaged"
        if remote.is_url(root):  # object stores have no folders to create or rename: move the objects
            fs, base = remote.filesystem(root)
            for s in steps:
                src = f"{base.rstrip('/')}/{s}"
                if fs.exists(src):
                    fs.mv(src, f"{remote.filesystem(aside)[1]}/{s}-{int(time.time())}", recursive=True)
        else:
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                src = os.path.join(root, str(s))
                if os.path.exists(src):
                    shutil.move(src, os.path.join(aside, f"{s}-{int(time.time())}"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bmr-checkpoint-set-aside")
    mngr.reload()


def restore_params_only(directory: str, step: Optional[int] = None):
    """The `state` item of a run checkpoint as a plain tree of numpy arrays (no target needed): used by
    merge / export, which read adapters or full params from a run."""
    with manager(directory, async_save=False) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        # target: the stored shapes on this process's first device, whatever topology wrote it
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        tree = mngr.item_metadata(step)["state"].tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree,
                              is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                       meta=ocp.args.JsonRestore()))
        return step, r["state"], r["meta"]
