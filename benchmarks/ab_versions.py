"""Is this checkout slower than another one? Our encode pass and our train step, two versions, one run.

    git worktree add /tmp/before <commit>
    python benchmarks/ab_versions.py --before /tmp/before [--rounds 12] [--out benchmarks/results/ab.json]

Per workload, one worker process per checkout imports that checkout's own package and its own
benchmarks/encode.py / benchmarks/train.py (so each side runs the workload exactly as its benchmark defines it),
loads Gemma 3 270M, compiles that workload, and then waits; the pair is killed before the next workload's pair
starts (two workers holding both workloads each outgrow a 24 GB machine). The parent alternates the two workers pass by pass (A B B A A B ...: each round
swaps the order, so a slow spell of a shared machine hits both sides alike) and reports per side the median
seconds and the median of the per-round ratios after / before, with its spread. Workloads (float32):
  encode  one batch of 32 SciFact passages x 256 tokens (encode.ours: last-token pooled, L2-normalised)
  train   one LoRA train step, global batch 8, queries 32 / passages 128 tokens, 1 hard negative, no remat
          (train.Ours: the step train() builds)
Only one worker computes at any time; the other is blocked reading its pipe. Each worker also hashes its
compiled programs (encode, train step; the optimised HLO, names and source locations stripped) and reports
their XLA cost analysis: equal hashes mean both checkouts run the same XLA program, so a time difference is
the process, not the code. Controls: swap the sides (`--before . --after /tmp/before`; the "before" worker
always starts first) or give the same checkout twice.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

WORKER = r"""
import functools, hashlib, os, re, sys, time
root, wanted = sys.argv[1], sys.argv[2].split(",")
sys.path[:0] = [root, os.path.join(root, "benchmarks")]
import encode, train  # first: they set the allocator up before jax starts
import jax, jax.numpy as jnp
from bmretriever_jax.convert import hub
cfg, base_np, tok, folder = hub.load("gemma3-270m", quiet=True)
work = {}
if "encode" in wanted:
    batches, _ = encode.load_batches(tok, 32, 256, 32)
    params = jax.tree.map(jnp.asarray, base_np)
    work["encode"] = encode.ours(cfg, params, batches, "float32")
if "train" in wanted:
    run = train.make_run(8, 32, 128, 1, dtype="float32", remat=False)
    ours = train.Ours(cfg, base_np, train.ours_frozen(base_np, run), run, train.real_batch(tok, run))
    work["train"] = ours.step
for fn in work.values():
    fn(); fn()  # compile + one warm pass
# each workload's compiled program, names and source locations stripped: equal hashes = the same XLA program
def program(name, compiled):
    lines = [re.sub(r"%[\w.\-]+", "%", re.sub(r"metadata=\{[^}]*\}", "", ln.split(" = ", 1)[1]))
             for ln in compiled.as_text().splitlines() if " = " in ln and not ln.lstrip().startswith("HloModule")]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print("program", name, hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16], len(lines),
          cost.get("flops"), cost.get("bytes accessed"), flush=True)
if "encode" in work:  # encode.ours's function, on its first batch
    ids, mask = (jnp.asarray(a) for a in batches[0])
    embed = jax.jit(functools.partial(encode.embed_batch, cfg, pooling="last", normalize=True, dtype=jnp.float32))
    program("encode", embed.lower(params, ids, mask).compile())
if "train" in work:
    program("train", ours.fn.lower(ours.state, ours.frozen, ours.batch).compile())
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    work[line.strip()]()
    print("seconds", time.perf_counter() - t, flush=True)
"""


def start(root: str, workload: str):
    """-> (worker process for one workload, {workload: its compiled program's {"hash", "instructions", "flops",
    "bytes"}})."""
    p = subprocess.Popen([sys.executable, "-c", WORKER, os.path.abspath(root), workload], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    program = {}
    for line in p.stdout:  # whatever the checkout prints while it loads, then "program ...", "ready"
        if line.startswith("program "):
            what, h, n, flops, nbytes = line.split()[1:]
            program[what] = {"hash": h, "instructions": int(n), "flops": float(flops), "bytes": float(nbytes)}
        if line.strip() == "ready":
            return p, program
    raise SystemExit(f"the worker of {root} did not start (see its stderr above)")


def timed(p: subprocess.Popen, what: str) -> float:
    p.stdin.write(what + "\n")
    p.stdin.flush()
    for line in p.stdout:  # skips anything else the checkout prints
        if line.startswith("seconds "):
            return float(line.split()[1])
    raise SystemExit("a worker died (see its stderr above)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="checkout of the version to compare against")
    ap.add_argument("--after", default=os.path.relpath(os.path.join(HERE, "..")),
                    help="checkout under test (default: this one)")
    ap.add_argument("--rounds", type=int, default=12, help="passes per side and workload")
    ap.add_argument("--workloads", default="encode,train")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ab.json"))
    a = ap.parse_args()
    load_start = common.load_average()
    res, programs = {}, {"before": {}, "after": {}}
    for what in a.workloads.split(","):
        # one pair of workers per workload, killed before the next pair starts: two workers holding a model and
        # both compiled workloads each outgrow 24 GB (a train step alone has 5.4 GB of temp buffers)
        sides = {}
        for name, root in (("before", a.before), ("after", a.after)):
            t = time.time()
            sides[name], prog = start(root, what)
            programs[name].update(prog)
            print(f"[ab] {what}: {name} ({root}) ready in {time.time() - t:.0f} s; compiled program {prog[what]}",
                  flush=True)
        same = programs["before"][what]["hash"] == programs["after"][what]["hash"]
        print(f"[ab] {what}: the two checkouts compile {'the SAME' if same else 'a different'} XLA program",
              flush=True)
        times = {"before": [], "after": []}
        for r in range(a.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                times[name].append(timed(sides[name], what))
            print(f"[ab] {what} round {r + 1}/{a.rounds}: before {times['before'][-1]:.2f} s, "
                  f"after {times['after'][-1]:.2f} s", flush=True)
        for p in sides.values():  # each holds a model and a compiled workload: no graceful teardown needed
            p.kill()
            p.wait()
        ratios = sorted(x / y for x, y in zip(times["after"], times["before"]))
        q = statistics.quantiles(ratios, n=4)
        res[what] = {"seconds": times, "median_before_s": statistics.median(times["before"]),
                     "median_after_s": statistics.median(times["after"]),
                     "median_ratio_after_over_before": statistics.median(ratios),
                     "ratio_quartiles": [q[0], q[2]]}
    same_program = {w: programs["before"][w]["hash"] == programs["after"][w]["hash"] for w in res}
    out = {"before": os.path.normpath(a.before), "after": os.path.normpath(a.after), "rounds": a.rounds,
           "results": res, "programs": programs, "same_program": same_program,
           "machine": {**common.cpu_info(), **common.versions("jax", "jaxlib", "flax"),
                       "load_average_start": load_start, "load_average_end": common.load_average()}}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print("| workload | before s (median) | after s (median) | after / before (median of rounds) | quartiles |")
    print("|---|---|---|---|---|")
    for what, r in res.items():
        lo, hi = r["ratio_quartiles"]
        print(f"| {what} | {r['median_before_s']:.3f} | {r['median_after_s']:.3f} | "
              f"{r['median_ratio_after_over_before']:.3f} | {lo:.3f} - {hi:.3f} |")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
