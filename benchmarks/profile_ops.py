"""Where an encode pass and a LoRA training step spend their time: ours (XLA:CPU) beside PyTorch, same run.

    python benchmarks/profile_ops.py                     # encode 64 passages x 256 tokens + one training step, both sides
    python benchmarks/profile_ops.py --only encode       # encode only
    python benchmarks/profile_ops.py --quick             # 32 passages, no BENCHMARKS.md update

Ours: `jax.profiler.trace` around the jitted calls. XLA:CPU records one event per executed op (thunk), named
by its HLO instruction (`hlo_op`, `hlo_module`). Each instruction is looked up in the optimized HLO of its
module (`compiled.as_text()`), and a category is read from what it computes and the `op_name` metadata. The
metadata carries the Flax module path (`.../attn/...`, `.../mlp/...`). The categories are:
  dense matmuls      dots without batch dimensions: q/k/v/o, MLP, LoRA factors (forward and backward)
  attention matmuls  batched dots inside attention: scores q.k and probabilities x v (XLA fuses the softmax
                     and, in the forward pass, the v projection into the same YNNPACK call: counted here)
  softmax / masks    what else attention computes: exp, max, sum, the bias add, soft-capping
  norms              RMSNorm (rsqrt and the ops around it)
  copies / layout    copy, transpose, concatenate, slices, dynamic-update-slice, pad: data movement only
  embedding gather   the token-embedding lookup (and its scatter-add in training)
  other elementwise  RoPE, activations, residual adds, the loss, the optimizer update
The time of a category is the union of its events' intervals over every thread, as wall-clock seconds.
"host / idle" is the wall time of the calls minus the union of all op intervals. That covers dispatch,
transfers, the Python loop, and waits between ops.

PyTorch: `torch.profiler` around the same calls. Each aten op's self CPU time is binned by its name: mm/addmm
-> dense matmuls; the SDPA kernel, bmm/baddbmm -> attention matmuls; softmax -> softmax / masks;
rsqrt/pow/mean -> norms; copy_/clone/cat/contiguous/_to_copy -> copies; embedding -> gather; the rest
elementwise. The muls and adds of torch's RMSNorm therefore land in "other elementwise": the torch bins are
coarser than ours. "host / idle" is the wall time minus the summed self times (Python, dispatch, framework).

Both sides run the same token ids and the same precision (fp32 on CPUs without bf16 units, bf16 compute
where `dtype: auto` picks it). Writes benchmarks/results/profile.json and the BENCHMARKS.md `profile`
section. (Not named profile.py: run as a script, that would shadow the standard library's `profile`
module, which torch and transformers import.)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # run from a checkout
sys.path.insert(0, HERE)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: torch's OpenMP threads do not spin
from bmretriever_jax.util.allocator import keep_freed_memory  # noqa: E402

ALLOCATOR = "keep" if keep_freed_memory() else "system"  # before jax starts its threads: see allocator.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

CATEGORIES = ("dense matmuls", "attention matmuls", "softmax / masks", "norms", "copies / layout",
              "embedding gather", "other elementwise", "host / idle")
LAYOUT_OPS = {"copy", "transpose", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad",
              "reshape", "bitcast", "broadcast", "parameter", "constant", "tuple", "get-tuple-element",
              "copy-start", "copy-done", "iota", "reverse"}


def log(msg: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# XLA: optimized HLO -> a category per instruction
# ----------------------------------------------------------------------------------------------------
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> Dict[str, dict]:
    """{instruction name: {"op", "calls": [computation], "op_names": [...], "batched_dot": bool}} for every
    instruction of an optimized HLO module, and {"%comp:NAME": [instruction names]} for its computations."""
    out: Dict[str, dict] = {}
    comp = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and not _INST.match(line):
            comp = m.group(1)
            out["%comp:" + comp] = []
            continue
        m = _INST.match(line)
        if not m or comp is None:
            continue
        name, op, rest = m.group(1), m.group(3), m.group(4)
        calls = [x.strip().lstrip("%") for c in _CALLS.findall(rest) for x in c.strip("{}").split(",") if x.strip()]
        out[name] = {"op": op, "calls": calls, "op_names": _OPNAME.findall(rest),
                     "batched_dot": op == "dot" and "lhs_batch_dims" in rest}
        out["%comp:" + comp].append(name)
    return out


def _closure(insts: Dict[str, dict], name: str, seen=None) -> List[dict]:
    """The instruction and everything its called computations contain (fusions, custom fusions)."""
    seen = set() if seen is None else seen
    if name in seen or name not in insts:
        return []
    seen.add(name)
    inst = insts[name]
    got = [inst]
    if inst["op"] in ("while", "conditional", "call"):
        return got  # control flow: its body's ops have events of their own
    for comp in inst["calls"]:
        for sub in insts.get("%comp:" + comp, []):
            got += _closure(insts, sub, seen)
    return got


def classify_xla(insts: Dict[str, dict], name: str) -> str:
    parts = _closure(insts, name)
    if not parts:
        return "other elementwise"
    ops = {p["op"] for p in parts} - {"fusion"}  # the fusion instruction itself: what it holds decides
    names = " ".join(n for p in parts for n in p["op_names"])
    if "dot" in ops or "convolution" in ops:
        attention = any(p["batched_dot"] and any("/attn/" in n for n in p["op_names"]) for p in parts)
        return "attention matmuls" if attention else "dense matmuls"
    if "gather" in ops or "scatter" in ops:
        return "embedding gather"
    if ops <= LAYOUT_OPS:
        return "copies / layout"
    if "rsqrt" in ops or re.search(r"/(?:\w*_)?norm\b", names):  # before attention: q/k norms live under attn/
        return "norms"
    if "/attn/" in names and ({"exponential", "reduce", "maximum", "select"} & ops or "softmax" in names):
        return "softmax / masks"
    return "other elementwise"


def _union(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def xla_profile(fn: Callable[[], object], hlo_texts: Dict[str, str], calls: int) -> dict:
    """Run fn() `calls` times under jax.profiler.trace -> {"wall_s", "seconds": {category: s}, "top": [...]}."""
    from jax.profiler import ProfileData

    index = {mod: hlo_instructions(text) for mod, text in hlo_texts.items()}
    folder = tempfile.mkdtemp(prefix="bmr-profile-")
    with jax.profiler.trace(folder):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - t
    data = ProfileData.from_file(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0])
    by_cat: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
    per_op: Dict[Tuple[str, str], float] = defaultdict(float)
    unknown = set()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict((k, v) for k, v in ev.stats if k in ("hlo_op", "hlo_module"))
                if "hlo_op" not in stats:
                    continue
                mod = stats.get("hlo_module", "")
                insts = next((v for k, v in index.items() if mod and (k == mod or mod.startswith(k)
                                                                     or k.startswith(mod))), None)
                if insts is None or stats["hlo_op"] not in insts:
                    unknown.add(f"{mod}:{stats['hlo_op']}")
                    continue
                if insts[stats["hlo_op"]]["op"] in ("while", "conditional", "call"):
                    continue  # a loop's own event spans its body's ops
                cat = classify_xla(insts, stats["hlo_op"])
                by_cat[cat].append((ev.start_ns, ev.start_ns + ev.duration_ns))
                per_op[(cat, stats["hlo_op"])] += ev.duration_ns * 1e-9
    seconds = {c: _union(v) * 1e-9 for c, v in by_cat.items()}
    all_ops = _union([iv for v in by_cat.values() for iv in v]) * 1e-9
    seconds["host / idle"] = max(wall - all_ops, 0.0)
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_s": wall, "seconds": seconds, "ops_s": all_ops, "unmatched_events": sorted(unknown)[:20],
            "top_ops": [{"category": c, "op": o, "s": round(s, 4)} for (c, o), s in top]}


# ----------------------------------------------------------------------------------------------------
# PyTorch: torch.profiler, aten ops binned by name
# ----------------------------------------------------------------------------------------------------
def classify_torch(name: str) -> str:
    n = name.split("::")[-1].lower()
    if n in ("mm", "addmm", "_addmm_activation"):
        return "dense matmuls"
    if "scaled_dot_product" in n or n in ("bmm", "baddbmm"):
        return "attention matmuls"
    if "softmax" in n or n in ("masked_fill", "masked_fill_", "where"):
        return "softmax / masks"
    if n in ("rsqrt", "pow", "mean"):
        return "norms"
    if n in ("copy_", "clone", "cat", "contiguous", "_to_copy", "to", "index_copy_", "fill_", "zero_", "zeros",
             "empty_like", "stack"):
        return "copies / layout"
    if "embedding" in n or n == "index_select":
        return "embedding gather"
    return "other elementwise"


def torch_profile(fn: Callable[[], object], calls: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - t
    seconds: Dict[str, float] = defaultdict(float)
    per_op: Dict[Tuple[str, str], float] = defaultdict(float)
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue  # autograd / profiler wrappers: their work is in the aten ops they call
        cat = classify_torch(ev.key)
        s = ev.self_cpu_time_total * 1e-6
        seconds[cat] += s
        per_op[(cat, ev.key)] += s
    ops = sum(seconds.values())
    seconds["host / idle"] = max(wall - ops, 0.0)
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    del torch
    return {"wall_s": wall, "seconds": dict(seconds), "ops_s": ops,
            "top_ops": [{"category": c, "op": o, "s": round(s, 4)} for (c, o), s in top]}


# ----------------------------------------------------------------------------------------------------
# The two workloads
# ----------------------------------------------------------------------------------------------------
def _variants(build):
    """{label: build()} for the optimisation variants of ours, each traced under its own setting: "ours, 1
    attention block" (before: the T x T causal attention as one computation) and "ours" (the defaults)."""
    from bmretriever_jax.models import decoder

    default = decoder.CPU_CAUSAL_BLOCKS
    out = {}
    try:
        for label, blocks in (("ours, 1 attention block", 1), ("ours", default)):
            decoder.CPU_CAUSAL_BLOCKS = blocks
            out[label] = build()  # traces and compiles now; the calls below reuse that executable (same shapes)
    finally:
        decoder.CPU_CAUSAL_BLOCKS = default
    return out


