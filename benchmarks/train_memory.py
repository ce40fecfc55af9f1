"""Peak memory of the contrastive training step vs global batch, with and without the gradient cache.

Two measurements (run by benchmarks/train.py; this file is also the subprocess entry of the second):
  compiled  our real train step (make_train_step, bf16, remat on, LoRA) lowered and compiled for each global
            batch, no execution: XLA's buffer assignment gives the bytes of arguments (frozen base f32,
            adapters, AdamW moments, batch), outputs, outputs aliased to donated inputs and temporaries.
            peak = arguments + temporaries + outputs - aliased: the most the step holds at once. This is the
            honest way to reach a 4096 batch on a 2-core CPU (the step would take hours).
  rss       one real training step per subprocess (ours and torch + peft, bf16 with f32 master weights):
            resident set size sampled every ms during the step (peak), after setup (baseline) and the
            process's VmHWM. tracemalloc does not see torch's or XLA's allocators; RSS sees both.

    python benchmarks/train_memory.py --child '{"side": "ours", "batch": 64, "grad_cache": 16, ...}'
    python benchmarks/train_memory.py --replot benchmarks/results/train.json benchmarks/results/train_memory.png
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

GB = 1024 ** 3


# ----------------------------------------------------------------------------------------------------
# Compiled-program memory (no execution)
# ----------------------------------------------------------------------------------------------------
def step_memory(model_cfg, base_np: dict, run) -> dict:
    """Compile our train step for `run`'s shapes and return XLA's memory analysis (bytes) + compile time."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bmretriever_jax.parallel import sharding
    from bmretriever_jax.training import (BATCH_AXES, init_state, make_mesh, make_optimizer, make_train_step,
                                       split_params)

    mesh = make_mesh(run)
    optimizer = make_optimizer(run)
    trainable_model, _ = split_params(base_np, run, jax.random.PRNGKey(0))
    state = init_state(run, trainable_model, optimizer)  # small: adapters + moments
    shardings = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    # the frozen base and the batch only as shapes: nothing of their size is allocated here
    frozen_sh = sharding.tree_shardings(base_np, mesh)
    frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base_np, frozen_sh)
    B, G = run.train.global_batch_size, 1 + run.data.num_negatives
    Tq, Tp = run.model.query_max_length, run.model.max_length
    row = NamedSharding(mesh, P(BATCH_AXES))
    batch = {"q_ids": jax.ShapeDtypeStruct((B, Tq), jnp.int32, sharding=row),
             "q_mask": jax.ShapeDtypeStruct((B, Tq), jnp.int32, sharding=row),
             "p_ids": jax.ShapeDtypeStruct((B * G, Tp), jnp.int32, sharding=row),
             "p_mask": jax.ShapeDtypeStruct((B * G, Tp), jnp.int32, sharding=row)}
    fn = make_train_step(model_cfg, run, optimizer, mesh, shardings)
    t = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    seconds = time.perf_counter() - t
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                           "temp_size_in_bytes", "generated_code_size_in_bytes")}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["temp_size_in_bytes"] + out["output_size_in_bytes"]
                         - out["alias_size_in_bytes"])
    out["compile_s"] = seconds
    return out


