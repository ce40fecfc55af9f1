"""LoRA adapters as their own pytree: init, combine (for the forward pass), merge, unmerge.

The adapter tree mirrors only the targeted linear layers of a parameter tree:

    params   {"layers": {"attn": {"q": {"kernel": [L, D, H*hd]}, ...}, ...}, ...}
    adapters {"layers": {"attn": {"q": {"lora_a": [L, D, r], "lora_b": [L, r, H*hd]}, ...}}}

so the optimizer and checkpoints see only what is trained. Kernels are [..., in, out] (the leading dims,
e.g. the stacked layer axis L, are kept by the adapters). The model's linear computes
x @ kernel + (x @ lora_a) @ lora_b; `combine` puts the adapters into the parameter tree with lora_b
already multiplied by the LoRA scale, inside whatever function is differentiated, so gradients w.r.t.
the raw B are right. LoRA dropout (PEFT semantics: dropout on x before lora_a) belongs to the model's
linear, not here; `LoraConfig.dropout` only carries the setting.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bmretriever_jax.util import treeutil

# Every attention and MLP projection: q, k, v, o, gate, up, down (PEFT "all-linear" minus the LM head).
DEFAULT_TARGETS = (r"layers/(attn|mlp)/[^/]+/kernel",)
KERNEL = "kernel"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, rsLoRA scaling, dropout (applied by the model's linear) and target regexes.

    A target regex is fully matched against a linear layer's kernel path ("layers/attn/q/kernel") or
    its module path ("layers/attn/q").
    """
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    dropout: float = 0.0
    targets: Sequence[str] = DEFAULT_TARGETS

    def __post_init__(self):
        # A tuple keeps the config hashable, so it can be a static argument of jax.jit.
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not targets:
            raise ValueError("LoraConfig.targets is empty: name at least one regex over parameter paths")


def scale(cfg: LoraConfig) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return cfg.alpha / math.sqrt(cfg.rank) if cfg.rslora else cfg.alpha / cfg.rank


def _module_of(kernel_path: str) -> str:
    return kernel_path[: -len(KERNEL) - 1] if kernel_path != KERNEL else ""


def _join(module: str, leaf: str) -> str:
    return f"{module}/{leaf}" if module else leaf


def target_paths(params: Mapping[str, Any], cfg: LoraConfig) -> list[str]:
    """Kernel paths selected by cfg.targets. Raises ValueError for a regex that matches no kernel."""
    flat = treeutil.flatten(params)
    kernels = [p for p in flat if p.rsplit("/", 1)[-1] == KERNEL]
    # Match the module path too, so r"layers/attn/q" works as well as r"layers/attn/q/kernel".
    treeutil.check_patterns(cfg.targets, kernels + [_module_of(p) for p in kernels], what="LoRA target")
    chosen = [p for p in kernels if treeutil.matches(p, cfg.targets) or treeutil.matches(_module_of(p), cfg.targets)]
    for p in chosen:
        if len(flat[p].shape) < 2:
            raise ValueError(f"LoRA target {p!r} has shape {tuple(flat[p].shape)}; a kernel is [..., in, out]")
    return chosen


