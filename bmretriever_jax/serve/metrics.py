"""Prometheus metrics of `bmr serve` (TEI's names with a `bmr_` prefix) and the XLA compile counter.

Each server owns its registry (no process-global state: tests start several servers in one process). The compile
counter listens to jax's `/jax/core/compile/backend_compile_duration` event, which fires for every XLA compile
(or persistent-cache fetch) in the process; the server records the count when warm-up ends, so
`bmr_request_path_compiles_total` is the number of compiles that happened while serving (it must stay 0).
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# durations: geometric x1.5 from 100 us (TEI: from 15 us, 35 buckets); lengths and batch sizes: powers of two
DURATION_BUCKETS = tuple(round(1e-4 * 1.5 ** i, 6) for i in range(30))
LENGTH_BUCKETS = tuple(2 ** i for i in range(14))
BATCH_BUCKETS = tuple(2 ** i for i in range(11))


class CompileCounter:
    """Counts XLA compiles in this process from the moment it is installed (thread-safe)."""

    _lock = threading.Lock()
    _count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            import jax.monitoring

            def on_duration(event, duration, **kwargs):
                if event == BACKEND_COMPILE_EVENT:
                    with cls._lock:
                        cls._count += 1

            jax.monitoring.register_event_duration_secs_listener(on_duration)
            cls._installed = True

    @classmethod
    def count(cls) -> int:
        with cls._lock:
            return cls._count


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bmr_request_count", "requests received", ["method", "route"], registry=r)
        self.success = Counter("bmr_request_success", "requests answered 200", ["route"], registry=r)
        self.failure = Counter("bmr_request_failure", "requests answered with an error, by reason",
                               ["err"], registry=r)
        self.embeds = Counter("bmr_embed_count", "texts embedded", ["model"], registry=r)
        self.tokens = Counter("bmr_embed_tokens", "real (unpadded) tokens embedded", ["model"], registry=r)
        self.padded_tokens = Counter("bmr_batch_padded_tokens", "padded tokens run (rows x bucket length)",
                                     ["model"], registry=r)
        self.dropped = Counter("bmr_embed_dropped", "texts dropped before running (client gone or timed out)",
                               registry=r)
        self.duration = Histogram("bmr_request_duration", "request latency, seconds (receipt to response)",
                                  ["route"], buckets=DURATION_BUCKETS, registry=r)
        self.queue_duration = Histogram("bmr_request_queue_duration", "seconds a request's texts waited for a batch",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.inference_duration = Histogram("bmr_batch_inference_duration", "seconds per batch on the device",
                                            buckets=DURATION_BUCKETS, registry=r)
        self.tokenization_duration = Histogram("bmr_request_tokenization_duration", "seconds to tokenise a request",
                                               buckets=DURATION_BUCKETS, registry=r)
        self.input_length = Histogram("bmr_request_input_length", "tokens per text", buckets=LENGTH_BUCKETS,
                                      registry=r)
        self.batch_size = Histogram("bmr_batch_next_size", "texts per batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("bmr_batch_next_tokens", "padded tokens per batch", buckets=LENGTH_BUCKETS,
                                      registry=r)
        self.queue_size = Gauge("bmr_queue_size", "texts waiting in the queue", registry=r)
        self.ready = Gauge("bmr_ready", "1 once every bucket shape is compiled and the server takes requests",
                           registry=r)
        self.compiles = Gauge("bmr_compiles_total", "XLA compiles in this process", registry=r)
        self.request_path_compiles = Gauge("bmr_request_path_compiles_total",
                                           "XLA compiles after warm-up (on the request path; must stay 0)",
                                           registry=r)
        self.compiles_at_ready = None

    def refresh_compiles(self) -> int:
        n = CompileCounter.count()
        self.compiles.set(n)
        after = 0 if self.compiles_at_ready is None else n - self.compiles_at_ready
        self.request_path_compiles.set(after)
        return after

    def render(self) -> bytes:
        self.refresh_compiles()
        return generate_latest(self.registry)
