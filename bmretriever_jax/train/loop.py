"""The training loop: data.train -> pairs -> the jitted step (`train.step`) under Orbax checkpoints with exact
resume (`train.resume` guards config changes), dev evaluation, and the trained retriever written as a model folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.experimental import multihost_utils
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from bmretriever_jax.train import checkpoint as ckpt
from bmretriever_jax.convert import hub
from bmretriever_jax.parallel import sharding
from bmretriever_jax.util import treeutil
from bmretriever_jax.config import RunConfig, dump, resolve_mesh_shape, to_dict
from bmretriever_jax.convert.hf import copy_tokenizer, load_hf, save_hf
from bmretriever_jax.data import builders
from bmretriever_jax.data.loader import PairLoader
from bmretriever_jax.data.pairs import read_pairs
from bmretriever_jax.parallel.distributed import is_host0
from bmretriever_jax.embed import Encoder, default_task, instruction_for
from bmretriever_jax.util.errors import ConfigError, DataFormatError, InputPathError, UserError
from bmretriever_jax.eval.evaluate import evaluate_retrieval
from bmretriever_jax.train.resume import check_resume_config, truncate_metrics
from bmretriever_jax.train.step import (init_state, make_mesh, make_optimizer, make_schedule, make_tokenize_fn,
                                        merged_params, make_train_step, split_params, to_global)


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN / inf: training stops with the last good checkpoint intact."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def load_training_pairs(run: RunConfig):
    """data.train entries: pairs JSONL files, or builder names (scifact, pubmedqa, medquad, pretrain:PATH)."""
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
    # everything a user can get wrong fails here, in a second, before the model loads
    pairs = load_training_pairs(run)
    if run.data.dev and not os.path.isdir(run.data.dev):
        raise InputPathError(f"data.dev: {run.data.dev}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    data, fsdp, _ = resolve_mesh_shape(run.mesh, jax.device_count())  # before any model loads
    if run.train.global_batch_size % (data * fsdp):  # a global batch is split over both batch axes
        raise ConfigError(f"train.global_batch_size {run.train.global_batch_size}: the mesh (data {data} x fsdp {fsdp} "
                          f"on {jax.device_count()} devices) splits a batch {data * fsdp} ways; allowed: a multiple "
                          f"of {data * fsdp}, or a smaller mesh.data / mesh.fsdp")
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
            truncate_metrics(log_path, step0 // run.train.grad_accum)
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
    trainable = multihost_utils.process_allgather(state["trainable"]["model"], tiled=True)
    frozen = multihost_utils.process_allgather(frozen, tiled=True)
    merged = jax.tree.map(lambda x: np.asarray(x, np.float32), merged_params(run, trainable, frozen))
    return merged, trainable


def dev_eval(run: RunConfig, model_cfg, params, tokenizer) -> dict:
    """NDCG@10 etc. on the dev split of data.dev with the given (merged) weights."""
    enc = Encoder(model_cfg, params, tokenizer, max_length=run.model.max_length, pooling=run.model.pooling,
                  normalize=run.model.normalize, dtype=run.model.dtype, bidirectional=run.model.bidirectional)
    task = run.data.dev_task or default_task(run.data.dev)  # data/scifact -> scifact's instruction
    res = evaluate_retrieval(enc, run.data.dev, run.data.dev_split, instruction_for(task),
                             cache_dir=os.path.join(run.out, "vector_cache"), progress=False)  # inside the train bar
    return {f"dev_{k}": v for k, v in res.items() if isinstance(v, (int, float))}


def export_model(run: RunConfig, model_cfg, params, trainable, source_folder: str, out: str) -> str:
    """The trained retriever (merged `params` from `host_params`) as a transformers folder (+ tokenizer +
    bmretriever.json) and, with LoRA, the adapter tree (adapter.safetensors) for PEFT export."""
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
