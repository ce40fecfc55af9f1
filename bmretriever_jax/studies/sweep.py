"""`bmr sweep CONFIG.yaml --grid KEY=V1,V2 [--point K=V,K=V ...] --out DIR`: a large-batch scaling study.

Every point (the product of the --grid axes, then the explicit --point assignments, in that order) is a
training run in its own subprocess, so each point's peak RSS is its own and a crashed point does not take the
sweep down. What a study needs:
  * `--examples N`: the same number of training queries at every point (steps = ceil(N / global batch));
    warm-up is `--warmup-fraction` of those steps;
  * `--lr-rule sqrt|linear --lr-base-batch B`: lr = config lr x (batch / B)^(1/2 or 1), stated per point;
  * `--dev DIR` (repeatable) with `--dev-docs N`: dev NDCG@10 / recall@100 per point on each folder's dev split
    over a corpus of every dev-judged document plus seeded random others up to N (data.subset_beir), and the
    untrained model's figures on the same sets (`baseline.json`);
  * per point: wall time, examples/s (median over steps after the first, which compiles), the train step's
    per-device peak as XLA assigns it (`memory_analysis()`), the `bmr plan` estimate and the peak RSS, and
    the machine it ran on (`cpu`: model, cores, bf16/AMX flags) with the JAX stack's `versions`;
  * resume: a finished point (DIR/<point>/point.json) is not run again; an unfinished one whose spec is
    unchanged resumes from its last checkpoint (every quarter of its steps), so a killed study loses little.
Written as DIR/results.tsv and DIR/results.json (after every point) and DIR/sweep.png (dev NDCG@10 vs global
batch, one line per setting of the other axes and dev set; loss vs candidates per query; throughput and peak
memory vs batch).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from bmretriever_jax.util import tables
from bmretriever_jax.studies.plot import plot_sweep, series as _series  # noqa: F401 (the sweep's figure)
from bmretriever_jax.config import ConfigError, load_config
from bmretriever_jax.studies.sweep_run import BASELINE_FILE, POINT_FILE, point_main, run_point, summarize_run  # noqa: F401

SPEC_FILE = "point-spec.json"
LR_RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
COLUMNS = ["point", "global_batch_size", "num_negatives", "temperature", "candidates_per_query", "steps",
           "examples", "lr", "final_loss", "final_accuracy", "chance_loss", "dev_ndcg@10", "dev_recall@100",
           "examples_per_s", "seconds", "train_seconds", "eval_seconds", "resumed_from_step", "step_peak_mb",
           "plan_estimate_mb", "peak_rss_mb", "error"]


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------
def _scalar(key: str, text: str):
    if not key:
        raise ConfigError(f"empty key in {text!r}")
    return yaml.safe_load(text.strip())


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
        vals = [_scalar(key, v) for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--grid {spec!r}: no values")
        if any(k == key for k, _ in axes):
            raise ConfigError(f"--grid {key} is given twice")
        axes.append((key, vals))
    return axes


def parse_point(spec: str) -> Dict[str, object]:
    """"train.global_batch_size=4,data.num_negatives=1" -> {key: value}: one explicit point (irregular designs,
    e.g. hard negatives only at the smallest and the largest batch)."""
    assign: Dict[str, object] = {}
    for part in (p for p in spec.split(",") if p.strip()):
        if "=" not in part:
            raise ConfigError(f"--point {spec!r}: expected KEY=V,KEY=V (e.g. train.global_batch_size=4,"
                              f"data.num_negatives=1)")
        k, v = part.split("=", 1)
        if k.strip() in assign:
            raise ConfigError(f"--point {spec!r}: {k.strip()} is given twice")
        assign[k.strip()] = _scalar(k.strip(), v)
    if not assign:
        raise ConfigError(f"--point {spec!r}: no assignments")
    return assign


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _name(assign: Dict[str, object]) -> str:
    name = ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in assign.items()) or "default"
    return name.replace("/", "_").replace(" ", "")


def grid_points(axes: Sequence[Tuple[str, list]], explicit: Sequence[Dict[str, object]] = ()
                ) -> List[Tuple[str, Dict[str, object]]]:
    """Cartesian product, then the explicit points -> [(point name, {key: value})]; names are folder-safe and
    readable ("global_batch_size=16,temperature=0.05"); a point given twice runs once."""
    points, seen = [], set()
    combos = [dict(zip([k for k, _ in axes], c)) for c in itertools.product(*[v for _, v in axes])] if axes else []
    for assign in combos + [dict(p) for p in explicit]:
        name = _name(assign)
        if name not in seen:
            seen.add(name)
            points.append((name, assign))
    return points


def steps_for(examples: int, batch: int) -> int:
    """Optimizer steps that show at least `examples` training queries at this global batch."""
    return -(-examples // batch)


def scaled_lr(lr: float, batch: int, rule: str, base_batch: int) -> float:
    if rule not in LR_RULES:
        raise ConfigError(f"--lr-rule {rule!r}; allowed: {', '.join(LR_RULES)}")
    return lr * (batch / base_batch) ** LR_RULES[rule]


def point_overrides(overrides: Sequence[str], assign: Dict[str, object], steps: Optional[int], out: str,
                    derived: Sequence[str] = ()) -> List[str]:
    """Sweep defaults (a log line every step, checkpoints every quarter of the run), then the user's
    overrides, then the grid point, then what the sweep derives from them (lr rule, warm-up; later wins)."""
    pre = ["train.log_every=1"]
    if steps is not None:
        pre += [f"train.steps={steps}", f"train.save_every={max(1, steps // 4)}"]
    return (pre + list(overrides) + [f"{k}={json.dumps(v)}" for k, v in assign.items()] + list(derived)
            + [f"out={out}"])


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------
def prepare_dev_sets(dev: Sequence[str], out: str, *, docs: int = 0, split: str = "dev") -> List[dict]:
    """--dev folders -> [{"name", "path", "split", "task", "docs", "queries"}]; with docs > 0 each corpus is cut
    to every document judged in `split` plus seeded random others up to `docs` (written once under
    OUT/dev/<name>). The instruction is the folder's task (data/scifact -> scifact)."""
    from bmretriever_jax.data.beir import load_beir, subset_beir
    from bmretriever_jax.embed import default_task

    sets, names = [], set()
    for d in dev:
        if not os.path.isfile(os.path.join(d, "qrels", f"{split}.tsv")):
            raise ConfigError(f"--dev {d}: no qrels/{split}.tsv (a BEIR folder with a {split} split is needed)")
        name = os.path.basename(os.path.normpath(d))
        if name in names:
            raise ConfigError(f"--dev {d}: two dev sets named {name!r}")
        names.add(name)
        path = subset_beir(d, os.path.join(out, "dev", name), docs, seed=0, splits=[split]) if docs else d
        corpus, queries, qrels = load_beir(path, split)
        sets.append({"name": name, "path": path, "split": split, "task": default_task(d),
                     "docs": len(corpus), "queries": len(qrels)})
    return sets


