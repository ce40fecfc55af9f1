"""dtype 'auto': bf16 where the hardware has bf16 units, float32 elsewhere; explicit names pass through."""
import jax.numpy as jnp
import pytest

from bmretriever_jax.util import precision


def test_bf16_is_fast_by_backend_and_cpu_flags():
    assert precision.bf16_is_fast("tpu") and precision.bf16_is_fast("gpu")
    assert precision.bf16_is_fast("cpu", {"fma", "avx2", "avx512f", "avx512_bf16"})
    assert precision.bf16_is_fast("cpu", {"amx_bf16", "amx_tile"})
    assert not precision.bf16_is_fast("cpu", {"fma", "avx2", "avx512f"})  # AVX2/AVX-512 without bf16 units
    assert not precision.bf16_is_fast("cpu", set())


def test_cpu_flags_reads_proc_cpuinfo_format(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert precision.cpu_flags(str(f)) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "bf16" in precision.cpu_flags(str(arm))
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()


def test_resolve_dtype(monkeypatch):
    assert precision.resolve_dtype("float32") == jnp.float32
    assert precision.resolve_dtype("bfloat16") == jnp.bfloat16
    assert precision.resolve_dtype(jnp.bfloat16) == jnp.bfloat16
    assert precision.resolve_dtype("auto") in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    with pytest.raises(ValueError, match="allowed: auto, bfloat16, float32"):
        precision.resolve_dtype("fp16")
    with pytest.raises(ValueError, match="allowed"):
        precision.resolve_dtype(jnp.float16)
    precision._auto.cache_clear()
    monkeypatch.setenv("BMR_DTYPE", "bfloat16")
    assert precision.resolve_dtype("auto") == jnp.bfloat16
    precision._auto.cache_clear()
    monkeypatch.setenv("BMR_DTYPE", "float32")
    assert precision.resolve_dtype("auto") == jnp.float32
    precision._auto.cache_clear()
    monkeypatch.setenv("BMR_DTYPE", "half")
    with pytest.raises(ValueError, match="BMR_DTYPE"):
        precision.resolve_dtype("auto")
    precision._auto.cache_clear()


def test_auto_matches_this_machine():
    """On this machine the choice follows its CPU flags (the reason: bf16 is emulated, and slower, without them)."""
    import jax

    precision._auto.cache_clear()
    want = jnp.bfloat16 if precision.bf16_is_fast(jax.default_backend(), precision.cpu_flags()) else jnp.float32
    assert precision.resolve_dtype("auto") == want
