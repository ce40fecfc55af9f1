"""`bmr plan`: presets of the papers' backbones, the per-device memory table for every shipped config, the
compile check on fake devices, and the memory figure against what XLA assigns to the real step."""
import argparse
import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmretriever_jax.pods import plan, stepcompile

from bmretriever_jax.parallel import sharding
from bmretriever_jax.config import ConfigError, load_config, resolve_mesh_shape
from bmretriever_jax.convert import presets
from bmretriever_jax.models import init_params
from bmretriever_jax.training import init_state, make_mesh, make_optimizer, split_params

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
IDS = [os.path.relpath(p, ROOT) for p in CONFIGS]
# smoke.yaml's batch of 4 cannot be split over 8 data shards (plan says so, see below)
OVERRIDES = {"smoke.yaml": ["train.global_batch_size=8"]}


def _overrides(path):
    return OVERRIDES.get(os.path.basename(path), [])


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------
# Published sizes (model cards) minus the untied LM head, which a retriever does not load:
# pythia-410m 405.3M - 50304 x 1024; pythia-1b 1011.8M - 50304 x 2048; Mistral-7B 7241.7M - 32000 x 4096;
# Gemma-2B 2506.2M, Qwen3-0.6B 596.0M and Gemma 3 270M 268.1M tie their embeddings.
PUBLISHED_M = {"pythia-410m": 405.3 - 51.5, "pythia-1b": 1011.8 - 103.0, "biomistral-7b": 7241.7 - 131.1,
               "gemma-2b": 2506.2, "qwen3-0.6b": 596.0, "gemma3-270m": 268.1}


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_preset_parameter_counts_match_the_published_models(name):
    assert abs(presets.preset(name).num_params() / 1e6 - PUBLISHED_M[name]) < 0.15


def test_preset_families_and_shapes():
    p = presets.preset
    assert (p("pythia-410m").family, p("pythia-410m").rotary_pct, p("pythia-410m").norm) == ("gpt_neox", 0.25, "layer")
    assert p("biomistral-7b").sliding_window == 4096 and all(p("biomistral-7b").layer_is_sliding)
    assert (p("gemma-2b").num_kv_heads, p("gemma-2b").norm_offset, p("gemma-2b").act) == (1, 1.0, "gelu_tanh")
    assert p("qwen3-0.6b").head_dim == 128 and p("qwen3-0.6b").qk_norm and p("qwen3-0.6b").sliding_window is None
    g3 = p("gemma3-270m")
    assert "".join("L" if s else "G" for s in g3.layer_is_sliding) == "LLLLLG" * 3
    assert (g3.rope_theta, g3.rope_local_theta, g3.sliding_window) == (1e6, 1e4, 512)


def test_gemma3_preset_equals_the_packaged_model():
    """The preset and the config converted from the shipped GGUF describe the same network."""
    from bmretriever_jax.convert import hub
    from bmretriever_jax.convert.hf import config_from_hf

    with open(os.path.join(hub.resolve("gemma3-270m", quiet=True), "config.json")) as f:
        real = config_from_hf(json.load(f))
    pre = presets.preset("gemma3-270m")
    assert dataclasses.replace(real, norm_eps=pre.norm_eps) == pre
    assert real.norm_eps == pytest.approx(pre.norm_eps, rel=1e-6)  # the GGUF stores 1e-6 as float32


@pytest.mark.parametrize("name,key", [
    ("models/pythia-410m", "pythia-410m"), ("models/biomistral-7b", "biomistral-7b"),
    ("runs/bmretriever-410m-pretrain/model", "pythia-410m"), ("BMRetriever/BMR-2B", "gemma-2b"),
    ("/data/ckpt/Qwen3-0.6B", "qwen3-0.6b"), ("gemma3-270m", "gemma3-270m"), ("runs/quickstart/model", None),
    ("models/pythia-410m-big", "pythia-410m"), ("models/pythia-4100m", None)])
def test_preset_for(name, key):
    assert presets.preset_for(name) == key


def test_every_paper_config_names_a_known_backbone():
    for path in CONFIGS:
        name = load_config(path).model.name
        assert os.path.isdir(name) or presets.preset_for(name), f"{path}: model.name {name!r} has no preset"


