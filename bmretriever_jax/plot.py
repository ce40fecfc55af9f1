"""`bmr plot RUN_DIR`: the loss curve (and dev NDCG@10 when logged) of a run as PNG."""
from __future__ import annotations

import json
import os
from typing import Optional


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