def encode_workload(args, cfg, params, tok, folder, dtype: str):
    """-> ({label: (ours fn, {module: hlo})}, torch fn, description): one pass over the passages each."""
    import functools

    import torch
    import transformers

    import encode as bench
    from bmretriever_jax.embed import embed_batch

    batches, real = bench.load_batches(tok, args.passages, args.seq_len, args.batch)
    dev = [(jnp.asarray(i), jnp.asarray(m)) for i, m in batches]

    def build():
        fn = jax.jit(functools.partial(embed_batch, cfg, pooling="last", normalize=True, dtype=jnp.dtype(dtype)))
        hlo = {"jit_embed_batch": fn.lower(params, *dev[0]).compile().as_text()}
        fn(params, *dev[0]).block_until_ready()
        return (lambda: [np.asarray(fn(params, i, m)) for i, m in dev]), hlo

    ours = _variants(build)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).to(tdtype).eval()
    theirs = bench.theirs(model, batches)
    what = (f"encode {args.passages} SciFact passages x {args.seq_len} tokens (left padded, "
            f"{real / (args.passages * args.seq_len):.0%} real), batch {args.batch}")
    return ours, theirs, what


def train_workload(args, cfg, params_np, tok, folder, dtype: str):
    """-> ({label: (ours fn, {module: hlo})}, torch fn, description): one training step each (train.py's)."""
    import train as bench

    run = bench.make_run(args.train_batch, 32, 128, 1, dtype=dtype, remat=dtype != "float32")
    batch_np = bench.real_batch(tok, run)
    frozen = bench.ours_frozen(params_np, run)

    def build():
        step = bench.Ours(cfg, params_np, frozen, run, batch_np)
        hlo = {"jit_train_step": step.fn.lower(step.state, step.frozen, step.batch).compile().as_text()}
        step.step()
        return step.step, hlo

    ours = _variants(build)
    theirs = bench.Torch(folder, "fp32" if dtype == "float32" else "bf16-autocast", batch_np, 2)
    what = (f"LoRA training step (benchmarks/train.py's), global batch {args.train_batch} queries x 32 tokens "
            f"+ {2 * args.train_batch} passages x 128, remat {'off' if dtype == 'float32' else 'on'}")
    return ours, theirs.step, what


