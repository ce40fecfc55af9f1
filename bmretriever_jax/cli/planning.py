"""`bmr plan`: per-device memory of a run on N fake CPU devices (plan.py) or the full-size step compiled for a
TPU slice / NVIDIA GPUs (podplan.py, which builds on plan.py)."""
from __future__ import annotations

from bmretriever_jax.config import ConfigError


def cmd_plan(a):
    if a.target:
        from bmretriever_jax.pods import podplan  # the TPU / GPU compile (libtpu / CUDA plugin in a subprocess)

        return podplan.cmd_plan_target(a)
    if a.tune:
        raise ConfigError("--tune needs --target (it compiles the candidates for that target's chips)")
    if a.max_batch:
        raise ConfigError("--max-batch needs --target (it bisects compiles for that target's chips)")
    if a.devices is None:
        raise ConfigError("give --devices N (fake CPU devices) or --target T (e.g. v5p-64, h100x8)")
    from bmretriever_jax.pods import plan  # jax: not for `bmr --help`

    res = plan.plan(a.config, a.overrides, devices=a.devices, device_memory=a.device_memory, compile=not a.no_compile)
    if res["compile"] is not None and not res["compile"]["ok"]:
        raise SystemExit(1)


def add_commands(sub) -> None:
    s = sub.add_parser("plan", help="per-device memory of a run on a mesh + a compile of its sharded step")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.global_batch_size=256 mesh.fsdp=8")
    s.add_argument("--devices", type=int, default=None, help="number of devices of the target mesh (fake CPU "
                   "devices: CPU-calibrated estimate + a compile of a tiny model of the same family)")
    s.add_argument("--target", default=None, help="compile the full-size step for a TPU slice (v4-32, v5e-256, "
                   "v5p-64, v6e-16, v5p:4x4x4) or GPUs (h100x8, h200x8, a100x8, h100:2x8); needs libtpu "
                   "(pip install -e '.[tpu]') or the CUDA plugin (pip install -e '.[gpu]')")
    s.add_argument("--max-batch", action="store_true", help="with --target: the largest global batch that fits "
                   "(and gradient-cache chunk), by bisection of compiles")
    s.add_argument("--tune", action="store_true", help="with --target: compile packing / remat policy / "
                   "gradient-cache candidates, fewest executed FLOPs per text token first, and print the first "
                   "that fits (the most text tokens/s at a given MFU)")
    s.add_argument("--device-memory", type=float, default=None, help="GiB per device; warn when the plan exceeds it")
    s.add_argument("--no-compile", action="store_true", help="only the memory table")
    s.set_defaults(fn=cmd_plan)
