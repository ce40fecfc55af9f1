"""Facts about the machine and the software a measurement ran on, recorded beside every number we keep
(sweep points, benchmark results): the CPU model, its logical cores and the matmul-relevant ISA extensions
(AVX-512 BF16 / AMX decide whether bf16 pays off on a CPU), and the versions of the libraries involved."""
from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Dict

BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags; "bf16" is Arm's Features entry
MATMUL_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8",
              "avx512_fp16", "bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def has_bf16_units(flags) -> bool:
    """A CPU with bf16 dot-product units (x86 AVX512-BF16 / AMX-BF16, Arm BF16), from its flags or `isa`."""
    return bool(BF16_CPU_FLAGS & set(flags))


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> Dict:
    """CPU model, logical cores and the matmul-relevant ISA extensions of the first processor."""
    model = platform.processor() or "unknown"
    if model in ("unknown", "", "x86_64"):
        try:
            with open(cpuinfo) as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        except OSError:
            pass
    return {"model": model, "logical_cpus": os.cpu_count(),
            "isa": sorted(f for f in cpu_flags(cpuinfo) if f in MATMUL_ISA), "platform": platform.platform()}


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
