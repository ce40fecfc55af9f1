"""The training step: a pure jitted `train_step(state, frozen, batch) -> (state, metrics)` and what it is made of
(mesh, global batches, optimiser and schedule, trainable / frozen split, initial state).

state = {"step", "trainable": {"model": LoRA adapters or full params, ["log_scale"]}, "opt_state"}; the
frozen base params are a separate argument, never in the optimizer or the checkpoint when LoRA is on.
The global batch is sharded over the mesh's ("data", "fsdp") axes; the loss scores every query against
every passage of the global batch (sharded InfoNCE, passages all-gathered); with `grad_cache_chunk` the
number of negatives is bounded by the vectors, not the activations.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bmretriever_jax.data.batches import BATCH_AXES, batch_shards, calibrate_packing, make_tokenize_fn  # noqa: F401 (re-exported)
from bmretriever_jax.models import lora as lora_lib
from bmretriever_jax.models.ops import gather_slots
from bmretriever_jax.training import losses
from bmretriever_jax.parallel import sharding
from bmretriever_jax.util import treeutil
from bmretriever_jax.config import RunConfig, resolve_mesh_shape
from bmretriever_jax.embed import embed_batch
from bmretriever_jax.models import ModelConfig
from bmretriever_jax.util.precision import resolve_dtype




# ----------------------------------------------------------------------------------------------------
# Mesh and batches
# ----------------------------------------------------------------------------------------------------
def make_mesh(run: RunConfig, devices=None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = resolve_mesh_shape(run.mesh, len(devices))
    # the device order follows the torus (splitting a physical axis when a mesh axis needs it): the same
    # mesh `bmr plan --target` compiles for; jax.make_mesh refuses e.g. (4, 8, 1) on a v5p 4x4x4
    return sharding.device_mesh(shape, devices[: math.prod(shape)])


def to_global(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
    """Host-local rows -> global arrays sharded over the batch axes (one code path for 1 or N hosts)."""
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------------------------------
def make_schedule(run: RunConfig):
    t = run.train
    warm = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
    rest = max(t.steps - t.warmup_steps, 1)
    decay = {"linear": optax.linear_schedule(t.lr, 0.0, rest), "cosine": optax.cosine_decay_schedule(t.lr, rest),
             "constant": optax.constant_schedule(t.lr)}[t.schedule]
    return optax.join_schedules([warm, decay], [t.warmup_steps])


def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    t = run.train
    opt = optax.chain(optax.clip_by_global_norm(t.clip) if t.clip > 0 else optax.identity(),
                      optax.adamw(make_schedule(run), b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay))
    if t.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=t.grad_accum)
    return opt


# ----------------------------------------------------------------------------------------------------
# Model assembly
# ----------------------------------------------------------------------------------------------------
def lora_config(run: RunConfig) -> lora_lib.LoraConfig:
    lc = run.lora
    return lora_lib.LoraConfig(rank=lc.rank, alpha=lc.alpha, rslora=lc.rslora, dropout=lc.dropout,
                               targets=tuple(lc.targets))


def split_params(params: dict, run: RunConfig, key) -> Tuple[dict, dict]:
    """-> (trainable model tree, frozen tree). LoRA: fresh adapters / the whole base. Full fine-tuning:
    the leaves matching train.full_finetune_regex are trainable, the rest frozen."""
    if run.lora.enabled:
        return lora_lib.init(params, lora_config(run), key), params
    flat = treeutil.flatten(params)
    treeutil.check_patterns(run.train.full_finetune_regex, flat.keys(), "train.full_finetune_regex")
    chosen = set(treeutil.select(flat.keys(), run.train.full_finetune_regex))
    return (treeutil.unflatten({k: v for k, v in flat.items() if k in chosen}),
            treeutil.unflatten({k: v for k, v in flat.items() if k not in chosen}))


def assemble(run: RunConfig, trainable_model: dict, frozen: dict) -> dict:
    if run.lora.enabled:
        return lora_lib.combine(frozen, trainable_model, lora_config(run))
    return treeutil.unflatten({**treeutil.flatten(frozen), **treeutil.flatten(trainable_model)})


def merged_params(run: RunConfig, trainable_model: dict, frozen: dict) -> dict:
    """Plain backbone params with LoRA folded in (for evaluation and export)."""
    if run.lora.enabled:
        return lora_lib.merge(frozen, trainable_model, lora_config(run))
    return assemble(run, trainable_model, frozen)


# ----------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------
def make_train_step(model_cfg: ModelConfig, run: RunConfig, optimizer, mesh: Mesh, state_shardings=None):
    """Returns jitted train_step(state, frozen, batch) -> (state, metrics); `state` is donated and keeps
    `state_shardings` (FSDP / tensor-parallel layout from `sharding.tree_shardings`)."""
    t, m = run.train, run.model
    sharded = mesh.size > 1
    loss_fn = losses.make_loss(temperature=t.temperature, similarity=t.similarity,
                               mesh=mesh if sharded else None, axis=BATCH_AXES)
    embed_kw = dict(pooling=m.pooling, normalize=m.normalize, dtype=resolve_dtype(m.dtype),
                    bidirectional=m.bidirectional, remat=m.remat_policy if m.remat else False)
    dropout = run.lora.dropout if run.lora.enabled else 0.0
    if dropout > 0 and t.grad_cache_chunk:
        raise ValueError("lora.dropout > 0 with train.grad_cache_chunk: the gradient cache recomputes each chunk "
                         "and needs a deterministic forward; set lora.dropout=0 or train.grad_cache_chunk=0")

    def scale_of(trainable):
        return trainable.get("log_scale") if t.learn_temperature else None

    # hidden states [rows, T, D] stay split over the batch axes layer after layer, in the plain path and in
    # the gradient cache's chunks alike. Without the pin, a chunk's re-embedding (a vjp inside the cache's
    # scan over chunks) is left to sharding propagation, which splits its rows over "data" only (the FSDP
    # weights claim "fsdp" for the feature axis): every chip of an fsdp group then computes the group's rows,
    # fsdp x the activations (with data>1 and fsdp>1; an fsdp-only mesh has no second axis to fall back to).
    act = NamedSharding(mesh, P(BATCH_AXES, None, None)) if sharded else None

    n_shards = batch_shards(mesh) if sharded else 1
    K = run.data.pack_max_segments

    def texts(slots, slot_index):  # packed slot vectors [R, K, D] -> those texts' vectors [N, D] in batch order
        v = gather_slots(slots, slot_index, n_shards)
        return v if act is None else jax.lax.with_sharding_constraint(v, NamedSharding(mesh, P(BATCH_AXES, None)))

    def plain_loss(trainable, frozen, batch, key):
        params = assemble(run, trainable["model"], frozen)
        kq, kp = jax.random.split(key)
        if "seg" in batch:  # packed: queries and passages share the rows
            v = embed_batch(model_cfg, params, batch["ids"], batch["seg"], dropout=dropout, dropout_key=kp,
                            activation_sharding=act, max_segments=K, **embed_kw)
            q, p = texts(v, batch["q_slot"]), texts(v, batch["p_slot"])
        else:
            q = embed_batch(model_cfg, params, batch["q_ids"], batch["q_mask"], dropout=dropout, dropout_key=kq,
                            activation_sharding=act, **embed_kw)
            p = embed_batch(model_cfg, params, batch["p_ids"], batch["p_mask"], dropout=dropout, dropout_key=kp,
                            activation_sharding=act, **embed_kw)
        p = p.reshape(q.shape[0], -1, p.shape[-1])
        return loss_fn(q, p, scale=scale_of(trainable))

    def cached_loss_and_grads(trainable, frozen, batch):
        packed = "seg" in batch

        def embed_fn(model_tree, chunk):
            params = assemble(run, model_tree, frozen)
            return embed_batch(model_cfg, params, chunk["ids"], chunk["mask"], activation_sharding=act,
                               **(dict(embed_kw, max_segments=K) if packed else embed_kw))

        if packed:  # one set of rows; the loss selects the queries' and passages' slots from its vectors
            qb, pb = {"ids": batch["ids"], "mask": batch["seg"]}, None
            select = dict(q_select=lambda v: texts(v, batch["q_slot"]), p_select=lambda v: texts(v, batch["p_slot"]))
        else:
            qb = {"ids": batch["q_ids"], "mask": batch["q_mask"]}
            pb = {"ids": batch["p_ids"], "mask": batch["p_mask"]}
            select = {}
        if t.learn_temperature:
            lf = lambda q, p, s: loss_fn(q, p, scale=s)  # noqa: E731
            loss, metrics, (g_model, g_scale) = losses.grad_cache(
                embed_fn, trainable["model"], qb, pb, chunk_size=t.grad_cache_chunk, loss_fn=lf,
                mesh=mesh if sharded else None, axis=BATCH_AXES, loss_params=trainable["log_scale"], **select)
            return loss, metrics, {"model": g_model, "log_scale": g_scale}
        loss, metrics, g_model = losses.grad_cache(embed_fn, trainable["model"], qb, pb, chunk_size=t.grad_cache_chunk,
                                                   loss_fn=loss_fn, mesh=mesh if sharded else None, axis=BATCH_AXES,
                                                   **select)
        return loss, metrics, {"model": g_model}

    def train_step(state, frozen, batch):
        key = jax.random.fold_in(jax.random.PRNGKey(t.seed), state["step"])
        if t.grad_cache_chunk:
            loss, metrics, grads = cached_loss_and_grads(state["trainable"], frozen, batch)
        else:
            (loss, metrics), grads = jax.value_and_grad(plain_loss, has_aux=True)(state["trainable"], frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        if t.learn_temperature:
            metrics["temperature"] = jnp.exp(-trainable["log_scale"])
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics

    out = None if state_shardings is None else (state_shardings, None)
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=out)


def init_state(run: RunConfig, trainable_model: dict, optimizer) -> dict:
    trainable = {"model": trainable_model}
    if run.train.learn_temperature:
        trainable["log_scale"] = jnp.asarray(-math.log(run.train.temperature), jnp.float32)
    return {"step": jnp.asarray(0, jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
