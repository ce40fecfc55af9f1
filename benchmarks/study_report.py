"""The README's scaling-study table and figure from a `bmr sweep` folder, finished or not: every point that has a
point.json (finished) is a row of DIR/results.json, which `bmr sweep` rewrites after every point; started,
unfinished points are listed as pending. Rewrites the README between
<!-- study:begin --> and <!-- study:end --> and DIR/sweep.png.

    python benchmarks/study_report.py [--dir benchmarks/results/scaling-study] [--no-readme]
"""
import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import replace_section  # noqa: E402  (benchmarks/common.py)
from bmretriever_jax import tables  # noqa: E402
from bmretriever_jax.plot import plot_sweep  # noqa: E402
from bmretriever_jax.sweep_run import POINT_FILE  # noqa: E402


def read_points(d):
    """Finished points from DIR/results.json (which `bmr sweep` rewrites after every point), sorted by setting and
    batch; `pending` = point folders started but not finished."""
    path = os.path.join(d, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no results yet (`bmr sweep` writes it when its first point finishes); "
                         "run bash benchmarks/scaling_study.sh")
    with open(path) as f:
        res = json.load(f)
    rows = sorted((r for r in res["points"] if "error" not in r),
                  key=lambda r: (r["num_negatives"], r["global_batch_size"]))
    pending = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(d, "*", "point-spec.json"))
                     if not os.path.exists(os.path.join(os.path.dirname(p), POINT_FILE)))
    return rows, pending, res.get("baseline")


SHOWN = {"scifact": "SciFact", "medquad": "MedQuAD"}  # dev-set folder name -> column title


def train_minutes(r) -> str:
    """Minutes of training in the point's last process; '-' when it only evaluated (training finished earlier)."""
    return "-" if r.get("resumed_from_step", 0) >= r["steps"] else f"{r['train_seconds'] / 60:.1f}"


def markdown(rows, baseline, pending):
    sets = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith("dev_ndcg@10:")},
                  key=lambda s: (list(SHOWN).index(s) if s in SHOWN else len(SHOWN), s))
    cols = (["global batch", "hard negatives", "steps x batch", "lr", "final loss"]
            + [f"{SHOWN.get(s, s)} dev NDCG@10" for s in sets]
            + ["mean", "mean recall@100", "examples/s", "step peak MB", "train min", "eval min"])
    body = []
    if baseline:
        body.append(["untrained", "", "", "", ""] + [baseline[f"dev_ndcg@10:{s}"] for s in sets]
                    + [baseline["dev_ndcg@10"], baseline["dev_recall@100"], "", "", "", ""])
    for r in rows:
        body.append([str(r["global_batch_size"]), str(r["num_negatives"]), f"{r['steps']} x {r['global_batch_size']}",
                     f"{r['lr']:.3g}", r["final_loss"]] + [r[f"dev_ndcg@10:{s}"] for s in sets]
                    + [r["dev_ndcg@10"], r["dev_recall@100"], f"{r['examples_per_s']:.2f}", f"{r['step_peak_mb']:.0f}",
                       train_minutes(r), f"{r['eval_seconds'] / 60:.1f}"])
    text = tables.render(cols, body, digits=3, markdown=True)
    resumed = [f"batch {r['global_batch_size']}, {r['num_negatives']} hard negative(s): from step "
               f"{r['resumed_from_step']}" for r in rows if r.get("resumed_from_step")]
    if resumed:
        text += ("\n\nResumed after a stop (train minutes count the steps after the resume only; '-': training had "
                 "finished before the stop and only the evaluation ran after it; examples/s is the last logged "
                 "step's): "
                 + "; ".join(resumed) + ".")
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
    rows, pending, baseline = read_points(d)
    text = markdown(rows, baseline, pending)
    print(text)
    if rows:
        print("wrote", plot_sweep(rows, os.path.join(d, "sweep.png"), baseline=baseline))
    if not a.no_readme:
        replace_section(os.path.join(ROOT, "README.md"), "study", text)
        print("rewrote the README table")

if __name__ == "__main__":
    main()
