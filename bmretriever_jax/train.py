"""Contrastive training: a pure jitted `train_step(state, frozen, batch) -> (state, metrics)` and a thin loop.

state = {"step", "trainable": {"model": LoRA adapters or full params, ["log_scale"]}, "opt_state"}; the
frozen base params are a separate argument, never in the optimizer or the checkpoint when LoRA is on.
The global batch is sharded over the mesh's ("data", "fsdp") axes; the loss scores every query against
every passage of the global batch (sharded InfoNCE, passages all-gathered); with `grad_cache_chunk` the
number of negatives is bounded by the vectors, not the activations.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bmretriever_jax import checkpoint as ckpt
from bmretriever_jax import lora as lora_lib
from bmretriever_jax import losses, sharding, treeutil
from bmretriever_jax.atomic import atomic_write
from bmretriever_jax.config import RunConfig, dump, resolve_mesh_shape, to_dict
from bmretriever_jax.distributed import is_host0
from bmretriever_jax.embed import (default_task, embed_batch, format_passage, format_query, instruction_for, pad_left,
                                   tokenize)
from bmretriever_jax.errors import ConfigError, DataFormatError, InputPathError, UserError
from bmretriever_jax.models import ModelConfig
from bmretriever_jax.precision import resolve_dtype

BATCH_AXES = ("data", "fsdp")


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN / inf: training stops with the last good checkpoint intact."""


