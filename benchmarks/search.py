"""Exact top-k search: bmretriever_jax (JAX, fp32 and bf16 x bf16 -> f32) vs faiss-cpu IndexFlatIP, same run.

    python benchmarks/search.py                      # 1,000,000 x 640 corpus, 1,000 queries, top-10
    python benchmarks/search.py --docs 100000 --queries 200   # quick look

Synthetic Gaussian vectors (the numbers do not depend on the values). Reports queries/s, the ratio to faiss,
GFLOP/s (2 * Q * N * d per search) and the fraction of this CPU's matmul peak, measured here as a 2048^2
jitted JAX matmul in fp32 and in bf16 with float32 accumulation. Also checks that the results agree:
fp32 top-10 ids equal to faiss's, bf16 top-10 overlap with the exact top-10. Writes
benchmarks/results/search.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from bmretriever_jax.eval.search import topk_search  # noqa: E402


def matmul_peak(dtype, n: int = 2048, reps: int = 20) -> float:
    """GFLOP/s of a jitted [n, n] @ [n, n] with float32 output (best of `reps`)."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32,
                                        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def timed(fn, repeats: int):
    """(best seconds, last result) over `repeats` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_faiss(corpus: np.ndarray, queries: np.ndarray, k: int, repeats: int):
    """faiss exact inner-product search; the index (a copy of the corpus) is freed on return."""
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    return timed(lambda: index.search(queries, k), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "search.json"))
    args = ap.parse_args()

    load = os.getloadavg()
    rng = np.random.default_rng(0)
    corpus = np.empty((args.docs, args.dim), np.float32)
    for start in range(0, args.docs, 100_000):  # chunked: no float64 temporaries of the whole corpus
        stop = min(start + 100_000, args.docs)
        corpus[start:stop] = rng.standard_normal((stop - start, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    flops = 2.0 * args.queries * args.docs * args.dim

    peak = {"float32": matmul_peak(jnp.float32), "bfloat16": matmul_peak(jnp.bfloat16)}

    rows = {}
    t_faiss, (f_scores, f_ids) = run_faiss(corpus, queries, args.k, args.repeats)
    rows["faiss IndexFlatIP (fp32)"] = {"seconds": t_faiss, "peak": peak["float32"]}

    exact_ids = None
    for dtype in ("float32", "bfloat16"):
        search = lambda: topk_search(queries, corpus, args.k, block_size=args.block_size,  # noqa: E731
                                     similarity="dot", dtype=dtype, mesh=None)
        topk_search(queries, corpus[:args.block_size], args.k, block_size=args.block_size, similarity="dot",
                    dtype=dtype, mesh=None)  # compile outside the timing
        seconds, (scores, ids) = timed(search, args.repeats)
        row = {"seconds": seconds, "peak": peak[dtype]}
        if dtype == "float32":
            exact_ids = ids
            row["ids_equal_faiss"] = float(np.mean(ids == f_ids))
            row["max_abs_score_diff_vs_faiss"] = float(np.max(np.abs(scores - f_scores)))
        else:
            row["top10_overlap_with_fp32"] = float(np.mean([len(set(a) & set(b)) / args.k
                                                            for a, b in zip(ids, exact_ids)]))
        rows[f"bmretriever_jax ({'fp32' if dtype == 'float32' else 'bf16 x bf16 -> f32'})"] = row

    for row in rows.values():
        row["queries_per_s"] = args.queries / row["seconds"]
        row["gflops"] = flops / row["seconds"] / 1e9
        row["fraction_of_peak"] = row["gflops"] / row.pop("peak")
        row["speedup_vs_faiss"] = t_faiss / row["seconds"]

    from bmretriever_jax.util.machine import cpu_info

    cpu = cpu_info()
    lines = [f"Exact top-{args.k}: {args.queries} queries x {args.docs:,} x {args.dim} float32 corpus, "
             f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs ({', '.join(cpu['isa']) or 'no AVX-512'}); matmul peak (2048^2, jax): fp32 {peak['float32']:.0f} GFLOP/s, "
             f"bf16->f32 {peak['bfloat16']:.0f} GFLOP/s; load average at start {load[0]:.1f} "
             "(other processes share the cores when > 0.5)", "",
             "| method | seconds | queries/s | GFLOP/s | fraction of peak | vs faiss | check |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        check = ("ids == faiss: {:.4f}".format(r["ids_equal_faiss"]) if "ids_equal_faiss" in r else
                 "top-10 overlap with fp32: {:.4f}".format(r["top10_overlap_with_fp32"])
                 if "top10_overlap_with_fp32" in r else "")
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['queries_per_s']:.0f} | {r['gflops']:.0f} | "
                     f"{r['fraction_of_peak']:.2f} | {r['speedup_vs_faiss']:.2f}x | {check} |")
    print("\n".join(lines))

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args) | {"out": None}, "matmul_peak_gflops": peak, "results": rows,
                   "machine": {"cpus": os.cpu_count(), "load_average_at_start": load, "platform": platform.platform(),
                               "jax": jax.__version__, "faiss": __import__("faiss").__version__},
                   "table": lines}, f, indent=1)
    if args.docs == 1_000_000 and args.queries == 1000:  # the documented configuration only
        import common

        common.replace_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md"), "search",
                               "Command: `python benchmarks/search.py`\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
