"""Orbax checkpoints with named items (`state`: arrays, `data`: iterator position, `meta`: JSON), restored
into an abstract tree after a check that names every mismatching parameter path."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, data: Dict, meta: Dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                            meta=ocp.args.JsonSave(meta)))


def _paths(tree) -> Dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


def check_compatible(stored_tree, abstract) -> None:
    """Raise naming every path missing, unexpected or with a different shape."""
    stored = {k: tuple(v.shape) for k, v in _paths(stored_tree).items()}
    wanted = {k: tuple(v.shape) for k, v in _paths(abstract).items()}
    problems = [f"  {k}: missing in checkpoint" for k in sorted(set(wanted) - set(stored))]
    problems += [f"  {k}: in checkpoint but not expected" for k in sorted(set(stored) - set(wanted))]
    problems += [f"  {k}: checkpoint shape {stored[k]}, expected {wanted[k]}"
                 for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
    if problems:
        raise ValueError("checkpoint does not match the configured model:\n" + "\n".join(problems[:20]) +
                         (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def restore(mngr: ocp.CheckpointManager, abstract_state, step: Optional[int] = None):
    """-> (step, state, data, meta) of `step` (default latest), or None if there is no checkpoint."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    md = mngr.item_metadata(step)
    check_compatible(md["state"].tree, abstract_state)
    r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                   data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return step, r["state"], r["data"], r["meta"]


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
