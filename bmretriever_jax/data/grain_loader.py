"""The training input on grain: PairLoader's batches, read from a prepared folder, built in worker processes.

`GrainPairLoader` has PairLoader's interface (`state()`, `restore(state)`, `next()`, `global_batch_size`,
`local_batch_size`) and yields the same batches: epoch e visits the pairs in the order
`np.random.default_rng([seed, e]).permutation(n)`, host p of P takes rows [p*B/P, (p+1)*B/P) of each global
batch, hard negatives are sampled / padded per (seed, epoch, pair) exactly as `PairLoader._item` does. So a
batch is a pure function of (seed, epoch, step), N hosts' batches concatenate to the 1-host batch, and the
position {"epoch", "step"} is the whole iterator state (the checkpoint's "data" item; it restores on any
process count and with any worker count, unlike grain's own per-process iterator state).

The pipeline is grain's: `MapDataset.range(global step t0, ...)` -> `.map(HostBatch)` (read this host's rows
of step t from the memory-mapped Arrow table, build the items, run `tokenize_fn`: tokenizing and packing)
-> `.to_iter_dataset(ReadOptions)` -> `.mp_prefetch(worker_count workers)`. Worker i builds steps t0+i,
t0+i+W, ...; grain interleaves them back in step order, so the output does not depend on the worker count.
Workers start with spawn and receive the (cloudpickled) map and tokenize_fn; they ignore SIGTERM / SIGINT
(the training process decides when to stop, a preemption notice must not kill the batches it still needs)
and exit when the training process is gone (even after a SIGKILL).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from bmretriever_jax.data.loader import check_loader_args, item_chars
from bmretriever_jax.data.packing import balance_order
from bmretriever_jax.data.prepared import Prepared, release_pages

_ITEM_COLUMNS = ("query", "instruction", "task", "positive_title", "positive_text", "negatives_title",
                 "negatives_text", "pos_key", "query_key")
HORIZON = 1 << 50  # global steps the grain range covers (it is never materialised)


def _ensure_absl_flags() -> None:
    """grain reads absl flags; outside an absl app they are unparsed and grain's reads raise."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:  # the training process is gone (SIGKILL leaves no one to stop us)
            os._exit(0)