def shares_table(results: Dict[str, dict]) -> str:
    names = list(results)
    head = "| category | " + " | ".join(f"{n} s | {n} share" for n in names) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(names)]
    for c in CATEGORIES:
        cells = []
        for n in names:
            s = results[n]["seconds"].get(c, 0.0)
            cells.append(f"{s:.2f} | {s / results[n]['wall_s']:.1%}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **wall** | " + " | ".join(f"**{results[n]['wall_s']:.2f}** | " for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--only", choices=["encode", "train"], default=None)
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=8, help="queries per training step (+1 negative each)")
    ap.add_argument("--calls", type=int, default=2, help="profiled calls per side (after the warm-up calls)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="unprofiled calls per side first: compilation, and the heap reaching its steady size "
                         "(a training step's first calls page-fault their temporaries in; see util/allocator.py)")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU has bf16 units, else float32")
    ap.add_argument("--quick", action="store_true", help="32 passages, 1 call, no BENCHMARKS.md update")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dump-hlo", default=None, metavar="DIR", help="also write each profiled module's optimized HLO")
    ap.add_argument("--markdown", default=os.path.join(HERE, "..", "BENCHMARKS.md"))
    args = ap.parse_args()
    from bmretriever_jax.util.precision import resolve_dtype

    dtype = jnp.dtype(resolve_dtype(args.dtype)).name
    if args.quick:
        args.passages, args.calls, args.warmup, args.markdown = 32, 1, 1, ""
    args.out = args.out or common.results_path("profile", quick=args.quick)

    import torch

    from bmretriever_jax.convert import hub

    torch.set_num_threads(os.cpu_count())
    load_start = common.load_average()
    cfg, params_np, tok, folder = hub.load(args.model, quiet=True)
    params = jax.tree.map(jnp.asarray, params_np)
    out = {"dtype": dtype, "cpu": common.cpu_info(), "allocator": ALLOCATOR, "jax": jax.__version__,
           "torch": torch.__version__, "load_average_start": load_start, "workloads": {}}
    for kind in ("encode", "train"):
        if args.only and kind != args.only:
            continue
        make = encode_workload if kind == "encode" else train_workload
        ours, theirs, what = make(args, cfg, params if kind == "encode" else params_np, tok, folder, dtype)
        if args.dump_hlo:
            os.makedirs(args.dump_hlo, exist_ok=True)
            for label, (_, hlo) in ours.items():
                for mod, text in hlo.items():
                    with open(os.path.join(args.dump_hlo, f"{mod}-{label.replace(' ', '_').replace(',', '')}.txt"),
                              "w") as f:
                        f.write(text)
        log(f"{kind}: {args.warmup} warm-up call(s) per contender")
        for _ in range(args.warmup):
            for fn, _ in ours.values():
                fn()
            theirs()
        results = {}
        for label, (fn, hlo) in ours.items():
            log(f"{kind}: profiling {label} ({args.calls} calls)")
            results[label] = xla_profile(fn, hlo, args.calls)
            if results[label]["unmatched_events"]:
                log(f"events not found in the HLO: {results[label]['unmatched_events']}")
        log(f"{kind}: profiling torch ({args.calls} calls)")
        results["torch"] = torch_profile(theirs, args.calls)
        out["workloads"][kind] = {"what": what, "results": results}
        print(shares_table(results))
    out["load_average_end"] = common.load_average()
    common.write_json(args.out, out)
    cpu = out["cpu"]
    isa = ", ".join(cpu["isa"]) or "no AVX-512 / bf16 / AMX"
    lines = [f"Command: `python benchmarks/profile_ops.py`\n",
             f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs ({isa}); {dtype} on both sides; jax "
             f"{jax.__version__}, torch {torch.__version__}; load average {load_start} -> {out['load_average_end']}. "
             f"Seconds are wall-clock over {args.calls} call(s) after {args.warmup} warm-up call(s); a share is of the "
             f"wall time.\n"]
    for kind, w in out["workloads"].items():
        res = w["results"]
        walls = ", ".join(f"{k} {r['wall_s']:.2f} s" for k, r in res.items())
        lines.append(f"**{w['what']}.** Wall time profiled (both profilers add overhead): {walls}.\n")
        lines.append(shares_table(res) + "\n")
        tops = ", ".join(f"{t['op']} ({t['category']}) {t['s']:.2f} s" for t in res["ours"]["top_ops"][:5])
        lines.append(f"Ours, the largest ops: {tops}.\n")
    if args.markdown:
        common.replace_section(args.markdown, "profile", "\n".join(lines))
        log(f"wrote the profile section of {args.markdown}")
    log(f"results: {args.out}")


if __name__ == "__main__":
    main()