def compiled_sweep(model_cfg, base_np, batches, chunks, args, log) -> dict:
    from train import make_run

    variants = {"no grad cache": 0, **{f"grad cache {c}": c for c in chunks}}
    rows = {name: {} for name in variants}
    for B in batches:
        for name, c in variants.items():
            run = make_run(B, args.query_len, args.passage_len, args.negatives, dtype="bfloat16", remat=True,
                           grad_cache=c, model=args.model)
            r = step_memory(model_cfg, base_np, run)
            rows[name][B] = r
            log(f"compiled memory B={B} {name}: peak {r['peak_bytes'] / GB:.2f} GiB (args "
                f"{r['argument_size_in_bytes'] / GB:.2f}, temp {r['temp_size_in_bytes'] / GB:.2f}; compiled in "
                f"{r['compile_s']:.0f} s)")
    G = 1 + args.negatives
    # the criterion is stated from batch 64 up; smaller batches (if swept) are shown, not judged
    ref = 64 if 64 in batches else batches[0]
    base_bytes = sum(x.nbytes for x in jax_leaves(base_np))
    n_params = sum(x.size for x in jax_leaves(base_np))
    lines = [f"Peak memory of our compiled training step (bf16 compute, f32 master weights, remat on, LoRA r16) vs "
             f"global batch, {args.query_len}-token queries + {G} x {args.passage_len}-token passages per query; "
             "from XLA's buffer assignment (arguments + temporaries + outputs - outputs aliased to donated inputs), "
             f"no execution. Arguments include the f32 frozen base ({base_bytes / GB:.2f} GiB for "
             f"{n_params / 1e6:.0f} M params).", "",
             "| global batch | " + " | ".join(f"{n}: peak GiB (temp GiB)" for n in variants) + " | "
             + " | ".join(f"{n}: peak / peak at {ref}" for n in variants) + " |",
             "|---|" + "---|" * (2 * len(variants))]
    for B in batches:
        cells = [f"{rows[n][B]['peak_bytes'] / GB:.2f} ({rows[n][B]['temp_size_in_bytes'] / GB:.2f})" for n in variants]
        cells += [f"{rows[n][B]['peak_bytes'] / rows[n][ref]['peak_bytes']:.3f}x" for n in variants]
        lines.append(f"| {B} | " + " | ".join(cells) + " |")
    growth = {n: rows[n][batches[-1]]["peak_bytes"] / rows[n][ref]["peak_bytes"] for n in variants}
    lines += ["", "Peak growth from batch {} to {}: {} (target with the gradient cache: <= 1.25x).".format(
        ref, batches[-1], ", ".join(f"{n} {g:.2f}x" for n, g in growth.items()))]
    return {"rows": {n: {str(b): r for b, r in v.items()} for n, v in rows.items()}, "growth": growth,
            "growth_from": ref, "frozen_base_bytes": base_bytes, "table": lines}


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------------------------------
# Measured RSS, one subprocess per configuration
# ----------------------------------------------------------------------------------------------------
def _rss() -> tuple:
    """(resident bytes, anonymous resident bytes) of this process. Resident includes file-backed pages, e.g.
    transformers' memory-mapped safetensors weights, which are only resident once touched."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page


def _vm_hwm() -> int:
    """Peak resident bytes of this process image (VmHWM; unlike ru_maxrss it is not inherited across exec from
    the parent, whose peak was far higher)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


class RssSampler:
    """Max resident (and anonymous resident) bytes while the `with` block runs: a thread polling
    /proc/self/statm every ms (torch and XLA release the GIL while they compute)."""

    def __enter__(self):
        self.peak, self.peak_anon = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        rss, anon = _rss()
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def child(spec: dict) -> dict:
    """One configuration: set up, then one measured training step. -> {baseline, peak, peak anon, VmHWM, ...}."""
    import torch

    torch.set_num_threads(os.cpu_count())
    from bmretriever_jax.convert import hub
    from train import Ours, Torch, make_run, ours_frozen, real_batch

    run = make_run(spec["batch"], spec["query_len"], spec["passage_len"], spec["negatives"], dtype="bfloat16",
                   remat=spec.get("remat", True), grad_cache=spec.get("grad_cache", 0), model=spec["model"])
    model_cfg, base_np, tok, folder = hub.load(spec["model"], quiet=True)
    batch_np = real_batch(tok, run)
    out = dict(spec)
    if spec["side"] == "ours":
        frozen = ours_frozen(base_np, run)
        o = Ours(model_cfg, base_np, frozen, run, batch_np)
        del base_np
        gc.collect()
        # compile outside the measured window: the step's memory, not the compiler's
        compiled = o.fn.lower(o.state, o.frozen, o.batch).compile()
        m = compiled.memory_analysis()
        out["compiled_peak_bytes"] = int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                                         - m.alias_size_in_bytes)

        def step():
            o.state, metrics = compiled(o.state, o.frozen, o.batch)
            return float(metrics["loss"])
    else:
        del base_np
        gc.collect()
        t = Torch(folder, spec["mode"], batch_np, 1 + spec["negatives"], checkpointing=spec.get("checkpointing", False))
        step = t.step
    gc.collect()
    out["baseline_bytes"], out["baseline_anon_bytes"] = _rss()
    t0 = time.perf_counter()
    with RssSampler() as s:
        out["loss"] = step()
    out["step_s"] = time.perf_counter() - t0
    out["peak_bytes"], out["peak_anon_bytes"] = s.peak, s.peak_anon
    out["vm_hwm_bytes"] = _vm_hwm()
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