def _run_child(spec: dict, spec_path: str, log_path: str, timeout: Optional[float]) -> str:
    """Runs `python -m bmretriever_jax.studies.sweep --point SPEC` -> "" or the error text (log kept beside)."""
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    try:
        proc = subprocess.run([sys.executable, "-m", "bmretriever_jax.studies.sweep", "--point", spec_path],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    with open(log_path, "w") as f:
        f.write((proc.stdout or "") + (proc.stderr or ""))
    if proc.returncode == 0:
        return ""
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:]) or "failed"
    return f"{tail}\n(full log: {log_path})"


def load_baseline(out: str) -> Optional[dict]:
    """The untrained model's dev figures of the sweep in `out` (baseline.json), or None before they exist."""
    path = os.path.join(out, BASELINE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def sweep(config: Optional[str], grid: Sequence[str], out: str, *, overrides: Sequence[str] = (),
          points: Sequence[str] = (), steps: Optional[int] = None, examples: Optional[int] = None,
          lr_rule: str = "none", lr_base_batch: Optional[int] = None, warmup_fraction: float = 0.1,
          dev: Sequence[str] = (), dev_docs: int = 0, dev_split: str = "dev", baseline: bool = True,
          keep_runs: bool = False, keep_models: bool = False, quiet: bool = False,
          timeout: Optional[float] = None) -> List[dict]:
    """Run every point (skipping finished ones, resuming unfinished ones) and write results.tsv /
    results.json / sweep.png. Returns one row per point (see COLUMNS); a failed point keeps its row with
    `error` set. `steps` and `examples` exclude each other."""
    if steps is not None and examples is not None:
        raise ConfigError("--steps and --examples exclude each other (--examples sets steps per batch size)")
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"--warmup-fraction {warmup_fraction}: allowed: >= 0 and < 1")
    axes = parse_grid(grid)
    todo = grid_points(axes, [parse_point(p) for p in points])
    if not todo:
        raise ConfigError("nothing to run: give --grid KEY=V1,V2 and/or --point KEY=V,KEY=V")
    base = load_config(config, list(overrides))
    lr_base_batch = lr_base_batch or base.train.global_batch_size
    scaled_lr(base.train.lr, 1, lr_rule, lr_base_batch)  # validates the rule before any point runs
    os.makedirs(out, exist_ok=True)
    dev_sets = prepare_dev_sets(dev, out, docs=dev_docs, split=dev_split) if dev else []
    if dev_sets:  # the points evaluate the dev sets themselves, after training, with every set at once
        overrides = list(overrides) + ["data.dev=null"]
        if baseline and not os.path.exists(os.path.join(out, BASELINE_FILE)):
            if not quiet:
                print("[baseline] the untrained model on " + ", ".join(
                    f"{d['name']} ({d['queries']} queries, {d['docs']} docs)" for d in dev_sets), flush=True)
            err = _run_child({"baseline": True, "config": config, "overrides": list(overrides), "dev": dev_sets,
                              "out": out}, os.path.join(out, "baseline-spec.json"),
                             os.path.join(out, "baseline.log"), timeout)
            if err and not quiet:
                print(f"  baseline FAILED: {err}", flush=True)
    base_res = load_baseline(out)
    grid_keys = [k for k, _ in axes] + sorted({k for p in points for k in parse_point(p)})
    settings = {"examples": examples, "steps": steps, "lr_rule": lr_rule, "lr_base_batch": lr_base_batch,
                "warmup_fraction": warmup_fraction, "overrides": list(overrides), "config": config}
    rows: List[dict] = []

    def record(row: dict) -> None:  # results.tsv / .json after every point: a study is readable while it runs
        rows.append(row)
        write_results(rows, out, grid_keys, dev_sets=dev_sets, baseline=base_res, settings=settings)

    for i, (name, assign) in enumerate(todo, 1):
        pdir = os.path.join(out, name)
        run = load_config(config, point_overrides(overrides, assign, steps, pdir))  # the point's batch and lr
        batch = run.train.global_batch_size
        n_steps, derived = steps, []
        if examples is not None:
            n_steps = steps_for(examples, batch)
            derived.append(f"train.warmup_steps={int(round(warmup_fraction * n_steps))}")
        lr = scaled_lr(run.train.lr, batch, lr_rule, lr_base_batch)
        if lr_rule != "none":
            derived.append(f"train.lr={lr!r}")
        ov = point_overrides(overrides, assign, n_steps, pdir, derived)
        run = load_config(config, ov)  # validates the point before spending a process on it
        cands = batch * (1 + run.data.num_negatives)
        row = {"point": name, **assign, "global_batch_size": batch, "num_negatives": run.data.num_negatives,
               "temperature": run.train.temperature, "candidates_per_query": cands, "lr": run.train.lr,
               "examples": run.train.steps * batch, "chance_loss": math.log(cands)}
        spec = {"config": config, "overrides": ov, "dev": dev_sets}
        done, spec_path = os.path.join(pdir, POINT_FILE), os.path.join(pdir, SPEC_FILE)
        if not os.path.exists(done):
            if not quiet:
                print(f"[{i}/{len(todo)}] {name}: {run.train.steps} steps of {batch}, lr {run.train.lr:.3g}",
                      flush=True)
            same = os.path.exists(spec_path) and json.load(open(spec_path)) == spec
            if os.path.isdir(pdir) and not same:
                shutil.rmtree(pdir)  # started with other settings: restart clean
            os.makedirs(pdir, exist_ok=True)  # same settings: train() resumes from the point's checkpoints
            err = _run_child(spec, spec_path, os.path.join(pdir, "point.log"), timeout)
            if err:
                row["error"] = err
                if not quiet:
                    print(f"  FAILED: {err}", flush=True)
                record(row)
                continue
        with open(done) as f:
            row.update(json.load(f))
        if not keep_runs:  # the exported model and checkpoints of a short run are not worth the disk
            for sub in ("checkpoints", "vector_cache") + (() if keep_models else ("model",)):
                shutil.rmtree(os.path.join(pdir, sub), ignore_errors=True)
        if not quiet:
            print("  " + ", ".join(f"{k}={_fmt(round(row[k], 4) if isinstance(row[k], float) else row[k])}"
                                   for k in ("final_loss", "dev_ndcg@10", "examples_per_s", "step_peak_mb",
                                             "seconds") if k in row), flush=True)
        record(row)
    if any("error" not in r for r in rows):
        plot_sweep(rows, os.path.join(out, "sweep.png"), baseline=base_res)
    return rows


