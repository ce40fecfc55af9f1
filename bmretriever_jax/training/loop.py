"""The training loop: data.train -> pairs -> the jitted step (`train.step`) under Orbax checkpoints with exact
resume (`train.resume` guards config changes), dev evaluation, and the trained retriever written as a model folder.

The host never waits for the device inside the loop: the next batches are read, tokenized and copied to the
devices by a background thread (`BatchPrefetcher`) while the step runs, and metrics are read once per
`log_every` (one step late) and before a checkpoint, the NaN check with them. A preemption notice (SIGTERM, a
first SIGINT) makes every process stop at the same step and save it (`PreemptionWatch`, exit code
PREEMPTED_EXIT_CODE); a checkpoint restores on another mesh or process count (docs/preemption.md).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import queue
import signal
import threading
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.experimental import multihost_utils
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.convert import hub
from bmretriever_jax.parallel import sharding
from bmretriever_jax.util import remote, treeutil
from bmretriever_jax.config import RunConfig, dump, resolve_mesh_shape, to_dict
from bmretriever_jax.convert.hf import copy_tokenizer, load_hf, save_hf
from bmretriever_jax.data import builders, packing
from bmretriever_jax.data.pairs import read_pairs
from bmretriever_jax.parallel.distributed import is_host0, preemption_sync_available
from bmretriever_jax.util.errors import ConfigError, DataFormatError, InputPathError, UserError
from bmretriever_jax.training.deveval import MeshEncoder, dev_eval
from bmretriever_jax.training.resume import check_resume_config, truncate_metrics
from bmretriever_jax.training.step import (batch_shards, init_state, make_mesh, make_optimizer, make_schedule,
                                        make_train_step, merged_params, split_params, to_global)


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN / inf: training stops with the last good checkpoint intact."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def _local_paths(run: RunConfig) -> RunConfig:
    """A copy of the config whose model / data paths are local: URLs fetched (util/remote.fetch), others kept."""
    def entry(e: str) -> str:
        if e.startswith("pretrain:"):
            return "pretrain:" + remote.fetch(e.split(":", 1)[1])
        return remote.fetch(e)

    local = copy.deepcopy(run)
    local.model.name = remote.fetch(run.model.name, quiet=False)
    local.data.train = [entry(e) for e in run.data.train]
    for key in ("dev", "prepared"):
        if getattr(run.data, key):
            setattr(local.data, key, remote.fetch(getattr(run.data, key)))
    return local


def load_training_pairs(run: RunConfig):
    """data.train entries: pairs JSONL files, or builder names (scifact, pubmedqa, medquad, pretrain:PATH)."""
    if run.data.prepared:  # a `bmr prepare` folder instead: opened and checked (files, tokenizer), not loaded
        from bmretriever_jax.data.prepared import open_for_run

        return open_for_run(run)
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
# The seam to the input pipeline, prefetching and preemption
# ----------------------------------------------------------------------------------------------------
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped on a preemption notice, after saving"; rerun to resume


class Preempted(SystemExit):
    """A preemption notice (SIGTERM, or a first SIGINT) stopped training after every process saved the same
    step. A SystemExit with code PREEMPTED_EXIT_CODE: `bmr train` exits with it (no traceback), a Python caller
    can catch it; rerunning the same command resumes from `step`."""

    def __init__(self, step: int, directory: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.directory = step, directory


def make_loader(run: RunConfig, pairs, tokenizer):
    """The training input: an object with `next(loader)` (this host's tokenized batch as numpy arrays),
    `state()` (a JSON-able position, the same on every process) and `restore(state)`. The loop uses nothing
    else of it, so another pipeline slots in here."""
    # PairLoader over `pairs`, or the grain loader over data.prepared (`pairs` is then the opened folder);
    # with data.packing the rows are calibrated on the first global batches, the same on every host
    from bmretriever_jax.data.pipeline import training_loader

    return training_loader(run, tokenizer, pairs)


class PackedShapeAgreement:
    """Packed batches on several processes: a host whose texts do not fit the calibrated rows packs them in the
    fallback shape (one text per row), and then every host must (global arrays are made of equal local
    shapes). Each host posts whether it fell back for the n-th batch in jax.distributed's key-value store (host
    RPCs, no device collective, so safe in the prefetch thread) and reads everyone's; a packed batch is
    re-packed into the fallback shape when another host fell back (`packing.to_fallback`, same texts)."""

    def __init__(self, n_local_shards: int, max_segments: int, pad_id: int, timeout_s: float = 600.0):
        self.n_local_shards, self.max_segments, self.pad_id = n_local_shards, max_segments, pad_id
        self.count = 0
        self.timeout_s = timeout_s
        # set when training stops: a batch built ahead that another process will never build must not keep
        # this process waiting for its key (the prefetch thread is joined on close)
        self.stop = threading.Event()

    def _get(self, client, key: str) -> str:
        deadline = time.time() + self.timeout_s
        while True:
            if self.stop.is_set():
                raise RuntimeError("training stopped while a batch built ahead waited for the other processes")
            try:
                return client.blocking_key_value_get(key, 500)
            except Exception as e:  # noqa: BLE001 - jax raises its runtime error on a deadline
                if "DEADLINE" not in str(e).upper() or time.time() > deadline:
                    raise

    def __call__(self, batch: dict) -> dict:
        if "seg" not in batch:
            return batch
        mine = packing.is_fallback(batch)
        if jax.process_count() > 1:
            from jax._src import distributed as _dist  # the client jax.distributed.initialize made

            client, pi = _dist.global_state.client, jax.process_index()
            key = f"bmr/packed-fallback/{self.count}"
            client.key_value_set(f"{key}/{pi}", "1" if mine else "0")
            anyone = any(self._get(client, f"{key}/{p}") == "1" for p in range(jax.process_count()))
            if self.count >= 2:  # every process has read batch count-2's keys: it posted count-1's since
                client.key_value_delete(f"bmr/packed-fallback/{self.count - 2}/{pi}")
            if anyone and not mine:
                batch = packing.to_fallback(batch, n_shards=self.n_local_shards, max_segments=self.max_segments,
                                            pad_id=self.pad_id)
        self.count += 1
        return batch


class BatchPrefetcher:
    """Builds the next batches in a background thread while the device runs the step: `next(loader)`
    (reading, tokenizing) and `to_global` (the host->device copy). `next()` -> (global batch, the loader's
    state after that batch): the position to checkpoint once the batch's step is done. Exceptions of the
    thread re-raise in the caller."""

    _END = object()

    def __init__(self, loader, make_global, depth: int = 2):
        self._loader, self._make_global = loader, make_global
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bmr-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self):
        try:
            while not self._stop.is_set():
                host = next(self._loader)
                self._put((self._make_global(host), copy.deepcopy(self._loader.state())))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((self._END, e))

    def next(self):
        batch, state = self._queue.get()
        if batch is self._END:
            raise state
        return batch, state

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


class PreemptionWatch:
    """Whether to stop for a preemption notice at a micro-step, the same answer on every process.

    With jax.distributed initialised, XLA's own SIGTERM handler (installed by jax.distributed.initialize)
    spreads the notice over the coordination service and `reached_preemption_sync_point` names one step for all
    processes (the slowest reaches the fastest one's step + 1); a Python SIGTERM handler would replace XLA's, so
    none is set; a first SIGINT is turned into a SIGTERM for XLA. In a single process a Python handler sets a
    flag (SIGTERM, first SIGINT). A second SIGINT interrupts at once (KeyboardInterrupt).
    `reached(i)` must be called at every micro-step i = 1, 2, ... of this invocation on every process: ids
    counted from this invocation's start are equal on all processes and reach a sync step computed from a
    notice that arrived before the loop (counters still 0)."""

    def __init__(self, mngr):
        self._mngr = mngr
        self.synced = preemption_sync_available()
        self.signal_name: Optional[str] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set in the main thread: no preemption handling
        if not self.synced:
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:
            # the second ^C interrupts at once
            signal.signal(signal.SIGINT, self._old.get(signal.SIGINT) or signal.default_int_handler)
            if self.synced:
                signal.raise_signal(signal.SIGTERM)  # to XLA's handler: the notice reaches every process
        self.signal_name = signal.Signals(signum).name

    def reached(self, i: int) -> bool:
        if self.synced:
            return self._mngr.reached_preemption(i)
        return self.signal_name is not None


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
def _log(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _topology(mesh) -> dict:
    return {"processes": jax.process_count(), "devices": int(mesh.devices.size),
            "mesh": [int(mesh.shape[a]) for a in mesh.axis_names]}


def train(run: RunConfig, *, quiet: bool = False, max_steps_this_run: Optional[int] = None,
          allow_config_change: bool = False) -> dict:
    """Train (resuming from the newest good checkpoint in run.out/checkpoints if any); returns final metrics.

    max_steps_this_run: stop after this many optimizer steps of this invocation (tests of resume).
    allow_config_change: resume although the config differs from the one the run was started with (in more
      than RESUMABLE_CHANGES); the differences are appended to run.out/config_changes.jsonl.
    A preemption notice (SIGTERM, first SIGINT) saves the step every process agrees on and raises Preempted
    (a SystemExit with PREEMPTED_EXIT_CODE). The checkpoint restores on any mesh / process count that splits
    the same global batch (arrays resharded by Orbax; the data position is global).
    """
    # URLs (gs://, ...) in the model, data and out paths: local copies to read, a staging folder to write
    # (util/remote.py); `given` is the config as written, kept in config.yaml and the checkpoints
    given, run, folder_out = run, _local_paths(run), remote.RunFolder(run.out)
    run.out = folder_out.local
    # everything a user can get wrong fails here, in a second, before the model loads
    pairs = load_training_pairs(run)
    if run.data.dev and not os.path.isdir(run.data.dev):
        raise InputPathError(f"data.dev: {run.data.dev}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    data, fsdp, _ = resolve_mesh_shape(run.mesh, jax.device_count())  # before any model loads
    if run.train.global_batch_size % (data * fsdp):  # a global batch is split over both batch axes
        raise ConfigError(f"train.global_batch_size {run.train.global_batch_size}: the mesh (data {data} x fsdp {fsdp} "
                          f"on {jax.device_count()} devices) splits a batch {data * fsdp} ways; allowed: a multiple "
                          f"of {data * fsdp}, or a smaller mesh.data / mesh.fsdp")
    if is_host0():
        folder_out.pull()  # a resumed run's metrics.jsonl and config.yaml, when out: is a URL
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

    loader = make_loader(run, pairs, tokenizer)

    ck_dir = folder_out.checkpoints
    mngr = ckpt.manager(ck_dir, keep=run.train.keep)
    topology = _topology(mesh)
    meta = {"config": to_dict(given), "model_folder": folder, "model_config": model_cfg.to_dict(), "topology": topology}
    say = (lambda msg: print(msg, flush=True)) if is_host0() else (lambda msg: None)
    # the target carries this run's shardings: Orbax reads each device's slices of a checkpoint written on
    # any other mesh or process count
    restored = ckpt.restore(mngr, ckpt.abstract_state(state, state_shardings), warn=say)
    log_path = os.path.join(run.out, "metrics.jsonl")
    if restored is not None:
        step0, state, data_state, saved_meta = restored
        changes = check_resume_config(saved_meta.get("config", {}), given, allow_config_change, ck_dir)
        state = jax.device_put(state, state_shardings)  # (already there: a no-op unless a leaf came back elsewhere)
        saved_batch = saved_meta.get("config", {}).get("train", {}).get("global_batch_size",
                                                                          run.train.global_batch_size)
        loader.restore(_map_position(data_state, saved_batch, run.train.global_batch_size, say))
        if is_host0():
            truncate_metrics(log_path, step0 // run.train.grad_accum)
            if changes:
                _log(os.path.join(run.out, "config_changes.jsonl"), {"step": step0, "changes": changes,
                                                                      "time": time.time()})
                say(f"resuming with config changes (--allow-config-change): {'; '.join(changes)}")
        if not quiet:
            was = saved_meta.get("topology")
            moved = f" (written on {_describe(was)}; now {_describe(topology)})" if was and was != topology else ""
            say(f"resumed from step {step0} ({ck_dir}){moved}")
    if is_host0():
        with open(os.path.join(run.out, "config.yaml"), "w") as f:
            f.write(dump(given))

    train_step = make_train_step(model_cfg, run, optimizer, mesh, state_shardings)
    accum = run.train.grad_accum
    total_micro = run.train.steps * accum
    micro = int(state["step"])
    micro_start = micro
    stop_at = total_micro if max_steps_this_run is None else min(total_micro, micro + max_steps_this_run * accum)
    schedule = make_schedule(run)
    cpu = jax.local_devices(backend="cpu")[0]  # the logged lr is computed here, not queued behind a step
    last = {}
    # metrics stay on the device until they are read: the losses of every micro-step since the last read
    # (all checked for NaN / inf), and the metrics of the step to log, read one step late so that the next
    # step is already queued when the host waits
    unchecked: list = []
    to_log: Optional[tuple] = None
    t0, last_at = time.time(), micro  # time and micro-step of the previous metrics read

    def check_finite(upto: Optional[int] = None):
        """Raise NonFiniteLoss if a loss of the micro-steps up to `upto` (all queued ones by default) is not finite."""
        now = [(m, loss) for m, loss in unchecked if upto is None or m <= upto]
        if not now:
            return
        values = jax.device_get([loss for _, loss in now])
        for (m, _), v in zip(now, values):
            if not math.isfinite(float(v)):
                raise NonFiniteLoss(f"loss became {float(v)} at step {-(-m // accum)} (micro-step {m}); stopping. "
                                    f"The last good checkpoint in {ck_dir} is intact; lower train.lr or check the "
                                    "data.")
        del unchecked[:len(now)]

    def read_log():
        nonlocal to_log, last, t0, last_at
        if to_log is None:
            return
        step, at, metrics = to_log
        to_log = None
        check_finite(at)
        el = time.time() - t0
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        with jax.default_device(cpu):
            lr = float(schedule(step))
        examples = (at - last_at) * run.train.global_batch_size
        last.update(step=step, examples_per_s=examples / max(el, 1e-9), lr=lr)
        bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=f"{last['examples_per_s']:.1f}")
        if is_host0():
            _log(log_path, last)
        t0, last_at = time.time(), at

    bar = tqdm(total=total_micro // accum, initial=micro // accum, desc="train", disable=quiet or not is_host0(),
               unit="step")
    prefetch = None
    agree = PackedShapeAgreement(max(1, batch_shards(mesh) // jax.process_count()), run.data.pack_max_segments,
                                 tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id)
    fallbacks = trained = 0  # packed batches trained in the fallback shape (one text per row), of all
    dev_encoder = MeshEncoder(run, model_cfg, tokenizer, mesh) if run.data.dev else None
    try:
        with PreemptionWatch(mngr) as watch:
            if run.data.dev and run.train.eval_every and micro == 0 and stop_at > 0:
                # the untrained model's dev metrics: the baseline every later evaluation is read against
                ev = dev_eval(run, dev_encoder.bind(state, frozen, 0))
                if is_host0():
                    _log(log_path, {"step": 0, **ev})
            prefetch = BatchPrefetcher(loader, lambda b: to_global(agree(b), mesh)) if micro < stop_at else None
            while micro < stop_at:
                batch, data_state = prefetch.next()
                if "seg" in batch:
                    trained += 1
                    fallbacks += packing.is_fallback(batch)
                state, metrics = train_step(state, frozen, batch)  # dispatched: runs while the host goes on
                micro += 1
                unchecked.append((micro, metrics["loss"]))
                read_log()  # the previous log step's metrics, now that this step is queued behind them
                preempted = watch.reached(micro - micro_start) and micro < total_micro
                boundary = micro % accum == 0
                step = micro // accum
                if boundary:
                    bar.update(1)
                    if step % run.train.log_every == 0 or micro == stop_at:
                        to_log = (step, micro, metrics)
                if (boundary and step % run.train.save_every == 0) or micro == total_micro or preempted:
                    read_log()
                    check_finite()  # a checkpoint never holds a state after a NaN
                    ckpt.save(mngr, micro, state, data_state, meta)
                    if is_host0():
                        folder_out.push()  # out: a URL: metrics.jsonl and config.yaml beside the checkpoints
                if preempted:
                    read_log()
                    mngr.wait_until_finished()
                    if jax.process_count() > 1:  # nobody exits (srun --kill-on-bad-exit) before all have saved
                        multihost_utils.sync_global_devices("bmr-preempted")
                    why = watch.signal_name or "a preemption notice"
                    say(f"bmr train: {why}: saved step {micro // accum}" +
                        (f" (micro-step {micro})" if accum > 1 else "") +
                        f" in {ck_dir} on every process; stopping with exit code {PREEMPTED_EXIT_CODE}. "
                        "Rerun the same command to resume (any mesh that splits the same global batch)")
                    raise Preempted(micro, ck_dir)
                if run.data.dev and run.train.eval_every and boundary and step % run.train.eval_every == 0 \
                        and micro < total_micro:
                    read_log()
                    ev = dev_eval(run, dev_encoder.bind(state, frozen, step))  # on every device of the mesh
                    if is_host0():
                        _log(log_path, {"step": step, **ev})
            read_log()
            check_finite()
            mngr.wait_until_finished()
    finally:
        agree.stop.set()
        if prefetch is not None:
            prefetch.close()
        bar.close()
        mngr.close()
        if is_host0():
            try:
                folder_out.push()
            except Exception as e:  # noqa: BLE001 - never hide the error that ended the loop
                print(f"uploading the run's files to {given.out} failed: {e}", flush=True)
    if fallbacks:  # every process says it: they must agree (the global shapes are the same everywhere)
        print(f"bmr train: process {jax.process_index()}: {fallbacks} of {trained} packed batches took the fallback "
              "shape (one text per row); a larger data.pack_tail_sigmas or data.pack_calibration_batches sizes "
              "the rows for them", flush=True)
    result = dict(last)
    if micro == total_micro:
        if run.data.dev:
            ev = dev_eval(run, dev_encoder.bind(state, frozen, micro // accum))
            result.update(ev)
            if is_host0():
                _log(log_path, {"step": micro // accum, **ev})
        params, trainable = host_params(run, state, frozen)
        if is_host0():
            export_model(run, model_cfg, params, trainable, folder, os.path.join(run.out, "model"))
            folder_out.push()
    return result


def _map_position(data_state: dict, saved_batch: int, batch: int, say) -> dict:
    """The data position for a resume with another global batch (only with --allow-config-change): the same
    number of examples into the epoch, in batches of the new size (rounded down)."""
    if saved_batch == batch or not {"epoch", "step"} <= set(data_state):
        return data_state
    step = int(data_state["step"]) * saved_batch // batch
    say(f"global batch {saved_batch} -> {batch}: continuing epoch {data_state['epoch']} at batch {step} "
        f"(was {data_state['step']}), after the same {int(data_state['step']) * saved_batch} examples or fewer")
    return {**data_state, "step": step}


def _describe(t: dict) -> str:
    return (f"{t.get('devices')} devices, mesh {tuple(t.get('mesh', ()))}, "
            f"{t.get('processes')} process{'es' if t.get('processes', 1) > 1 else ''}")


def host_params(run: RunConfig, state, frozen) -> Tuple[dict, dict]:
    """(plain backbone params with LoRA folded in, trainable tree) as host numpy arrays; a collective:
    every process must call it."""
    trainable = multihost_utils.process_allgather(state["trainable"]["model"], tiled=True)
    frozen = multihost_utils.process_allgather(frozen, tiled=True)
    merged = jax.tree.map(lambda x: np.asarray(x, np.float32), merged_params(run, trainable, frozen))
    return merged, trainable


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
