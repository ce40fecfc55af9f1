"""Resuming a run: what may change between a run and its resume, the config-change guard, and the metrics log
cut back to the restored step. (Checkpoints themselves: `bmretriever_jax.training.checkpoint`.)"""
from __future__ import annotations

import json
import os
from typing import List

from bmretriever_jax.util.atomic import atomic_write
from bmretriever_jax.config import RunConfig, to_dict
from bmretriever_jax.util.errors import ConfigError

# what may change between a run and its resume without --allow-config-change: how long it runs, how it reports,
# the mesh it runs on (a preempted pod resumes on whatever slice it gets; the checkpoint reshards, and the data
# position is global) and where the run folder is (moved or copied: its checkpoints are read from the new place).
# The global batch is not among them: it changes what a step is.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.keep",
                     "mesh.data", "mesh.fsdp", "mesh.tensor", "out")


def config_changes(saved: dict, now: dict, prefix: str = "") -> List[str]:
    """['train.lr: 0.0002 -> 0.001', ...]: every leaf of the two config dicts that differs."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with the keys it lacks taken from `defaults` (recursively): a setting added to bmr after a run
    started was, in effect, at its default in that run."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = with_defaults(out[k], v)
    return out


def check_resume_config(saved: dict, run: RunConfig, allow: bool, where: str) -> List[str]:
    """The differences that need --allow-config-change; raises ConfigError listing them when not allowed."""
    saved = with_defaults(saved, to_dict(RunConfig()))
    changes = [c for c in config_changes(saved, to_dict(run)) if c.split(":")[0] not in RESUMABLE_CHANGES]
    if changes and not allow:
        raise ConfigError(f"{where}: the run was started with another config; resuming would change "
                          f"{'; '.join(changes)}. Use a new `out` folder, or pass --allow-config-change")
    return changes


def truncate_metrics(path: str, step: int) -> None:
    """Drop the log lines of steps after `step` (they are about to be run again from the checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        with atomic_write(path, "w") as f:
            f.writelines(keep)
