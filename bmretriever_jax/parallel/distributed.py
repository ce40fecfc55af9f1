"""Multi-controller set-up: one code path for 1 process or N (TPU pod, SLURM, an explicit coordinator).

Sources, in order:
  BMR_COORDINATOR=host:port, BMR_NUM_PROCESSES, BMR_PROCESS_ID   explicit (local multi-process, any cluster)
  SLURM_* / TPU metadata                                           jax.distributed's own cluster detection,
                                                                    enabled with BMR_DISTRIBUTED=auto
Nothing set: a single process, jax.distributed is not initialised.
"""
from __future__ import annotations

import os

_initialized = False


def maybe_initialize() -> bool:
    """Initialise jax.distributed from the environment; returns True if this is a multi-process run."""
    global _initialized
    if _initialized:
        return True
    import jax  # here: the `bmr` entry point imports this module, and `bmr --help` imports no jax

    coord = os.environ.get("BMR_COORDINATOR")
    if coord:
        n = int(os.environ["BMR_NUM_PROCESSES"])
        pid = int(os.environ["BMR_PROCESS_ID"])
        local = os.environ.get("BMR_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid,
                                   local_device_ids=[int(x) for x in local.split(",")] if local else None)
        _initialized = True
    elif os.environ.get("BMR_DISTRIBUTED") == "auto":
        jax.distributed.initialize()  # SLURM, TPU pods, ... detected by jax
        _initialized = True
    return _initialized


def preemption_sync_available() -> bool:
    """True when jax.distributed runs with its preemption service (the default, `jax_enable_preemption_service`):
    XLA then owns SIGTERM (its handler is installed by jax.distributed.initialize and only records the notice)
    and `multihost_utils.reached_preemption_sync_point` names one step for every process. A Python SIGTERM
    handler set afterwards would replace XLA's and silently disable that; the training loop sets none then."""
    import jax  # (see maybe_initialize)
    from jax._src import distributed as _dist  # jax 0.10.2 keeps the client and the sync manager here

    state = _dist.global_state
    return getattr(state, "client", None) is not None and getattr(state, "preemption_sync_manager", None) is not None


def is_host0() -> bool:
    import jax  # (see maybe_initialize)

    return jax.process_index() == 0
