"""One point of a `bmr sweep` study, run in its own process (`python -m bmretriever_jax.studies.sweep --point SPEC`):
train (resuming from the point's checkpoints), read the compiled step's peak, evaluate the dev sets; and the
untrained model's dev figures (the study's baseline)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

from bmretriever_jax.config import ConfigError, load_config
from bmretriever_jax.util import paths
from bmretriever_jax.util.machine import run_facts

POINT_FILE = "point.json"
BASELINE_FILE = "baseline.json"


# ----------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def summarize_run(run_dir: str) -> Dict[str, float]:
    """metrics.jsonl of a run -> final loss / accuracy, dev metrics and the steady-state examples/s."""
    from bmretriever_jax.studies.plot import read_metrics

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
    from bmretriever_jax.pods.plan import estimate_memory, resolve_model_config
    from bmretriever_jax.pods.stepcompile import compile_train_step, compiled_peak_bytes
    from bmretriever_jax.training import make_mesh, train

    run = load_config(config, overrides)
    cache = tempfile.mkdtemp(prefix="bmr-sweep-xla-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        ckpt = os.path.join(run.out, "checkpoints")
        done_steps = paths.checkpoint_steps(ckpt)
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
    res.update(run_facts())  # points of one study may run on different machines (a resume on another machine)
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
    res.update(run_facts())
    shutil.rmtree(os.path.join(out, "baseline_vector_cache"), ignore_errors=True)
    with open(os.path.join(out, BASELINE_FILE), "w") as f:
        json.dump(res, f, indent=1)
    return res


def point_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("baseline"):
        run_baseline(spec["config"], spec["overrides"], spec["dev"], spec["out"])
    else:
        run_point(spec["config"], spec["overrides"], spec.get("dev", ()))
    return 0
