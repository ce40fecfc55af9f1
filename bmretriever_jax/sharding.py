"""Parameter shardings from regex rules over parameter paths (the one selector, as for LoRA targets).

A rule maps a path regex to logical axis names per array dimension; `LOGICAL_TO_MESH` maps logical names
to mesh axes. Stacked layer params carry a leading "layers" axis that is never sharded.

  tensor parallel (Megatron): q/k/v/gate/up split their output features, o/down their input features;
  FSDP: the other (embedding/feature) axis of every matrix is split over "fsdp", gathered per use by GSPMD.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
    return jax.tree_util.keystr(p, simple=True, separator="/")


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES, logical=LOGICAL_TO_MESH) -> P:
    """PartitionSpec of one leaf; an axis is only sharded when the mesh axis size divides it."""
    for regex, axes in rules:
        # rules name parameter paths; they also match the same leaf inside optimizer state or a train state
        if re.search(rf"(^|/){regex}$", path):
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
