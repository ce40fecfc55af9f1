"""Accelerator targets for `bmr plan --target`: the chip facts in one table, slice / GPU names -> topologies,
and the device meshes that map the (data, fsdp, tensor) axes onto them.

Targets:
  TPU slices by accelerator type, as `gcloud compute tpus tpu-vm create --accelerator-type` names them:
    v4-N and v5p-N count TensorCores (2 per chip: v5p-64 is 32 chips, 2x4x4), v5e-N / v6e-N count chips
    (v5e-256 is 16x16); or a topology directly: v5p:4x4x4, v5e:2x2, v6e:4x4, v4:2x2x4.
  NVIDIA GPUs: h100x8 (one host of 8), h100:2x8 (2 hosts of 8), likewise h200 / a100 / a100-40gb.
Nothing here needs a device: the topologies come from the TPU / GPU compilers (libtpu, the CUDA plugin),
which `bmr plan` runs in a subprocess with JAX_PLATFORMS=cpu.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional, Tuple

from bmretriever_jax.config import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    key: str  # the name in targets: v5p, h100, ...
    platform: str  # "tpu" or "cuda"
    device_kind: str  # what jax's Device.device_kind says, checked against the compiler's topology
    hbm_gib: float  # memory per chip (one JAX device)
    peak_bf16_tflops: float  # dense bf16 matmul peak per chip
    interconnect_gbps: Optional[float]  # chip-to-chip GB/s (TPU: ICI per chip; GPU: NVLink); None: not published
    chips_per_host: int
    naming: str  # how slice names count: "cores" (2 per chip), "chips", or "gpus"
    dims: int = 0  # TPU torus dimensions (3 for v4 / v5p, 2 for v5e / v6e); 0 for GPUs
    # TPU: libtpu's chip config ("megacore": one JAX device per chip, the two TensorCores fused, as on a
    # real v4 / v5p VM; libtpu's default for v4 makes one device per TensorCore instead)
    chip_config: str = "default"


# One table of chip facts; the source of each row is the comment above it.
CHIPS: Dict[str, Chip] = {
    # Cloud TPU v4 (cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16 per chip, 32 GiB HBM2 at 1200 GB/s,
    # 3D torus, 4 chips per host; v4-N counts TensorCores (2 per chip, megacore). The page gives pod-level
    # all-reduce (1.1 PB/s) and bisection (24 TB/s) bandwidths, not one per chip.
    "v4": Chip("v4", "tpu", "TPU v4", 32.0, 275.0, None, 4, "cores", 3, "megacore"),
    # Cloud TPU v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s,
    # bidirectional ICI 1200 GB/s per chip, 3D torus, 4 chips per host; v5p-N counts TensorCores.
    "v5p": Chip("v5p", "tpu", "TPU v5", 95.0, 459.0, 1200.0, 4, "cores", 3, "megacore"),
    # Cloud TPU v5e (cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s,
    # ICI 1600 Gbit/s = 200 GB/s per chip, 2D torus, 4 chips per host in multi-host slices; v5e-N counts chips.
    "v5e": Chip("v5e", "tpu", "TPU v5 lite", 16.0, 197.0, 200.0, 4, "chips", 2),
    # Cloud TPU v6e / Trillium (cloud.google.com/tpu/docs/v6e): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s,
    # ICI 3200 Gbit/s = 400 GB/s per chip, 2D torus, 4 chips per host in multi-host slices; counts chips.
    "v6e": Chip("v6e", "tpu", "TPU v6 lite", 32.0, 918.0, 400.0, 4, "chips", 2),
    # NVIDIA H100 SXM5 80GB (NVIDIA H100 datasheet): 989 TFLOP/s dense bf16 (1979 with sparsity), 80 GB
    # HBM3 at 3.35 TB/s, NVLink 4 900 GB/s, 8 per HGX host. Datasheet values, not read from a device.
    "h100": Chip("h100", "cuda", "NVIDIA H100", 80.0, 989.0, 900.0, 8, "gpus"),
    # NVIDIA H200 SXM 141GB (NVIDIA H200 datasheet): 989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s,
    # NVLink 900 GB/s, 8 per HGX host. Datasheet values.
    "h200": Chip("h200", "cuda", "NVIDIA H200", 141.0, 989.0, 900.0, 8, "gpus"),
    # NVIDIA A100 SXM4 80GB / 40GB (NVIDIA A100 datasheet): 312 TFLOP/s dense bf16, 80 GB HBM2e at
    # 2.04 TB/s (40 GB HBM2 at 1.56 TB/s), NVLink 3 600 GB/s, 8 per HGX host. Datasheet values.
    "a100": Chip("a100", "cuda", "NVIDIA A100", 80.0, 312.0, 600.0, 8, "gpus"),
    "a100-40gb": Chip("a100-40gb", "cuda", "NVIDIA A100", 40.0, 312.0, 600.0, 8, "gpus"),
}
# JAX on a GPU takes XLA_PYTHON_CLIENT_MEM_FRACTION of the memory (launch/slurm_gpu.sbatch sets 0.92; jax's
# default is 0.75): a step fits when its peak is below that share, not below the whole HBM.
GPU_MEM_FRACTION = 0.92

# GpuTargetConfig text protos for the deviceless CUDA compile (XLA's gpu_device_info + versions). The H200
# one compiled on this machine (../shared/notes/deviceless-aot.md). H100 / A100 follow NVIDIA's
# architecture whitepapers: SMs (132 on H100 SXM5, 108 on A100), 128 / 64 FP32 units per SM, shared memory
# per SM 228 KiB / 164 KiB (227 / 163 KiB opt-in per block), L2 50 MB / 40 MB, boost clocks 1.98 / 1.41 GHz,
# compute capability 9.0 / 8.0. device_memory_size and memory_bandwidth are datasheet numbers (on real
# hardware `jax.lib.xla_client.get_topology_for_devices(jax.devices()).target_config` prints the exact
# proto); they drive XLA's scheduler memory limit and cost model, not the buffer assignment we report.
_GPU_PROTO = """gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32
  shared_memory_per_block: 49152  shared_memory_per_core: {smem_core}
  shared_memory_per_block_optin: {smem_optin}
  threads_per_core_limit: 2048  core_count: {sms}  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: {bw}  l2_cache_size: {l2}  clock_rate_ghz: {clock}
  device_memory_size: {mem}
  cuda_compute_capability {{ major: {cc_major} minor: {cc_minor} }}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{name}"
