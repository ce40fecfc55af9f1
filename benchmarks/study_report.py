"""The scaling study's table and figure (docs/studies/scaling.md) from a `bmr sweep` folder, finished or not: every
point that has a point.json (finished) is a row of DIR/results.json, which `bmr sweep` rewrites after every point;
started, unfinished points are listed as pending. Rewrites docs/studies/scaling.md between
<!-- study:begin --> and <!-- study:end --> and DIR/sweep.png.

With `--test-from runs/study-test` (what benchmarks/study_test.sh ends with) it also digests the test-set evaluation
of the retrained points and the baselines into DIR/test.json (metrics, commands, CPU, versions, the retrained
points' dev figures beside the study's); the page's test table (<!-- studytest:begin/end -->) is rendered from
DIR/test.json whenever it exists.

    python benchmarks/study_report.py [--dir benchmarks/results/scaling-study] [--test-from DIR] [--no-page]
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
from bmretriever_jax.util import tables  # noqa: E402
from bmretriever_jax.util.machine import has_bf16_units, run_facts  # noqa: E402
from bmretriever_jax.studies.plot import plot_sweep  # noqa: E402
from bmretriever_jax.studies.sweep_run import POINT_FILE  # noqa: E402

PAGE = os.path.join(ROOT, "docs", "studies", "scaling.md")  # the page whose marked sections this script rewrites


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
    return rows, pending, res.get("baseline"), res


SHOWN = {"scifact": "SciFact", "medquad": "MedQuAD"}  # dev-set folder name -> column title


def train_minutes(r) -> str:
    """Minutes of training in the point's last process; '-' when it only evaluated (training finished earlier)."""
    return "-" if r.get("resumed_from_step", 0) >= r["steps"] else f"{r['train_seconds'] / 60:.1f}"


def cpu_kind(cpu) -> str:
    bf16 = "bf16 units" if has_bf16_units(cpu.get("isa", ())) else "no bf16 units"
    return f"{cpu['model']}, {cpu['logical_cpus']} cores, {bf16}"


def machines(rows, res) -> str:
    """Which machine ran which point, from the points' own `cpu` records; points without one fall back to the
    `machines` note of results.json (written by hand)."""
    groups = {}
    for r in rows:
        if r.get("cpu"):
            groups.setdefault(cpu_kind(r["cpu"]), []).append(f"{r['global_batch_size']}/{r['num_negatives']}")
    parts = [f"{k} (batch/hard negatives {', '.join(v)})" for k, v in groups.items()]
    if any(not r.get("cpu") for r in rows) and res.get("machines"):
        parts.append(str(res["machines"]))
    return ("Machines: " + "; ".join(parts) + ".") if parts else ""


def markdown(rows, baseline, pending, res=None):
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
    where = machines(rows, res or {})
    if where:
        text += "\n\n" + where
    if pending:
        text += ("\n\nStarted, not finished (`bash benchmarks/scaling_study.sh` resumes them; the script's points "
                 "not named anywhere here have not started): " + ", ".join(f"`{p}`" for p in pending))
    return text


TEST_KEYS = ("ndcg@10", "mrr@10", "recall@100", "ndcg@100", "recall@1000", "seconds")
POINT_NAMES = {"global_batch_size=16,num_negatives=1": "Gemma 3 270M + LoRA, batch 16 + 1 hard negative (best dev)",
               "global_batch_size=4,num_negatives=0": "Gemma 3 270M + LoRA, batch 4, in-batch negatives only"}
BASELINE_NAMES = {"bm25": "BM25 (bm25s, full passages)", "minilm": "all-MiniLM-L6-v2"}


def _by_model(evaluated):
    """bmr eval's {'<label> | <data>': metrics} -> {label: {data: the kept metrics}} (label without '/model')."""
    out = {}
    for key, metrics in evaluated.items():
        label, data = key.split(" | ")
        out.setdefault(label[:-len("/model")] if label.endswith("/model") else label, {})[data] = {
            k: metrics[k] for k in TEST_KEYS if k in metrics}
    return out


def digest_test(src, study_dir):
    """runs/study-test (test.json, test-baselines.json, results.json of the retrained points) -> the committed
    DIR/test.json."""
    def load(name):
        path = os.path.join(src, name)
        if not os.path.exists(path):
            raise SystemExit(f"{path}: missing; run bash benchmarks/study_test.sh")
        with open(path) as f:
            return json.load(f)

    retrained = {r["point"]: r for r in load("results.json")["points"]}
    with open(os.path.join(study_dir, "results.json")) as f:
        study = {r["point"]: r for r in json.load(f)["points"]}
    doc = {"what": "the scaling study's best point and its batch-4 point, retrained with the study's settings, and "
                   "the baselines on the FULL SciFact test set (300 claims, 5,183 abstracts) and the MedQuAD test "
                   "split (300 questions, 4,000 answers); trained models in float32, queries 32 and passages 64 "
                   "tokens, as trained",
           "command": "bash benchmarks/study_test.sh",
           **run_facts(),
           "points": _by_model(load("test.json")), "baselines": _by_model(load("test-baselines.json")),
           "reproduction": {name: {"dev_ndcg@10 retrained": r["dev_ndcg@10"],
                                   "dev_ndcg@10 study": study.get(name, {}).get("dev_ndcg@10"),
                                   "final_loss retrained": r["final_loss"],
                                   "final_loss study": study.get(name, {}).get("final_loss"),
                                   "train_seconds retrained": round(r["train_seconds"], 1),
                                   "cpu retrained": r.get("cpu")}
                            for name, r in retrained.items()}}
    with open(os.path.join(study_dir, "test.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def test_markdown(doc):
    cols = ["model", "SciFact NDCG@10", "SciFact recall@100", "MedQuAD NDCG@10", "MedQuAD recall@100"]
    body = []
    for names, group in ((BASELINE_NAMES, doc["baselines"]), (POINT_NAMES, doc["points"])):
        for label, per_data in group.items():
            body.append([names.get(label, label)] + [per_data.get(d, {}).get(m) for d in ("scifact", "medquad")
                                                      for m in ("ndcg@10", "recall@100")])
    return (tables.render(cols, body, digits=4, markdown=True)
            + f"\n\nMeasured on {cpu_kind(doc['cpu'])} (isa: {', '.join(doc['cpu']['isa'])}), trained models in "
              f"float32 (jax {doc['versions']['jax']}); `{doc['command']}`.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join("benchmarks", "results", "scaling-study"))
    ap.add_argument("--no-page", "--no-readme", dest="no_page", action="store_true",
                    help="print only; leave docs/studies/scaling.md as it is")
    ap.add_argument("--test-from", default=None, help="runs/study-test: digest its test evaluation into DIR/test.json")
    a = ap.parse_args()
    d = os.path.join(ROOT, a.dir) if not os.path.isabs(a.dir) else a.dir
    if a.test_from:
        digest_test(a.test_from, d)
    rows, pending, baseline, res = read_points(d)
    text = markdown(rows, baseline, pending, res)
    print(text)
    if rows:
        print("wrote", plot_sweep(rows, os.path.join(d, "sweep.png"), baseline=baseline))
    if not a.no_page:
        replace_section(PAGE, "study", text)
        print("rewrote the table in", os.path.relpath(PAGE, ROOT))
    if os.path.exists(os.path.join(d, "test.json")):
        with open(os.path.join(d, "test.json")) as f:
            test = test_markdown(json.load(f))
        print(test)
        if not a.no_page:
            replace_section(PAGE, "studytest", test)

if __name__ == "__main__":
    main()
