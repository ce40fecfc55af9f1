"""Helpers for tests that start processes: a free local port, the environment of a child `bmr` process (fake CPU
devices, jax.distributed variables only when given), and `bmr train` as a child process."""
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DISTRIBUTED = ("BMR_COORDINATOR", "BMR_NUM_PROCESSES", "BMR_PROCESS_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices=None, **extra) -> dict:
    """This environment + the repository and tests/ on PYTHONPATH, `devices` fake CPU devices (if given), and
    the jax.distributed variables only when passed in `extra`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), **extra)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    for k in DISTRIBUTED:
        if k not in extra:
            env.pop(k, None)
    return env


def bmr_train(args, env, quiet: bool = True) -> subprocess.Popen:
    """`bmr [-q] train /dev/null ARGS` as a child process (stdout / stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "bmretriever_jax.cli", *(["-q"] if quiet else []), "train",
                             "/dev/null", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
