"""`bmr plan --target`: target names -> topologies, meshes that map (or say which sizes do), the full-size
step compiled by libtpu for a small TPU slice (memory figures below the HBM), "does not fit" with a non-zero
exit, and the analytic FLOP count. The TPU tests need libtpu (`make test` installs it into a folder that
BMR_PLUGIN_PATH names); the GPU and full-size paper compiles are slow tests."""
import glob
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from bmretriever_jax.pods import podplan

from bmretriever_jax.parallel import sharding
from bmretriever_jax.config import ConfigError, load_config
from bmretriever_jax.convert import presets
from bmretriever_jax.pods.targets import parse_target

ROOT = os.path.dirname(os.path.dirname(__file__))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
PAPERS = os.path.join(ROOT, "configs", "papers")


def _plugin(module):
    paths = [p for p in os.environ.get("BMR_PLUGIN_PATH", "").split(os.pathsep) if p]
    return importlib.util.find_spec(module) is not None or any(
        os.path.isdir(os.path.join(p, module)) for p in paths)


@pytest.fixture
def _libtpu():
    assert _plugin("libtpu"), "libtpu is not installed: `make test` installs it (BMR_PLUGIN_PATH=.venv/plugins/tpu)"


@pytest.fixture
def _cuda_plugin():
    assert _plugin("jax_cuda12_plugin"), "the CUDA plugin is not installed: `make test-slow` installs it"


# a compiler the test set-up installs is a requirement, not a reason to skip
needs_tpu = pytest.mark.usefixtures("_libtpu")
needs_cuda = pytest.mark.usefixtures("_cuda_plugin")


@pytest.mark.parametrize("name,topology,chips,hosts", [
    ("v5p-64", "v5p:2x4x4", 32, 8), ("v5p-128", "v5p:4x4x4", 64, 16), ("v4-32", "v4:2x2x4", 16, 4),
    ("v4-8", "v4:2x2x1", 4, 1), ("v5e-256", "v5e:16x16", 256, 64), ("v5litepod-16", "v5e:4x4", 16, 4),
    ("v6e-16", "v6e:4x4", 16, 4), ("v6e-8", "v6e:2x4", 8, 2), ("v5p:4x4x4", "v5p:4x4x4", 64, 16),
    ("h100x8", "1x1x8", 8, 1), ("h100:2x8", "1x2x8", 16, 2), ("a100-40gbx8", "1x1x8", 8, 1)])
def test_target_names(name, topology, chips, hosts):
    t = parse_target(name)
    assert (t.topology, t.n_chips, t.hosts) == (topology, chips, hosts)


def test_bad_targets_name_the_allowed_forms():
    with pytest.raises(ConfigError, match="v5p-63 is not a v5p slice; allowed: v5p-8, v5p-16"):
        parse_target("v5p-63")
    with pytest.raises(ConfigError, match="unknown target; allowed: TPU slices"):
        parse_target("tpu7-8")
    with pytest.raises(ConfigError, match="3 dimensions"):
        parse_target("v5p:4x4")


def test_gpu_memory_counts_the_allocator_share():
    assert parse_target("h100x8").usable_bytes == int(0.92 * 80 * 2**30)
    assert parse_target("v5e-4").usable_bytes == 16 * 2**30


