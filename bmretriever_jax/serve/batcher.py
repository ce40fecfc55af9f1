"""One queue, one device thread: requests' texts -> batches in precompiled (rows, length) buckets -> vectors.

A backend turns texts into token ids (`tokenize`, called off the event loop by the HTTP handlers) and runs a batch
(`prepare` lays it out on the host, `launch` dispatches it, `finish` waits for the result). `JaxBackend` wraps an
`Encoder`: every (rows, length) shape it will ever run is compiled by `warmup()` before the server reports ready,
and a batch is packed (several texts a row, segment ids) or padded (one a row) into one of those shapes, so no XLA
compile happens on the request path. `SentenceTransformerBackend` runs an exported
sentence-transformers folder (the load test's anchor behind the same HTTP layer).

`Batcher` owns one thread. Handlers `submit` jobs (one per text, each with an asyncio future); a full queue raises
`QueueFull`, a closing one `Draining`. The thread waits for the oldest job, gathers until the largest batch of its
bucket is full or `max_wait_ms` passed (only while the device is idle: while a batch runs, the next is formed and
padded at once and launched when the device is free, so host work overlaps device work, and one program at a
time has all the cores), skips jobs whose future is done
(client gone, deadline passed), and hands results back with `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("bmr.serve")

DEFAULT_SEQ_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclasses.dataclass(eq=False)
class Job:
    ids: List[int]
    text: str
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = 0.0


@dataclasses.dataclass
class Result:
    vector: np.ndarray  # [dim] float32, as the model pools it (normalised or not: `Backend.normalized`)
    queue_s: float
    inference_s: float


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------
class JaxBackend:
    """An `Encoder` with every batch shape compiled ahead: `shapes()` lists them, `warmup()` compiles and runs each
    once. Vectors come out pooled but not normalised (the handler normalises per request, in float32 numpy: the
    same unit vectors as `Encoder.encode_*`, and TEI's `normalize: false` is possible)."""

    kind = "jax"
    normalized = False

    def __init__(self, encoder, *, seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, max_batch_tokens: int = 16384,
                 pack: bool = True, max_segments: int = 16):
        import jax

        from bmretriever_jax.embed import embed_batch

        self.encoder = enc = encoder
        # pack: a batch's texts are placed several to a row (segment ids; attention, positions and pooling per
        # text, as in packed training) in whichever compiled (rows, length) shape computes the fewest tokens, so
        # short texts fill rows instead of padding them; the vectors equal the padded path's (tests/test_serve.py)
        self.pack, self.max_segments = bool(pack), int(max_segments)
        self.max_length, self.dim, self.tokenizer = enc.max_length, enc.dim, enc.tokenizer
        self.normalize_default = enc.normalize
        self.seq_buckets = sorted({b for b in seq_buckets if 0 < b < enc.max_length} | {enc.max_length})
        sizes = sorted(set(int(b) for b in batch_sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch sizes {batch_sizes}: need positive integers")
        self.rows = {T: ([r for r in sizes if r * T <= max_batch_tokens] or sizes[:1]) for T in self.seq_buckets}
        self.max_rows_any = max(max(r) for r in self.rows.values())
        self._jit = jax.jit(functools.partial(embed_batch, enc.cfg, pooling=enc.pooling, normalize=False,
                                              dtype=enc.dtype, bidirectional=enc.bidirectional,
                                              **({"max_segments": self.max_segments} if self.pack else {})))
        self._compiled: Dict[Tuple[int, int], Callable] = {}
        self.shapes_used: collections.Counter = collections.Counter()  # (rows, length) -> batches run

    def shapes(self) -> List[Tuple[int, int]]:
        return [(r, T) for T in self.seq_buckets for r in self.rows[T]]

    def warmup(self, progress: Optional[Callable[[int, int, Tuple[int, int]], None]] = None) -> None:
        import jax
        import jax.numpy as jnp

        from bmretriever_jax.embed import pad_left

        shapes = self.shapes()
        for i, (r, T) in enumerate(shapes):
            spec = jax.ShapeDtypeStruct((r, T), jnp.int32)
            fn = self._jit.lower(self.encoder.params, spec, spec).compile()
            ids, mask = pad_left([[self.encoder.pad_id]], T, self.encoder.pad_id, rows=r)
            if self.pack:  # the mask holds segment ids: one text, segment 1
                mask = (mask > 0).astype(np.int32)
            np.asarray(fn(self.encoder.params, ids, mask))  # run once: nothing is left to do on the first request
            self._compiled[(r, T)] = fn
            if progress:
                progress(i + 1, len(shapes), (r, T))

    def tokenize(self, texts: Sequence[str]) -> List[List[int]]:
        from bmretriever_jax.embed import tokenize

        return tokenize(self.tokenizer, texts, self.max_length)

    def untruncated_lengths(self, texts: Sequence[str]) -> List[int]:
        """Token counts with the EOS, capped at max_length + 1 (enough to tell which texts are too long)."""
        from bmretriever_jax.embed import tokenize

        return [len(s) for s in tokenize(self.tokenizer, texts, self.max_length + 1)]

    def bucket(self, n_tokens: int) -> int:
        """The batcher groups jobs by bucket: packed, every length goes together (`prepare` picks the shape)."""
        if self.pack:
            return self.seq_buckets[-1]
        return self._fit(n_tokens)

    def _fit(self, n_tokens: int) -> int:
        for T in self.seq_buckets:
            if n_tokens <= T:
                return T
        return self.seq_buckets[-1]

    def max_rows(self, T: int) -> int:
        """Texts per batch: the largest compiled row count (packed: 4 texts a row, e.g. short queries)."""
        return self.max_rows_any * 4 if self.pack else self.rows[T][-1]

    def token_budget(self) -> Optional[int]:
        """Packed: the real tokens one batch may hold, the largest compiled shape's (rows x length), so a batch
        of long texts is not a queue of chunks that every text in it waits for. Padded: None (rows bound it)."""
        return max(r * T for r, T in self.shapes()) if self.pack else None

    def plan(self, n: int, T: int) -> List[Tuple[int, int]]:
        """n texts of bucket T -> [(compiled rows, texts)]: one padded batch, unless padding would cost more than
        half the real rows; then the largest compiled size that fits, and the rest the same way (n=2 with sizes
        1,4,8 runs 1+1, not 2 padded to 4; n=5 runs 4+1)."""
        rows, out = self.rows[T], []
        while n > 0:
            up = next((r for r in rows if r >= n), rows[-1])
            if up <= 1.5 * n or up == rows[0]:
                take = min(up, n)
                out.append((up, take))
            else:
                take = max(r for r in rows if r <= n)
                out.append((take, take))
            n -= take
        return out

    def _packed_chunks(self, seqs: Sequence[Sequence[int]]):
        """Texts -> chunks ((rows, T), ids, segment ids, (texts, their slots)): the compiled length T whose rows hold them
        in the fewest computed tokens (first-fit decreasing, `data.packing`), split as `plan` splits rows."""
        from bmretriever_jax.data.packing import place, write_rows

        lengths = [len(t) for t in seqs]
        best = None
        for T in self.seq_buckets:
            if T < max(lengths):
                continue
            row, sid, n_rows = place(lengths, T, self.max_segments)
            cost = sum(r for r, _ in self.plan(n_rows, T)) * T
            if best is None or cost < best[0]:
                best = (cost, T, row, sid, n_rows)
        _, T, row, sid, n_rows = best
        chunks, first = [], 0
        for rows, take in self.plan(n_rows, T):
            members = [i for i in range(len(seqs)) if first <= row[i] < first + take]
            ids, seg, slots = write_rows([seqs[i] for i in members], [row[i] - first for i in members],
                                         [sid[i] for i in members], rows=rows, length=T,
                                         pad_id=self.encoder.pad_id, max_segments=self.max_segments)
            chunks.append(((rows, T), ids, seg, (np.asarray(members, np.int64), slots.astype(np.int64))))
            first += take
        return chunks

    def prepare(self, jobs: Sequence[Job]):
        """Host side of a batch: pad each chunk of `plan` to its compiled shape (while the previous batch runs)."""
        from bmretriever_jax.embed import pad_left

        if self.pack:
            chunks = self._packed_chunks([j.ids for j in jobs])
            return chunks, sum(rows * T for (rows, T), *_ in chunks)
        T = self.bucket(max(len(j.ids) for j in jobs))
        chunks, i = [], 0
        for rows, take in self.plan(len(jobs), T):
            ids, mask = pad_left([j.ids for j in jobs[i:i + take]], T, self.encoder.pad_id, rows=rows)
            chunks.append(((rows, T), ids, mask, take))
            i += take
        return chunks, sum(rows * T for (rows, T), *_ in chunks)

    def launch(self, prepared):
        """Run the chunks one after the other (one program at a time has all the cores); the last one is left
        running (dispatched), so the batcher forms the next batch meanwhile."""
        chunks, _ = prepared
        handles = []
        for shape, ids, mask, take in chunks:  # packed: mask = segment ids, take = (texts, their slots)
            if handles:
                handles[-1][0].block_until_ready()
            self.shapes_used[shape] += 1
            handles.append((self._compiled[shape](self.encoder.params, ids, mask), take))
        return handles

    def finish(self, handles, n: int) -> np.ndarray:
        # host copies + numpy slices: no jax op, so no compile
        if self.pack:  # slot vectors [rows, K, D] -> each text's vector, in job order
            out = np.zeros((n, self.dim), np.float32)
            for h, (members, slots) in handles:
                out[members] = np.asarray(h, np.float32).reshape(-1, self.dim)[slots]
            return out
        return np.concatenate([np.asarray(h, np.float32)[:take] for h, take in handles])[:n]


class SentenceTransformerBackend:
    """A sentence-transformers folder (e.g. `bmr export --format sentence-transformers`) behind the same queue and
    HTTP layer: `model.encode` on each batch (its own tokenisation and dynamic padding; no static shapes)."""

    kind = "sentence-transformers"
    normalized = True  # the exported folder ends in a Normalize module

    def __init__(self, path: str, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, max_batch_tokens: int = 16384):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.max_length = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.tokenizer = self.model.tokenizer
        self.normalize_default = True
        self.seq_buckets = [self.max_length]
        self.rows = {self.max_length: [max(r for r in batch_sizes if r * self.max_length <= max_batch_tokens)
                                       if any(r * self.max_length <= max_batch_tokens for r in batch_sizes)
                                       else min(batch_sizes)]}
        self.max_rows_any = self.rows[self.max_length][0]
        self.encoder = None

    def shapes(self):
        return []

    def warmup(self, progress=None) -> None:
        self.model.encode(["warm up"], batch_size=1)

    def tokenize(self, texts):
        return self.model.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                    add_special_tokens=True)["input_ids"]

    def untruncated_lengths(self, texts):
        return [len(s) for s in self.model.tokenizer(list(texts), truncation=True, max_length=self.max_length + 1,
                                                     add_special_tokens=True)["input_ids"]]

    def bucket(self, n_tokens):
        return self.max_length

    def max_rows(self, T):
        return self.max_rows_any

    def prepare(self, jobs):
        return [j.text for j in jobs], sum(len(j.ids) for j in jobs)

    def launch(self, prepared):
        return self.model.encode(prepared[0], batch_size=len(prepared[0]), convert_to_numpy=True)

    def finish(self, handle, n):
        return np.asarray(handle, np.float32)[:n]


# ----------------------------------------------------------------------------------------------------
# The batcher
# ----------------------------------------------------------------------------------------------------
def _resolve(items) -> None:
    """On the event loop: complete each future still waiting (a cancelled one is left alone)."""
    for fut, value, is_error in items:
        if fut.done():
            continue
        if is_error:
            fut.set_exception(value)
        else:
            fut.set_result(value)


class Batcher:
    def __init__(self, backends: Dict[str, object], *, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 metrics=None):
        self.backends = backends
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._queues: Dict[str, collections.deque] = {name: collections.deque() for name in backends}
        self._queued = 0
        self._closing = False
        self._stopped = False
        self.batches = 0
        self.batch_sizes: collections.Counter = collections.Counter()
        self.dropped = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self._thread = threading.Thread(target=self._run, name="bmr-batcher", daemon=True)

    # ---- handler side (event loop thread) ------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._thread.start()

    def submit(self, model: str, jobs: Sequence[Job]) -> None:
        now = time.perf_counter()
        with self._cv:
            if self._closing:
                raise Draining()
            if self._queued + len(jobs) > self.max_queue:
                raise QueueFull()
            for j in jobs:
                j.enqueued = now
            self._queues[model].extend(jobs)
            self._queued += len(jobs)
            self._gauge()
            self._cv.notify()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Refuse new jobs, finish the queued ones, stop the thread. -> True when the thread ended in time."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- device thread ---------------------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_size.set(self._queued)

    def _drop_done_heads(self) -> None:
        for q in self._queues.values():
            while q and q[0].future.done():
                q.popleft()
                self._queued -= 1
                self.dropped += 1
                if self.metrics is not None:
                    self.metrics.dropped.inc()

    def _take(self, block: bool):
        """-> (model, jobs), or None (nothing now when not blocking; closed and empty when blocking)."""
        with self._cv:
            while True:
                self._drop_done_heads()
                heads = [(q[0].enqueued, name) for name, q in self._queues.items() if q]
                if heads:
                    _, name = min(heads)
                    q, backend = self._queues[name], self.backends[name]
                    head = q[0]
                    T0 = backend.bucket(len(head.ids))
                    limit = backend.max_rows(T0)
                    wait = head.enqueued + self.max_wait - time.perf_counter()
                    if block and not self._closing and wait > 0 and len(q) < limit:
                        self._cv.wait(wait)
                        continue
                    return name, self._form(q, backend, T0, limit)
                self._gauge()
                if self._closing or not block:
                    return None
                self._cv.wait()

    def _form(self, q: collections.deque, backend, T0: int, limit: int) -> List[Job]:
        """The oldest job, then (in arrival order, within a window) others that fit its length bucket (and the
        backend's token budget, if it has one)."""
        chosen, keep = [], collections.deque()
        budget = getattr(backend, "token_budget", lambda: None)()
        tokens = 0
        window = 4 * limit
        while q and window > 0:
            job = q.popleft()
            window -= 1
            if job.future.done():
                self._queued -= 1
                self.dropped += 1
                if self.metrics is not None:
                    self.metrics.dropped.inc()
                continue
            if len(chosen) < limit and backend.bucket(len(job.ids)) <= T0 and \
                    (budget is None or not chosen or tokens + len(job.ids) <= budget):
                chosen.append(job)
                tokens += len(job.ids)
                self._queued -= 1
            else:
                keep.append(job)
        keep.extend(q)
        q.clear()
        q.extend(keep)
        self._gauge()
        return chosen

    def _run(self) -> None:
        """Form and pad batch k+1 while batch k runs; launch k+1 once k is done (one program at a time)."""
        inflight = None
        while True:
            try:
                taken = self._take(block=inflight is None)
                prepared = None
                if taken is not None and taken[1]:
                    name, jobs = taken
                    try:
                        prepared = (name, jobs, self.backends[name].prepare(jobs))
                    except Exception as e:  # noqa: BLE001 - a failing batch fails its requests, not the server
                        self._fail(jobs, e)
                if inflight is not None:
                    self._complete(*inflight)
                    inflight = None
                if prepared is not None:
                    name, jobs, (arrays, padded) = prepared
                    t0 = time.perf_counter()
                    try:
                        inflight = (name, jobs, self.backends[name].launch((arrays, padded)), padded, t0)
                    except Exception as e:  # noqa: BLE001
                        self._fail(jobs, e)
                if taken is None and inflight is None and self._closing:
                    with self._cv:
                        if not any(self._queues.values()):
                            break
            except Exception as e:  # noqa: BLE001 - keep the device thread alive whatever happens
                log.error("batcher: %s: %s", type(e).__name__, (str(e).splitlines() or [""])[0])
                inflight = None
        self._stopped = True

    def _complete(self, name, jobs, handle, padded, t0) -> None:
        try:
            vecs = self.backends[name].finish(handle, len(jobs))
        except Exception as e:  # noqa: BLE001
            self._fail(jobs, e)
            return
        t1 = time.perf_counter()
        real = sum(len(j.ids) for j in jobs)
        self.batches += 1
        self.batch_sizes[len(jobs)] += 1
        self.real_tokens += real
        self.padded_tokens += padded
        m = self.metrics
        if m is not None:
            m.inference_duration.observe(t1 - t0)
            m.batch_size.observe(len(jobs))
            m.batch_tokens.observe(padded)
            m.embeds.labels(name).inc(len(jobs))
            m.tokens.labels(name).inc(real)
            m.padded_tokens.labels(name).inc(padded)
        by_loop = collections.defaultdict(list)
        for j, v in zip(jobs, vecs):
            by_loop[j.loop].append((j.future, Result(v, t0 - j.enqueued, t1 - t0), False))
        self._post(by_loop)

    def _fail(self, jobs, e: Exception) -> None:
        log.error("batch of %d failed: %s: %s", len(jobs), type(e).__name__, (str(e).splitlines() or [""])[0])
        by_loop = collections.defaultdict(list)
        for j in jobs:
            by_loop[j.loop].append((j.future, e, True))
        self._post(by_loop)

    @staticmethod
    def _post(by_loop) -> None:
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                pass