def _path_seed(path: str) -> int:
    # A stable hash (not Python's salted hash()) so each adapter's init depends only on key and path,
    # not on the order or number of targets.
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def init(params: Mapping[str, Any], cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Adapter tree for the targeted kernels of `params` (arrays or jax.ShapeDtypeStruct leaves).

    For a kernel [..., in, out]: lora_a [..., in, r] ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
    kaiming_uniform_(a=sqrt(5)) on a Linear(in, r)), lora_b [..., r, out] = 0, so the model is unchanged
    at step 0. Only adapter leaves are returned.
    """
    flat = treeutil.flatten(params)
    out = {}
    for path in target_paths(params, cfg):
        *lead, d_in, d_out = flat[path].shape
        module = _module_of(path)
        bound = 1.0 / math.sqrt(d_in)
        k = jax.random.fold_in(key, _path_seed(module))
        out[_join(module, "lora_a")] = jax.random.uniform(k, (*lead, d_in, cfg.rank), dtype, -bound, bound)
        out[_join(module, "lora_b")] = jnp.zeros((*lead, cfg.rank, d_out), dtype)
    return treeutil.unflatten(out)


def _pairs(params: Mapping[str, Any], adapters: Mapping[str, Any]) -> tuple[dict, list[tuple[str, Any, Any]]]:
    """(flat params, [(module path, lora_a, lora_b)]) with shapes checked against the kernels."""
    flat_p = treeutil.flatten(params)
    flat_a = treeutil.flatten(adapters)
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in flat_a.items():
        module, _, name = path.rpartition("/")
        if name not in ("lora_a", "lora_b"):
            raise ValueError(f"adapter tree leaf {path!r} is not a lora_a / lora_b leaf")
        modules.setdefault(module, {})[name] = leaf
    out = []
    for module, ab in modules.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise ValueError(f"adapter {module!r} has only {sorted(ab)}; both lora_a and lora_b are needed")
        kpath = _join(module, KERNEL)
        if kpath not in flat_p:
            raise ValueError(f"adapter {module!r} has no kernel {kpath!r} in the parameter tree")
        k_shape, a_shape, b_shape = (tuple(x.shape) for x in (flat_p[kpath], ab["lora_a"], ab["lora_b"]))
        ok = (len(a_shape) == len(k_shape) == len(b_shape) and a_shape[:-1] == k_shape[:-1]
              and b_shape[:-2] == k_shape[:-2] and b_shape[-1] == k_shape[-1] and a_shape[-1] == b_shape[-2])
        if not ok:
            raise ValueError(f"adapter {module!r}: lora_a {a_shape} and lora_b {b_shape} do not fit kernel "
                             f"{k_shape} ([..., in, r], [..., r, out] for [..., in, out])")
        out.append((module, ab["lora_a"], ab["lora_b"]))
    return flat_p, out


def combine(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LoraConfig) -> dict:
    """Parameter tree whose targeted linear dicts also carry lora_a and lora_b * scale(cfg).

    Pure and jit-friendly; call it inside the loss so grads flow to the raw adapter tree.
    """
    flat, pairs = _pairs(params, adapters)
    s = scale(cfg)
    for module, a, b in pairs:
        if _join(module, "lora_a") in flat:
            raise ValueError(f"parameter tree already has LoRA leaves at {module!r}")
        flat[_join(module, "lora_a")] = a
        flat[_join(module, "lora_b")] = b * jnp.asarray(s, b.dtype)
    return treeutil.unflatten(flat)


def _delta(a: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """s * A @ B in float32, batched over leading dims: [..., in, r] x [..., r, out] -> [..., in, out]."""
    return s * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _apply(params, adapters, cfg, sign: float) -> dict:
    flat, pairs = _pairs(params, adapters)
    s = scale(cfg)
    for module, a, b in pairs:
        kpath = _join(module, KERNEL)
        kernel = flat[kpath]
        flat[kpath] = (kernel.astype(jnp.float32) + sign * _delta(a, b, s)).astype(kernel.dtype)
    return treeutil.unflatten(flat)


def merge(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LoraConfig) -> dict:
    """params with kernel += scale * lora_a @ lora_b (in float32, cast back to the kernel dtype)."""
    return _apply(params, adapters, cfg, +1.0)


def unmerge(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LoraConfig) -> dict:
    """Inverse of `merge`: kernel -= scale * lora_a @ lora_b (exact up to rounding in the kernel dtype)."""
    return _apply(params, adapters, cfg, -1.0)


def num_params(adapters: Mapping[str, Any]) -> int:
    """Number of trainable adapter scalars."""
    return sum(math.prod(x.shape) for x in treeutil.flatten(adapters).values())
