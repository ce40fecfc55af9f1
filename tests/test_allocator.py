"""allocator.keep_freed_memory: a second large allocation reuses the first one's pages (no page faults)."""
import os
import platform
import subprocess
import sys

import pytest

from bmretriever_jax.util import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free 256 MiB twice with the C allocator, as XLA:CPU does with its temp buffers (numpy
# would not do: it asks for transparent huge pages); print the minor page faults of the second round.
PROBE = r"""
import ctypes, resource
from bmretriever_jax.util.allocator import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def round_trip(size=256 << 20):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _probe(mode: str):
    env = {**os.environ, "BMR_MALLOC": mode, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's mallopt only")
def test_second_allocation_does_not_fault_pages_in_again():
    pages = (256 << 20) // 4096
    applied, faults = _probe("keep")
    assert applied
    assert faults < pages // 100, f"{faults} minor faults for a reused 256 MiB block"
    # glibc's defaults: the block was munmap-ed and the second one faults every page in again
    applied, faults = _probe("system")
    assert not applied
    assert faults > pages // 2


def test_bad_mode_is_an_error(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("BMR_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="BMR_MALLOC='jemalloc'.*'keep'.*'system'"):
        allocator.keep_freed_memory()
