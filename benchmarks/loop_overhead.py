"""The training loop's cost over a bare loop of the jitted step, and the overlap of input with compute.

    python benchmarks/loop_overhead.py             # tiny model (tests/hf_tiny.py), CPU, 5 interleaved rounds
    python benchmarks/loop_overhead.py --rounds 1  # a smoke run

Contenders (the same RunConfig, model, jitted step and batches; one CPU device, mesh (1,1,1)):
  bare         the very jitted step train() ran (captured), `state, m = step(state, frozen, batch)` over the
               global batches train() fed it, one wait per log_every steps (median over those chunks): the
               device time of a step with nothing else to do.
  loop         `bmretriever_jax.training.train()` itself: the loader reads and tokenizes each batch and a background
               thread makes it global while the step runs; metrics read once per log_every (one step late),
               the NaN check with them, the preemption check at every step, checkpoints and model export at the
               end (outside the timed steps). Its step time is read from its own metrics.jsonl
               (global batch / examples_per_s over log_every steps), first interval (compilation) dropped.
  loop + slow  the same with a deliberately slow input: the loader sleeps --sleep-ms per batch (no CPU used).
  host         the input alone: next(loader) (+ the sleep) and to_global, timed in a loop: the host time H.
Overhead = loop / bare - 1 (target <= 5 %). Overlap: loop + slow should take ~max(bare, H + sleep), not the sum.
Writes benchmarks/results/loop_overhead.json (CPU model / ISA and versions), rewrites its section of
BENCHMARKS.md (between <!-- loop:begin/end -->) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # run from a checkout
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # hf_tiny: the tiny random model of the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

import common  # noqa: E402
from bmretriever_jax.config import load_config  # noqa: E402
from bmretriever_jax.data.pairs import write_pairs  # noqa: E402
from bmretriever_jax.training import loop as loop_mod  # noqa: E402
from bmretriever_jax.training import to_global  # noqa: E402
from bmretriever_jax.util.machine import run_facts  # noqa: E402
from hf_tiny import tiny_model_dir, tiny_pairs  # noqa: E402

OUT = os.path.join(HERE, "results", "loop_overhead.json")


def log(msg):
    print(f"[loop-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SlowLoader:
    """A loader that sleeps before every batch (the seam's interface: next / state / restore)."""

    def __init__(self, inner, sleep_s: float):
        self.inner, self.sleep_s = inner, sleep_s

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.sleep_s)
        return next(self.inner)

    def state(self):
        return self.inner.state()

    def restore(self, state):
        self.inner.restore(state)


