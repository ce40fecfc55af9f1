"""Batches of training pairs for contrastive training: deterministic, resumable, sharded over hosts.

Epoch e visits the pairs in the order `np.random.default_rng([seed, e]).permutation(n)`; global batch s of
the epoch is positions [s*B, (s+1)*B) of that order, and host p of P receives rows [p*B/P, (p+1)*B/P) of it
(its contiguous slice, matching a batch sharded over the data axis in host order). Every batch is a pure
function of (seed, epoch, step), so the position {"epoch", "step"} is the whole state: a restored run sees
exactly the batches it would have seen, on any number of hosts that divides the global batch.

Each item is {"query", "instruction", "task", "positive": {"title","text"}, "negatives": [{"title","text"}] *
num_negatives, "index": pair index}. Hard negatives beyond `num_negatives` are subsampled (or the first ones
taken); pairs with too few are padded with the positives of random other pairs (`short="pad"`), or left
out of the data set altogether (`short="drop"`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from bmretriever_jax.data.packing import balance_order
from bmretriever_jax.data.pairs import Pair, as_passage, doc_keys


def check_loader_args(global_batch_size: int, num_negatives: int, negatives: str, short: str, process_index: int,
                      process_count: int) -> None:
    """The arguments every pair loader (this one, `grain_loader.GrainPairLoader`) takes, checked alike."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    if negatives not in ("random", "first") or short not in ("pad", "drop"):
        raise ValueError(f"negatives must be 'random'|'first' and short 'pad'|'drop', got {negatives!r}, {short!r}")


def item_chars(item: dict) -> int:
    """What an item weighs when global batches are balanced over devices (packed training), without a
    tokenizer: the characters of its query, positive and negatives. Both loaders weigh alike."""
    docs = [item["positive"]] + list(item["negatives"])
    return len(item["query"] or "") + sum(len(d.get("title") or "") + len(d.get("text") or "") for d in docs)


class PairLoader:
    """Infinite iterator over per-host batches of training pairs (see the module docstring).

    pairs: the training pairs; global_batch_size: B, pairs per step over all hosts.
    num_negatives: hard negatives per item (group size G = 1 + num_negatives); 0 = in-batch negatives only.
    negatives: "random" (a seeded sample of the pair's negatives, new each epoch) or "first" (the best-ranked).
    short: "pad" or "drop" for pairs with fewer than num_negatives negatives.
    process_index / process_count: this host and the number of hosts (B must divide evenly).
    drop_last: True drops the incomplete last batch of each epoch; False completes it with the first pairs of
      the same epoch's order, so every pair is seen every epoch and every batch has B rows (fixed shapes).
    tokenize_fn: applied to each host batch (list of items) -> dict of arrays; the iterator then yields that.
    balance_shards: > 1 orders each global batch with `packing.balance_order` over that many blocks (packed
      training: every device's block then holds about the same tokens; weights: `item_chars`). The batch
      holds the same pairs, in another order.
    """

    def __init__(self, pairs: Sequence[Pair], global_batch_size: int, *, seed: int, num_negatives: int = 1,
                 negatives: str = "random", short: str = "pad", process_index: int = 0, process_count: int = 1,
                 drop_last: bool = True, tokenize_fn: Callable[[list[dict]], dict[str, Any]] | None = None,
                 balance_shards: int = 0):
        check_loader_args(global_batch_size, num_negatives, negatives, short, process_index, process_count)
        self.pairs = list(pairs)
        self.dropped = 0
        if short == "drop":
            kept = [p for p in self.pairs if len(p.negatives) >= num_negatives]
            self.dropped = len(self.pairs) - len(kept)
            self.pairs = kept
        n = len(self.pairs)
        if n < global_batch_size and drop_last:
            raise ValueError(f"{n} pairs cannot fill one batch of {global_batch_size} with drop_last=True")
        if n == 0:
            raise ValueError("no pairs to load")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = seed
        self.num_negatives = num_negatives
        self.negatives = negatives
        self.short = short
        self.process_index = process_index
        self.process_count = process_count
        self.drop_last = drop_last
        self.tokenize_fn = tokenize_fn
        self.balance_shards = balance_shards
        self.steps_per_epoch = n // global_batch_size if drop_last else -(-n // global_batch_size)
        self._positive_keys = [doc_keys(p.positive)[0] for p in self.pairs]
        self._query_positives: dict[str, set[str]] = {}  # query text -> keys of all its positives
        for p, key in zip(self.pairs, self._positive_keys):
            self._query_positives.setdefault(p.query, set()).add(key)
        self._epoch = 0
        self._step = 0

    # ------------------------------------------------------------------------------------------------ position
    def state(self) -> dict[str, int]:
        """The position of the next batch: {"epoch", "step"} (step within the epoch)."""
        return {"epoch": self._epoch, "step": self._step}

    def restore(self, state: dict[str, int]) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"state {state} outside epoch >= 0, step in [0, {self.steps_per_epoch})")
        self._epoch, self._step = epoch, step

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_at(self._epoch, self._step)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch

    # ------------------------------------------------------------------------------------------------ batches
    def order(self, epoch: int) -> np.ndarray:
        """[num_pairs] int: the visiting order of an epoch."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """[global_batch_size] int: pair indices of a global batch (all hosts)."""
        order = self.order(epoch)
        start = step * self.global_batch_size
        positions = np.arange(start, start + self.global_batch_size) % len(order)  # wraps only if not drop_last
        idx = order[positions]
        if self.balance_shards > 1:  # weights: the characters of each item (its negatives as chosen)
            idx = idx[balance_order([item_chars(self._item(int(i), epoch)) for i in idx], self.balance_shards)]
        return idx

    def batch_at(self, epoch: int, step: int):
        """This host's batch (its slice of the global batch), tokenized if a tokenize_fn was given."""
        idx = self.global_indices(epoch, step)
        lo = self.process_index * self.local_batch_size
        items = [self._item(int(i), epoch) for i in idx[lo:lo + self.local_batch_size]]
        return self.tokenize_fn(items) if self.tokenize_fn is not None else items

    def _item(self, i: int, epoch: int) -> dict:
        pair = self.pairs[i]
        # One generator per (seed, epoch, pair): a pair's negatives do not depend on which host or batch
        # position it lands in, so 1-host and N-host runs see the same items.
        rng = np.random.default_rng([self.seed, epoch, i, 1])
        negs = list(pair.negatives)
        k = self.num_negatives
        if len(negs) > k:
            negs = [negs[j] for j in np.sort(rng.choice(len(negs), k, replace=False))] \
                if self.negatives == "random" else negs[:k]
        while len(negs) < k:
            negs.append(self.pairs[self._random_other(i, rng)].positive)
        return {"query": pair.query, "instruction": pair.instruction, "task": pair.task,
                "positive": as_passage(pair.positive), "negatives": [as_passage(d) for d in negs], "index": i}

    def _random_other(self, i: int, rng: np.random.Generator) -> int:
        """A pair whose positive is none of the positives of pair i's query (that would be a false negative)."""
        n = len(self.pairs)
        taken = self._query_positives[self.pairs[i].query]
        for _ in range(64):
            j = int(rng.integers(n))
            if self._positive_keys[j] not in taken:
                return j
        others = [j for j in range(n) if self._positive_keys[j] not in taken]
        if not others:
            raise ValueError(f"cannot pad the negatives of pair {i}: no other pair has a different positive")
        return others[int(rng.integers(len(others)))]
