"""One entry point for the training input: PairLoader over pairs in memory, or the grain loader over a
prepared folder (`data.prepared`), with packing calibrated on global batches so every host compiles the
same shapes.

    make_loader(run, tokenize_fn, process_index, process_count, pairs=None, n_shards=1)  -> the loader
    training_loader(run, tokenizer, pairs=None)                               -> the loader the loop uses
"""
from __future__ import annotations

from typing import Callable, List, Optional

from bmretriever_jax.data.loader import PairLoader


def make_loader(run, tokenize_fn: Optional[Callable], process_index: int, process_count: int, pairs=None,
                prepared=None, n_shards: int = 1):
    """PairLoader over `pairs`, or (run.data.prepared set) GrainPairLoader over the prepared folder
    (`prepared`: an already opened `Prepared` of it). Both: drop_last=False, state {"epoch", "step"}; packed
    with data.pack_balance, each global batch ordered for its `n_shards` blocks (packing.balance_order)."""
    d, t = run.data, run.train
    balance = n_shards if d.packing and d.pack_balance else 0
    common = dict(seed=t.seed, num_negatives=d.num_negatives, negatives=d.negatives, short=d.short,
                  process_index=process_index, process_count=process_count, drop_last=False, tokenize_fn=tokenize_fn,
                  balance_shards=balance)
    if d.prepared:
        from bmretriever_jax.data.grain_loader import GrainPairLoader

        return GrainPairLoader(d.prepared, t.global_batch_size, worker_count=d.workers, prefetch=d.prefetch,
                               data=prepared, **common)
    if pairs is None:
        raise ValueError("make_loader: pairs are needed when data.prepared is not set")
    return PairLoader(pairs, t.global_batch_size, **common)


def global_batch_items(loader, epoch: int, step: int) -> List[dict]:
    """Every host's items of a global batch, untokenized (the same list on every host)."""
    if hasattr(loader, "global_items"):
        return loader.global_items(epoch, step)
    idx = loader.global_indices(epoch, step)
    return [loader._item(int(i), epoch) for i in idx]  # PairLoader's own item builder


def calibration_batches(loader, count: int) -> List[List[dict]]:
    """The first `count` global batches of epoch 0 (fewer if the epoch is shorter)."""
    return [global_batch_items(loader, 0, s) for s in range(min(count, loader.steps_per_epoch))]


def pack_rows_from_lengths(prepared, loader, run, n_shards: int, count: int):
    """`calibrate_packing` from the prepared token lengths (no tokenizing): the same rows when the folder
    was tokenized with the run's tokenizer and cut lengths (negatives chosen as the loader chooses them)."""
    from bmretriever_jax.data.batches import rows_for_lengths

    hb = loader._host_batch(False, 0, 1)
    hb._data = prepared
    lengths = []
    for s in range(min(count, loader.steps_per_epoch)):
        per_pair = hb.token_lengths(hb.global_indices(0, s), 0)
        lengths.append(([int(q) for q, _ in per_pair], [int(x) for _, ps in per_pair for x in ps]))
    return rows_for_lengths(run, lengths, n_shards)


def training_loader(run, tokenizer, pairs=None, prepared=None, *, process_index=None,
                    process_count=None, n_shards: Optional[int] = None):
    """The loader `train.loop` iterates: tokenize_fn from `train.step.make_tokenize_fn`, packed rows calibrated
    on the first `data.pack_calibration_batches` GLOBAL batches of epoch 0 (all hosts pick the same shapes),
    each host's batch split over its `n_shards // process_count` local shards."""
    import jax

    from bmretriever_jax.config import resolve_mesh_shape
    from bmretriever_jax.data.batches import batch_shards, calibrate_packing, make_tokenize_fn

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if n_shards is None:
        data, fsdp, _ = resolve_mesh_shape(run.mesh, jax.device_count())
        n_shards = batch_shards({"data": data, "fsdp": fsdp})
    from bmretriever_jax.data.prepared import Prepared

    if isinstance(pairs, Prepared):  # train.loop hands the opened folder over in place of the pairs
        pairs, prepared = None, pairs
    if run.data.prepared and prepared is None:
        from bmretriever_jax.data.prepared import open_for_run

        prepared = open_for_run(run, tokenizer)
    loader = make_loader(run, None, pi, pc, pairs=pairs, prepared=prepared, n_shards=n_shards)
    if not run.data.packing:
        loader.tokenize_fn = make_tokenize_fn(tokenizer, run)
        return _started(loader)
    count = run.data.pack_calibration_batches
    rows = None
    if prepared is not None:
        from bmretriever_jax.data.prepared import token_lengths_match

        if token_lengths_match(prepared.manifest, run):
            rows = pack_rows_from_lengths(prepared, loader, run, n_shards, count)
    if rows is None:
        rows = calibrate_packing(tokenizer, run, calibration_batches(loader, count), n_shards)
    loader.tokenize_fn = make_tokenize_fn(tokenizer, run, pack_rows=rows, n_local_shards=n_shards // pc)
    loader.pack_rows = rows
    return _started(loader)


def _started(loader):
    """Grain workers start here, so they spawn and build the first batches while the step compiles."""
    if hasattr(loader, "start") and getattr(loader, "worker_count", 0) > 0:
        loader.start()
    return loader
