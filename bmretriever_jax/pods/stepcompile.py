"""The real sharded train step, lowered and compiled without any array: the abstract train state and inputs
(ShapeDtypeStructs carrying the training shardings), the compile, and XLA's per-device buffer figures. Used by
`bmr plan` (fake CPU devices), `bmr plan --target` (TPU / GPU compilers) and `bmr sweep` (the step's peak)."""
from __future__ import annotations

from typing import Dict

from bmretriever_jax.util import treeutil
from bmretriever_jax.config import RunConfig
from bmretriever_jax.models.config import ModelConfig


def param_dtype(run: RunConfig):
    import jax.numpy as jnp

    return jnp.dtype(run.model.param_dtype)


def abstract_train_state(model_cfg: ModelConfig, run: RunConfig):
    """(optimizer, abstract state, abstract frozen params): the trees `train.train` builds, as
    ShapeDtypeStructs (nothing is allocated)."""
    import jax

    from bmretriever_jax.models import init_params
    from bmretriever_jax.training import init_state, make_optimizer, split_params

    pdt = param_dtype(run)
    # train() loads the base in float32 unless param_dtype is bfloat16; trainable leaves keep that dtype
    params = jax.eval_shape(lambda k: init_params(model_cfg, k, dtype=pdt), jax.random.PRNGKey(0))
    trainable, frozen = jax.eval_shape(lambda p, k: split_params(p, run, k), params, jax.random.PRNGKey(0))
    optimizer = make_optimizer(run)
    state = jax.eval_shape(lambda t: init_state(run, t, optimizer), trainable)
    return optimizer, state, frozen


def packing_plan(run: RunConfig, n_shards: int) -> Dict:
    """Rows and tokens of the run's step on data of its length profile (`data.packing.plan_packing`):
    packed when data.packing is on, else padded."""
    from bmretriever_jax.data import packing

    profile = packing.load_profile(run.data.length_profile or
                                   ("pretrain" if run.train.stage == "pretrain" else "finetune"))
    return packing.plan_packing(profile, global_batch=run.train.global_batch_size, group=1 + run.data.num_negatives,
                                n_shards=n_shards, query_length=run.model.query_max_length,
                                passage_length=run.model.max_length, max_segments=run.data.pack_max_segments,
                                packed=run.data.packing, sigmas=run.data.pack_tail_sigmas,
                                balance=run.data.pack_balance)


def abstract_inputs(model_cfg: ModelConfig, run: RunConfig, mesh):
    """(optimizer, state shardings, state, frozen, batch) as ShapeDtypeStructs carrying their shardings."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bmretriever_jax.parallel import sharding
    from bmretriever_jax.training import BATCH_AXES

    optimizer, state, frozen = abstract_train_state(model_cfg, run)
    st_sh = sharding.tree_shardings(state, mesh)
    fr_sh = sharding.tree_shardings(frozen, mesh)

    def with_sharding(tree, shardings):
        def one(path, x, s):
            try:
                s.shard_shape(x.shape)
            except Exception as e:  # noqa: BLE001 -- jax's message does not say which parameter
                name = treeutil.path_str(path)
                raise ValueError(f"{name} {tuple(x.shape)}: sharding {s.spec} does not fit: {e}") from None
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

        return jax.tree_util.tree_map_with_path(one, tree, shardings)

    B, G = run.train.global_batch_size, 1 + run.data.num_negatives
    rows = NamedSharding(mesh, P(BATCH_AXES))
    Tq, Tp = run.model.query_max_length, run.model.max_length
    if run.data.packing:  # rows sized from the data's length profile, as a run calibrates them
        from bmretriever_jax.training.step import batch_shards

        pp = packing_plan(run, batch_shards(mesh))
        (R, L), = pp["row_groups"]
        batch = {"ids": (R, L), "seg": (R, L), "q_slot": (B,), "p_slot": (B * G,)}
    else:
        batch = {"q_ids": (B, Tq), "q_mask": (B, Tq), "p_ids": (B * G, Tp), "p_mask": (B * G, Tp)}
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=rows) for k, s in batch.items()}
    return optimizer, st_sh, with_sharding(state, st_sh), with_sharding(frozen, fr_sh), batch


# Sharding propagation and SPMD partitioning run before the backend's code generation, so a check that only
# has to reach the end of compilation can skip LLVM's optimisations (halves the compile time on CPU).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_train_step(model_cfg: ModelConfig, run: RunConfig, mesh, *, fast: bool = False):
    """The sharded train step of `train.train`, lowered and compiled for `mesh` without any real array.
    Returns (compiled, (state, frozen, batch) abstract inputs); `fast` skips backend optimisations."""
    from bmretriever_jax.training import make_train_step

    optimizer, st_sh, state, frozen, batch = abstract_inputs(model_cfg, run, mesh)
    step = make_train_step(model_cfg, run, optimizer, mesh, st_sh)
    lowered = step.lower(state, frozen, batch)
    compiled = lowered.compile(compiler_options=FAST_COMPILE) if fast else lowered.compile()
    return compiled, (state, frozen, batch)


def compiled_peak_bytes(compiled) -> Dict[str, int]:
    """Per-device bytes XLA assigned to the compiled step: arguments + outputs not aliased to a donated
    argument + temporaries (the buffer-assignment peak)."""
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out
