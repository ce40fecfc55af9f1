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
    per-device peak as XLA assigns it (`memory_analysis()`), the `bmr plan` estimate and the peak RSS;
  * resume: a finished point (DIR/<point>/point.json) is not run again; an unfinished one whose spec is
    unchanged resumes from its last checkpoint (every quarter of its steps), so a killed study loses little.
Written as DIR/results.tsv, DIR/results.json and DIR/sweep.png (dev NDCG@10 vs global batch, one line per
setting of the other axes and dev set; loss vs candidates per query; throughput and peak memory vs batch).
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
SPEC_FILE = "point-spec.json"
BASELINE_FILE = "baseline.json"
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


def evaluate_dev_sets(encoder, dev_sets: Sequence[dict], cache_dir: str) -> Dict[str, float]:
    """NDCG@10 / recall@100 on each dev set ("dev_ndcg@10:<name>") and their means ("dev_ndcg@10")."""
    from bmretriever_jax.embed import instruction_for
    from bmretriever_jax.eval.evaluate import evaluate_retrieval

    out: Dict[str, float] = {}
    for d in dev_sets:
        res = evaluate_retrieval(encoder, d["path"], d["split"], instruction_for(d["task"]),
                                 cache_dir=os.path.join(cache_dir, d["name"]), progress=False)
        for m in ("ndcg@10", "recall@100"):
            out[f"dev_{m}:{d['name']}"] = res[m]
    for m in ("ndcg@10", "recall@100"):
        out[f"dev_{m}"] = statistics.mean(out[f"dev_{m}:{d['name']}"] for d in dev_sets)
    return out


def run_point(config: Optional[str], overrides: Sequence[str], dev_sets: Sequence[dict] = (),
              quiet: bool = True) -> dict:
    """Train one point (resuming from its checkpoints if any), evaluate it on the dev sets and collect its
    numbers; writes <out>/point.json. Call in a fresh process (peak RSS).

    The train step's own memory comes from XLA: after training, the same step is lowered again with
    abstract inputs and its `memory_analysis()` read. A persistent compilation cache private to this
    process makes that second compile a cache hit instead of a second full compile.
    """
    import tempfile

    import jax

    from bmretriever_jax.config import resolve_mesh_shape
    from bmretriever_jax.embed import Encoder
    from bmretriever_jax.plan import compile_train_step, compiled_peak_bytes, estimate_memory, resolve_model_config
    from bmretriever_jax.train import make_mesh, train

    run = load_config(config, overrides)
    cache = tempfile.mkdtemp(prefix="bmr-sweep-xla-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        ckpt = os.path.join(run.out, "checkpoints")
        done_steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
        t0 = time.time()
        train(run, quiet=quiet)
        res = summarize_run(run.out)
        res["train_seconds"] = time.time() - t0
        res["resumed_from_step"] = max(done_steps, default=0)
        res["peak_rss_mb"] = _peak_rss_mb()
        # the exported folder holds the exact ModelConfig training used (same HLO -> cache hit)
        model_cfg, _ = resolve_model_config(os.path.join(run.out, "model"))
        compiled, _ = compile_train_step(model_cfg, run, make_mesh(run))
        res["step_peak_mb"] = compiled_peak_bytes(compiled)["peak"] / 2**20
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if dev_sets:
        t1 = time.time()
        enc = Encoder.load(os.path.join(run.out, "model"), max_length=run.model.max_length, dtype=run.model.dtype,
                           quiet=True)
        res.update(evaluate_dev_sets(enc, dev_sets, os.path.join(run.out, "vector_cache")))
        res["eval_seconds"] = time.time() - t1
    res["seconds"] = time.time() - t0
    try:
        est = estimate_memory(model_cfg, run, resolve_mesh_shape(run.mesh, len(jax.devices())))
        res["plan_estimate_mb"] = sum(est.values()) / 2**20
    except (ConfigError, ValueError) as e:  # an estimate is a bonus, never a reason to lose a point
        res["plan_estimate_mb"] = float("nan")
        res["plan_error"] = str(e)
    with open(os.path.join(run.out, POINT_FILE), "w") as f:
        json.dump(res, f, indent=1)
    return res


def run_baseline(config: Optional[str], overrides: Sequence[str], dev_sets: Sequence[dict], out: str) -> dict:
    """The untrained model (model.name) on the dev sets, with the points' sequence length and dtype."""
    from bmretriever_jax.embed import Encoder

    run = load_config(config, list(overrides))
    t0 = time.time()
    enc = Encoder.load(run.model.name, max_length=run.model.max_length, dtype=run.model.dtype,
                       pooling=run.model.pooling, quiet=True)
    res = evaluate_dev_sets(enc, dev_sets, os.path.join(out, "baseline_vector_cache"))
    res["eval_seconds"] = time.time() - t0
    shutil.rmtree(os.path.join(out, "baseline_vector_cache"), ignore_errors=True)
    with open(os.path.join(out, BASELINE_FILE), "w") as f:
        json.dump(res, f, indent=1)
    return res


def _point_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("baseline"):
        run_baseline(spec["config"], spec["overrides"], spec["dev"], spec["out"])
    else:
        run_point(spec["config"], spec["overrides"], spec.get("dev", ()))
    return 0


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
    """Runs `python -m bmretriever_jax.sweep --point SPEC` -> "" or the error text (log kept beside)."""
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    try:
        proc = subprocess.run([sys.executable, "-m", "bmretriever_jax.sweep", "--point", spec_path],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    with open(log_path, "w") as f:
        f.write((proc.stdout or "") + (proc.stderr or ""))
    if proc.returncode == 0:
        return ""
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:]) or "failed"
    return f"{tail}\n(full log: {log_path})"


