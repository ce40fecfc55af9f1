"""Facts about the machine and the software a measurement ran on, recorded beside every number we keep
(sweep points, benchmark results): the CPU model, its logical cores and the matmul-relevant ISA extensions
(AVX-512 BF16 / AMX decide whether bf16 pays off on a CPU), and the versions of the libraries involved."""
from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Dict

MATMUL_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8",
              "avx512_fp16")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> Dict:
    """CPU model, logical cores and the matmul-relevant ISA extensions of the first processor."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"model": model, "logical_cpus": os.cpu_count(), "isa": sorted(f for f in flags if f in MATMUL_ISA),
            "platform": platform.platform()}


def versions(*modules: str) -> Dict[str, str]:
    """`module: version` for each name ('not installed' where it is missing), plus python."""
    out = {"python": platform.python_version()}
    for name in modules:
        try:
            out[name] = getattr(sys.modules.get(name) or importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            out[name] = "not installed"
    return out


def run_facts() -> Dict:
    """What a training / evaluation number depends on: the CPU and the JAX stack's versions."""
    return {"cpu": cpu_info(), "versions": versions("bmretriever_jax", "jax", "jaxlib", "flax", "optax", "numpy")}
