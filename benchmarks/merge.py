"""Peak memory and time of merging 4 checkpoints of Gemma 3 270M: ours (streamed, `bmr merge`) against mergekit 0.1.5.

    python benchmarks/merge.py [--work /tmp/bmr_merge_bench] [--methods linear ties] [--skip-mergekit]

The 4 checkpoints are the real Gemma 3 270M weights (hub.load('gemma3-270m'), float32) plus seeded Gaussian noise
(std 1e-3), saved once as transformers Gemma3ForCausalLM folders (the layout mergekit's architecture table knows; ours
reads it too). Each merge runs in its own child process, which reports its merge time (imports excluded) and the RSS
after imports; the parent reads the child's peak RSS from wait4 (ru_maxrss). Both tools write float32 safetensors with
one shard (mergekit's default shard size is 5B parameters, ours 5 GiB), so both hold one output model. The two outputs
are compared tensor by tensor. Results: a markdown table on stdout and benchmarks/results/merge.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
N_MODELS = 4
NOISE = 1e-3


def make_checkpoints(work: str) -> dict:
    """base/ (the real weights) and m0..m3/ (perturbed), once; returns their paths."""
    paths = {"base": os.path.join(work, "base"), **{f"m{i}": os.path.join(work, f"m{i}") for i in range(N_MODELS)}}
    stamp = os.path.join(work, "READY")
    if os.path.exists(stamp):
        return paths
    import numpy as np
    from safetensors.numpy import save_file

    from bmretriever_jax.convert import hub
    from bmretriever_jax.convert.hf import config_to_hf
    from bmretriever_jax.convert.names import params_to_hf
    from bmretriever_jax.convert.export import copy_tokenizer

    shutil.rmtree(work, ignore_errors=True)
    cfg, params, _, folder = hub.load("gemma3-270m", quiet=True)
    hf_cfg = dict(config_to_hf(cfg), architectures=["Gemma3ForCausalLM"], model_type="gemma3_text")
    tensors = params_to_hf(cfg, params, prefix="model.")
    del params
    for name, path in paths.items():
        os.makedirs(path)
        seed = 0 if name == "base" else 1 + int(name[1:])
        rng = np.random.default_rng(seed)
        out = {k: np.ascontiguousarray(v, np.float32) if name == "base" else
               (v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(NOISE)).astype(np.float32)
               for k, v in tensors.items()}
        save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        del out
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        copy_tokenizer(folder, path)
        print(f"  wrote {path}", flush=True)
    open(stamp, "w").close()
    return paths


def merge_config(method: str, paths: dict) -> dict:
    models = [paths[f"m{i}"] for i in range(N_MODELS)]
    if method == "linear":
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": m, "parameters": {"weight": 1.0 / N_MODELS}} for m in models]}
    if method == "ties":
        return {"merge_method": "ties", "base_model": paths["base"], "dtype": "float32",
                "parameters": {"density": 0.5},
                "models": [{"model": m, "parameters": {"weight": 1.0 / N_MODELS}} for m in models]}
    raise ValueError(method)


# The child programs: import, note RSS, merge, print {"seconds", "rss_after_import_mb"} as the last line.
_RSS = textwrap.dedent("""
    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
""")
CHILD = {
    "ours": _RSS + textwrap.dedent("""
        import json, sys, time
        from bmretriever_jax.merging.folder import merge_to_folder
        cfg, out = json.loads(sys.argv[1]), sys.argv[2]
        base = rss_mb(); t = time.perf_counter()
        merge_to_folder(cfg, out)
        print(json.dumps({"seconds": time.perf_counter() - t, "rss_after_import_mb": base}))
    """),
    "mergekit": _RSS + textwrap.dedent("""
        import json, sys, time
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
        cfg, out = json.loads(sys.argv[1]), sys.argv[2]
        conf = MergeConfiguration.model_validate(cfg)
        base = rss_mb(); t = time.perf_counter()
        run_merge(conf, out, options=MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=True,
                                                  quiet=True))
        print(json.dumps({"seconds": time.perf_counter() - t, "rss_after_import_mb": base}))
    """),
}


def run_child(tool: str, cfg: dict, out: str) -> dict:
    """Run one merge in a fresh child process; its peak RSS comes from wait4 (so peaks of runs do not mix)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r_out, w_out = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD[tool], json.dumps(cfg), out], stdout=w_out,
                            stderr=subprocess.PIPE, env=env)
    os.close(w_out)
    with os.fdopen(r_out) as f:
        stdout = f.read()
    stderr = proc.stderr.read().decode(errors="replace")
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    return {"merge_seconds": round(res["seconds"], 2), "process_seconds": round(wall, 2),
            "rss_after_import_mb": round(res["rss_after_import_mb"]), "peak_rss_mb": round(rusage.ru_maxrss / 1024)}