def overrides(args, model, pairs, out, steps):
    return [f"model.name={model}", f"data.train=[{pairs}]", f"out={out}", "model.dtype=float32",
            f"model.max_length={args.passage_len}", f"model.query_max_length={args.query_len}",
            f"train.global_batch_size={args.batch}", f"train.steps={steps}", f"train.log_every={args.log_every}",
            f"train.save_every={steps}", "train.warmup_steps=1", "train.lr=1e-3", "lora.dropout=0.0",
            "data.num_negatives=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


class Capture:
    """Wraps make_train_step so that train() hands over what it runs: the jitted step, the frozen params, the
    global batches it fed and the state after its last step (a bare loop then runs the very same program)."""

    def __init__(self):
        self.fn = self.frozen = self.state = self.mesh = None
        self.batches = []

    def __enter__(self):
        self._orig = loop_mod.make_train_step

        def make(model_cfg, run, optimizer, mesh, *rest, **kw):
            fn = self._orig(model_cfg, run, optimizer, mesh, *rest, **kw)
            self.fn, self.mesh = fn, mesh

            def wrapped(state, frozen, batch):
                self.frozen = frozen
                self.batches.append(batch)
                out = fn(state, frozen, batch)
                self.state = out[0]
                return out
            return wrapped

        loop_mod.make_train_step = make
        return self

    def __exit__(self, *exc):
        loop_mod.make_train_step = self._orig


def bare_step(args, cap: Capture) -> float:
    """Per-step seconds of the captured jitted step over the batches train() fed it: median over chunks of
    log_every steps, one wait per chunk (as the loop's log intervals)."""
    state, batches = cap.state, cap.batches[-args.steps:]
    per_step = []
    for lo in range(0, len(batches) - args.log_every + 1, args.log_every):
        t = time.perf_counter()
        for b in batches[lo:lo + args.log_every]:
            state, m = cap.fn(state, cap.frozen, b)
        jax.block_until_ready((state, m))
        per_step.append((time.perf_counter() - t) / args.log_every)
    cap.state = state
    return statistics.median(per_step)


def host_step(args, model, pairs, mesh, sleep_s: float) -> float:
    """Per-batch seconds of the input alone: next(loader) (+ the sleep) and to_global."""
    import transformers

    run = load_config(None, overrides(args, model, pairs, tempfile.mkdtemp(), 10))
    loader = SlowLoader(loop_mod.make_loader(run, loop_mod.load_training_pairs(run),
                                             transformers.AutoTokenizer.from_pretrained(model)), sleep_s)
    jax.block_until_ready(to_global(next(loader), mesh))
    t = time.perf_counter()
    for _ in range(args.steps):
        jax.block_until_ready(to_global(next(loader), mesh))
    return (time.perf_counter() - t) / args.steps


def loop_step(args, model, pairs, sleep_s: float, cap: Optional[Capture] = None) -> dict:
    """Per-step seconds of train() (median over its log intervals after the first) and its wall time."""
    out = tempfile.mkdtemp(prefix="loop-bench-")
    steps = args.steps + args.log_every  # the first interval holds the compilation
    run = load_config(None, overrides(args, model, pairs, os.path.join(out, "run"), steps))
    orig = loop_mod.make_loader
    if sleep_s:
        loop_mod.make_loader = lambda *a: SlowLoader(orig(*a), sleep_s)
    try:
        t = time.perf_counter()
        if cap is not None:
            with cap:
                loop_mod.train(run, quiet=True)
        else:
            loop_mod.train(run, quiet=True)
        wall = time.perf_counter() - t
    finally:
        loop_mod.make_loader = orig
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    per_step = [args.batch / r["examples_per_s"] for r in rows if "examples_per_s" in r][1:]
    return {"s_per_step": statistics.median(per_step), "intervals": per_step, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per contender and round")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--passage-len", type=int, default=64)
    ap.add_argument("--sleep-ms", type=float, default=None,
                    help="the slow input's sleep per batch (default: the bare step time, measured)")
    ap.add_argument("--render", action="store_true", help="rewrite the BENCHMARKS.md section from the saved JSON")
    args = ap.parse_args()
    if args.render:
        with open(OUT) as f:
            result = json.load(f)
        result.setdefault("loop_over_bare_per_round", [round(a / b, 3) for a, b in zip(result["rounds_ms"]["loop"],
                                                                                      result["rounds_ms"]["bare"])])
        common.replace_section(os.path.join(HERE, "..", "BENCHMARKS.md"), "loop", markdown(result))
        print(markdown(result))
        return
    root = tempfile.mkdtemp(prefix="loop-bench-data-")
    model = tiny_model_dir(os.path.join(root, "model"), family="llama")
    pairs = os.path.join(root, "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(512))
    load_start = common.load_average()
    log(f"devices: {jax.devices()}; load {load_start}")
    res = {k: [] for k in ("bare", "loop", "host", "host_slow", "loop_slow")}
    loops = {"loop": [], "loop_slow": []}
    for r in range(args.rounds):
        cap = Capture()
        got = loop_step(args, model, pairs, 0.0, cap)
        loops["loop"].append(got)
        res["loop"].append(got["s_per_step"])
        res["bare"].append(bare_step(args, cap))
        if args.sleep_ms is None:
            args.sleep_ms = round(res["bare"][0] * 1000, 1)
            log(f"slow input: sleeps {args.sleep_ms} ms per batch (the first bare step time)")
        res["host"].append(host_step(args, model, pairs, cap.mesh, 0.0))
        res["host_slow"].append(host_step(args, model, pairs, cap.mesh, args.sleep_ms / 1000))
        got = loop_step(args, model, pairs, args.sleep_ms / 1000)
        loops["loop_slow"].append(got)
        res["loop_slow"].append(got["s_per_step"])
        log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1000:.2f} ms" for k, v in res.items()))
    med = {k: statistics.median(v) for k, v in res.items()}
    overhead = med["loop"] / med["bare"] - 1
    expect_max, expect_sum = max(med["bare"], med["host_slow"]), med["bare"] + med["host_slow"]
    result = {
        "command": " ".join(["python benchmarks/loop_overhead.py", *sys.argv[1:]]),
        "setup": {"model": "tests/hf_tiny llama (hidden 64, 3 layers, vocab 97), float32, LoRA r16 (defaults)",
                  "global_batch": args.batch, "query_len": args.query_len, "passage_len": args.passage_len,
                  "negatives": 1, "devices": [str(x) for x in jax.devices()], "steps_per_round": args.steps,
                  "log_every": args.log_every, "rounds": args.rounds, "sleep_ms": args.sleep_ms},
        "median_ms": {k: round(v * 1000, 3) for k, v in med.items()},
        "rounds_ms": {k: [round(x * 1000, 3) for x in v] for k, v in res.items()},
        "loop_intervals_ms": {k: [[round(x * 1000, 3) for x in g["intervals"]] for g in v] for k, v in loops.items()},
        "loop_overhead": round(overhead, 4),
        # loop and bare of one round run back to back on the same program: their ratio per round
        "loop_over_bare_per_round": [round(a / b, 3) for a, b in zip(res["loop"], res["bare"])],
        "slow_input": {"expected_if_overlapped_ms": round(expect_max * 1000, 3),
                       "expected_if_serial_ms": round(expect_sum * 1000, 3),
                       "measured_ms": round(med["loop_slow"] * 1000, 3),
                       "measured_over_max": round(med["loop_slow"] / expect_max, 4),
                       "measured_over_sum": round(med["loop_slow"] / expect_sum, 4)},
        "load_average": {"start": load_start, "end": common.load_average()},
        **run_facts(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)
    page = os.path.join(HERE, "..", "BENCHMARKS.md")
    common.replace_section(page, "loop", markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m, s, cpu = r["median_ms"], r["slow_input"], r["cpu"]
    return "\n".join([
        f"Command: `{r['command']}`", "",
        f"Tiny model ({r['setup']['model']}), global batch {r['setup']['global_batch']} queries x "
        f"{r['setup']['query_len']} tokens + {2 * r['setup']['global_batch']} passages x {r['setup']['passage_len']} "
        f"tokens, 1 CPU device; median of {r['setup']['rounds']} interleaved rounds of {r['setup']['steps_per_round']} "
        f"steps. CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, ISA {', '.join(cpu['isa'])}; jax "
        f"{r['versions']['jax']}; load average {r['load_average']['start'][0]} at start, "
        f"{r['load_average']['end'][0]} at the end.", "",
        "| contender | ms / step |", "|---|---|",
        f"| the same jitted step in a bare loop (train()'s batches, already on the device) | {m['bare']:.2f} |",
        f"| `train()` loop (tokenizing + host->device in a thread, metrics per log_every) | {m['loop']:.2f} |",
        f"| host input alone (next + to_global) | {m['host']:.2f} |",
        f"| host input alone, slow loader (+{r['setup']['sleep_ms']} ms sleep) | {m['host_slow']:.2f} |",
        f"| `train()` loop with the slow loader | {m['loop_slow']:.2f} |", "",
        f"Loop overhead over the bare step: {100 * r['loop_overhead']:+.1f}% from the medians (target <= 5%); "
        f"loop / bare per round (the two run back to back): "
        f"{', '.join(f'{x:.2f}' for x in r['loop_over_bare_per_round'])} (median "
        f"{statistics.median(r['loop_over_bare_per_round']):.2f}). Slow input: "
        f"{s['measured_ms']:.2f} ms per step = {s['measured_over_max']:.2f} x max(device, host) "
        f"({s['expected_if_overlapped_ms']:.2f} ms), {s['measured_over_sum']:.2f} x their sum "
        f"({s['expected_if_serial_ms']:.2f} ms)."])


if __name__ == "__main__":
    main()
