"""`bmr plan CONFIG.yaml --devices N`: per-device memory of a training run on a mesh, and a compile of its
sharded train step on N fake CPU devices, before a pod is booked.

Memory is counted per device for the configured mesh (data, fsdp, tensor):
  * parameters, optimizer state and gradients: exact, from the abstract train state (`jax.eval_shape`) and
    the same sharding rules training uses (`sharding.spec_for`), so FSDP / tensor splits are the real ones;
  * activations, gradient-cache vectors and the contrastive scores: a model of what the backward pass keeps
    per token and per layer (see `ACT_BYTES`), for the local batch (or one gradient-cache chunk), without
    remat or with remat and its policy (model.remat_policy: what each layer keeps besides its input).
The compile check builds a TINY model of the same family and shape pattern (same switches: norms, gated MLP,
GQA ratio, q/k norms, sliding-window layers, biases; small dims divisible by the mesh axes) and lowers and
compiles the real `train.make_train_step` with abstract inputs on N fake CPU devices in a subprocess
(XLA_FLAGS must be set before jax is imported), which catches sharding errors without the hardware.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Sequence, Tuple

from bmretriever_jax.config import ConfigError, RunConfig, load_config, resolve_mesh_shape, to_dict
from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.util import tables, treeutil
from bmretriever_jax.pods.stepcompile import abstract_train_state, compile_train_step, compiled_peak_bytes, param_dtype

GiB = 2**30
MiB = 2**20
MESH_AXES = ("data", "fsdp", "tensor")

# Bytes the backward pass keeps per token of one decoder layer, per unit of each width, plus the attention
# probabilities (H x T per token). What autodiff must save in `models/modules.py` is ~12 B per hidden unit
# (f32 norm inputs, bf16 matmul inputs), ~14 B per unit of a gated MLP (f32 gate / up / activation, bf16
# down input; ~6 B for a plain one), ~8 B per q/k/v unit and 4 + 2 B per attention probability (f32
# softmax output, bf16 copy for the PV matmul). XLA keeps more (unfused converts, gradient temporaries):
# the width coefficients below are measured with `compiled.memory_analysis()` on XLA:CPU for each family
# switch (tests/test_plan.py re-checks the totals within 25%). It is a CPU-calibrated estimate, not a bound:
# the TPU and GPU compilers lay buffers out differently, and on the paper configs the full-size compiles
# (`bmr plan --target`, benchmarks/results/plan_pods.json) came out between ESTIMATE_VS_COMPILE[0] and [1]
# of this figure. Where libtpu / the CUDA plugin is installed, `--target` replaces it by the compiler's own.
ACT_BYTES = {
    "hidden": 46.0,  # per hidden unit (residual, pre-norms, LoRA inputs)
    "sandwich_norm": 14.0,  # per hidden unit, Gemma 2/3's two extra norms
    "qkv": 13.0,  # per unit of q + 2 kv (projections, q/k norms, rotary)
    "mlp_gated": 26.0,  # per MLP unit, gated with SiLU (Llama, Mistral, Qwen3)
    "mlp_gated_gelu": 33.0,  # gated with GELU (Gemma): the tanh form keeps two more f32 intermediates
    "mlp_plain": 11.0,  # up -> GELU -> down (GPT-NeoX)
}
# (estimate - compile) / compile over the paper configs on their targets and on 8 x H100, measured
# here with jax 0.10.2 / libtpu 0.0.42.1 / jax-cuda12-plugin 0.10.2 (benchmarks/plan_pods.py)
ESTIMATE_VS_COMPILE = (-0.23, +0.38)
# Remat keeps the f32 residual stream at every layer boundary, plus one layer's worth being recomputed.
REMAT_CARRY_FACTOR = 1.3
# Without remat the last layer's backward needs temporaries besides the saved residuals (~0.7 layer).
BACKWARD_WORKSPACE = 0.7


# ----------------------------------------------------------------------------------------------------
# Which model a config names
# ----------------------------------------------------------------------------------------------------
def resolve_model_config(name: str, quiet: bool = True) -> Tuple[ModelConfig, str]:
    """model.name -> (ModelConfig, where it came from): a model folder's config.json, a preset of the papers'
    backbones (when the folder is not on this machine), or a packaged model (gemma3-270m)."""
    from bmretriever_jax.convert.hf import config_from_hf
    from bmretriever_jax.convert import presets

    cfg_path = os.path.join(name, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            return config_from_hf(json.load(f)), cfg_path
    key = presets.preset_for(name)
    if key is not None:
        return presets.preset(key), f"preset {key}"
    from bmretriever_jax.convert import hub

    folder = hub.resolve(name, quiet=quiet)  # a .gguf file or another packaged name: converted once, cached
    with open(os.path.join(folder, "config.json")) as f:
        return config_from_hf(json.load(f)), os.path.join(folder, "config.json")


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------
def _abstract_mesh(shape: Sequence[int]):
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(shape), MESH_AXES)


def _local_bytes(tree, mesh, *, prefix: str = "", gathered: Sequence[str] = (), per_layer: int = 1) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs laid out by the training sharding rules; axes in
    `gathered` count as all-gathered, and each leaf is divided by `per_layer` (one slice of a stack)."""
    import jax

    from bmretriever_jax.parallel import sharding

    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = prefix + treeutil.path_str(path)
        shape = list(x.shape)
        for i, axis in enumerate(tuple(sharding.spec_for(name, x.shape, mesh))):
            for a in (axis,) if isinstance(axis, str) else (axis or ()):
                if a not in gathered:
                    shape[i] = -(-shape[i] // mesh.shape[a])
        total += math.prod(shape) * x.dtype.itemsize // per_layer
    return total


def _per_layer_saved(cfg: ModelConfig, tokens: int, attn_elems: int, tensor: int, compute_bytes: int) -> float:
    """Bytes one layer keeps for the backward pass over `tokens` tokens whose attention matrices hold
    `attn_elems` (sum of heads x T x T) elements; tensor-parallel axes split heads and the MLP."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    mlp = ("mlp_plain" if not cfg.gated_mlp else "mlp_gated" if cfg.act == "silu" else "mlp_gated_gelu")
    hidden = ACT_BYTES["hidden"] + (ACT_BYTES["sandwich_norm"] if cfg.sandwich_norm else 0.0)
    per_token = (hidden * cfg.hidden_size
                 + (ACT_BYTES[mlp] * cfg.intermediate_size + ACT_BYTES["qkv"] * (q + 2 * kv)) / tensor)
    return tokens * per_token + attn_elems * (4 + compute_bytes) / tensor


def _policy_saved_per_token(cfg: ModelConfig, policy: str, lora: bool, tensor: int) -> float:
    """Bytes per token and layer a remat policy keeps: the float32 outputs of the weight matmuls that the
    backward needs (q, k, v feed norms / rotary, gate and up feed the activation; o and down only join the
    residual sum, so nothing keeps them). With LoRA each is two matmuls, x @ W and (x @ A) @ B."""
    if policy == "nothing_saveable":
        return 0.0
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    mlp = (2 if cfg.gated_mlp else 1) * cfg.intermediate_size
    return 4.0 * (2 if lora else 1) * (q + 2 * kv + mlp) / tensor


def estimate_memory(model_cfg: ModelConfig, run: RunConfig, mesh_shape: Sequence[int]) -> Dict[str, int]:
    """Per-device bytes by component for `run` on a (data, fsdp, tensor) mesh of `mesh_shape`.

    Rows: frozen params, trainable params, optimizer state, gradients (+ the update's temporaries),
    FSDP-gathered layer weights, activations, contrastive vectors and scores. All integers (bytes).
    """
    mesh = _abstract_mesh(mesh_shape)
    n_data, n_fsdp, n_tensor = mesh_shape
    shards = n_data * n_fsdp
    m, t = run.model, run.train
    B, G = t.global_batch_size, 1 + run.data.num_negatives
    if B % shards:
        raise ConfigError(f"train.global_batch_size={B} is not divisible by the {shards} batch shards "
                         f"(mesh data x fsdp = {n_data} x {n_fsdp})")
    b = B // shards
    D, L, H = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.num_heads
    e = 2 if m.dtype in ("bfloat16", "auto") else 4  # auto is bf16 on every accelerator
    _, state, frozen = abstract_train_state(model_cfg, run)
    rows: Dict[str, int] = {}
    rows["frozen params"] = _local_bytes(frozen, mesh)
    trainable = _local_bytes(state["trainable"], mesh)
    rows["trainable params"] = trainable
    rows["optimizer state (AdamW)"] = _local_bytes(state["opt_state"], mesh)
    # the gradient tree (the gradient cache's float32 accumulator), and as much again for the update
    # (AdamW's new moments are computed before they replace the donated ones)
    rows["gradients + update"] = 2 * trainable
    if n_fsdp > 1:
        # FSDP all-gathers one layer's weights at a time inside the layer scan (the forward's copy is gone
        # before the backward gathers again), cast to the compute dtype before they are used; the
        # activations stay batch-sharded (the forward pins them, `decoder.forward(activation_sharding=)`).
        # Measured on 8 fake devices (tests/test_plan.py): without the pin GSPMD gathered the activations
        # instead and this row was far too small; with it, one compute-dtype layer is what the peak adds.
        layers = [t_.get("layers", {}) for t_ in (frozen, state["trainable"].get("model", {}))]
        stored = param_dtype(run).itemsize
        rows["FSDP-gathered layer weights"] = int(min(e, stored) / stored * sum(
            _local_bytes(t_, mesh, prefix="layers/", gathered=("fsdp",), per_layer=L) for t_ in layers))

    def seqs(n, T):  # (tokens, attention elements) of n sequences of length T
        return n * T, n * H * T * T

    if run.data.packing:  # one pass over the shared packed rows the data's length profile needs (per shard)
        from bmretriever_jax.pods.stepcompile import packing_plan

        (rows_all, T_row), = packing_plan(run, shards)["row_groups"]
        R = rows_all // shards
        passes = [seqs(min(t.grad_cache_chunk, R) if t.grad_cache_chunk else R, T_row)]
    elif t.grad_cache_chunk:
        c = t.grad_cache_chunk
        passes = [seqs(min(c, b), m.query_max_length), seqs(min(c, b * G), m.max_length)]
    else:
        passes = [seqs(b, m.query_max_length), seqs(b * G, m.max_length)]
    saved = [_per_layer_saved(model_cfg, tok, att, n_tensor, e) for tok, att in passes]
    # queries and passages are two forward passes; without the cache both live until the backward,
    # with it one chunk at a time (the larger one bounds the peak)
    alive = passes if not t.grad_cache_chunk else [max(passes, key=lambda p: p[0])]
    alive_saved = saved if not t.grad_cache_chunk else [max(saved)]
    policy = getattr(m, "remat_policy", "nothing_saveable") if m.remat else "everything_saveable"
    if policy == "everything_saveable":  # no remat: every layer's residuals live until its backward
        act = L * sum(alive_saved) + BACKWARD_WORKSPACE * max(alive_saved)
    else:
        # remat keeps the f32 residual stream at each layer boundary, plus what the policy saves (float32
        # matmul outputs), plus one layer's worth being recomputed in the backward
        per_token = _policy_saved_per_token(model_cfg, policy, run.lora.enabled, n_tensor)
        kept = sum(L * tok * (REMAT_CARRY_FACTOR * D * 4 + per_token) for tok, _ in alive)
        if policy == "dots_saveable":  # the attention einsums too: scores [H, T] and P @ V [q]
            kept += sum(L * 4 * (att + tok * H * model_cfg.head_dim) / n_tensor for tok, att in alive)
        act = kept + max(alive_saved)
    # embeddings in and final hidden states out (f32) of every alive pass
    act += sum(3 * tok * D * 4 for tok, _ in alive)
    rows["activations"] = int(act)
    # contrastive loss: local vectors and their cotangents, all-gathered passages (+ cotangent), scores
    vec = 2 * (b + b * G) * D * 4 + 2 * B * G * D * 4 + 4 * b * B * G * 4
    if t.grad_cache_chunk:
        vec += 2 * (b + b * G) * D * 4  # the cached vectors and their cotangent chunks
    rows["contrastive vectors + scores"] = int(vec)
    return rows


def format_table(rows: Dict[str, int], device_memory_gib: Optional[float] = None) -> str:
    total = sum(rows.values())
    body = [[k, f"{v / GiB:.3f}", f"{v / MiB:.1f}"] for k, v in rows.items()]
    body.append(["total", f"{total / GiB:.3f}", f"{total / MiB:.1f}"])
    if device_memory_gib:
        body.append(["device memory", f"{device_memory_gib:.3f}", None])
    return tables.render(["per device", "GiB", "MiB"], body)


# ----------------------------------------------------------------------------------------------------
# The tiny model of the same family and shape pattern
# ----------------------------------------------------------------------------------------------------
def tiny_config(cfg: ModelConfig, mesh_shape: Sequence[int], layers: int = 2) -> ModelConfig:
    """Same family switches, small dims that every sharded axis divides (so no rule silently falls back to
    replication): hidden % fsdp, heads*head_dim % tensor, kv_heads*head_dim % tensor, mlp % tensor,
    vocab % tensor. Keeps the GQA ratio (capped at 4), rotary fraction and the local/global layer mix."""
    _, f, tp = mesh_shape
    group = min(cfg.num_heads // cfg.num_kv_heads, 4)
    kv = min(cfg.num_kv_heads, 2)
    head_dim = 8 * tp
    hidden = 32 * max(f, 2)
    kinds = cfg.layer_is_sliding
    sliding = None
    if cfg.sliding_window is not None:
        if all(kinds):
            sliding = None  # Mistral v0.1: every layer local
        else:
            pattern = [True, False] if any(kinds) else [False]
            sliding = tuple(pattern[i % len(pattern)] for i in range(layers))
    return dataclasses.replace(
        cfg, vocab_size=64 * tp, hidden_size=hidden, intermediate_size=2 * hidden * tp, num_layers=layers,
        num_heads=kv * group, num_kv_heads=kv, head_dim=head_dim,
        sliding_window=None if cfg.sliding_window is None else 4, sliding_layers=sliding,
        query_pre_attn_scalar=None if cfg.query_pre_attn_scalar is None else float(head_dim),
        max_position_embeddings=64)


def tiny_run(run: RunConfig, mesh_shape: Sequence[int]) -> RunConfig:
    """The run settings that shape the step (LoRA or full, grad cache, remat, dtypes, negatives, similarity,
    learnable temperature) with a global batch of 2 queries per batch shard and 16-token sequences."""
    shards = mesh_shape[0] * mesh_shape[1]
    d = to_dict(run)
    d["model"].update(max_length=16, query_max_length=16)
    d["train"].update(global_batch_size=2 * shards, grad_cache_chunk=1 if run.train.grad_cache_chunk else 0,
                      grad_accum=run.train.grad_accum)
    d["mesh"] = dict(zip(MESH_AXES, mesh_shape))
    from bmretriever_jax.config import build

    return build(RunConfig, d)


def _check_in_process(model_cfg: ModelConfig, run: RunConfig, n_devices: int) -> dict:
    import jax

    from bmretriever_jax.training import make_mesh

    devices = jax.devices()
    if len(devices) < n_devices:
        raise RuntimeError(f"{n_devices} devices requested, this process has {len(devices)}")
    mesh_shape = resolve_mesh_shape(run.mesh, n_devices)
    tcfg, trun = tiny_config(model_cfg, mesh_shape), tiny_run(run, mesh_shape)
    mesh = make_mesh(trun, devices[:n_devices])
    compiled, _ = compile_train_step(tcfg, trun, mesh, fast=True)
    return {"ok": True, "tiny_model": {k: getattr(tcfg, k) for k in ("family", "hidden_size", "num_layers",
                                                                        "num_heads", "num_kv_heads", "head_dim")},
            "tiny_peak_bytes": compiled_peak_bytes(compiled)["peak"]}


def compile_check(model_cfg: ModelConfig, run: RunConfig, n_devices: int, *, in_process: bool = False,
                  timeout: float = 900.0) -> dict:
    """Lower and compile the sharded train step of a tiny model of the same family on `n_devices` fake CPU
    devices. -> {"ok": bool, "error": str (if not ok), ...}.

    in_process: use this process's devices (it must already have >= n_devices, e.g. a test session with
    --xla_force_host_platform_device_count); otherwise a subprocess with XLA_FLAGS set before jax starts.
    """
    if in_process:
        try:
            return _check_in_process(model_cfg, run, n_devices)
        except Exception as e:  # noqa: BLE001 -- the point is to report any lowering / sharding error
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            json.dump({"model": model_cfg.to_dict(), "run": to_dict(run), "devices": n_devices}, f)
        flags = [x for x in os.environ.get("XLA_FLAGS", "").split()
                 if not x.startswith("--xla_force_host_platform_device_count")]
        env = dict(os.environ, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"]),
                   JAX_PLATFORMS="cpu")
        try:
            proc = subprocess.run([sys.executable, "-m", "bmretriever_jax.pods.plan", "--compile-check", spec],
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"compile check timed out after {timeout:.0f} s"}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"ok": False, "error": tail or f"exit code {proc.returncode}"}


def _compile_check_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    from bmretriever_jax.config import build

    res = compile_check(ModelConfig.from_dict(spec["model"]), build(RunConfig, spec["run"]), spec["devices"],
                        in_process=True)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------
def plan(config: Optional[str], overrides: Sequence[str] = (), *, devices: int, device_memory: Optional[float] = None,
         compile: bool = True, in_process: bool = False, out=print) -> dict:
    """Memory table (+ warning) and compile check for one config; returns
    {"mesh", "model_source", "rows", "total_bytes", "fits", "compile"}."""
    run = load_config(config, overrides)
    mesh_shape = resolve_mesh_shape(run.mesh, devices)
    model_cfg, source = resolve_model_config(run.model.name)
    rows = estimate_memory(model_cfg, run, mesh_shape)
    total = sum(rows.values())
    n_params = model_cfg.num_params()
    out(f"config     {config or '<overrides>'}")
    out(f"model      {run.model.name} ({source}): {model_cfg.family}, {n_params / 1e6:,.1f}M parameters, "
        f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}")
    out(f"mesh       data={mesh_shape[0]} fsdp={mesh_shape[1]} tensor={mesh_shape[2]} on {devices} devices")
    t = run.train
    out(f"batch      {t.global_batch_size} queries x {1 + run.data.num_negatives} passages, "
        f"{run.model.query_max_length}/{run.model.max_length} tokens, "
        f"{'LoRA r=%d' % run.lora.rank if run.lora.enabled else 'full fine-tuning'}, "
        f"remat={getattr(run.model, 'remat_policy', 'on') if run.model.remat else 'off'}, "
        f"grad cache={'chunks of %d' % t.grad_cache_chunk if t.grad_cache_chunk else 'off'}")
    out(format_table(rows, device_memory))
    lo, hi = ESTIMATE_VS_COMPILE
    out(f"(a CPU-calibrated estimate, not the TPU / GPU compiler's figure: on the paper configs it was {lo:+.0%} to "
        f"{hi:+.0%} off the full-size compiles; `bmr plan CONFIG --target T` compiles for the real chips)")
    fits = None
    if device_memory:
        fits = total <= device_memory * GiB
        if not fits:
            out(f"WARNING: {total / GiB:.2f} GiB per device exceeds --device-memory {device_memory:g} GiB: "
                "use LoRA, a larger fsdp axis, train.grad_cache_chunk, model.remat=true or shorter sequences")
    result = {"mesh": list(mesh_shape), "model_source": source, "rows": rows, "total_bytes": total, "fits": fits,
              "compile": None}
    if compile:
        res = compile_check(model_cfg, run, devices, in_process=in_process)
        result["compile"] = res
        if res["ok"]:
            tm = res["tiny_model"]
            out(f"compile    OK: sharded train step of a tiny {tm['family']} (hidden {tm['hidden_size']}, "
                f"{tm['num_heads']}/{tm['num_kv_heads']} heads x {tm['head_dim']}) on {devices} fake CPU devices")
        else:
            out(f"compile    FAILED:\n{res['error']}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--compile-check":
        sys.exit(_compile_check_main(sys.argv[2]))
    raise SystemExit("usage: python -m bmretriever_jax.pods.plan --compile-check SPEC.json (internal; use `bmr plan`)")
