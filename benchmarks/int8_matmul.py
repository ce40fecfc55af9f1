"""Is int8 worth it on this CPU? XLA:CPU int8 x int8 -> int32 matmuls vs float32, on the encoder's shapes.

    python benchmarks/int8_matmul.py

The issue behind it: optional int8 encoding (weight-only or dynamic) where the CPU has int8 dot units
(AMX-INT8, AVX512-VNNI / AVX-VNNI). It pays only if XLA's int8 matmuls beat its float32 ones by clearly more
than the cost of quantizing the activations. This measures both on Gemma 3 270M's projection shapes (2048
tokens, the CPU chunk, x the hidden and MLP widths): plain int8 x int8 -> int32, and dynamic quantization
(per-row scales of the float32 activations, int8 weights, int32 accumulation, rescale to float32).
Writes benchmarks/results/int8_matmul.json and the `int8` section of BENCHMARKS.md.
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

SHAPES = [(2048, 640, 1024), (2048, 640, 2048), (2048, 2048, 640), (2048, 1024, 640), (2048, 2048, 2048)]
INT8_ISA = ("amx_int8", "avx512_vnni", "avx_vnni")


def interleaved_medians(calls, reps: int = 15):
    """[(fn, args)] -> median seconds of each, timed round-robin (A B C A B C ...) after one call each, so load
    from other processes falls on every contender alike."""
    for fn, args in calls:
        fn(*args).block_until_ready()
    times = [[] for _ in calls]
    for _ in range(reps):
        for i, (fn, args) in enumerate(calls):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


@jax.jit
def f32(a, b):
    return a @ b


@jax.jit
def i8(a, b):
    return jax.lax.dot(a, b, preferred_element_type=jnp.int32)


@jax.jit
def dynamic(a, b, w_scale):
    """float32 activations quantized per row on the fly, int8 weights with per-column scales."""
    scale = jnp.maximum(jnp.max(jnp.abs(a), axis=1, keepdims=True), 1e-12) / 127.0
    qa = jnp.round(a / scale).astype(jnp.int8)
    return jax.lax.dot(qa, b, preferred_element_type=jnp.int32).astype(jnp.float32) * scale * w_scale


def main() -> None:
    rng = np.random.default_rng(0)
    cpu = common.cpu_info()
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    int8_units = sorted({f for f in flags if f in INT8_ISA})
    load_start = common.load_average()
    rows = []
    for m, k, n in SHAPES:
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        qa = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
        qb = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
        ws = jnp.ones((1, n), jnp.float32)
        flop = 2.0 * m * k * n
        t32, t8, tdyn = interleaved_medians([(f32, (a, b)), (i8, (qa, qb)), (dynamic, (a, qb, ws))])
        rows.append({"shape": [m, k, n], "fp32_gflops": flop / t32 / 1e9, "int8_gops": flop / t8 / 1e9,
                     "dynamic_int8_gops": flop / tdyn / 1e9, "int8_vs_fp32": t32 / t8, "dynamic_vs_fp32": t32 / tdyn})
        print(rows[-1], flush=True)
    out = {"cpu": cpu, "int8_units": int8_units, "jax": jax.__version__, "rows": rows,
           "load_average": [load_start, common.load_average()]}
    common.write_json(os.path.join(HERE, "results", "int8_matmul.json"), out)
    gm = lambda key: float(np.exp(np.mean([np.log(r[key]) for r in rows])))  # noqa: E731
    lines = ["Command: `python benchmarks/int8_matmul.py`\n",
             f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; int8 dot units: "
             f"{', '.join(int8_units) or 'none (no AMX-INT8, AVX512-VNNI or AVX-VNNI)'}; jax {jax.__version__}; "
             f"load average {out['load_average'][0]} -> {out['load_average'][1]}. Median of 15 interleaved calls.\n",
             "| M x K x N | fp32 GFLOP/s | int8 -> int32 GOP/s | dynamic int8 GOP/s | int8 / fp32 | dynamic / fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {' x '.join(map(str, r['shape']))} | {r['fp32_gflops']:.0f} | {r['int8_gops']:.0f} | "
                     f"{r['dynamic_int8_gops']:.0f} | {r['int8_vs_fp32']:.2f}x | {r['dynamic_vs_fp32']:.2f}x |")
    lines.append(f"\nGeometric mean: int8 {gm('int8_vs_fp32'):.2f}x, dynamic int8 {gm('dynamic_vs_fp32'):.2f}x "
                 "of float32.")
    common.replace_section(os.path.join(HERE, "..", "BENCHMARKS.md"), "int8", "\n".join(lines))


if __name__ == "__main__":
    main()
