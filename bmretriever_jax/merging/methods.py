"""Per-leaf merge kernels and the method registry (mergekit 0.1.5 semantics: see bmretriever_jax/merging/__init__.py)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from bmretriever_jax.util.errors import ConfigError


F32 = np.float32
_EPS_RESCALE = 1e-7  # mergekit sparsify.rescaled_masked_tensor
_SLERP_DOT_THRESHOLD = 0.9995  # mergekit slerp: above this |cos|, interpolate linearly
_SLERP_EPS = 1e-8


# ----------------------------------------------------------------------------------------------------
# Per-leaf kernels. Inputs are float32 "rows" [S, N]: S independent tensors (stacked slices) of N elements.
# They are numpy on the host on purpose: a merge streams leaves from disk one at a time, every leaf shape
# and option set would otherwise compile its own XLA program, and numpy float32 follows the same IEEE
# arithmetic as mergekit's torch CPU kernels. Only DARE's masks come from jax.random (reproducible keys).
# ----------------------------------------------------------------------------------------------------
def _rescaled(delta: np.ndarray, mask: np.ndarray, rescale: str | None, density: float) -> np.ndarray:
    masked = delta * mask
    if rescale is None:
        return masked
    if rescale == "density":
        return masked / density if density > 0 else masked
    before = np.abs(delta).sum(-1, keepdims=True)
    after = np.abs(masked).sum(-1, keepdims=True)
    ok = (before >= _EPS_RESCALE) & (after >= _EPS_RESCALE)
    return np.where(ok, masked * (before / np.where(ok, after, 1.0)), masked)


def _magnitude(delta: np.ndarray, density: float, rescale: str | None) -> np.ndarray:
    """Keep the top max(1, int(density * N)) |values| of each row (TIES trim)."""
    if density >= 1:
        return delta
    s, n = delta.shape
    if density <= 0 or n == 0:
        return np.zeros_like(delta)
    k = max(1, int(density * n))
    return _rescaled(delta, _top_k_mask(np.abs(delta), k), rescale, density)


def _top_k_mask(mag: np.ndarray, k: int) -> np.ndarray:
    """Float32 mask [S, N] of the k largest entries of each row of mag [S, N] (>= 0 or NaN), as a stable sort on
    -mag would pick them: among equal magnitudes the lower index wins (torch's order is unspecified), NaN last.

    A selection (np.partition, O(N)) finds the k-th largest value instead of sorting: a 262k x 640 embedding is one
    168M-element tensor, which a sort takes tens of seconds and int64 indices of 8 bytes per element to order."""
    s, n = mag.shape
    if np.isnan(mag).any():
        mag = np.where(np.isnan(mag), np.float32(-1), mag)  # below every magnitude: picked last, lower index first
    mask = np.zeros(mag.shape, F32)
    for r in range(s):
        row = mag[r]
        threshold = np.partition(row, n - k)[n - k]
        above = row > threshold
        mask[r] = above
        need = k - int(np.count_nonzero(above))
        if need > 0:  # entries equal to the threshold fill the rest in index order
            mask[r, np.flatnonzero(row == threshold)[:need]] = 1.0
    return mask


def _random(delta: np.ndarray, density: float, rescale: str | None, key: jax.Array) -> np.ndarray:
    """DARE: keep each element with probability `density`, then rescale."""
    if density >= 1:
        return delta
    mask = np.asarray(jax.random.bernoulli(key, density, delta.shape), F32)
    return _rescaled(delta, mask, rescale, density)


def _gta(base, xs, keys, *, weights, density, normalize, rescale, lambda_, sparsify, consensus):
    """mergekit GeneralizedTaskArithmeticMerge.merge_group on rows [S, N]."""
    deltas = []
    for i, x in enumerate(xs):
        d = x - base
        if sparsify == "magnitude":
            d = _magnitude(d, density[i], rescale)
        elif sparsify == "random":
            d = _random(d, density[i], rescale, keys[i])
        deltas.append(d)
    w = np.asarray(weights, F32).reshape(-1, 1, 1)
    deltas = np.stack(deltas) * w  # [M, S, N]
    if consensus:
        elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(deltas) == elected  # zero deltas never agree, so they do not dilute the mean
        mixed = np.where(agree, deltas, 0.0).sum(0)
        divisor = np.where(agree, w, 0.0).sum(0)
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor = np.where(np.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def _linear(base, xs, keys, *, weights, normalize):
    out = np.zeros_like(xs[0])
    for w, x in zip(weights, xs):
        out = out + np.float32(w) * x
    return out / np.float32(sum(weights)) if normalize else out


def _slerp(base, xs, keys, *, t):
    """Spherical interpolation from base (t=0) to xs[0] (t=1) per row; lerp when (anti)colinear."""
    a, b = base, xs[0]
    if a.shape[1] == 0:
        return (1 - t) * a + t * b
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    na = np.where(na > _SLERP_EPS, na, 1.0)
    nb = np.where(nb > _SLERP_EPS, nb, 1.0)
    dot = np.clip(((a / na) * (b / nb)).sum(-1, keepdims=True), -1.0, 1.0)
    lin = np.abs(dot) > _SLERP_DOT_THRESHOLD
    theta = np.arccos(np.where(lin, 0.0, dot))
    sin_theta = np.where(lin, 1.0, np.sin(theta))
    coef_a = np.where(lin, 1 - t, np.sin((1 - t) * theta) / sin_theta)
    coef_b = np.where(lin, t, np.sin(t * theta) / sin_theta)
    return coef_a * a + coef_b * b


def _model_stock(base, xs, keys):
    """Model Stock (Jang et al. 2024) as mergekit: t = N cos / (1 + (N-1) cos), cos = mean pairwise cosine
    of the task vectors; result = t * mean(models) + (1 - t) * base, per row."""
    offsets = [x - base for x in xs]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cos.append(np.clip((a * b).sum(-1) / np.maximum(norm_product, 1e-6), -1.0, 1.0))
    cos_theta = np.stack(cos).mean(0)[:, None]
    n = len(xs)
    denominator = 1 + (n - 1) * cos_theta
    # No finite estimate at the singularity: keep the base rather than amplify opposing updates.
    singular = np.abs(denominator) < 1e-6
    t = np.where(singular, 0.0, n * cos_theta / np.where(singular, 1.0, denominator))
    average = sum(xs) / n
    return t * average + (1 - t) * base


# ----------------------------------------------------------------------------------------------------
# Method table
# ----------------------------------------------------------------------------------------------------
REQUIRED = object()
_PER_MODEL = frozenset({"weights", "density"})


@dataclasses.dataclass(frozen=True)
class _Method:
    fn: Callable
    needs_base: bool
    min_models: int
    max_models: int | None
    defaults: Mapping[str, Any]
    random: bool = False


def _gta_method(sparsify, consensus, normalize, rescale, random=False):
    fn = lambda base, xs, keys, **kw: _gta(base, xs, keys, sparsify=sparsify, consensus=consensus, **kw)  # noqa: E731
    return _Method(fn, True, 1, None, dict(weights=REQUIRED, density=1.0, normalize=normalize, rescale=rescale,
                                           lambda_=1.0), random)


METHODS: dict[str, _Method] = {
    "linear": _Method(_linear, False, 1, None, dict(weights=REQUIRED, normalize=True)),
    "task_arithmetic": _gta_method(None, False, False, False),
    "ties": _gta_method("magnitude", True, True, False),
    "dare_ties": _gta_method("random", True, False, True, random=True),
    "dare_linear": _gta_method("random", False, False, True, random=True),
    "slerp": _Method(_slerp, True, 1, 1, dict(t=REQUIRED)),
    "model_stock": _Method(_model_stock, True, 2, None, {}),
}


def resolve_options(method: str, n_models: int, options: Mapping[str, Any]) -> dict[str, Any]:
    m = METHODS[method]
    unknown = sorted(set(options) - set(m.defaults))
    if unknown:
        raise ConfigError(f"merge method {method!r} has no option(s) {unknown}; allowed: {sorted(m.defaults)}")
    out = {}
    for name, default in m.defaults.items():
        value = options.get(name, default)
        if value is REQUIRED or value is None and default is REQUIRED:
            raise ConfigError(f"merge method {method!r} needs {name!r}")
        if name in _PER_MODEL:
            values = [value] * n_models if np.ndim(value) == 0 else list(value)
            if len(values) != n_models:
                raise ConfigError(f"{name!r} has {len(values)} values for {n_models} models")
            value = tuple(float(v) for v in values)
        out[name] = value
    if "density" in out and any(not 0.0 <= d <= 1.0 for d in out["density"]):
        raise ConfigError(f"density must be in [0, 1], got {out['density']}")
    if "rescale" in out:
        r = out["rescale"]
        if r not in (False, None, True, "l1", "density"):
            raise ConfigError(f"rescale must be False, True (= 'l1', mergekit) or 'density', got {r!r}")
        out["rescale"] = "l1" if r is True else (r or None)
    if method == "linear" and out["normalize"] and sum(out["weights"]) == 0:
        raise ConfigError(f"linear merge with normalize=True needs weights not summing to 0, got {out['weights']}")
    if "t" in out:
        out["t"] = float(out["t"])
    if "lambda_" in out:
        out["lambda_"] = float(out["lambda_"])
    return out