"""
_HOPPER = dict(smem_core=233472, smem_optin=232448, sms=132, fpus=128, l2=52428800, clock=1.98, cc_major=9,
               cc_minor=0)
_AMPERE = dict(smem_core=167936, smem_optin=166912, sms=108, fpus=64, l2=41943040, clock=1.41, cc_major=8,
               cc_minor=0)
GPU_TARGET_CONFIGS: Dict[str, str] = {
    "h100": _GPU_PROTO.format(**_HOPPER, bw=3350000000000, mem=80 * GiB, name="NVIDIA H100 80GB HBM3"),
    "h200": _GPU_PROTO.format(**_HOPPER, bw=4800000000000, mem=150754820096, name="NVIDIA H200"),
    "a100": _GPU_PROTO.format(**_AMPERE, bw=2039000000000, mem=80 * GiB, name="NVIDIA A100-SXM4-80GB"),
    "a100-40gb": _GPU_PROTO.format(**_AMPERE, bw=1555000000000, mem=40 * GiB, name="NVIDIA A100-SXM4-40GB"),
}

INSTALL_HINT = {"tpu": "pip install -e '.[tpu]'", "cuda": "pip install -e '.[gpu]'"}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given
    chip: Chip
    topology: str  # TPU: "v5p:2x4x4"; GPU: partitions x hosts x GPUs per host, "1x2x8"
    n_chips: int

    @property
    def hosts(self) -> int:
        return max(1, self.n_chips // self.chip.chips_per_host)

    @property
    def usable_bytes(self) -> int:
        """What one device may hold: the HBM on TPU; the share JAX's allocator takes on a GPU."""
        frac = GPU_MEM_FRACTION if self.chip.platform == "cuda" else 1.0
        return int(self.chip.hbm_gib * GiB * frac)


