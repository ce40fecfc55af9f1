"""Dev evaluation inside training on 2 processes: on every device (`training/deveval.py`, what the loop runs)
vs gathering the weights to host 0 and encoding there while the other process waits (what the loop did before).

    python benchmarks/dev_eval.py                 # gemma3-270m + LoRA, SciFact dev claims over 300 abstracts
    python benchmarks/dev_eval.py --docs 40       # a smoke run

Two local processes (jax.distributed, one CPU device each, each pinned to its own core with
os.sched_setaffinity, the way two hosts of a pod each have their own chips) build the same LoRA training
state, sharded over the 2-device mesh as `bmr train` shards it, then run in turn, --rounds times:
  mesh    dev_eval(run, MeshEncoder.bind(state)): every device encodes its half of each padded batch, only the
          vectors are gathered (what `bmr train` runs at data.dev / train.eval_every);
  host-0  host_params(): the LoRA and frozen trees gathered to every host, folded into plain params, then
          process 0 encodes everything with `Encoder` while process 1 waits at a barrier (the loop before).
Every time is the wall time from a barrier before to a barrier after (the time the training pauses), median of
the rounds after the first (the first compiles). Both must report the same NDCG@10.
Writes benchmarks/results/dev_eval.json (CPU model / ISA, versions) and its section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # run from a checkout
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_dev_folder(out: str, docs: int, seed: int = 0) -> dict:
    """SciFact with its dev-judged abstracts + seeded random others (`docs` in all), dev qrels only."""
    from bmretriever_jax.data.beir import load_beir, subset_beir

    shutil.rmtree(out, ignore_errors=True)  # subset_beir reuses a folder it finds: --docs may have changed
    subset_beir(os.path.join(ROOT, "data", "scifact"), out, docs, seed=seed, splits=["dev"])
    corpus, queries, _ = load_beir(out, "dev")
    return {"queries": len(queries), "documents": len(corpus)}


def child(args) -> None:
    pid = int(os.environ["BMR_PROCESS_ID"])
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[pid % len(cores)]})
    from bmretriever_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    import jax
    import numpy as np
    import transformers
    from jax.experimental import multihost_utils

    from bmretriever_jax.config import load_config
    from bmretriever_jax.convert import hub
    from bmretriever_jax.convert.hf import load_hf
    from bmretriever_jax.embed import Encoder
    from bmretriever_jax.eval.evaluate import evaluate_retrieval
    from bmretriever_jax.parallel import sharding
    from bmretriever_jax.text import instruction_for
    from bmretriever_jax.training.deveval import MeshEncoder, dev_eval
    from bmretriever_jax.training.loop import host_params
    from bmretriever_jax.training.step import init_state, make_mesh, make_optimizer, split_params

    run = load_config(None, [f"model.name={args.model}", f"model.max_length={args.max_length}", "model.dtype=float32",
                             "lora.enabled=true", f"data.dev={args.dev}", "data.dev_split=dev", "data.dev_task=scifact",
                             "train.global_batch_size=2"])
    folder = hub.resolve(run.model.name, quiet=True)
    model_cfg, base = load_hf(folder, dtype=np.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    mesh = make_mesh(run)
    optimizer = make_optimizer(run)
    trainable, frozen = split_params(base, run, jax.random.PRNGKey(0))
    frozen = sharding.shard(frozen, mesh)
    state = init_state(run, trainable, optimizer)
    state = jax.device_put(state, sharding.tree_shardings(state, mesh))
    enc = MeshEncoder(run, model_cfg, tokenizer, mesh).bind(state, frozen, 0)

    def mesh_eval():
        return dev_eval(run, enc)["dev_ndcg@10"]

    def host0_eval():
        params, _ = host_params(run, state, frozen)  # every process takes part in the gather
        ndcg = None
        if jax.process_index() == 0:
            e = Encoder(model_cfg, params, tokenizer, max_length=run.model.max_length, pooling=run.model.pooling,
                        normalize=run.model.normalize, dtype=run.model.dtype)
            ndcg = evaluate_retrieval(e, run.data.dev, "dev", instruction_for("scifact"), progress=False)["ndcg@10"]
        return ndcg

    times = {"mesh": [], "host-0": []}
    ndcg = {}
    for r in range(args.rounds):
        for name, fn in (("mesh", mesh_eval), ("host-0", host0_eval)):
            multihost_utils.sync_global_devices(f"before-{name}-{r}")
            t = time.perf_counter()
            value = fn()
            multihost_utils.sync_global_devices(f"after-{name}-{r}")
            times[name].append(time.perf_counter() - t)
            if value is not None:
                ndcg[name] = value
    if pid == 0:
        print("RESULT " + json.dumps({"times_s": times, "ndcg@10": ndcg}), flush=True)
    multihost_utils.sync_global_devices("end")
    jax.distributed.shutdown()  # together: the coordinator (process 0) must not leave first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--docs", type=int, default=300, help="abstracts in the dev corpus (relevant ones + random)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both contenders (the first compiles)")
    ap.add_argument("--work", default="/tmp/bmr_dev_eval_bench")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dev", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "dev_eval.json"))
    args = ap.parse_args()
    if args.child:
        return child(args)

    import socket

    from common import load_average, replace_section, write_json

    from bmretriever_jax.util.machine import cpu_info, versions

    dev = os.path.join(args.work, "scifact-dev")
    size = make_dev_folder(dev, args.docs)
    load0, t0 = load_average(), time.time()
    with socket.socket() as sock:  # a free local port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dev", dev, "--model", args.model,
           "--max-length", str(args.max_length), "--rounds", str(args.rounds)]
    env = dict(os.environ, BMR_COORDINATOR=f"127.0.0.1:{port}", BMR_NUM_PROCESSES="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    logs = [os.path.join(args.work, f"process{i}.log") for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:  # each process's own output, kept for a post-mortem
            procs.append(subprocess.Popen(cmd, env=dict(env, BMR_PROCESS_ID=str(i)), stdout=log,
                                          stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 3600
    while any(p.poll() is None for p in procs):  # a process that fails leaves the other at a barrier: end it
        if any(p.returncode for p in procs) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(1)
    for p in procs:
        p.wait()
    for i, p in enumerate(procs):
        if p.returncode:
            lines = [x for x in open(logs[i]).read().splitlines() if not x.startswith("    @")]
            raise SystemExit(f"process {i} failed ({p.returncode}), whole log {logs[i]}:\n" + "\n".join(lines[-40:]))
    result = json.loads([line for line in open(logs[0]).read().splitlines() if line.startswith("RESULT ")][-1][7:])
    if abs(result["ndcg@10"]["mesh"] - result["ndcg@10"]["host-0"]) > 1e-4:
        raise SystemExit(f"the two evaluations disagree: NDCG@10 {result['ndcg@10']}")
    steady = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in result["times_s"].items()}
    res = {"command": "python benchmarks/dev_eval.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_info(),
           "versions": versions("jax", "jaxlib", "numpy"), "model": args.model, "max_length": args.max_length,
           "dev": size, "processes": 2, "devices_per_process": 1, "rounds": args.rounds, **result,
           "steady_s": steady, "speedup": steady["host-0"] / steady["mesh"],
           "load_average_start": load0, "load_average_end": load_average(), "seconds": round(time.time() - t0, 1)}
    write_json(args.out, res)
    replace_section(os.path.join(ROOT, "BENCHMARKS.md"), "deveval", render(res))
    print(render(res))


def render(res: dict) -> str:
    c = res["cpu"]
    lines = [f"Command: `{res['command']}`", "",
             f"{res['model']} + LoRA r16 (fp32, max length {res['max_length']}), SciFact dev: {res['dev']['queries']} "
             f"claims over {res['dev']['documents']} abstracts; 2 local processes (jax.distributed), one CPU device "
             f"each, each pinned to its own core. CPU: {c.get('model')}, {c.get('logical_cpus')} logical CPUs "
             f"({', '.join(c.get('isa') or []) or 'no AVX-512'}); load average {res['load_average_start']} -> {res['load_average_end']}. Wall time "
             "the training pauses (barrier to barrier), median of the rounds after the first (which compiles):", "",
             "| dev evaluation | first round (compiles) | steady | NDCG@10 |", "|---|---:|---:|---:|"]
    names = {"mesh": "on every device (`training/deveval.py`, the loop now)",
             "host-0": "weights gathered, host 0 encodes, host 1 waits (the loop before)"}
    for k in ("mesh", "host-0"):
        lines.append(f"| {names[k]} | {res['times_s'][k][0]:.1f} s | {res['steady_s'][k]:.1f} s | "
                     f"{res['ndcg@10'].get(k, float('nan')):.4f} |")
    lines += ["", f"On every device: **{res['speedup']:.2f}x** faster here; each process encodes half of every batch "
              "and no weights move."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
