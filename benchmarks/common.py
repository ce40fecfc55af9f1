"""Shared helpers for the side-by-side benchmarks: machine facts, matmul peaks, interleaved timing, output.

Timing on a shared 2-core machine is noisy: other processes steal cycles in bursts. So the contenders of a
benchmark run round-robin (A B C D A B C D ...) and each reports the median over rounds, which exposes all
of them to the same load; the load average is recorded before and after so a reader can judge the run.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from bmretriever_jax.util.machine import cpu_info, versions  # noqa: F401  (the benchmarks' machine facts)


# ----------------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------------
def load_average() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------------------------------
# Peaks
# ----------------------------------------------------------------------------------------------------
def jax_matmul_peak(dtype: str, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of a jitted [n, n] @ [n, n] with float32 accumulation and output (best of `reps`)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else None
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32, precision=prec))
    f(a, b).block_until_ready()
    return 2 * n ** 3 / best_time(lambda: f(a, b).block_until_ready(), reps) / 1e9


def torch_matmul_peak(dtype: str, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of torch.mm on [n, n] operands of `dtype` (bf16 accumulates in f32 inside oneDNN)."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    with torch.inference_mode():
        torch.mm(a, b)
        return 2 * n ** 3 / best_time(lambda: torch.mm(a, b), reps) / 1e9


def best_time(fn: Callable[[], object], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, log: Optional[Callable[[str], None]] = None
                ) -> Dict[str, Dict]:
    """Run every fn once per round, round-robin; -> {name: {median_s, min_s, median_cpu_s, times_s, ...}}.

    cpu_s is this process's CPU time (all threads) during the call: under load it shows how much work a
    contender did when it did run, which wall time hides (spinning thread pools inflate it, though).
    Call each fn once beforehand (compilation, lazy init): these timings are steady-state.
    """
    times: Dict[str, List[float]] = {k: [] for k in fns}
    cpus: Dict[str, List[float]] = {k: [] for k in fns}
    loads: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            times[name].append(dt)
            cpus[name].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            loads[name].append(round(os.getloadavg()[0], 2))
            if log:
                log(f"round {r + 1}/{rounds} {name}: {dt:.2f} s, {cpus[name][-1]:.1f} CPU-s "
                    f"(load {loads[name][-1]:.1f})")
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "median_cpu_s": statistics.median(cpus[k]),
                "times_s": [round(x, 4) for x in v], "cpu_s": [round(x, 3) for x in cpus[k]],
                "load_1min": loads[k]} for k, v in times.items()}


# ----------------------------------------------------------------------------------------------------
# Vectors
# ----------------------------------------------------------------------------------------------------
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, d] arrays -> [n] float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's top-k nearest other rows (cosine) under vectors a vs vectors b."""
    def topk(x):
        x = np.asarray(x, np.float64)
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    ta, tb = topk(a), topk(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def results_path(name: str, *, fp32_only: bool = False, quick: bool = False) -> str:
    """benchmarks/results/<name>[-fp32][_quick].json: an fp32-only run (a CPU without bf16 units) or a smoke
    run (--quick) never overwrites the full results."""
    suffix = ("-fp32" if fp32_only else "") + ("_quick" if quick else "")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}{suffix}.json")


def write_json(path: str, obj: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)


def replace_section(path: str, name: str, body: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in a markdown file (appends the
    marked section when absent), so each benchmark rewrites only its own results."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)