def _tpu_shape(chip: Chip, n_chips: int) -> Optional[Tuple[int, ...]]:
    """The slice shape Cloud TPU gives `n_chips` chips (the tables of the v4 / v5p / v5e / v6e pages):
    3D: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...; 2D: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16,
    16x16. None if `n_chips` is not one of them."""
    if n_chips < 1 or n_chips & (n_chips - 1):
        return None
    if chip.dims == 2:
        if n_chips == 2 or n_chips > 256:
            return None
        dims = [1, 1]
    else:
        if n_chips < 4:
            return None
        if n_chips == 4:
            return (2, 2, 1)
        dims = [2, 2, 2]
    while math.prod(dims) < n_chips:  # grow the last of the smallest dimensions, as the tables do
        i = max(j for j, d in enumerate(dims) if d == min(dims))
        dims[i] *= 2
    return tuple(dims)


def _known() -> str:
    return ("TPU slices v4-N / v5p-N (N TensorCores, 2 per chip), v5e-N / v6e-N (N chips), or a topology such "
            "as v5p:4x4x4; GPUs h100x8, h200x8, a100x8, a100-40gbx8, multi-host h100:2x8")


def parse_target(name: str) -> Target:
    """'v5p-64' / 'v5p:4x4x4' / 'h100x8' / 'h100:2x8' -> Target; ConfigError naming the allowed forms."""
    s = name.strip().lower().replace("v5litepod", "v5e")
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", s)
    if m:
        chip = CHIPS[m.group(1)]
        n = int(m.group(2))
        chips = n // 2 if chip.naming == "cores" else n
        shape = _tpu_shape(chip, chips) if (chip.naming != "cores" or n % 2 == 0) else None
        if shape is None:
            sizes = [c * (2 if chip.naming == "cores" else 1) for c in (1, 4, 8, 16, 32, 64, 128, 256)
                     if _tpu_shape(chip, c)]
            raise ConfigError(f"--target {name}: {chip.key}-{n} is not a {chip.key} slice; allowed: "
                              + ", ".join(f"{chip.key}-{k}" for k in sizes) + ", ...")
        return Target(name, chip, f"{chip.key}:" + "x".join(map(str, shape)), math.prod(shape))
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", s)
    if m:
        chip = CHIPS[m.group(1)]
        dims = tuple(int(x) for x in m.group(2).split("x"))
        if len(dims) != chip.dims or min(dims) < 1:
            raise ConfigError(f"--target {name}: a {chip.key} topology has {chip.dims} dimensions, e.g. "
                              f"{chip.key}:{'x'.join(['2'] * chip.dims)}")
        return Target(name, chip, s, math.prod(dims))
    m = re.fullmatch(r"(h100|h200|a100|a100-40gb)(?:x(\d+)|:(\d+)x(\d+))", s)
    if m:
        chip = CHIPS[m.group(1)]
        hosts, per_host = (1, int(m.group(2))) if m.group(2) else (int(m.group(3)), int(m.group(4)))
        if hosts < 1 or not 1 <= per_host <= chip.chips_per_host:
            raise ConfigError(f"--target {name}: 1 to {chip.chips_per_host} GPUs per host, e.g. {chip.key}x8 "
                              f"or {chip.key}:2x8")
        return Target(name, dataclasses.replace(chip, chips_per_host=per_host), f"1x{hosts}x{per_host}",
                      hosts * per_host)
    raise ConfigError(f"--target {name!r}: unknown target; allowed: {_known()}")


# ----------------------------------------------------------------------------------------------------
# Devices and meshes (used in the compile subprocess, where JAX_PLATFORMS=cpu and the plugin are set up)
# ----------------------------------------------------------------------------------------------------
def topology_devices(target: Target) -> list:
    """The target's devices, compile-only (no hardware): from libtpu or the CUDA plugin."""
    from jax.experimental import topologies

    if target.chip.platform == "tpu":
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            chip_config_name=target.chip.chip_config)
    else:
        topo = topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGET_CONFIGS[target.chip.key],
                                            topology=target.topology)
    devices = list(topo.devices)
    if len(devices) != target.n_chips or not devices[0].device_kind.startswith(target.chip.device_kind):
        raise RuntimeError(f"{target.name}: the compiler made {len(devices)} x {devices[0].device_kind!r} devices, "
                           f"expected {target.n_chips} x {target.chip.device_kind!r}")
    return devices