def rss_sweep(args, batches, chunk: int, log, torch_too: bool = True) -> dict:
    base = {"model": args.model, "query_len": args.query_len, "passage_len": args.passage_len,
            "negatives": args.negatives}
    configs = {"ours (no grad cache)": {"side": "ours", "grad_cache": 0},
               f"ours (grad cache {chunk})": {"side": "ours", "grad_cache": chunk}}
    if torch_too:
        configs.update({"torch bf16 autocast": {"side": "torch", "mode": "bf16-autocast"},
                        "torch bf16 autocast + grad ckpt": {"side": "torch", "mode": "bf16-autocast",
                                                            "checkpointing": True}})
    rows = {n: {} for n in configs}
    for B in batches:
        for name, cfg in configs.items():
            spec = {**base, **cfg, "batch": B}
            t = time.perf_counter()
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                               capture_output=True, text=True)
            res = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not res:
                log(f"rss B={B} {name}: FAILED (exit {p.returncode}): {p.stderr[-2000:]}")
                rows[name][B] = {"error": p.stderr[-2000:], "returncode": p.returncode}
                continue
            r = json.loads(res[-1][len("RESULT "):])
            rows[name][B] = r
            log(f"rss B={B} {name}: baseline {r['baseline_bytes'] / GB:.2f} GiB, peak during step "
                f"{r['peak_bytes'] / GB:.2f} GiB (anonymous {r['peak_anon_bytes'] / GB:.2f}), VmHWM "
                f"{r['vm_hwm_bytes'] / GB:.2f} GiB, step "
                f"{r['step_s']:.0f} s ({time.perf_counter() - t:.0f} s with setup)")
    lines = ["Measured resident memory of one training step (one subprocess per row; bf16 compute with f32 master "
             "weights on both sides, remat on for ours; RSS sampled every ms during the step). 'baseline' = "
             "after setup (model, adapters, optimizer, batch; ours also compiled), 'peak' = max during the "
             "step, 'anon' = the same without file-backed pages (transformers memory-maps the f32 safetensors, "
             "so torch's untouched weights, most of the 0.67 GB embedding table, are never resident; ours copies "
             "the whole base into its own buffers), 'VmHWM' = the process's lifetime peak (includes model "
             "loading and, for ours, compilation). Absolute numbers include each runtime's own footprint "
             "(both processes import jax and torch).", "",
             "| configuration | global batch | baseline GiB | peak during step GiB | peak - baseline GiB | "
             "peak anon GiB | VmHWM GiB | ours compiled peak GiB | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in configs:
        for B in batches:
            r = rows[name][B]
            if "error" in r:
                lines.append(f"| {name} | {B} | failed (exit {r['returncode']}) | | | | | | |")
                continue
            cp = f"{r['compiled_peak_bytes'] / GB:.2f}" if "compiled_peak_bytes" in r else ""
            lines.append(f"| {name} | {B} | {r['baseline_bytes'] / GB:.2f} | {r['peak_bytes'] / GB:.2f} | "
                         f"{(r['peak_bytes'] - r['baseline_bytes']) / GB:.2f} | {r['peak_anon_bytes'] / GB:.2f} | "
                         f"{r['vm_hwm_bytes'] / GB:.2f} | {cp} | {r['step_s']:.0f} |")
    return {"rows": {n: {str(b): r for b, r in v.items()} for n, v in rows.items()}, "table": lines}


# ----------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------
def plot(result: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    mem = result["memory"]["rows"]
    first_gc = None
    for name, rows in mem.items():
        bs = sorted(int(b) for b in rows)
        ys = [rows[str(b)]["peak_bytes"] / GB for b in bs]
        ax.plot(bs, ys, marker="o", label=f"ours, {name}: compiled step (buffers only)")
        ref = str(result["memory"].get("growth_from", bs[0]))
        if name != "no grad cache" and first_gc is None:
            first_gc = rows[ref]["peak_bytes"] / GB
    if first_gc is not None:
        ax.axhline(1.25 * first_gc, color="grey", ls=":", lw=1,
                   label=f"1.25x grad-cache peak at batch {result['memory'].get('growth_from', '')}")
    markers = {"ours": "s", "torch": "^"}
    for name, rows in result.get("rss", {}).get("rows", {}).items():
        pts = sorted((int(b), r["peak_bytes"] / GB) for b, r in rows.items() if "peak_bytes" in r)
        if pts:
            ax.plot(*zip(*pts), ls="--", marker=markers["torch" if name.startswith("torch") else "ours"],
                    label=f"{name}: measured process RSS peak")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([t for t in (1, 1.5, 2, 3, 5, 10, 20, 40, 80, 160) if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]])
    ax.set_xlabel("global batch (queries; each with 1 positive + hard negatives)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title("Gemma 3 270M LoRA training step: peak memory vs global batch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help="JSON spec of one RSS measurement (run by train.py)")
    ap.add_argument("--replot", nargs=2, metavar=("RESULT_JSON", "PNG"), help="redraw the plot from a result JSON")
    a = ap.parse_args()
    if a.replot:
        with open(a.replot[0]) as f:
            plot(json.load(f), a.replot[1])
    elif a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
    else:
        ap.error("nothing to do: pass --child or --replot")