# ----------------------------------------------------------------------------------------------------
# The memory table
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_plan_table_for_every_config(path):
    lines = []
    res = plan.plan(path, _overrides(path), devices=8, device_memory=96.0, compile=False, out=lines.append)
    rows, text = res["rows"], "\n".join(lines)
    assert all(v >= 0 for v in rows.values()) and rows["activations"] > 0
    assert res["total_bytes"] == sum(rows.values()) and res["fits"] is True
    assert "total" in text and "activations" in text and "WARNING" not in text
    run = load_config(path, _overrides(path))
    cfg, _ = plan.resolve_model_config(run.model.name)
    n_data, n_fsdp, n_tensor = res["mesh"]
    assert n_data * n_fsdp * n_tensor == 8
    # the parameters are all accounted for: frozen + trainable base weights = the model, split over FSDP
    # (every big matrix's "embed" axis is divisible by the fsdp sizes used here)
    itemsize = jnp.dtype(run.model.param_dtype).itemsize
    base = rows["frozen params"] + (0 if run.lora.enabled else rows["trainable params"])
    assert base == pytest.approx(cfg.num_params() * itemsize / n_fsdp, rel=0.01)
    if run.lora.enabled:  # AdamW: two float32 moments per trainable float32 adapter weight
        assert rows["optimizer state (AdamW)"] == pytest.approx(2 * rows["trainable params"], rel=1e-3)


def test_plan_warns_when_over_device_memory_and_rejects_unsplittable_batches():
    lines = []
    path = os.path.join(ROOT, "configs", "papers", "bmretriever-410m-pretrain.yaml")
    res = plan.plan(path, [], devices=8, device_memory=4.0, compile=False, out=lines.append)
    assert res["fits"] is False and any(ln.startswith("WARNING") and "exceeds" in ln for ln in lines)
    with pytest.raises(ConfigError, match="not divisible by the 8 batch shards"):
        plan.plan(os.path.join(ROOT, "configs", "smoke.yaml"), [], devices=8, compile=False, out=lines.append)


def test_memory_scales_the_way_the_mesh_and_settings_say():
    cfg = presets.preset("qwen3-0.6b")
    run = load_config(os.path.join(ROOT, "configs", "papers", "stm-qwen3-0.6b-expert.yaml"))
    dp = plan.estimate_memory(cfg, run, (8, 1, 1))
    fsdp = plan.estimate_memory(cfg, run, (1, 8, 1))
    assert fsdp["frozen params"] == pytest.approx(dp["frozen params"] / 8, rel=0.01)
    assert "FSDP-gathered layer weights" in fsdp and "FSDP-gathered layer weights" not in dp
    no_cache = plan.estimate_memory(cfg, load_config(None, ["model.name=qwen3-0.6b", "model.max_length=512",
                                                            "model.query_max_length=512",
                                                            "train.global_batch_size=256", "data.num_negatives=1"]),
                                    (8, 1, 1))
    assert no_cache["activations"] > 2 * dp["activations"]  # 32 local queries + 64 passages vs a chunk of 32
    no_remat = plan.estimate_memory(cfg, load_config(os.path.join(ROOT, "configs", "papers",
                                                                  "stm-qwen3-0.6b-expert.yaml"),
                                                     ["model.remat=false"]), (8, 1, 1))
    assert no_remat["activations"] > 5 * dp["activations"]


# ----------------------------------------------------------------------------------------------------
# The compile check
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_tiny_model_keeps_the_family_and_divides_the_mesh(path):
    run = load_config(path, _overrides(path))
    cfg, _ = plan.resolve_model_config(run.model.name)
    for shape in [resolve_mesh_shape(run.mesh, 8), (2, 2, 2), (1, 1, 8)]:
        tiny = plan.tiny_config(cfg, shape)
        same = ("family", "norm", "act", "gated_mlp", "attn_bias", "mlp_bias", "parallel_residual", "qk_norm",
                "sandwich_norm", "embed_scale", "norm_offset", "rotary_pct", "tie_embeddings")
        assert all(getattr(tiny, k) == getattr(cfg, k) for k in same)
        assert (tiny.sliding_window is None) == (cfg.sliding_window is None)
        assert set(tiny.layer_is_sliding) == set(cfg.layer_is_sliding)  # local-only, global-only or both
        _, f, t = shape
        assert tiny.hidden_size % f == 0 and tiny.intermediate_size % t == 0 and tiny.vocab_size % t == 0
        assert (tiny.num_heads * tiny.head_dim) % t == 0 and (tiny.num_kv_heads * tiny.head_dim) % t == 0
        assert tiny.num_params() < 2e6