def _columns(rows: List[dict], grid_keys: Sequence[str]) -> List[str]:
    keys = list(dict.fromkeys(grid_keys))
    per_dev = sorted({k for r in rows for k in r if k.startswith("dev_") and ":" in k})
    cols = (["point"] + [k for k in keys if k.split(".")[-1] not in COLUMNS]
            + [c for c in COLUMNS[1:] if any(c in r for r in rows)])
    at = cols.index("dev_recall@100") + 1 if "dev_recall@100" in cols else len(cols)
    return cols[:at] + per_dev + cols[at:]


def write_results(rows: List[dict], out: str, grid_keys: Sequence[str], *, dev_sets: Sequence[dict] = (),
                  baseline: Optional[dict] = None, settings: Optional[dict] = None) -> None:
    # grid axes other than batch / negatives / temperature get their own (dotted) column
    cols = _columns(rows, grid_keys)
    with open(os.path.join(out, "results.tsv"), "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c, "")
                cells.append(f"{v:.6g}" if isinstance(v, float) else str(v).replace("\t", " ").replace("\n", " | "))
            f.write("\t".join(cells) + "\n")
    path = os.path.join(out, "results.json")
    doc = {"grid": list(dict.fromkeys(grid_keys)), "settings": settings or {}, "dev_sets": list(dev_sets),
           "baseline": baseline, "points": rows}
    if os.path.exists(path):  # keys a person added (notes on the machines, a reproduction) survive a resume
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            old = None
        if isinstance(old, dict):
            doc = {**old, **doc}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def print_table(rows: List[dict], baseline: Optional[dict] = None) -> str:
    per_dev = sorted({k for r in rows for k in r if k.startswith("dev_ndcg@10:")})
    cols = ["point", "steps", "lr", "final_loss", "dev_ndcg@10"] + per_dev + [
        "examples_per_s", "step_peak_mb", "plan_estimate_mb", "peak_rss_mb", "seconds"]
    cols = [c for c in cols if any(c in r for r in rows)] + ["status"]
    body = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else r.get(c) for c in cols[:-1]]
            + ["FAILED" if "error" in r else "ok"] for r in rows]
    if baseline:
        body.insert(0, ["untrained"] + [f"{baseline[c]:.4g}" if c in baseline else None for c in cols[1:-1]] + [""])
    text = tables.render(cols, body)
    print(text)
    return text


