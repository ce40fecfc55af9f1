"""`bmr sweep CONFIG.yaml --grid KEY=V1,V2 [--grid ...] --out DIR`: a large-batch scaling study.

Every point of the grid (the product of the --grid axes, e.g. global batch x number of hard negatives x
temperature) is a short `train.train` run in its own subprocess, so each point's peak RSS is its own and a
crashed point does not take the sweep down. Per point: final loss and in-batch accuracy, dev NDCG@10 (when
data.dev is set), examples/s (median over the steps after the first, which includes compilation), the
train step's per-device peak as XLA assigns it (`memory_analysis()`), the `bmr plan` estimate of the same,
and the process's peak RSS (which also holds the loaded and exported host copies of the model).
Written as DIR/results.tsv, DIR/results.json and DIR/sweep.png (NDCG@10 and loss vs candidates per query;
throughput and peak memory vs global batch).
A finished point (DIR/<point>/point.json) is not run again, so an interrupted sweep resumes.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from bmretriever_jax import tables
from bmretriever_jax.config import ConfigError, load_config

POINT_FILE = "point.json"
COLUMNS = ["point", "global_batch_size", "num_negatives", "temperature", "candidates_per_query", "steps",
           "final_loss", "final_accuracy", "chance_loss", "dev_ndcg@10", "examples_per_s", "seconds",
           "step_peak_mb", "plan_estimate_mb", "peak_rss_mb", "error"]


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------
def parse_grid(specs: Sequence[str]) -> List[Tuple[str, list]]:
    """["train.global_batch_size=8,16", "train.temperature=0.02,0.05"] -> [(key, [values]), ...].

    Values are scalars read as YAML (8 -> int, 0.02 -> float, true -> bool); a key may appear once.
    """
    axes: List[Tuple[str, list]] = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. train.global_batch_size=8,16,32)")
        key, values = spec.split("=", 1)
        key = key.strip()
        vals = [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--grid {spec!r}: no values")
        if any(k == key for k, _ in axes):
            raise ConfigError(f"--grid {key} is given twice")
        axes.append((key, vals))
    return axes


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def grid_points(axes: Sequence[Tuple[str, list]]) -> List[Tuple[str, Dict[str, object]]]:
    """Cartesian product -> [(point name, {key: value})]; names are folder-safe and readable:
    "global_batch_size=16,temperature=0.05"."""
    points = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        assign = {k: v for (k, _), v in zip(axes, combo)}
        name = ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in assign.items()) or "default"
        points.append((name.replace("/", "_").replace(" ", ""), assign))
    return points


def point_overrides(overrides: Sequence[str], assign: Dict[str, object], steps: Optional[int], out: str) -> List[str]:
    """Sweep defaults (a log line every step, one checkpoint at the end), then the user's overrides, then
    the grid point (later overrides win)."""
    pre = ["train.log_every=1"]
    if steps is not None:
        pre += [f"train.steps={steps}", f"train.save_every={steps}"]
    return pre + list(overrides) + [f"{k}={json.dumps(v)}" for k, v in assign.items()] + [f"out={out}"]


# ----------------------------------------------------------------------------------------------------
# One point (runs in its own process)
# ----------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def summarize_run(run_dir: str) -> Dict[str, float]:
    """metrics.jsonl of a run -> final loss / accuracy, dev metrics and the steady-state examples/s."""
    from bmretriever_jax.plot import read_metrics

    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    if not steps:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps")
    last = steps[-1]
    # the first logged step pays for compilation; with one step there is nothing else to report
    speeds = [r["examples_per_s"] for r in steps[1:]] or [steps[0]["examples_per_s"]]
    out = {"final_loss": last["loss"], "final_accuracy": last.get("accuracy", float("nan")),
           "examples_per_s": statistics.median(speeds), "steps": last["step"]}
    dev = [r for r in rows if "dev_ndcg@10" in r]
    if dev:
        out.update({k: v for k, v in dev[-1].items() if k.startswith("dev_")})
    return out


def run_point(config: Optional[str], overrides: Sequence[str], quiet: bool = True) -> dict:
    """Train one point and collect its numbers; writes <out>/point.json. Call in a fresh process (peak RSS).

    The train step's own memory comes from XLA: after training, the same step is lowered again with
    abstract inputs and its `memory_analysis()` read. A persistent compilation cache private to this
    process makes that second compile a cache hit instead of a second full compile.
    """
    import tempfile

    import jax

    from bmretriever_jax.config import resolve_mesh_shape
    from bmretriever_jax.plan import compile_train_step, compiled_peak_bytes, estimate_memory, resolve_model_config
    from bmretriever_jax.train import make_mesh, train

    run = load_config(config, overrides)
    cache = tempfile.mkdtemp(prefix="bmr-sweep-xla-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        t0 = time.time()
        train(run, quiet=quiet)
        res = summarize_run(run.out)
        res["seconds"] = time.time() - t0
        res["peak_rss_mb"] = _peak_rss_mb()
        # the exported folder holds the exact ModelConfig training used (same HLO -> cache hit)
        model_cfg, _ = resolve_model_config(os.path.join(run.out, "model"))
        compiled, _ = compile_train_step(model_cfg, run, make_mesh(run))
        res["step_peak_mb"] = compiled_peak_bytes(compiled)["peak"] / 2**20
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    try:
        est = estimate_memory(model_cfg, run, resolve_mesh_shape(run.mesh, len(jax.devices())))
        res["plan_estimate_mb"] = sum(est.values()) / 2**20
    except (ConfigError, ValueError) as e:  # an estimate is a bonus, never a reason to lose a point
        res["plan_estimate_mb"] = float("nan")
        res["plan_error"] = str(e)
    with open(os.path.join(run.out, POINT_FILE), "w") as f:
        json.dump(res, f, indent=1)
    return res


def _point_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    run_point(spec["config"], spec["overrides"])
    return 0


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------
def sweep(config: Optional[str], grid: Sequence[str], out: str, *, overrides: Sequence[str] = (),
          steps: Optional[int] = None, keep_runs: bool = False, quiet: bool = False,
          timeout: Optional[float] = None) -> List[dict]:
    """Run every grid point (skipping finished ones) and write results.tsv / results.json / sweep.png.

    Returns one row per point (see COLUMNS); a point that fails keeps its row with `error` set.
    """
    axes = parse_grid(grid)
    points = grid_points(axes)
    os.makedirs(out, exist_ok=True)
    rows = []
    for i, (name, assign) in enumerate(points, 1):
        pdir = os.path.join(out, name)
        ov = point_overrides(overrides, assign, steps, pdir)
        run = load_config(config, ov)  # validates the point before spending a process on it
        row = {"point": name, **{k: v for k, v in assign.items()}, "global_batch_size": run.train.global_batch_size,
               "num_negatives": run.data.num_negatives, "temperature": run.train.temperature,
               "candidates_per_query": run.train.global_batch_size * (1 + run.data.num_negatives),
               "chance_loss": math.log(run.train.global_batch_size * (1 + run.data.num_negatives))}
        done = os.path.join(pdir, POINT_FILE)
        if not os.path.exists(done):
            if not quiet:
                print(f"[{i}/{len(points)}] {name}", flush=True)
            if os.path.isdir(pdir):
                shutil.rmtree(pdir)  # a half-finished point restarts clean (its shape may have changed)
            os.makedirs(pdir)
            spec = os.path.join(pdir, "point-spec.json")
            with open(spec, "w") as f:
                json.dump({"config": config, "overrides": ov}, f)
            try:
                proc = subprocess.run([sys.executable, "-m", "bmretriever_jax.sweep", "--point", spec],
                                      capture_output=True, text=True, timeout=timeout)
                with open(os.path.join(pdir, "point.log"), "w") as f:
                    f.write((proc.stdout or "") + (proc.stderr or ""))
                failed = proc.returncode != 0
                err = ("\n".join((proc.stderr or "").strip().splitlines()[-5:])
                       + f"\n(full log: {pdir}/point.log)") if failed else ""
            except subprocess.TimeoutExpired:
                failed, err = True, f"timed out after {timeout} s"
            if failed:
                row["error"] = err or "failed"
                if not quiet:
                    print(f"  FAILED: {row['error']}", flush=True)
                rows.append(row)
                continue
        with open(done) as f:
            row.update(json.load(f))
        if not keep_runs:  # the exported model and checkpoints of a short run are not worth the disk
            for sub in ("model", "checkpoints", "vector_cache"):
                shutil.rmtree(os.path.join(pdir, sub), ignore_errors=True)
        if not quiet:
            print("  " + ", ".join(f"{k}={_fmt(round(row[k], 4) if isinstance(row[k], float) else row[k])}"
                                   for k in ("final_loss", "dev_ndcg@10", "examples_per_s", "step_peak_mb")
                                   if k in row), flush=True)
        rows.append(row)
    write_results(rows, out, [k for k, _ in axes])
    if any("error" not in r for r in rows):
        plot_sweep(rows, os.path.join(out, "sweep.png"))
    return rows


def write_results(rows: List[dict], out: str, grid_keys: Sequence[str]) -> None:
    # grid axes other than batch / negatives / temperature get their own (dotted) column
    cols = (["point"] + [k for k in grid_keys if k.split(".")[-1] not in COLUMNS]
            + [c for c in COLUMNS[1:] if any(c in r for r in rows)])
    with open(os.path.join(out, "results.tsv"), "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c, "")
                cells.append(f"{v:.6g}" if isinstance(v, float) else str(v).replace("\t", " ").replace("\n", " | "))
            f.write("\t".join(cells) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"grid": list(grid_keys), "points": rows}, f, indent=1)


def _series(rows: List[dict], x_keys: Sequence[str]):
    """Group rows by every grid value that is not on the x axis -> {label: [rows]}."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        parts = [p for p in r["point"].split(",") if p.split("=")[0] not in x_keys]
        groups.setdefault(", ".join(parts) or "all", []).append(r)
    return groups