def _parser():
    p = argparse.ArgumentParser(prog="bmr")
    from bmretriever_jax.cli import planning

    planning.add_commands(p.add_subparsers(dest="cmd", required=True))
    return p


def test_cli_plan_quickstart_compiles_on_8_fake_devices_in_a_subprocess(capsys):
    """The command as a user runs it: the compile check runs in a subprocess that sets XLA_FLAGS itself."""
    a = _parser().parse_args(["plan", os.path.join(ROOT, "configs", "quickstart.yaml"), "--devices", "8",
                              "--device-memory", "0.5"])
    a.fn(a)
    out = capsys.readouterr().out
    assert "mesh       data=8 fsdp=1 tensor=1 on 8 devices" in out
    assert "WARNING" in out and "exceeds --device-memory 0.5 GiB" in out  # the 262k-token embedding alone is 1 GiB
    assert "compile    OK: sharded train step of a tiny gemma3" in out


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_compile_check_for_every_config(path):
    """Every shipped config's sharded step compiles on 8 devices (in this test process's 8 fake CPU devices;
    ~10-25 s each on a 2-core machine, hence slow)."""
    run = load_config(path, _overrides(path))
    cfg, _ = plan.resolve_model_config(run.model.name)
    res = plan.compile_check(cfg, run, 8, in_process=True)
    assert res["ok"], res.get("error")


def test_compile_check_reports_a_sharding_error(monkeypatch):
    """A rule that splits the stacked layer axis (2 tiny layers) over the 8-way data axis is reported, with
    the parameter and the sizes, instead of raised."""
    from jax.sharding import PartitionSpec as P

    real = sharding.spec_for

    def broken(path, shape, mesh, *a, **k):
        return P("data") if path.endswith("layers/attn_norm/scale") else real(path, shape, mesh, *a, **k)

    monkeypatch.setattr(sharding, "spec_for", broken)
    run = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ["lora.enabled=false"])
    res = plan.compile_check(presets.preset("gemma3-270m"), run, 8, in_process=True)
    assert not res["ok"] and "attn_norm/scale (2, 64)" in res["error"] and "evenly divide" in res["error"], res


# ----------------------------------------------------------------------------------------------------
# The memory figure against the measured peak
# ----------------------------------------------------------------------------------------------------
def _small(name, **kw):
    """A small model of a paper family (4 layers, hidden 256): big enough that activations and weights, not
    fixed overheads, make up the memory, small enough to compile in seconds."""
    c = presets.preset(name)
    sliding = None if c.sliding_layers is None else (True, True, True, False)
    return dataclasses.replace(c, **{**dict(
        vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
        num_kv_heads=min(c.num_kv_heads, 2), head_dim=64, sliding_layers=sliding,
        sliding_window=None if c.sliding_window is None else 32), **kw})


SMALL = ["model.name=gemma3-270m", "model.max_length=64", "model.query_max_length=32", "train.global_batch_size=16", "data.num_negatives=1"]


