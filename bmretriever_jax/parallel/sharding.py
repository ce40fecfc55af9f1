"""Parameter shardings from regex rules over parameter paths (the one selector, as for LoRA targets).

A rule maps a path regex to logical axis names per array dimension; `LOGICAL_TO_MESH` maps logical names
to mesh axes. Stacked layer params carry a leading "layers" axis that is never sharded.

  tensor parallel (Megatron): q/k/v/gate/up split their output features, o/down their input features;
  FSDP: the other (embedding/feature) axis of every matrix is split over "fsdp", gathered per use by GSPMD.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bmretriever_jax.util import treeutil
from bmretriever_jax.util.errors import ConfigError

# (regex over the parameter path, logical axes of the array's dimensions)
DEFAULT_RULES: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = (
    (r"embed/embedding", ("vocab", "embed")),
    (r"layers/attn/(q|k|v)/kernel", ("layers", "embed", "heads")),
    (r"layers/attn/o/kernel", ("layers", "heads", "embed")),
    (r"layers/mlp/(gate|up)/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlp/down/kernel", ("layers", "mlp", "embed")),
    (r"layers/attn/(q|k|v)/(bias|lora_b)", None),  # replicated small leaves
    (r"lm_head/kernel", ("embed", "vocab")),
)
LOGICAL_TO_MESH: Dict[str, Optional[str]] = {
    "layers": None, "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "mlp": "tensor",
}


def _path(p) -> str:
    return treeutil.path_str(p)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES, logical=LOGICAL_TO_MESH) -> P:
    """PartitionSpec of one leaf; an axis is only sharded when the mesh axis size divides it."""
    for regex, axes in rules:
        if treeutil.matches_within(path, regex):  # also the same leaf inside an optimizer or train state
            if axes is None or len(axes) != len(shape):
                return P()
            out = []
            for dim, name in zip(shape, axes):
                mesh_axis = logical.get(name) if name else None
                if mesh_axis and mesh.shape.get(mesh_axis, 1) > 1 and dim % mesh.shape[mesh_axis] == 0:
                    out.append(mesh_axis)
                else:
                    out.append(None)
            return P(*out)
    return P()


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding per leaf of a param (or adapter / optimizer-moment) tree, following `rules`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, spec_for(_path(p), getattr(x, "shape", ()), mesh, rules))
                                        for p, x in flat])


def shard(tree, mesh: Mesh, rules=DEFAULT_RULES):
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


# ----------------------------------------------------------------------------------------------------
# Device meshes that map onto the physical topology
# ----------------------------------------------------------------------------------------------------
def _topology_name(devices) -> str:
    """'TPU v5 4x4x4 (64 devices)' from the devices' torus coordinates, or the kind and count."""
    d0 = devices[0]
    coords = [getattr(d, "coords", None) for d in devices]
    if all(c is not None for c in coords):
        dims = [max(c[i] for c in coords) + 1 for i in range(len(coords[0]))]
        while len(dims) > 2 and dims[-1] == 1:
            dims.pop()
        return f"{d0.device_kind} {'x'.join(map(str, dims))} ({len(devices)} devices)"
    return f"{len(devices)} x {d0.device_kind}"


def _device_grid(shape, devices, split: bool):
    return mesh_utils.create_device_mesh(tuple(shape), list(devices), allow_split_physical_axes=split)


def device_mesh(shape: Sequence[int], devices, axis_names=("data", "fsdp", "tensor")) -> Mesh:
    """A Mesh of `shape` over `devices` (all of them: the caller picks the subset) in an order that follows
    the physical torus / host layout (jax.experimental.mesh_utils). A TPU mesh axis that no product of whole
    physical axes makes (8 on a 4x4x4 v5p) is built by splitting a physical axis, as MaxText does
    (allow_split_physical_axes): collectives over it cross fewer wraparound links but still run.
    Raises ConfigError naming the topology and mesh sizes that map when neither works."""
    shape = tuple(int(s) for s in shape)
    errors = []
    for split in (False, True):
        try:
            grid = _device_grid(shape, devices, split)
            return Mesh(grid, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))
        except (NotImplementedError, ValueError, AssertionError) as e:  # mesh_utils' ways of saying "cannot"
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    fits = []
    for f in factorizations(len(devices), len(shape)):
        try:
            _device_grid(f, devices, False)
            fits.append(f)
        except (NotImplementedError, ValueError, AssertionError):
            pass
    # the closest to what was asked first: the same tensor axis, fewest axes changed, least resized
    fits.sort(key=lambda f: (f[-1] != shape[-1], sum(a != b for a, b in zip(f, shape)),
                             sum(abs(math.log2(a / b)) for a, b in zip(f, shape))))
    named = lambda f: "(" + ", ".join(f"{a}={s}" for a, s in zip(axis_names, f)) + ")"  # noqa: E731
    raise ConfigError(f"mesh {named(shape)} does not map onto {_topology_name(devices)}: {errors[-1]}; "
                      f"sizes that map: {', '.join(named(f) for f in fits[:6])}")


def factorizations(n: int, k: int = 3) -> List[Tuple[int, ...]]:
    """Every k-tuple of positive integers whose product is n."""
    out = []
    for head in range(1, n + 1):
        if n % head == 0:
            out += [(head,) + t for t in (factorizations(n // head, k - 1) if k > 1 else [()])]
    return [t for t in out if len(t) == k and math.prod(t) == n]