def sweep(config: Optional[str], grid: Sequence[str], out: str, *, overrides: Sequence[str] = (),
          points: Sequence[str] = (), steps: Optional[int] = None, examples: Optional[int] = None,
          lr_rule: str = "none", lr_base_batch: Optional[int] = None, warmup_fraction: float = 0.1,
          dev: Sequence[str] = (), dev_docs: int = 0, dev_split: str = "dev", baseline: bool = True,
          keep_runs: bool = False, quiet: bool = False, timeout: Optional[float] = None) -> List[dict]:
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
    rows = []
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
                rows.append(row)
                continue
        with open(done) as f:
            row.update(json.load(f))
        if not keep_runs:  # the exported model and checkpoints of a short run are not worth the disk
            for sub in ("model", "checkpoints", "vector_cache"):
                shutil.rmtree(os.path.join(pdir, sub), ignore_errors=True)
        if not quiet:
            print("  " + ", ".join(f"{k}={_fmt(round(row[k], 4) if isinstance(row[k], float) else row[k])}"
                                   for k in ("final_loss", "dev_ndcg@10", "examples_per_s", "step_peak_mb",
                                             "seconds") if k in row), flush=True)
        rows.append(row)
    base_res = None
    if os.path.exists(os.path.join(out, BASELINE_FILE)):
        base_res = json.load(open(os.path.join(out, BASELINE_FILE)))
    write_results(rows, out, [k for k, _ in axes] + sorted({k for p in points for k in parse_point(p)}),
                  dev_sets=dev_sets, baseline=base_res, settings={
                      "examples": examples, "steps": steps, "lr_rule": lr_rule, "lr_base_batch": lr_base_batch,
                      "warmup_fraction": warmup_fraction, "overrides": list(overrides), "config": config})
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
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"grid": list(dict.fromkeys(grid_keys)), "settings": settings or {}, "dev_sets": list(dev_sets),
                   "baseline": baseline, "points": rows}, f, indent=1)


def _series(rows: List[dict], x_keys: Sequence[str]):
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
        for name, rs in _series(ok, ("global_batch_size",)).items():
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
        for name, rs in _series(ok, x_keys).items():
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
                 warmup_fraction=a.warmup_fraction, dev=a.dev or [], dev_docs=a.dev_docs, dev_split=a.dev_split, baseline=a.baseline,
                 keep_runs=a.keep_runs, quiet=getattr(a, "quiet", False))
    base = os.path.join(a.out, BASELINE_FILE)
    print_table(rows, json.load(open(base)) if os.path.exists(base) else None)
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
    s.set_defaults(fn=cmd_sweep)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--point":
        sys.exit(_point_main(sys.argv[2]))
    raise SystemExit("usage: python -m bmretriever_jax.sweep --point SPEC.json (internal; use `bmr sweep`)")