def test_mesh_that_cannot_map_names_the_sizes_that_do():
    """On the 8 fake CPU devices: a mesh over part of them cannot take all of them."""
    with pytest.raises(ConfigError, match=r"mesh \(data=2, fsdp=2, tensor=1\) does not map onto 8 x cpu: .*"
                                          r"sizes that map: \(data=2, fsdp=4, tensor=1\)"):
        sharding.device_mesh((2, 2, 1), jax.devices()[:8])
    mesh = sharding.device_mesh((2, 4, 1), jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_flop_count_follows_what_is_trained():
    cfg = presets.preset("pythia-410m")
    full = podplan.step_flops(cfg, load_config(None, ["model.name=pythia-410m", "lora.enabled=false",
                                                       "model.remat=false", "train.grad_cache_chunk=0"]))
    assert full["backward"] == 2 * full["forward"] and full["executed"] == full["model"]
    lora = podplan.step_flops(cfg, load_config(None, ["model.name=pythia-410m", "train.grad_cache_chunk=8"]))
    assert full["forward"] < lora["forward"] < 1.05 * full["forward"]  # adapters add a little forward
    assert lora["forward"] < lora["backward"] < 1.5 * lora["forward"]  # no weight grads for the base
    assert lora["executed"] == pytest.approx(lora["model"] + 2 * lora["forward"])  # remat + the cache's pass
    # 6 N per token: the weight matmuls of a full fine-tuning step dominate at 64 tokens
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    assert full["model"] / full["tokens"] == pytest.approx(6 * n, rel=0.1)


def _bmr(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "bmretriever_jax.cli", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@needs_tpu
def test_smoke_config_compiles_for_a_v5e_2x2_slice():
    r = _bmr(SMOKE, "--target", "v5e:2x2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "4 x TPU v5 lite (v5e:2x2, 1 host), mesh data=4 fsdp=1 tensor=1" in out
    peak = float(out.split("peak       ")[1].split()[0])
    assert 0.5 < peak < 16.0 and "of 16.00 GiB (HBM 16 GiB)" in out and "fits       yes" in out
    for word in ("arguments", "temp", "FLOPs", "tokens     384 computed per step (padded", "text tok/s", "40% of peak"):
        assert word in out


@needs_tpu
def test_too_large_reports_does_not_fit_and_exits_non_zero():
    r = _bmr(SMOKE, "train.global_batch_size=1024", "model.max_length=1024", "model.remat=false",
             "--target", "v5e:2x2")
    assert r.returncode == 1, r.stdout + r.stderr
    # XLA:TPU refuses a program larger than the HBM; the tool reports it as the answer, not a crash
    assert r.stdout.splitlines()[-1].startswith("does not fit: the v5e:2x2 compiler ran out of memory per chip")
    assert "exceeds available HBM" in r.stdout


@needs_tpu
def test_mesh_over_part_of_a_slice_is_a_one_line_error():
    res = podplan.run_target(SMOKE, ["mesh.data=2"], "v5e:2x2")
    assert "config_error" in res, res
    msg = res["config_error"]
    assert "\n" not in msg and "does not map onto TPU v5 lite 2x2 (4 devices)" in msg
    assert "(data=4, fsdp=1, tensor=1)" in msg.split("sizes that map: ")[1]


def test_without_the_compiler_says_how_to_install_and_exits_2(tmp_path):
    """A GPU target where the CUDA plugin is not importable (PYTHONPATH / BMR_PLUGIN_PATH without it)."""
    # BMR_PLUGIN_PATH points at an empty folder, so the compile subprocess cannot find the plugin even where
    # `make test-slow` installed it beside the venv (it is never installed into the venv itself)
    assert importlib.util.find_spec("jax_cuda12_plugin") is None, "the CUDA plugin must not be in the venv"
    r = _bmr(SMOKE, "--target", "h100x8", env_extra={"BMR_PLUGIN_PATH": str(tmp_path)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the CUDA compiler is not installed: pip install -e '.[gpu]'" in r.stdout


@pytest.mark.slow
@needs_cuda
def test_smoke_config_compiles_for_two_gpus():
    r = _bmr(SMOKE, "train.global_batch_size=4", "--target", "h100:1x2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 x NVIDIA H100" in r.stdout and "fits       yes" in r.stdout


# the target each paper config is documented for (the first line of the config names it)
def _documented_target(path):
    with open(path) as f:
        for line in f:
            if line.startswith("# target:"):
                return line.split(":", 1)[1].split()[0]
    raise AssertionError(f"{path} has no '# target:' line")


@pytest.mark.slow
@needs_tpu
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(PAPERS, "*.yaml"))), ids=os.path.basename)
def test_every_paper_config_compiles_and_fits_on_its_target(path):
    r = _bmr(path, "--target", _documented_target(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_target_compile_traces_without_cpu_row_chunking():
    """forward's CPU-only row chunking (a lax.map over row blocks) and causal query blocks must not reach a TPU /
    GPU compile made from a CPU process: it would measure another program than the chips run (it also hid the gradient cache's
    (data, fsdp) sharding bug behind a different one)."""
    from bmretriever_jax.models import decoder

    blocks = lambda: decoder._module_kw("float32", False, False, 0.0, None, None)[0]["causal_blocks"]  # noqa: E731
    assert decoder._row_chunks(64, 512) > 1  # this test session is on CPU
    assert blocks() == decoder.CPU_CAUSAL_BLOCKS > 1  # and so is causal attention in query blocks
    for platform in ("tpu", "cuda"):
        with decoder.compiling_for(platform):
            assert decoder._row_chunks(64, 512) == 1
            assert blocks() == 1
    assert decoder._row_chunks(64, 512) > 1