def cmd_sweep(a):
    rows = sweep(a.config, a.grid or [], a.out, overrides=a.overrides, points=a.point or [], steps=a.steps,
                 examples=a.examples, lr_rule=a.lr_rule, lr_base_batch=a.lr_base_batch,
                 warmup_fraction=a.warmup_fraction, dev=a.dev or [], dev_docs=a.dev_docs, dev_split=a.dev_split,
                 baseline=a.baseline, keep_runs=a.keep_runs, keep_models=a.keep_models,
                 quiet=getattr(a, "quiet", False))
    print_table(rows, load_baseline(a.out))
    print(f"wrote {a.out}/results.tsv, results.json" + (", sweep.png" if os.path.exists(
        os.path.join(a.out, "sweep.png")) else ""))
    if any("error" in r for r in rows):
        raise SystemExit(1)


def add_commands(sub) -> None:
    s = sub.add_parser("sweep", help="scaling study: a training run per grid point -> table + plot (resumable)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value applied to every point, e.g. model.max_length=64")
    s.add_argument("--grid", action="append",
                   help="KEY=V1,V2,... (repeat for more axes; the product is run), e.g. train.global_batch_size=8,16")
    s.add_argument("--point", action="append",
                   help="KEY=V,KEY=V: one more point, after the grid's (repeat), e.g. "
                        "train.global_batch_size=4,data.num_negatives=1")
    n = s.add_mutually_exclusive_group()
    n.add_argument("--steps", type=int, default=None, help="train.steps of every point")
    n.add_argument("--examples", type=int, default=None,
                   help="training queries per point: steps = ceil(N / global batch) (a fixed-data study)")
    s.add_argument("--warmup-fraction", type=float, default=0.1, help="with --examples: warm-up steps / steps")
    s.add_argument("--lr-rule", choices=sorted(LR_RULES), default="none",
                   help="lr = config lr x (batch / --lr-base-batch)^(1/2: sqrt, 1: linear)")
    s.add_argument("--lr-base-batch", type=int, default=None, help="the batch the config's lr is for "
                                                                   "(default: its train.global_batch_size)")
    s.add_argument("--dev", action="append", help="BEIR folder with a dev split: dev NDCG@10 per point (repeat)")
    s.add_argument("--dev-docs", type=int, default=0,
                   help="cut each dev corpus to its dev-judged documents + random others up to N (0 = whole)")
    s.add_argument("--dev-split", default="dev")
    s.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the untrained model's dev figures (baseline.json)")
    s.add_argument("--out", required=True, help="sweep folder: one run folder per point + results")
    s.add_argument("--keep-runs", action="store_true", help="keep each point's exported model and checkpoints")
    s.add_argument("--keep-models", action="store_true", help="keep each point's exported model (for test-set "
                                                               "evaluation), drop its checkpoints")
    s.set_defaults(fn=cmd_sweep)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--point":
        sys.exit(point_main(sys.argv[2]))
    raise SystemExit("usage: python -m bmretriever_jax.studies.sweep --point SPEC.json (internal; use `bmr sweep`)")
