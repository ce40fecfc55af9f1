"""The compute dtype: `auto` picks bf16 matmul inputs where the hardware runs them fast, else float32.

bf16 inputs with float32 accumulation are what TPU/GPU tensor cores and CPUs with bf16 dot-product units
(x86 AVX512-BF16 / AMX-BF16, Arm BF16) are built for: measured on a 2-core AVX512-BF16 CPU, Gemma 3 270M
encodes 1.75x faster than in float32 with the same retrieval quality (BENCHMARKS.md, docs/quickstart.md). On a CPU
without such units XLA emulates bf16 dots and they are SLOWER than float32 (measured on a 2-core AVX2
EPYC: 414 vs 614 tokens/s encoding, 98 vs 152 GFLOP/s on a 2048^2 matmul), so `auto` keeps float32 there.
`BMR_DTYPE=bfloat16|float32` overrides the choice for every `auto` in the process.
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Iterable

import jax
import jax.numpy as jnp

from bmretriever_jax.util.machine import cpu_flags, has_bf16_units

COMPUTE_DTYPES = ("auto", "bfloat16", "float32")


def bf16_is_fast(backend: str | None = None, flags: Iterable[str] | None = None) -> bool:
    """True where bf16 matmul inputs beat float32: any accelerator, or a CPU with bf16 dot-product units."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return True
    if platform.system() == "Darwin":  # Apple silicon has no /proc/cpuinfo; M2 and later have BF16
        return False
    return has_bf16_units(cpu_flags() if flags is None else flags)


@functools.lru_cache(maxsize=None)
def _auto() -> str:
    forced = os.environ.get("BMR_DTYPE", "").strip()
    if forced:
        if forced not in ("bfloat16", "float32"):
            raise ValueError(f"BMR_DTYPE={forced!r}; allowed: bfloat16, float32")
        return forced
    return "bfloat16" if bf16_is_fast() else "float32"


def resolve_dtype(dtype) -> jnp.dtype:
    """'auto' | 'bfloat16' | 'float32' | a dtype -> the jnp dtype of matmul inputs."""
    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {dtype!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
        dtype = _auto() if dtype == "auto" else dtype
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"compute dtype {dtype}; allowed: {', '.join(COMPUTE_DTYPES)}")
    return dtype
