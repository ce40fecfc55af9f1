"""`bmr plot RUN_DIR`: the loss curve (and dev NDCG@10 when logged) of a run as PNG; `plot_sweep`: the figure of
a `bmr sweep` study."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence


def read_metrics(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a training run folder?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    # here: matplotlib costs ~0.9 s and its backend is chosen at the call; sweep.py imports read_metrics only
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    dev = [r for r in rows if "dev_ndcg@10" in r]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no loss records yet")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    if dev:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in dev], [r["dev_ndcg@10"] for r in dev], "o-", color="tab:orange", label="dev NDCG@10")
        ax2.set_ylabel("dev NDCG@10")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "loss.png")
    fig.savefig(out, dpi=120)
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
