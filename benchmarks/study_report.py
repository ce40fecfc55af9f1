"""The README's scaling-study table and figure from a `bmr sweep` folder, finished or not: every point that has a
point.json (finished) is a row, the others are listed as pending. Rewrites the README between
<!-- study:begin --> and <!-- study:end --> and DIR/sweep.png.

    python benchmarks/study_report.py [--dir benchmarks/results/scaling-study] [--no-readme]
"""
import argparse
import glob
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import replace_section  # noqa: E402  (benchmarks/common.py)
from bmretriever_jax import tables  # noqa: E402
from bmretriever_jax.plot import plot_sweep  # noqa: E402
from bmretriever_jax.sweep_run import BASELINE_FILE, POINT_FILE  # noqa: E402


def spec_value(overrides, key):
    vals = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return json.loads(vals[-1]) if vals else None


def read_points(d):
    rows, pending = [], []
    for spec_path in sorted(glob.glob(os.path.join(d, "*", "point-spec.json"))):
        pdir = os.path.dirname(spec_path)
        ov = json.load(open(spec_path))["overrides"]
        b, n = spec_value(ov, "train.global_batch_size"), spec_value(ov, "data.num_negatives")
        row = {"point": os.path.basename(pdir), "global_batch_size": b, "num_negatives": n,
               "candidates_per_query": b * (1 + n), "lr": spec_value(ov, "train.lr"),
               "chance_loss": math.log(b * (1 + n))}
        if os.path.exists(os.path.join(pdir, POINT_FILE)):
            row.update(json.load(open(os.path.join(pdir, POINT_FILE))))
            row["examples"] = row["steps"] * b
            rows.append(row)
        else:
            pending.append(row["point"])
    rows.sort(key=lambda r: (r["num_negatives"], r["global_batch_size"]))
    return rows, pending


def markdown(rows, baseline, pending):
    cols = ["global batch", "hard negatives", "steps x batch", "lr", "final loss", "SciFact dev NDCG@10",
            "MedQuAD dev NDCG@10", "mean", "mean recall@100", "examples/s", "step peak MB", "train min", "eval min"]
    body = []
    if baseline:
        body.append(["untrained", "", "", "", "", baseline["dev_ndcg@10:scifact"], baseline["dev_ndcg@10:medquad"],
                     baseline["dev_ndcg@10"], baseline["dev_recall@100"], "", "", "", ""])
    for r in rows:
        body.append([str(r["global_batch_size"]), str(r["num_negatives"]), f"{r['steps']} x {r['global_batch_size']}",
                     f"{r['lr']:.3g}", r["final_loss"], r["dev_ndcg@10:scifact"], r["dev_ndcg@10:medquad"],
                     r["dev_ndcg@10"], r["dev_recall@100"], f"{r['examples_per_s']:.2f}", f"{r['step_peak_mb']:.0f}",
                     f"{r['train_seconds'] / 60:.1f}", f"{r['eval_seconds'] / 60:.1f}"])
    text = tables.render(cols, body, digits=3, markdown=True)
    if pending:
        text += ("\n\nStarted, not finished (`bash benchmarks/scaling_study.sh` resumes them; the script's points "
                 "not named anywhere here have not started): " + ", ".join(f"`{p}`" for p in pending))
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join("benchmarks", "results", "scaling-study"))
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args()
    d = os.path.join(ROOT, a.dir) if not os.path.isabs(a.dir) else a.dir
    rows, pending = read_points(d)
    base = os.path.join(d, BASELINE_FILE)
    baseline = json.load(open(base)) if os.path.exists(base) else None
    text = markdown(rows, baseline, pending)
    print(text)
    if rows:
        print("wrote", plot_sweep(rows, os.path.join(d, "sweep.png"), baseline=baseline))
    if not a.no_readme:
        replace_section(os.path.join(ROOT, "README.md"), "study", text)
        print("rewrote the README table")

if __name__ == "__main__":
    main()
