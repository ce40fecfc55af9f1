"""`bmr plot DIR`: the loss curve (and dev NDCG@10 when logged) of a training run as PNG, or of every run in a
folder of runs (`runs/quickstart` holds `literature/` and `consumer/`) in one figure; `plot_sweep`: the figure of
a `bmr sweep` study."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from bmretriever_jax.util.errors import DataFormatError, InputPathError

METRICS = "metrics.jsonl"
_NOT_RUNS = ("checkpoints", "checkpoints-damaged", "model", "vector_cache")  # inside a run or a quickstart: no runs


def read_metrics(run_dir: str):
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        raise InputPathError(f"{run_dir}: no {METRICS} (not a training run folder?)")
    with open(path) as f:
        lines = f.read().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # the last line of a run being written (or killed mid-write): not an error
                break
            raise DataFormatError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def find_runs(folder: str) -> List[str]:
    """The training runs at or under `folder`: every folder (itself included, subfolders at any depth, in sorted
    order) holding a metrics.jsonl; a run's checkpoints/ and model/ are not searched. `runs/quickstart` after
    `make quickstart` -> its literature/ and consumer/ experts (and itself too once `bmr train
    configs/quickstart.yaml` has written there)."""
    if not os.path.isdir(folder):
        raise InputPathError(f"{folder}: no such folder")
    runs = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if METRICS in filenames:
            runs.append(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _NOT_RUNS)
    if not runs:
        raise InputPathError(f"{folder}: no training run here (no {METRICS} in it or in its subfolders)")
    return runs


def run_curves(run_dir: str):
    """-> (single, {name: (loss rows, dev rows)}, runs without a logged step): the runs `find_runs` finds, named
    by their path under `run_dir` (`run_dir` itself, and a single run, by its folder's name)."""
    runs = find_runs(run_dir)
    single = runs == [run_dir]
    curves, empty = {}, []
    for r in runs:
        rows = read_metrics(r)
        train = [x for x in rows if "loss" in x and "step" in x]
        dev = [x for x in rows if "dev_ndcg@10" in x and "step" in x]
        if train:
            rel = os.path.relpath(r, run_dir)
            curves[os.path.basename(os.path.abspath(r)) if single or rel == "." else rel] = (train, dev)
        else:
            empty.append(r)
    if not curves:
        what = f"{runs[0]}/{METRICS} has" if single else f"none of the {len(runs)} runs under {run_dir} has"
        raise DataFormatError(f"{what} no loss records yet")
    return single, curves, empty


def draw(curves, title: str, single: bool):
    """The figure (matplotlib, Agg): loss per step on the left axis, dev NDCG@10 on a second axis where logged;
    several runs: a colour per run and one legend naming each line."""
    # here: matplotlib costs ~0.9 s and its backend is chosen at the call; sweep.py imports read_metrics only
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5) if single else (7.5, 4.5))
    ax2 = ax.twinx() if any(dev for _, dev in curves.values()) else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (train, dev)) in enumerate(curves.items()):
        c = "tab:blue" if single else colors[i % len(colors)]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=c,
                label="train loss" if single else f"{name}: train loss")
        if dev:
            ax2.plot([r["step"] for r in dev], [r["dev_ndcg@10"] for r in dev], "o-" if single else "o--",
                     color="tab:orange" if single else c, label="dev NDCG@10" if single else f"{name}: dev NDCG@10")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    if ax2 is not None:
        ax2.set_ylabel("dev NDCG@10")
    if not single:  # the lines need names; one legend for both axes
        handles, labels = ax.get_legend_handles_labels()
        if ax2 is not None:
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    """One run, or every run under a folder of runs (a line per run) -> PNG (default DIR/loss.png); returns the
    PNG's path. Runs with no logged step yet are left out with a note on stderr; a folder with no run, or with
    no step logged in any, is a one-line error."""
    single, curves, empty = run_curves(run_dir)
    for r in empty:
        print(f"bmr plot: {r}: no loss records yet, left out", file=sys.stderr)
    title = os.path.basename(os.path.abspath(run_dir)) if single else \
        f"{os.path.normpath(run_dir)}: {len(curves)} runs"
    fig = draw(curves, title, single)
    out = out or os.path.join(run_dir, "loss.png")
    fig.savefig(out, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def series(rows: List[dict], x_keys: Sequence[str]):
    """Group rows by every grid value that is not on the x axis -> {label: [rows]}."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        parts = [p for p in r["point"].split(",") if p.split("=")[0] not in x_keys]
        groups.setdefault(", ".join(parts) or "all", []).append(r)
    return groups


def plot_sweep(rows: List[dict], path: str, baseline: Optional[dict] = None) -> str:
    """2 x 2 panels: dev NDCG@10 (or in-batch accuracy) vs global batch, one line per setting of the other axes
    and dev set (the untrained model dotted); loss vs candidates per query; examples/s and peak memory vs
    global batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axs = plt.subplots(2, 2, figsize=(11, 8))
    dev_keys = sorted({k for r in ok for k in r if k.startswith("dev_ndcg@10:")}) or (
        ["dev_ndcg@10"] if any("dev_ndcg@10" in r for r in ok) else [])
    quality = dev_keys or ["final_accuracy"]
    ax = axs[0, 0]
    for qi, y in enumerate(quality):
        for name, rs in series(ok, ("global_batch_size",)).items():
            rs = sorted((r for r in rs if y in r and r[y] == r[y]), key=lambda r: r["global_batch_size"])
            label = ", ".join(p for p in (name if name != "all" else "", y.split(":", 1)[1] if ":" in y else "") if p)
            if rs:
                ax.plot([r["global_batch_size"] for r in rs], [r[y] for r in rs], "os^vD"[qi % 5] + "-",
                        label=label or None)
        if baseline and y in baseline:
            ax.axhline(baseline[y], ls=":", color="gray")
            ax.annotate(f"untrained {y.split(':', 1)[-1] if ':' in y else ''}".strip(), (1.0, baseline[y]),
                        xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_ylabel("dev NDCG@10" if dev_keys else "in-batch accuracy (no dev set)")
    panels = [
        (axs[0, 1], "candidates_per_query", "final_loss", "final InfoNCE loss"),
        (axs[1, 0], "global_batch_size", "examples_per_s", "examples / s"),
        (axs[1, 1], "global_batch_size", "step_peak_mb", "peak memory per device (MB)"),
    ]
    for ax_, x, y, label in panels:
        x_keys = ("global_batch_size", "num_negatives") if x == "candidates_per_query" else ("global_batch_size",)
        for name, rs in series(ok, x_keys).items():
            rs = sorted((r for r in rs if y in r and r[y] == r[y]), key=lambda r: r[x])
            if name == "all":  # a single series: name the measurement, not the (empty) grouping
                name = "train step (XLA memory_analysis)" if y == "step_peak_mb" else None
            elif y == "step_peak_mb":
                name = f"train step, {name}"
            if rs:
                ax_.plot([r[x] for r in rs], [r[y] for r in rs], "o-", label=name)
        if y == "final_loss":  # the loss of a uniform guess grows with the candidates: ln(candidates)
            rs = sorted(ok, key=lambda r: r[x])
            ax_.plot([r[x] for r in rs], [r["chance_loss"] for r in rs], ":", color="gray", label="chance ln(N)")
        if y == "step_peak_mb":  # the same step: XLA's figure, the plan's, and the whole process
            rs = sorted(ok, key=lambda r: r[x])
            for key, style, lab in (("plan_estimate_mb", "s--", "bmr plan estimate"),
                                    ("peak_rss_mb", "^:", "process peak RSS (+ host copies of the model)")):
                pts = [(r[x], r[key]) for r in rs if r.get(key, float("nan")) == r.get(key)]
                if pts:
                    ax_.plot(*zip(*pts), style, label=lab)
        ax_.set_ylabel(label)
    for ax_, x in ((axs[0, 0], "global_batch_size"), (axs[0, 1], "candidates_per_query"),
                   (axs[1, 0], "global_batch_size"), (axs[1, 1], "global_batch_size")):
        ax_.set_xscale("log", base=2)
        ax_.set_xlabel("candidates per query (batch x (1 + negatives))" if x == "candidates_per_query"
                       else "global batch")
        ax_.grid(alpha=0.3)
        if ax_.get_legend_handles_labels()[0]:
            ax_.legend(fontsize=7)
    ex = sorted({r.get("examples") for r in ok if r.get("examples")})
    what = (f"{ex[0]:,}-{ex[-1]:,} training queries each" if len(ex) > 1 else f"{ex[0]:,} training queries each"
            ) if ex else f"{', '.join(map(str, sorted({r.get('steps') for r in ok})))} steps each"
    fig.suptitle(f"scaling sweep ({len(ok)} points, {what})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