def _measure(cfg, run):
    """Compile the real sharded step for run's mesh on this test process's fake devices, run it once on real
    arrays, and return XLA's per-device buffer assignment (arguments + unaliased outputs + temporaries).

    Why this and not the process's peak RSS: the 8 fake devices share one process, so RSS sums all of them
    plus the Python / JAX / compiler heap (hundreds of MB, noisy across runs on a shared machine), while
    `memory_analysis()` is per device and is exactly what the allocator must provide for this program.
    """
    mesh = make_mesh(run, jax.devices())
    compiled, (a_state, a_frozen, a_batch) = stepcompile.compile_train_step(cfg, run, mesh)
    params = init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.dtype(run.model.param_dtype))
    trainable, frozen = split_params(params, run, jax.random.PRNGKey(1))
    state = init_state(run, trainable, make_optimizer(run))
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, a_state))
    frozen = jax.device_put(frozen, jax.tree.map(lambda x: x.sharding, a_frozen))
    rng = np.random.default_rng(0)
    batch = {k: jax.device_put(np.asarray(rng.integers(3, cfg.vocab_size, v.shape) if "ids" in k
                                          else np.ones(v.shape), np.int32), v.sharding) for k, v in a_batch.items()}
    _, metrics = compiled(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    return stepcompile.compiled_peak_bytes(compiled)


def _check_within_25pct(cfg, run):
    est = sum(plan.estimate_memory(cfg, run, resolve_mesh_shape(run.mesh, len(jax.devices()))).values())
    peak = _measure(cfg, run)["peak"]
    assert abs(est - peak) <= 0.25 * peak, f"estimate {est / 2**20:.1f} MiB vs measured {peak / 2**20:.1f} MiB"


def test_memory_estimate_within_25_percent_of_measured_peak():
    """The quickstart's family (Gemma 3: sandwich norms, sliding-window layers), LoRA, remat, data parallel
    over the 8 fake devices."""
    _check_within_25pct(_small("gemma3-270m"), load_config(None, SMALL + ["mesh.data=8"]))


@pytest.mark.slow
@pytest.mark.parametrize("name,over", [
    ("pythia-410m", ["mesh.data=1", "lora.enabled=false", "train.grad_cache_chunk=4"]),
    ("qwen3-0.6b", ["mesh.data=4", "mesh.tensor=2", "model.remat=false"]),
    ("gemma-2b", ["mesh.data=4", "model.max_length=128", "train.global_batch_size=32", "data.num_negatives=3"]),
    ("biomistral-7b", ["mesh.data=1", "model.dtype=float32"]),
    ("qwen3-0.6b", ["mesh.data=1", "model.remat_policy=dots_saveable"]),
    ("pythia-410m", ["mesh.data=1", "lora.enabled=false", "model.remat_policy=dots_with_no_batch_dims_saveable"]),
])
def test_memory_estimate_within_25_percent_other_settings(name, over):
    _check_within_25pct(_small(name), load_config(None, SMALL + over))


# Two layouts where XLA's GSPMD partitioner kept far more than the plan's model of the intended layout
# until the forward pinned the activations to the batch axes (decoder.forward(activation_sharding=)):
#  * data=8 with this 4-layer model: the scan's stacked residuals were split over "data" along the layer
#    axis (padded 4 -> 8) and all-gathered per layer in the backward: 250 MiB vs 124 MiB on 1 device;
#  * fsdp=4: activations [rows, T, D] were all-gathered over "fsdp" instead of the weights (39 vs 28 MiB).
@pytest.mark.slow
@pytest.mark.parametrize("name,over", [
    ("gemma-2b", ["mesh.data=8", "model.max_length=128", "train.global_batch_size=32", "data.num_negatives=3"]),
    ("qwen3-0.6b", ["mesh.data=2", "mesh.fsdp=4"]),
    ("qwen3-0.6b", ["mesh.fsdp=8"]),
])
def test_memory_estimate_with_pinned_activations(name, over):
    _check_within_25pct(_small(name), load_config(None, SMALL + over))


def test_the_estimate_range_printed_is_the_one_measured_against_the_compiles():
    """`bmr plan --devices` prints how far its CPU-calibrated estimate was from the real TPU / GPU compiles of
    the paper configs: that range must be the one in benchmarks/results/plan_pods.json, not a guess."""
    import json

    from bmretriever_jax.pods import plan as plan_mod

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "plan_pods.json")
    rows = [r for r in json.load(open(path)).values() if "memory" in r]
    assert len(rows) >= 8, "benchmarks/plan_pods.py has compiled too few paper configs"
    rel = [(r["estimate_bytes"] - r["memory"]["peak"]) / r["memory"]["peak"] for r in rows]
    lo, hi = plan_mod.ESTIMATE_VS_COMPILE
    assert lo <= min(rel) < lo + 0.01 and hi - 0.01 < max(rel) <= hi, (min(rel), max(rel))