def worker_init(worker_index: int, worker_count: int, ppid: Optional[int] = None) -> None:
    """In each grain worker: ignore SIGTERM / SIGINT, exit when the parent dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ensure_absl_flags()
    threading.Thread(target=_watch_parent, args=(ppid or os.getppid(),), daemon=True).start()


class _InitWithParent:
    def __init__(self, ppid: int):
        self.ppid = ppid

    def __call__(self, worker_index: int, worker_count: int) -> None:
        worker_init(worker_index, worker_count, self.ppid)


class HostBatch:
    """Global step t -> this host's batch (items, or tokenize_fn(items)). Picklable: the prepared folder is
    reopened (memory-mapped) in each worker; the epoch's permutation is computed once per process and epoch."""

    def __init__(self, path: str, *, n: int, global_batch_size: int, seed: int, num_negatives: int, negatives: str,
                 short: str, process_index: int, process_count: int, steps_per_epoch: int,
                 tokenize_fn: Optional[Callable] = None, kept: Optional[np.ndarray] = None, balance_shards: int = 0):
        self.path, self.n, self.B, self.seed = path, n, global_batch_size, seed
        self.k, self.negatives, self.short = num_negatives, negatives, short
        self.process_index, self.process_count = process_index, process_count
        self.local = global_batch_size // process_count
        self.steps_per_epoch = steps_per_epoch
        self.tokenize_fn = tokenize_fn
        self.kept = kept  # short="drop": the kept pairs' rows (None: every row)
        self.balance_shards = balance_shards  # > 1: order each global batch with packing.balance_order
        self._data: Optional[Prepared] = None
        self._perm = (None, None)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_data"], d["_perm"] = None, (None, None)
        return d

    @property
    def data(self) -> Prepared:
        if self._data is None:
            self._data = Prepared(self.path)
        return self._data

    def order(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        order = self.order(epoch)
        start = step * self.B
        idx = order[np.arange(start, start + self.B) % self.n]
        if self.balance_shards > 1:
            idx = idx[balance_order(self.costs(idx, epoch), self.balance_shards)]
        return idx

    def costs(self, idx: np.ndarray, epoch: int) -> np.ndarray:
        """What each pair weighs in a packed batch, its negatives as `items` chooses them: tokens (query +
        positive + negatives) when the folder is tokenized, else `loader.item_chars` of its item, as PairLoader
        weighs it (every host then reads the global batch's texts: tokenize the folder for pods)."""
        if not self.data.tokenizer:
            return np.asarray([item_chars(it) for it in self.items_at(epoch, idx)], float)
        return np.asarray([q + sum(ps) for q, ps in self.token_lengths(idx, epoch)], float)

    def token_lengths(self, idx, epoch: int) -> List[tuple]:
        """Per pair (in this order): (query tokens, [positive, negatives...] tokens) from a tokenized folder's
        stored lengths, the negatives as `items_at` chooses them (no text read)."""
        rows = [self.row(int(i)) for i in idx]
        got = self.data.rows(rows, ("q_len", "p_len", "n_len"))
        short = [j for j in range(len(rows)) if len(got["n_len"][j]) < self.k]  # their negatives are padded
        keys = self.data.rows([rows[j] for j in short], ("query_key", "pos_key")) if short else {}
        key_of = {j: (keys["query_key"][m], keys["pos_key"][m]) for m, j in enumerate(short)}
        picks = [self._choose_negatives(int(i), epoch, len(got["n_len"][j]), *key_of.get(j, (None, None)))
                 for j, i in enumerate(idx)]
        pads = sorted({p for _, ps in picks for p in ps})
        pad_len = dict(zip(pads, self.data.rows([self.row(p) for p in pads], ("p_len",))["p_len"])) if pads else {}
        return [(got["q_len"][j], [got["p_len"][j]] + [got["n_len"][j][m] for m in keep] + [pad_len[p] for p in ps])
                for j, (keep, ps) in enumerate(picks)]

    def row(self, i: int) -> int:
        return int(self.kept[i]) if self.kept is not None else i

    def _choose_negatives(self, i: int, epoch: int, n_own: int, query_key: int, pos_key: int):
        """(positions of the pair's own negatives it keeps, pairs whose positives pad the rest): PairLoader._item's
        choice, from the same generator."""
        rng = np.random.default_rng([self.seed, epoch, i, 1])  # PairLoader._item's generator
        keep = list(range(n_own))
        if n_own > self.k:
            keep = [int(m) for m in np.sort(rng.choice(n_own, self.k, replace=False))] \
                if self.negatives == "random" else keep[:self.k]
        pads: List[int] = []
        if len(keep) < self.k:
            taken = self.data.query_positives(query_key, pos_key)
            while len(keep) + len(pads) < self.k:
                pads.append(self._random_other(i, taken, rng))
        return keep, pads

    def items(self, epoch: int, step: int, lo: int, hi: int) -> List[dict]:
        return self.items_at(epoch, self.global_indices(epoch, step)[lo:hi])

    def items_at(self, epoch: int, idx) -> List[dict]:
        """The items of these pair indices (in this order) in an epoch."""
        rows = self.data.rows([self.row(int(i)) for i in idx], _ITEM_COLUMNS)
        out = []
        for j, i in enumerate(idx):
            i = int(i)
            own = [{"title": t, "text": x} for t, x in zip(rows["negatives_title"][j], rows["negatives_text"][j])]
            keep, pads = self._choose_negatives(i, epoch, len(own), rows["query_key"][j], rows["pos_key"][j])
            negs = [own[m] for m in keep]
            if pads:
                got = self.data.rows([self.row(p) for p in pads], ("positive_title", "positive_text"))
                negs += [{"title": t, "text": x} for t, x in zip(got["positive_title"], got["positive_text"])]
            out.append({"query": rows["query"][j], "instruction": rows["instruction"][j], "task": rows["task"][j],
                        "positive": {"title": rows["positive_title"][j], "text": rows["positive_text"][j]},
                        "negatives": negs, "index": i})
        return out

    def _random_other(self, i: int, taken: set, rng: np.random.Generator) -> int:
        for _ in range(64):  # PairLoader._random_other, with hashed keys
            j = int(rng.integers(self.n))
            if self.data.pos_key(self.row(j)) not in taken:
                return j
        keys = self.data.column_numpy("pos_key")
        rows = self.kept if self.kept is not None else np.arange(self.n)
        others = np.flatnonzero(~np.isin(keys[rows], np.fromiter(taken, np.int64)))
        if not len(others):
            raise ValueError(f"cannot pad the negatives of pair {i}: no other pair has a different positive")
        return int(others[int(rng.integers(len(others)))])

    def __call__(self, t: int):
        epoch, step = divmod(int(t), self.steps_per_epoch)
        lo = self.process_index * self.local
        items = self.items(epoch, step, lo, lo + self.local)
        release_pages()  # the rows are Python objects now: unmap the pages read (bounded RSS on any corpus)
        return self.tokenize_fn(items) if self.tokenize_fn is not None else items


def _plain(x):
    """grain's shared-memory arrays -> ordinary numpy arrays (the shared block is released at once)."""
    if isinstance(x, np.ndarray):
        return np.array(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


class GrainPairLoader:
    """Infinite iterator over per-host batches of a prepared folder (see the module docstring).

    Arguments as PairLoader's (with the folder instead of the pairs), plus worker_count (grain worker
    processes; 0 = build batches in this process, in a background thread) and prefetch (batches each
    worker keeps ready), balance_shards (as PairLoader's). tokenize_fn must pickle when worker_count > 0 (it
    runs in the workers).
    """

    def __init__(self, path: str, global_batch_size: int, *, seed: int, num_negatives: int = 1,
                 negatives: str = "random", short: str = "pad", process_index: int = 0, process_count: int = 1,
                 drop_last: bool = True, tokenize_fn: Optional[Callable[[List[dict]], Dict[str, Any]]] = None,
                 worker_count: int = 0, prefetch: int = 2, data: Optional[Prepared] = None, balance_shards: int = 0):
        check_loader_args(global_batch_size, num_negatives, negatives, short, process_index, process_count)
        if worker_count < 0 or prefetch < 0:
            raise ValueError(f"worker_count {worker_count} and prefetch {prefetch} must be >= 0")
        self.path = path
        self.data = data if data is not None else Prepared(path)
        kept = None
        self.dropped = 0
        if short == "drop" and num_negatives > 0:
            n_neg = self.data.column_numpy("n_neg")
            ok = n_neg >= num_negatives
            if not ok.all():
                kept = np.flatnonzero(ok)
                self.dropped = int(len(n_neg) - len(kept))
        n = len(kept) if kept is not None else len(self.data)
        if n < global_batch_size and drop_last:
            raise ValueError(f"{n} pairs cannot fill one batch of {global_batch_size} with drop_last=True")
        if n == 0:
            raise ValueError("no pairs to load")
        self.n = n
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = n // global_batch_size if drop_last else -(-n // global_batch_size)
        self.worker_count, self.prefetch = worker_count, prefetch
        self.tokenize_fn = tokenize_fn
        self._spec = dict(n=n, global_batch_size=global_batch_size, seed=seed, num_negatives=num_negatives,
                          negatives=negatives, short=short, steps_per_epoch=self.steps_per_epoch, kept=kept,
                          balance_shards=balance_shards)
        self._local = None  # HostBatch of this process (global_items, batch_at)
        self._epoch, self._step = 0, 0
        self._it = None

    # ------------------------------------------------------------------------------------------------ position
    def state(self) -> Dict[str, int]:
        """The position of the next batch: {"epoch", "step"} (step within the epoch)."""
        return {"epoch": self._epoch, "step": self._step}

    def restore(self, state: Dict[str, int]) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"state {state} outside epoch >= 0, step in [0, {self.steps_per_epoch})")
        if (epoch, step) == (self._epoch, self._step):
            return  # already there: a started pipeline keeps its workers and the batches they have made
        self.close()
        self._epoch, self._step = epoch, step

    # ------------------------------------------------------------------------------------------------ batches
    def _host_batch(self, tokenize: bool, process_index: int, process_count: int) -> HostBatch:
        return HostBatch(self.path, process_index=process_index, process_count=process_count,
                         tokenize_fn=self.tokenize_fn if tokenize else None, **self._spec)

    def global_items(self, epoch: int, step: int) -> List[dict]:
        """All items of a global batch (every host's rows, untokenized): e.g. to calibrate packing."""
        if self._local is None:
            self._local = self._host_batch(False, 0, 1)
            self._local._data = self.data
        return self._local.items(epoch, step, 0, self.global_batch_size)

    def batch_at(self, epoch: int, step: int):
        """This host's batch at a position, built in this process (no workers)."""
        hb = self._host_batch(True, self.process_index, self.process_count)
        hb._data = self.data
        return hb(epoch * self.steps_per_epoch + step)

    def start(self) -> None:
        """Start the workers now (they spawn, import and build the first batches while the caller goes on);
        `next()` does it otherwise. A later `restore` to another position restarts them."""
        if self._it is None:
            self._start()

    def _start(self):
        import grain

        _ensure_absl_flags()
        t0 = self._epoch * self.steps_per_epoch + self._step
        fn = self._host_batch(True, self.process_index, self.process_count)
        ds = grain.MapDataset.range(t0, t0 + HORIZON).map(fn)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if self.prefetch else 0,
                                                  prefetch_buffer_size=max(self.prefetch, 1)))
        if self.worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                             per_worker_buffer_size=max(self.prefetch, 1)),
                                worker_init_fn=_InitWithParent(os.getpid()))
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._start()
        batch = _plain(next(self._it))
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch

    def close(self) -> None:
        """Stop the workers (the next `next()` starts them again at the current position)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
