"""`bmr serve`: an embedding server (OpenAI /v1/embeddings + text-embeddings-inference /embed) for every family."""
from __future__ import annotations

from bmretriever_jax.util.errors import UserError

MODEL_HELP = ("a model name (gemma3-270m, smollm2-135m), .gguf, transformers folder, run or `bmr export` folder, as "
              "`bmr encode --model` takes; NAME=PATH serves it as NAME (default: the folder's base name)")


def _ints(text: str, what: str):
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what}={text!r}: comma-separated integers expected")
    if not vals or min(vals) < 1:
        raise UserError(f"{what}={text!r}: positive integers expected")
    return vals


def cmd_serve(a):
    import logging
    import os

    if a.port < 0 or a.port > 65535:
        raise UserError(f"--port {a.port}: 0..65535")
    for flag in ("max_queue", "max_inputs", "max_input_chars", "max_batch_tokens"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    seq = _ints(a.seq_buckets, "--seq-buckets") if a.seq_buckets else None
    rows = _ints(a.batch_sizes, "--batch-sizes")
    api_key = a.api_key or os.environ.get("BMR_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", a.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from bmretriever_jax.serve.app import ServerState, ServeSettings, load_models, run

    models = load_models(a.models, max_length=a.max_length, dtype=a.dtype, instruction=a.instruction,
                         seq_buckets=seq, batch_sizes=rows, max_batch_tokens=a.max_batch_tokens, pack=a.pack,
                         backend=a.backend, quiet=a.quiet)
    settings = ServeSettings(max_inputs=a.max_inputs, max_input_chars=a.max_input_chars, max_queue=a.max_queue,
                             max_wait_ms=a.max_wait_ms, request_timeout=a.request_timeout, api_key=api_key,
                             drain_timeout=a.timeout_graceful_shutdown or 60.0)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger("bmr.serve").warning("listening on %s without --api-key: anyone who reaches it can use it",
                                               a.host)
    return run(ServerState(models, settings), a.host, a.port, timeout_graceful_shutdown=a.timeout_graceful_shutdown,
               access_log=a.access_log)


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="an embedding server: OpenAI /v1/embeddings and TEI /embed, batched, over HTTP")
    s.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set BMR_API_KEY)")
    s.add_argument("--instruction", default=None, help="default query instruction: task name (scifact, nfcorpus, "
                   "...) or text (default: the model's bmretriever.json, else the general QA one)")
    s.add_argument("--max-length", type=int, default=None, help="tokens per text, EOS included (longer ones are "
                   "truncated; default: the model's, else 512)")
    s.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="matmul inputs (f32 accumulation); auto: bfloat16 where the hardware has bf16 units")
    s.add_argument("--seq-buckets", default=None, help="padded lengths compiled at start-up, comma-separated "
                   "(default 32,64,128,... up to --max-length)")
    s.add_argument("--batch-sizes", default="1,4,8,16,32", help="padded batch rows compiled at start-up, per length "
                   "(default 1,4,8,16,32; a shape over --max-batch-tokens is skipped)")
    s.add_argument("--max-batch-tokens", type=int, default=16384, help="rows x padded length of one batch, at most")
    s.add_argument("--no-pack", dest="pack", action="store_false", help="one text per row (padded), instead of "
                   "packing a batch's texts several to a row in the compiled shape that computes the fewest tokens")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long an idle batcher gathers texts")
    s.add_argument("--max-queue", type=int, default=1024, help="texts waiting; more -> 429 with Retry-After")
    s.add_argument("--max-inputs", type=int, default=512, help="texts per request; more -> 413")
    s.add_argument("--max-input-chars", type=int, default=100_000, help="characters per text; more -> 413")
    s.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may wait (503 after)")
    s.add_argument("--timeout-graceful-shutdown", type=int, default=None, help="on SIGTERM, seconds to let requests "
                   "in flight finish before cancelling them (default: wait for all)")
    s.add_argument("--compile-cache", default=None, help="folder of jax's persistent compilation cache (faster "
                   "restarts)")
    s.add_argument("--backend", choices=["jax", "sentence-transformers"], default="jax",
                   help="sentence-transformers: serve an exported sentence-transformers folder with torch (the load "
                   "test's anchor)")
    s.add_argument("--access-log", action="store_true", help="one uvicorn log line per request")
    s.set_defaults(fn=cmd_serve)