# ----------------------------------------------------------------------------------------------------
# Mesh and batches
# ----------------------------------------------------------------------------------------------------
def make_mesh(run: RunConfig, devices=None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = resolve_mesh_shape(run.mesh, len(devices))
    # the device order follows the torus (splitting a physical axis when a mesh axis needs it): the same
    # mesh `bmr plan --target` compiles for; jax.make_mesh refuses e.g. (4, 8, 1) on a v5p 4x4x4
    return sharding.device_mesh(shape, devices[: math.prod(shape)])


def make_tokenize_fn(tokenizer, run: RunConfig):
    """Loader items -> fixed-shape int32 arrays (left padded): queries [B, Tq], passages [B*G, Tp]."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    Tq, Tp = run.model.query_max_length, run.model.max_length

    def fn(items: List[dict]) -> Dict[str, np.ndarray]:
        queries = [format_query(it["query"], it.get("instruction") or instruction_for(it.get("task"))) for it in items]
        passages = [format_passage(d) for it in items for d in [it["positive"]] + list(it["negatives"])]
        q_ids, q_mask = pad_left(tokenize(tokenizer, queries, Tq), Tq, pad_id)
        p_ids, p_mask = pad_left(tokenize(tokenizer, passages, Tp), Tp, pad_id)
        return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}

    return fn


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

    def plain_loss(trainable, frozen, batch, key):
        params = assemble(run, trainable["model"], frozen)
        kq, kp = jax.random.split(key)
        q = embed_batch(model_cfg, params, batch["q_ids"], batch["q_mask"], dropout=dropout, dropout_key=kq,
                        activation_sharding=act, **embed_kw)
        p = embed_batch(model_cfg, params, batch["p_ids"], batch["p_mask"], dropout=dropout, dropout_key=kp,
                        activation_sharding=act, **embed_kw)
        p = p.reshape(q.shape[0], -1, p.shape[-1])
        return loss_fn(q, p, scale=scale_of(trainable))

    def cached_loss_and_grads(trainable, frozen, batch):
        def embed_fn(model_tree, chunk):
            params = assemble(run, model_tree, frozen)
            return embed_batch(model_cfg, params, chunk["ids"], chunk["mask"], activation_sharding=act, **embed_kw)

        qb = {"ids": batch["q_ids"], "mask": batch["q_mask"]}
        pb = {"ids": batch["p_ids"], "mask": batch["p_mask"]}
        if t.learn_temperature:
            lf = lambda q, p, s: loss_fn(q, p, scale=s)  # noqa: E731
            loss, metrics, (g_model, g_scale) = losses.grad_cache(
                embed_fn, trainable["model"], qb, pb, chunk_size=t.grad_cache_chunk, loss_fn=lf,
                mesh=mesh if sharded else None, axis=BATCH_AXES, loss_params=trainable["log_scale"])
            return loss, metrics, {"model": g_model, "log_scale": g_scale}
        loss, metrics, g_model = losses.grad_cache(embed_fn, trainable["model"], qb, pb, chunk_size=t.grad_cache_chunk,
                                                   loss_fn=loss_fn, mesh=mesh if sharded else None, axis=BATCH_AXES)
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


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def load_training_pairs(run: RunConfig):
    """data.train entries: pairs JSONL files, or builder names (scifact, pubmedqa, medquad, pretrain:PATH)."""
    from bmretriever_jax.data import builders
    from bmretriever_jax.data.pairs import read_pairs

    names = ", ".join(sorted(builders.BUILDERS))
    if not run.data.train:
        raise ConfigError(f"data.train is empty: list pairs JSONL files or builder names ({names})")
    pairs = []
    for entry in run.data.train:
        if os.path.exists(entry):
            got = read_pairs(entry)
            if not got:
                raise DataFormatError(f"{entry}: no training pairs in the file (data.train)")
            pairs += got
        elif entry.startswith("pretrain:"):
            pairs += builders.pretrain_pairs_from_beir(entry.split(":", 1)[1])
        elif entry in builders.BUILDERS:
            pairs += builders.build(entry)
        elif os.sep in entry or entry.endswith((".jsonl", ".gz", ".json")):
            raise InputPathError(f"data.train: {entry}: no such file")
        else:
            raise ConfigError(f"data.train: {entry!r} is neither a file nor a builder; builders: {names}, "
                              "pretrain:CORPUS.jsonl")
    return pairs


# what may change between a run and its resume without --allow-config-change: how long it runs, how it reports
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.keep")


def config_changes(saved: dict, now: dict, prefix: str = "") -> List[str]:
    """['train.lr: 0.0002 -> 0.001', ...]: every leaf of the two config dicts that differs."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def check_resume_config(saved: dict, run: RunConfig, allow: bool, where: str) -> List[str]:
    """The differences that need --allow-config-change; raises ConfigError listing them when not allowed."""
    changes = [c for c in config_changes(saved, to_dict(run)) if c.split(":")[0] not in RESUMABLE_CHANGES]
    if changes and not allow:
        raise ConfigError(f"{where}: the run was started with another config; resuming would change "
                          f"{'; '.join(changes)}. Use a new `out` folder, or pass --allow-config-change")
    return changes


def _truncate_metrics(path: str, step: int) -> None:
    """Drop the log lines of steps after `step` (they are about to be run again from the checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        with atomic_write(path, "w") as f:
            f.writelines(keep)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
def _log(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(run: RunConfig, *, quiet: bool = False, max_steps_this_run: Optional[int] = None,
          allow_config_change: bool = False) -> dict:
    """Train (resuming from the newest good checkpoint in run.out/checkpoints if any); returns final metrics.

    max_steps_this_run: stop after this many optimizer steps of this invocation (tests of resume).
    allow_config_change: resume although the config differs from the one the run was started with (in more
      than RESUMABLE_CHANGES); the differences are appended to run.out/config_changes.jsonl.
    """
    from tqdm.auto import tqdm

    from bmretriever_jax import hub
    from bmretriever_jax.convert.hf import load_hf
    from bmretriever_jax.data.loader import PairLoader

    import transformers

    # everything a user can get wrong fails here, in a second, before the model loads
    pairs = load_training_pairs(run)
    if run.data.dev and not os.path.isdir(run.data.dev):
        raise InputPathError(f"data.dev: {run.data.dev}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    os.makedirs(run.out, exist_ok=True)
    folder = hub.resolve(run.model.name, quiet=quiet)
    model_cfg, base = load_hf(folder, dtype=np.dtype(run.model.param_dtype) if run.model.param_dtype != "bfloat16"
                              else np.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if run.model.param_dtype == "bfloat16":
        base = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)
    mesh = make_mesh(run)
    optimizer = make_optimizer(run)
    key = jax.random.PRNGKey(run.train.seed)
    trainable_model, frozen = split_params(base, run, key)
    frozen = sharding.shard(frozen, mesh)
    state = init_state(run, trainable_model, optimizer)
    state_shardings = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, state_shardings)

    loader = PairLoader(pairs, run.train.global_batch_size, seed=run.train.seed, num_negatives=run.data.num_negatives,
                        negatives=run.data.negatives, short=run.data.short, process_index=jax.process_index(),
                        process_count=jax.process_count(), drop_last=False,
                        tokenize_fn=make_tokenize_fn(tokenizer, run))

    mngr = ckpt.manager(os.path.join(run.out, "checkpoints"), keep=run.train.keep)
    meta = {"config": to_dict(run), "model_folder": folder, "model_config": model_cfg.to_dict()}
    say = (lambda msg: print(msg, flush=True)) if is_host0() else (lambda msg: None)
    restored = ckpt.restore(mngr, jax.eval_shape(lambda s: s, state), warn=say)
    log_path = os.path.join(run.out, "metrics.jsonl")
    if restored is not None:
        step0, state, data_state, saved_meta = restored
        changes = check_resume_config(saved_meta.get("config", {}), run, allow_config_change,
                                      os.path.join(run.out, "checkpoints"))
        state = jax.device_put(state, state_shardings)
        loader.restore(data_state)
        if is_host0():
            _truncate_metrics(log_path, step0 // run.train.grad_accum)
            if changes:
                _log(os.path.join(run.out, "config_changes.jsonl"), {"step": step0, "changes": changes,
                                                                      "time": time.time()})
                say(f"resuming with config changes (--allow-config-change): {'; '.join(changes)}")
        if not quiet:
            say(f"resumed from step {step0} ({run.out}/checkpoints)")
    if is_host0():
        with open(os.path.join(run.out, "config.yaml"), "w") as f:
            f.write(dump(run))

    train_step = make_train_step(model_cfg, run, optimizer, mesh, state_shardings)
    accum = run.train.grad_accum
    total_micro = run.train.steps * accum
    micro = int(state["step"])
    stop_at = total_micro if max_steps_this_run is None else min(total_micro, micro + max_steps_this_run * accum)
    it = iter(loader)
    last = {}
    t0, seen = time.time(), 0
    bar = tqdm(total=total_micro // accum, initial=micro // accum, desc="train", disable=quiet or not is_host0(),
               unit="step")
    try:
        if run.data.dev and run.train.eval_every and micro == 0 and stop_at > 0:
            # the untrained model's dev metrics: the baseline every later evaluation is read against
            params, _ = host_params(run, state, frozen)
            if is_host0():
                _log(log_path, {"step": 0, **dev_eval(run, model_cfg, params, tokenizer)})
        while micro < stop_at:
            batch = to_global(next(it), mesh)
            state, metrics = train_step(state, frozen, batch)
            micro += 1
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss} at step {micro // accum} (micro-step {micro}); stopping. "
                                    f"The last good checkpoint in {run.out}/checkpoints is intact; lower train.lr "
                                    "or check the data.")
            seen += run.train.global_batch_size
            if micro % accum:
                continue
            step = micro // accum
            bar.update(1)
            if step % run.train.log_every == 0 or micro == stop_at:
                el = time.time() - t0
                last = {k: float(v) for k, v in metrics.items()}
                last.update(step=step, examples_per_s=seen / max(el, 1e-9), lr=float(make_schedule(run)(step)))
                bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=f"{last['examples_per_s']:.1f}")
                if is_host0():
                    _log(log_path, last)
                t0, seen = time.time(), 0
            if step % run.train.save_every == 0 or micro == total_micro:
                ckpt.save(mngr, micro, state, loader.state(), meta)
            if run.data.dev and run.train.eval_every and step % run.train.eval_every == 0 and micro < total_micro:
                params, _ = host_params(run, state, frozen)  # every process takes part in the gather
                if is_host0():
                    _log(log_path, {"step": step, **dev_eval(run, model_cfg, params, tokenizer)})
        mngr.wait_until_finished()
    finally:
        bar.close()
        mngr.close()
    result = dict(last)
    if micro == total_micro:
        params, trainable = host_params(run, state, frozen)
        if is_host0():
            export_model(run, model_cfg, params, trainable, folder, os.path.join(run.out, "model"))
            if run.data.dev:
                ev = dev_eval(run, model_cfg, params, tokenizer)
                _log(log_path, {"step": micro // accum, **ev})
                result.update(ev)
    return result


def host_params(run: RunConfig, state, frozen) -> Tuple[dict, dict]:
    """(plain backbone params with LoRA folded in, trainable tree) as host numpy arrays; a collective:
    every process must call it."""
    from jax.experimental import multihost_utils

    trainable = multihost_utils.process_allgather(state["trainable"]["model"], tiled=True)
    frozen = multihost_utils.process_allgather(frozen, tiled=True)
    merged = jax.tree.map(lambda x: np.asarray(x, np.float32), merged_params(run, trainable, frozen))
    return merged, trainable


def dev_eval(run: RunConfig, model_cfg, params, tokenizer) -> dict:
    """NDCG@10 etc. on the dev split of data.dev with the given (merged) weights."""
    from bmretriever_jax.embed import Encoder
    from bmretriever_jax.eval.evaluate import evaluate_retrieval

    enc = Encoder(model_cfg, params, tokenizer, max_length=run.model.max_length, pooling=run.model.pooling,
                  normalize=run.model.normalize, dtype=run.model.dtype, bidirectional=run.model.bidirectional)
    task = run.data.dev_task or default_task(run.data.dev)  # data/scifact -> scifact's instruction
    res = evaluate_retrieval(enc, run.data.dev, run.data.dev_split, instruction_for(task),
                             cache_dir=os.path.join(run.out, "vector_cache"), progress=False)  # inside the train bar
    return {f"dev_{k}": v for k, v in res.items() if isinstance(v, (int, float))}


def export_model(run: RunConfig, model_cfg, params, trainable, source_folder: str, out: str) -> str:
    """The trained retriever (merged `params` from `host_params`) as a transformers folder (+ tokenizer +
    bmretriever.json) and, with LoRA, the adapter tree (adapter.safetensors) for PEFT export."""
    from safetensors.numpy import save_file

    from bmretriever_jax.convert.hf import copy_tokenizer, save_hf

    save_hf(model_cfg, params, out, bidirectional=run.model.bidirectional)
    copy_tokenizer(source_folder, out)  # the same file list as every export
    settings = {"pooling": run.model.pooling, "normalize": run.model.normalize, "max_length": run.model.max_length,
                "bidirectional": run.model.bidirectional, "base_model": run.model.name,
                "lora": dataclasses.asdict(run.lora) if run.lora.enabled else None}
    with open(os.path.join(out, "bmretriever.json"), "w") as f:
        json.dump(settings, f, indent=2)
    if run.lora.enabled:
        flat = {k: np.asarray(v, np.float32) for k, v in treeutil.flatten(trainable).items()}
        save_file(flat, os.path.join(out, "adapter.safetensors"))
    return out
