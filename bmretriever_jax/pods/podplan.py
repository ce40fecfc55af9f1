"""`bmr plan CONFIG --target T`: the FULL-SIZE sharded train step compiled by the real TPU / GPU compiler for a
target's topology, with abstract inputs (no weights, no device), and what the step costs there.

Per chip: XLA's buffer assignment (`compiled.memory_analysis()`: arguments, outputs, aliased, temp; peak =
arguments + outputs - aliased + temp) against the chip's HBM, the compile time, and an analytic FLOP count
(`cost_analysis()` counts a scanned layer body once, so it cannot give a step's FLOPs) turned into step time,
examples/s and tokens/s at stated utilisations of the chip's peak bf16 FLOP/s (targets.CHIPS).

The compile runs in a subprocess with JAX_PLATFORMS=cpu (the CUDA plugin needs it to compile without a GPU;
libtpu stays quiet with it) and ALLOW_MULTIPLE_LIBTPU_LOAD=1 (nothing runs on a TPU, so two compiles need not
lock each other out); BMR_PLUGIN_PATH (os.pathsep-separated folders, e.g. a `pip install --target` of
libtpu or the CUDA plugin) is added to that subprocess's PYTHONPATH only, so a CPU machine can keep the
plugins out of the environment its other jax programs use.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

from bmretriever_jax.config import ConfigError, RunConfig, load_config, resolve_mesh_shape
from bmretriever_jax.pods.targets import INSTALL_HINT, Target, parse_target

GiB = 2**30
UTILISATIONS = (0.30, 0.40, 0.50)
MISSING_EXIT = 2


# ----------------------------------------------------------------------------------------------------
# FLOPs of one step, analytic
# ----------------------------------------------------------------------------------------------------
def step_flops(cfg, run: RunConfig, n_shards: int = 1) -> Dict[str, float]:
    """FLOPs of one optimizer micro-step (2 per multiply-add), by part.

    forward: the weight matmuls of every layer (q, k, v, o, MLP; LoRA's x @ A and (x A) @ B) and attention's
      QK^T and PV over the full row T x T (the mask does not skip work), for every computed token: padded,
      B query rows and B*G passage rows; packed (data.packing), the shared rows the data's length profile needs
      (`stepcompile.packing_plan`, with n_shards batch shards, as on the mesh); embedding lookups and norms
      are not counted (no multiply-adds of consequence).
    backward: gradients w.r.t. activations for every matmul (1x its forward) plus gradients w.r.t. weights
      (another 1x) only for trained weights: full fine-tuning 2x the forward, LoRA 1x for the frozen base
      (activation gradients only) + 2x for the adapters and attention.
    remat: recomputing the forward in the backward (model.remat with a policy that saves no matmul: 1x).
    grad_cache: the gradient cache's first forward that only makes the vectors (1x forward).
    loss: the query x passage similarities and their gradients (3 x 2 B x BG x D).
    model = forward + backward (the MFU numerator); executed = all of the above (what the chips run).
    tokens: computed tokens per step (text + padding); text_tokens: the profile's text in them.
    """
    from bmretriever_jax.pods.stepcompile import packing_plan

    m, t = run.model, run.train
    B, G = t.global_batch_size, 1 + run.data.num_negatives
    D, L, I = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    mats = {"q": (D, q), "k": (D, kv), "v": (D, kv), "o": (q, D), "up": (D, I), "down": (I, D)}
    if cfg.gated_mlp:
        mats["gate"] = (D, I)
    base = sum(2 * a * b for a, b in mats.values())  # per token and layer
    lora = 0.0
    if run.lora.enabled:
        import re

        for name, (a, b) in mats.items():
            group = "mlp" if name in ("gate", "up", "down") else "attn"
            path = f"layers/{group}/{name}/kernel"
            if any(re.search(rx, path) for rx in run.lora.targets):
                lora += 2 * run.lora.rank * (a + b)
    pp = packing_plan(run, n_shards)
    tokens = pp["computed_tokens"]
    attn = sum(n * 4 * T * T * q for n, T in pp["row_groups"])  # QK^T + PV
    fwd_base, fwd_lora, fwd_attn = L * tokens * base, L * tokens * lora, L * attn
    forward = fwd_base + fwd_lora + fwd_attn
    if run.lora.enabled:
        backward = fwd_base + 2 * fwd_lora + 2 * fwd_attn
    else:
        backward = 2 * forward
    remat = forward if (m.remat and m.remat_policy == "nothing_saveable") else 0.0
    grad_cache = forward if t.grad_cache_chunk else 0.0
    loss = 3 * 2 * B * B * G * D
    model = forward + backward + loss
    return {"tokens": float(tokens), "text_tokens": float(pp["text_tokens"]), "text_share": pp["text_share"],
            "forward": forward, "backward": backward, "remat": remat,
            "grad_cache": grad_cache, "loss": float(loss), "model": model,
            "executed": model + remat + grad_cache}


def throughput(flops: Dict[str, float], run: RunConfig, target: Target, util: float) -> Dict[str, float]:
    """Step time, examples/s and tokens/s when the chips run the executed FLOPs at `util` of their peak."""
    step_s = flops["executed"] / (target.n_chips * target.chip.peak_bf16_tflops * 1e12 * util)
    return {"util": util, "step_s": step_s, "examples_per_s": run.train.global_batch_size / step_s,
            "tokens_per_s": flops["tokens"] / step_s, "text_tokens_per_s": flops["text_tokens"] / step_s,
            "hours": step_s * run.train.steps * run.train.grad_accum / 3600,
            "mfu": util * flops["model"] / flops["executed"]}


# ----------------------------------------------------------------------------------------------------
# The compile (inside the subprocess)
# ----------------------------------------------------------------------------------------------------
def _plugin_missing(target: Target) -> Optional[str]:
    mod = "libtpu" if target.chip.platform == "tpu" else "jax_cuda12_plugin"
    return None if importlib.util.find_spec(mod) else INSTALL_HINT[target.chip.platform]


def _target_run(run: RunConfig) -> RunConfig:
    """dtype `auto` means bfloat16 on every TPU / GPU (precision.py); this process is on CPU, so say it."""
    if run.model.dtype == "auto":
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, dtype="bfloat16"))
    return run


def compile_on_target(run: RunConfig, target: Target, devices) -> dict:
    """Compile the full-size step of `run` on the target's devices -> figures per chip (bytes, seconds)."""
    from bmretriever_jax.pods import plan, stepcompile
    from bmretriever_jax.parallel import sharding
    from bmretriever_jax.models import decoder

    run = _target_run(run)
    shape = resolve_mesh_shape(run.mesh, target.n_chips)
    if math.prod(shape) != target.n_chips:
        # a pod is rented whole: a mesh over part of it is a mistake, reported with the sizes that map
        sharding.device_mesh(shape, devices)
    mesh = sharding.device_mesh(shape, devices)
    cfg, source = plan.resolve_model_config(run.model.name)
    B = run.train.global_batch_size
    shards = shape[0] * shape[1]
    if B % shards:
        raise ConfigError(f"train.global_batch_size={B} is not divisible by the {shards} batch shards "
                          f"(mesh data x fsdp = {shape[0]} x {shape[1]})")
    t0 = time.time()
    estimate = sum(plan.estimate_memory(cfg, run, shape).values())
    common = {"mesh": list(shape), "estimate_bytes": estimate, "global_batch_size": B,
              "grad_cache_chunk": run.train.grad_cache_chunk, "model_source": source}
    try:
        # traced as for the target's chips, not for this CPU process (decoder.compiling_for: no CPU row chunking)
        with decoder.compiling_for(target.chip.platform):
            compiled, _ = stepcompile.compile_train_step(cfg, run, mesh)
    except Exception as e:  # noqa: BLE001 -- XLA:TPU refuses programs larger than HBM: that is the answer
        msg = str(e)
        if "Ran out of memory" not in msg and "RESOURCE_EXHAUSTED" not in msg:
            raise
        line = next((ln for ln in msg.splitlines() if "memory" in ln), msg.splitlines()[0])
        return {**common, "memory": None, "oom": line.strip()[:300], "compile_s": time.time() - t0, "fits": False}
    seconds = time.time() - t0
    mem = stepcompile.compiled_peak_bytes(compiled)
    return {**common, "memory": mem, "compile_s": seconds,
            "fits": mem["peak"] <= target.usable_bytes,
            "model": {"family": cfg.family, "params": cfg.num_params(), "layers": cfg.num_layers,
                      "hidden": cfg.hidden_size}}


def max_batch(config: Optional[str], overrides: Sequence[str], target: Target, devices,
              report: Callable[[dict], None]) -> dict:
    """Largest global batch whose step fits, by compiling: doubling (or halving) from the config's batch
    brackets it between a batch that fits and one that does not, then bisection over multiples of the batch
    shards narrows the bracket to a quarter of the batch found. With the gradient cache the chunk then
    doubles while it fits (up to the local batch): the cache bounds activations by the chunk, not the batch."""
    base = load_config(config, overrides)
    shape = resolve_mesh_shape(base.mesh, target.n_chips)
    shards = shape[0] * shape[1]

    def trial(extra: List[str]) -> dict:
        res = compile_on_target(load_config(config, list(overrides) + extra), target, devices)
        res["overrides"] = extra
        report({"trial": res})
        return res

    def at(batch: int) -> dict:
        return trial([f"train.global_batch_size={batch}"])

    b = max(shards, base.train.global_batch_size // shards * shards)
    res = at(b)
    lo, hi, best = (b, None, res) if res["fits"] else (None, b, None)
    while hi is None and b < (1 << 22):  # grow until one does not fit
        b *= 2
        res = at(b)
        lo, best = (b, res) if res["fits"] else (lo, best)
        hi = None if res["fits"] else b
    while lo is None and b > shards:  # shrink until one fits
        b = max(shards, b // 2 // shards * shards)
        res = at(b)
        lo, best = (b, res) if res["fits"] else (None, None)
        hi = b if not res["fits"] else hi
    if lo is None:
        return {"max_batch": None}
    while hi is not None and hi - lo > max(shards, lo // 4):
        mid = (lo + hi) // 2 // shards * shards
        res = at(mid)
        if res["fits"]:
            lo, best = mid, res
        else:
            hi = mid
    out = {"max_batch": lo, "first_too_large": hi, "at": best}
    c = base.train.grad_cache_chunk
    if c:
        local = lo // shards
        while c * 2 <= local:
            res = trial([f"train.global_batch_size={lo}", f"train.grad_cache_chunk={c * 2}"])
            if not res["fits"]:
                break
            c, out["at"] = c * 2, res
        out["max_chunk"] = c
    return out


REMAT_CANDIDATES = (("model.remat=true", "model.remat_policy=nothing_saveable"),
                    ("model.remat=true", "model.remat_policy=dots_with_no_batch_dims_saveable"),
                    ("model.remat=false",))


def tune_candidates(config: Optional[str], overrides: Sequence[str], n_shards: int, cfg) -> List[dict]:
    """The settings `--tune` may pick, fewest executed FLOPs per text token first: packing on, each remat
    policy, the gradient cache off or in chunks of the config's size, 4x and 1/4 of it (within the local batch).
    The config as written comes first among equals."""
    base = load_config(config, overrides)
    local = base.train.global_batch_size // n_shards
    c = base.train.grad_cache_chunk or 16
    chunks = sorted({0} | {x for x in (c // 4, c, 4 * c) if 1 <= x <= local})
    out = [{"overrides": [], "label": "the config as written"}]
    for remat in REMAT_CANDIDATES:
        for chunk in chunks:
            extra = ["data.packing=true", *remat, f"train.grad_cache_chunk={chunk}"]
            out.append({"overrides": extra, "label": " ".join(extra)})
    for cand in out:
        run = load_config(config, list(overrides) + cand["overrides"])
        fl = step_flops(cfg, run, n_shards)
        cand["flops_per_text_token"] = fl["executed"] / fl["text_tokens"]
    return sorted(out, key=lambda d: (d["flops_per_text_token"], d["label"] != "the config as written"))


def tune(config: Optional[str], overrides: Sequence[str], target: Target, devices,
         report: Callable[[dict], None]) -> dict:
    """Compile the candidates in order of executed FLOPs per text token (`tune_candidates`) until one fits:
    the first that fits runs the most text per second at a given MFU. Returns it with every trial made."""
    from bmretriever_jax.pods import plan

    base = load_config(config, overrides)
    shape = resolve_mesh_shape(base.mesh, target.n_chips)
    cfg = plan.resolve_model_config(base.model.name)[0]
    cands = tune_candidates(config, overrides, shape[0] * shape[1], cfg)
    baseline = next(c for c in cands if not c["overrides"])
    tried = []
    for cand in cands:
        res = compile_on_target(load_config(config, list(overrides) + cand["overrides"]), target, devices)
        res.update(overrides=cand["overrides"], label=cand["label"], flops_per_text_token=cand["flops_per_text_token"])
        report({"tune_trial": res})
        tried.append(res)
        if res["fits"]:
            return {"best": res, "baseline_flops_per_text_token": baseline["flops_per_text_token"], "tried": tried}
    return {"best": None, "tried": tried}


def _subprocess_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    target = parse_target(spec["target"])

    def emit(obj):
        print(json.dumps(obj), flush=True)

    hint = _plugin_missing(target)
    if hint:
        emit({"missing": hint})
        return MISSING_EXIT
    try:
        from bmretriever_jax.pods.targets import topology_devices

        devices = topology_devices(target)
        if spec.get("tune"):
            emit({"result": tune(spec["config"], spec["overrides"], target, devices, emit)})
        elif spec["max_batch"]:
            emit({"result": max_batch(spec["config"], spec["overrides"], target, devices, emit)})
        else:
            emit({"result": compile_on_target(load_config(spec["config"], spec["overrides"]), target, devices)})
    except ConfigError as e:
        emit({"config_error": str(e)})
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------
# The command (parent process)
# ----------------------------------------------------------------------------------------------------
def _subprocess_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    extra = [p for p in os.environ.get("BMR_PLUGIN_PATH", "").split(os.pathsep) if p]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + extra + [p for p in [os.environ.get("PYTHONPATH")] if p])
    # fake CPU device counts are for --devices; the target's devices come from the compiler
    env["XLA_FLAGS"] = " ".join(x for x in env.get("XLA_FLAGS", "").split()
                                if not x.startswith("--xla_force_host_platform_device_count"))
    return env


def run_target(config: Optional[str], overrides: Sequence[str], target_name: str, *, max_batch: bool = False,
               tune: bool = False, timeout: float = 3600.0, on_line: Callable[[dict], None] = lambda d: None) -> dict:
    """Run the compile subprocess; returns its last JSON object ({"result"}, {"missing"}, {"config_error"} or
    {"error": stderr tail}), calling on_line for each object it prints (the --max-batch trials)."""
    parse_target(target_name)  # a bad name is a one-line ConfigError before any subprocess
    load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            json.dump({"config": config, "overrides": list(overrides), "target": target_name,
                       "max_batch": max_batch, "tune": tune}, f)
        err_path = os.path.join(tmp, "stderr")
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "bmretriever_jax.pods.podplan", spec], env=_subprocess_env(),
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            last, t0 = None, time.time()
            for line in proc.stdout:
                if line.startswith("{"):
                    last = json.loads(line)
                    on_line(last)
                if time.time() - t0 > timeout:
                    proc.kill()
                    return {"error": f"compile for {target_name} timed out after {timeout:.0f} s"}
            proc.wait()
        if last is not None and ("result" in last or "missing" in last or "config_error" in last):
            return last
        with open(err_path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        # libtpu's start-up warnings on a machine without a TPU are noise; keep the traceback
        keep = [ln for ln in lines if not ln.startswith(("WARNING", "E0000", "I0000", "W0000", "===", "learning/"))
                and "Failed to find host bounds" not in ln]
        return {"error": "\n".join(keep[-12:]) or f"exit code {proc.returncode}"}


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def format_report(res: dict, run: RunConfig, target: Target, cfg=None) -> List[str]:
    """The per-chip memory / time table of one compile."""
    from bmretriever_jax.pods import plan

    cfg = cfg or plan.resolve_model_config(run.model.name)[0]
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, global_batch_size=res["global_batch_size"],
                                                             grad_cache_chunk=res["grad_cache_chunk"]))
    mem, chip = res["memory"], target.chip
    d, f, t = res["mesh"]
    usable = target.usable_bytes
    lines = [f"target     {target.name}: {target.n_chips} x {chip.device_kind} ({target.topology}, {target.hosts} "
             f"host{'s' if target.hosts > 1 else ''}), mesh data={d} fsdp={f} tensor={t}",
             f"compiled   full-size train step by the {'TPU' if chip.platform == 'tpu' else 'GPU (sm_%s)' % ('90' if chip.key.startswith('h') else '80')} "
             f"compiler in {res['compile_s']:.0f} s (abstract inputs, no weights)",
             "per chip   arguments {a} / outputs {o} (aliased {al}) / temp {tm} GiB".format(
                 a=_gib(mem["arguments"]), o=_gib(mem["outputs"]), al=_gib(mem["aliased"]), tm=_gib(mem["temp"])),
             f"peak       {_gib(mem['peak'])} GiB of {_gib(usable)} GiB "
             + (f"(HBM {chip.hbm_gib:g} GiB)" if chip.platform == "tpu" else
                f"(0.92 x {chip.hbm_gib:g} GB HBM: XLA_PYTHON_CLIENT_MEM_FRACTION of launch/slurm_gpu.sbatch)")]
    margin = usable - mem["peak"]
    lines.append(f"fits       {'yes' if res['fits'] else 'NO: does not fit'}, margin {_gib(margin)} GiB "
                 f"({100 * margin / usable:+.0f}%)")
    est = res["estimate_bytes"]
    lines.append(f"estimate   {_gib(est)} GiB (CPU-calibrated, `bmr plan --devices`): "
                 f"{100 * (est - mem['peak']) / mem['peak']:+.0f}% vs the compile")
    fl = step_flops(cfg, run, d * f)
    parts = [f"forward {fl['forward']:.3g}", f"backward {fl['backward']:.3g} "
             f"({'LoRA: activation grads for the frozen base' if run.lora.enabled else 'full: 2x forward'})"]
    if fl["remat"]:
        parts.append(f"remat recompute {fl['remat']:.3g}")
    if fl["grad_cache"]:
        parts.append(f"gradient-cache first forward {fl['grad_cache']:.3g}")
    lines.append(f"FLOPs      {fl['executed']:.3g} per step executed = " + " + ".join(parts)
                 + f" + loss {fl['loss']:.2g}; model FLOPs (fwd + bwd) {fl['model']:.3g}")
    B, G = res["global_batch_size"], 1 + run.data.num_negatives
    from bmretriever_jax.pods.stepcompile import packing_plan

    pp = packing_plan(run, d * f)
    how = (f"packed: {pp['row_groups'][0][0]:,} rows x {pp['row_groups'][0][1]} for {B} queries and "
           f"{B * G} passages"
           if run.data.packing else f"padded: {B} queries x {run.model.query_max_length} + {B * G} passages x "
           f"{run.model.max_length}")
    lines.append(f"tokens     {fl['tokens']:,.0f} computed per step ({how}); text {fl['text_tokens']:,.0f} "
                 f"({fl['text_share']:.0%}, length profile '{run.data.length_profile or run.train.stage}'); "
                 f"peak bf16 {chip.peak_bf16_tflops:g} TFLOP/s per chip")
    lines.append(f"{'utilisation':<14}{'MFU':>6}{'step s':>10}{'examples/s':>12}{'text tok/s':>12}"
                 f"{'hours for %d steps' % run.train.steps:>22}")
    for u in UTILISATIONS:
        th = throughput(fl, run, target, u)
        lines.append(f"{f'{u:.0%} of peak':<14}{th['mfu']:>6.0%}{th['step_s']:>10.3f}{th['examples_per_s']:>12,.0f}"
                     f"{th['text_tokens_per_s']:>12,.0f}{th['hours']:>22.2f}")
    return lines


def cmd_plan_target(a) -> None:
    """`bmr plan CONFIG --target T [--max-batch]`; exit 1 when the step does not fit, 2 without the compiler."""
    from bmretriever_jax.pods import plan

    target = parse_target(a.target)
    run = load_config(a.config, a.overrides)
    cfg, source = plan.resolve_model_config(run.model.name)
    print(f"config     {a.config or '<overrides>'}")
    print(f"model      {run.model.name} ({source}): {cfg.family}, {cfg.num_params() / 1e6:,.1f}M parameters, "
          f"{cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"{'LoRA r=%d' % run.lora.rank if run.lora.enabled else 'full fine-tuning'}, "
          f"grad cache={'chunks of %d' % run.train.grad_cache_chunk if run.train.grad_cache_chunk else 'off'}")

    def on_line(obj):
        tr, tt = obj.get("trial"), obj.get("tune_trial")
        if not (tr or tt):
            return
        t = tr or tt
        peak = f"peak {_gib(t['memory']['peak'])} GiB" if t["memory"] else "the compiler ran out of memory"
        what = (f"global batch {t['global_batch_size']:>6}, chunk {t['grad_cache_chunk']:>3}" if tr else
                f"{t['label']}: {t['flops_per_text_token']:.3g} FLOPs per text token")
        print(f"tried      {what}: {peak} of {_gib(target.usable_bytes)} GiB -> "
              f"{'fits' if t['fits'] else 'does not fit'} ({t['compile_s']:.0f} s)", flush=True)

    tune_mode = getattr(a, "tune", False)
    res = run_target(a.config, a.overrides, a.target, max_batch=a.max_batch, tune=tune_mode, on_line=on_line)
    if "missing" in res:
        print(f"the {'TPU' if target.chip.platform == 'tpu' else 'CUDA'} compiler is not installed: "
              f"{res['missing']} (or `pip install --target DIR` it and set BMR_PLUGIN_PATH=DIR)")
        raise SystemExit(MISSING_EXIT)
    if "config_error" in res:
        raise ConfigError(res["config_error"])
    if "error" in res:
        print(f"compile    FAILED for {a.target}:\n{res['error']}")
        raise SystemExit(1)
    out = res["result"]
    if out.get("oom"):
        print(f"does not fit: the {a.target} compiler ran out of memory per chip "
              f"(mesh data={out['mesh'][0]} fsdp={out['mesh'][1]} tensor={out['mesh'][2]}): {out['oom']}")
        raise SystemExit(1)
    if tune_mode:
        best = out["best"]
        if best is None:
            print(f"tune       no candidate fits on {a.target}")
            raise SystemExit(1)
        run = load_config(a.config, list(a.overrides) + best["overrides"])
        gain = out["baseline_flops_per_text_token"] / best["flops_per_text_token"]
        print(f"tune       best that fits on {a.target}: {best['label']} ({best['flops_per_text_token']:.3g} executed "
              f"FLOPs per text token, {gain:.2f}x the text per FLOP of the config as written); set these in the "
              f"config: {' '.join(best['overrides']) or '(nothing: the config is best)'}")
        for ln in format_report(best, run, target, cfg):
            print(ln)
        return
    if a.max_batch:
        if out["max_batch"] is None:
            print(f"max batch  none fits on {a.target}")
            raise SystemExit(1)
        best = out["at"]
        run = load_config(a.config, list(a.overrides) + best["overrides"])
        print(f"max batch  {out['max_batch']} queries per step"
              + (f", gradient-cache chunk up to {out['max_chunk']}" if "max_chunk" in out else "")
              + f" on {a.target}")
        for ln in format_report(best, run, target, cfg):
            print(ln)
        return
    for ln in format_report(out, run, target, cfg):
        print(ln)
    if not out["fits"]:
        print(f"does not fit: {_gib(out['memory']['peak'])} GiB per chip > {_gib(target.usable_bytes)} GiB on "
              f"{a.target}: use LoRA, a larger mesh.fsdp, a smaller train.grad_cache_chunk or shorter sequences")
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        sys.exit(_subprocess_main(sys.argv[1]))
    raise SystemExit("usage: python -m bmretriever_jax.pods.podplan SPEC.json (internal; use `bmr plan --target`)")