def compare(ours: str, theirs: str) -> float:
    """Max |difference| over all tensors (mergekit's names carry the CausalLM prefix "model.")."""
    import numpy as np

    from bmretriever_jax.convert.names import strip_prefix
    from bmretriever_jax.convert.weights import SafetensorsReader

    a, b = SafetensorsReader(ours), SafetensorsReader(theirs)
    names_b = strip_prefix(b.keys())
    if set(names_b) != set(a.keys()):
        raise ValueError(f"different tensors: {sorted(set(names_b) ^ set(a.keys()))[:5]}")
    return max(float(np.abs(a.read(n).astype(np.float32) - b.read(names_b[n]).astype(np.float32)).max())
               for n in a.keys())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bmr_merge_bench")
    p.add_argument("--methods", nargs="+", default=["linear", "ties"])
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="runs per merge: the fastest is kept (a shared machine is noisy)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "merge.json"))
    a = p.parse_args(argv)
    print("making the 4 checkpoints (once) ...", flush=True)
    paths = make_checkpoints(a.work)
    size_mb = os.path.getsize(os.path.join(paths["m0"], "model.safetensors")) / 2**20
    tools = ["ours"] + ([] if a.skip_mergekit else ["mergekit"])
    rows = []
    for method in a.methods:
        cfg = merge_config(method, paths)
        outs = {}
        for tool in tools:
            outs[tool] = os.path.join(a.work, f"out-{tool}-{method}")
            print(f"{tool} {method} ...", flush=True)
            runs = [run_child(tool, cfg, outs[tool]) for _ in range(a.repeat)]
            r = dict(min(runs, key=lambda x: x["merge_seconds"]), peak_rss_mb=max(x["peak_rss_mb"] for x in runs))
            rows.append({"tool": tool, "method": method, **r})
            print(f"  {r}", flush=True)
        if "mergekit" in outs:
            diff = compare(outs["ours"], outs["mergekit"])
            for r in rows[-len(tools):]:
                r["max_abs_diff_vs_mergekit"] = diff
            print(f"  max |ours - mergekit| = {diff:.3g}", flush=True)
    head = ("| method | tool | merge s | process s | RSS after imports MB | peak RSS MB | max abs diff vs mergekit |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r['method']} | {r['tool']} | {r['merge_seconds']:.1f} | {r['process_seconds']:.1f} | "
                      f"{r['rss_after_import_mb']} | {r['peak_rss_mb']} | "
                      f"{r.get('max_abs_diff_vs_mergekit', float('nan')):.2g} |" for r in rows]
    table = "\n".join(lines)
    from bmretriever_jax.util.machine import cpu_info

    cpu = cpu_info()
    print(f"\n{N_MODELS} x Gemma 3 270M float32 checkpoints ({size_mb:.0f} MB each), "
          f"{os.cpu_count()} CPUs:\n\n{table}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"checkpoint_mb": round(size_mb), "n_models": N_MODELS, "cpus": os.cpu_count(), "cpu": cpu,
                   "machine": platform.machine(), "python": platform.python_version(), "rows": rows,
                   "command": " ".join(["python benchmarks/merge.py", *(argv if argv is not None else sys.argv[1:])]),
                   "table": table}, f, indent=1)
    sys.path.insert(0, HERE)
    import common

    command = " ".join(["python benchmarks/merge.py", *(argv if argv is not None else sys.argv[1:])])
    common.replace_section(os.path.join(HERE, "..", "BENCHMARKS.md"), "merge",
                           f"Command: `{command}`"
                           f"\n\n{N_MODELS} x Gemma 3 270M float32 checkpoints ({size_mb:.0f} MB each), "
                           f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs "
                           f"({', '.join(cpu['isa']) or 'no AVX-512'}), load average {os.getloadavg()[0]:.1f} at the "
                           f"end:\n\n{table}")
    return rows


if __name__ == "__main__":
    main()