def plot_sweep(rows: List[dict], path: str) -> str:
    """2 x 2 panels: dev NDCG@10 (or in-batch accuracy) and loss vs candidates per query; examples/s and
    peak memory vs global batch. One line per setting of the remaining grid axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axs = plt.subplots(2, 2, figsize=(10, 7))
    has_dev = any("dev_ndcg@10" in r for r in ok)
    quality = "dev_ndcg@10" if has_dev else "final_accuracy"
    panels = [
        (axs[0, 0], "candidates_per_query", quality, "dev NDCG@10" if has_dev else "in-batch accuracy (no data.dev)"),
        (axs[0, 1], "candidates_per_query", "final_loss", "final InfoNCE loss"),
        (axs[1, 0], "global_batch_size", "examples_per_s", "examples / s"),
        (axs[1, 1], "global_batch_size", "step_peak_mb", "peak memory per device (MB)"),
    ]
    for ax, x, y, label in panels:
        x_keys = ("global_batch_size", "num_negatives") if x == "candidates_per_query" else ("global_batch_size",)
        for name, rs in _series(ok, x_keys).items():
            rs = sorted((r for r in rs if y in r and r[y] == r[y]), key=lambda r: r[x])
            if name == "all":  # a single series: name the measurement, not the (empty) grouping
                name = "train step (XLA memory_analysis)" if y == "step_peak_mb" else None
            elif y == "step_peak_mb":
                name = f"train step, {name}"
            if rs:
                ax.plot([r[x] for r in rs], [r[y] for r in rs], "o-", label=name)
        if y == "final_loss":  # the loss of a uniform guess grows with the candidates: ln(candidates)
            rs = sorted(ok, key=lambda r: r[x])
            ax.plot([r[x] for r in rs], [r["chance_loss"] for r in rs], ":", color="gray", label="chance ln(N)")
        if y == "step_peak_mb":  # the same step: XLA's figure, the plan's, and the whole process
            rs = sorted(ok, key=lambda r: r[x])
            for key, style, lab in (("plan_estimate_mb", "s--", "bmr plan estimate"),
                                    ("peak_rss_mb", "^:", "process peak RSS (+ host copies of the model)")):
                pts = [(r[x], r[key]) for r in rs if r.get(key, float("nan")) == r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), style, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("candidates per query (batch x (1 + negatives))" if x == "candidates_per_query"
                      else "global batch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    steps = sorted({r.get("steps") for r in ok})
    fig.suptitle(f"scaling sweep ({len(ok)} points, {', '.join(map(str, steps))} steps each)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(rows: List[dict]) -> str:
    cols = ["point", "final_loss", "dev_ndcg@10", "examples_per_s", "step_peak_mb", "plan_estimate_mb", "peak_rss_mb",
            "seconds"]
    cols = [c for c in cols if any(c in r for r in rows)] + ["status"]
    text = tables.render(cols, [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else r.get(c) for c in cols[:-1]]
                                + ["FAILED" if "error" in r else "ok"] for r in rows])
    print(text)
    return text


def cmd_sweep(a):
    rows = sweep(a.config, a.grid, a.out, overrides=a.overrides, steps=a.steps, keep_runs=a.keep_runs,
                 quiet=getattr(a, "quiet", False))
    print_table(rows)
    print(f"wrote {a.out}/results.tsv, results.json" + (", sweep.png" if os.path.exists(
        os.path.join(a.out, "sweep.png")) else ""))
    if any("error" in r for r in rows):
        raise SystemExit(1)


def add_commands(sub) -> None:
    s = sub.add_parser("sweep", help="scaling study: a short training run per grid point -> table + plot")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value applied to every point, e.g. data.dev=null")
    s.add_argument("--grid", action="append", required=True,
                   help="KEY=V1,V2,... (repeat for more axes), e.g. train.global_batch_size=8,16,32")
    s.add_argument("--steps", type=int, default=None, help="train.steps of every point")
    s.add_argument("--out", required=True, help="sweep folder: one run folder per point + results")
    s.add_argument("--keep-runs", action="store_true", help="keep each point's exported model and checkpoints")
    s.set_defaults(fn=cmd_sweep)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--point":
        sys.exit(_point_main(sys.argv[2]))
    raise SystemExit("usage: python -m bmretriever_jax.sweep --point SPEC.json (internal; use `bmr sweep`)")
