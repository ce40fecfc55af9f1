"""The HTTP layer of `bmr serve`: FastAPI on uvicorn, OpenAI- and TEI-compatible routes over one `Batcher`.

Routes
  POST /v1/embeddings   OpenAI: input (string | list of strings), model, encoding_format float | base64,
                        dimensions (truncate + renormalise), user; plus input_type query | document | raw (Cohere /
                        Voyage spelling; search_query / search_document / passage accepted) and instruction (a task
                        name or the text; default: the model's)
  POST /embed           text-embeddings-inference: inputs, normalize, truncate, truncation_direction, prompt_name
                        (query | document | passage | raw | a task name), dimensions; bare 2-D JSON array out
  GET  /health          200 {"status": "ok"} once every model is compiled, else 503 (loading / draining)
  GET  /metrics         Prometheus text (metrics.py)
  GET  /info, /v1/models
Errors are one line each, in the route's own shape (OpenAI: {"error": {message, type, param, code}}, TEI: {"error",
"error_type"}), and logged in one line: 400 bad JSON / bad value, 401 API key, 404 unknown model, 413 too many inputs
or characters, 422 schema (and TEI truncate=false on a too-long text), 429 queue full and 503 loading / draining /
deadline passed (both with Retry-After), 500 a failed batch (the server keeps running).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from bmretriever_jax.serve.batcher import Batcher, Draining, Job, QueueFull
from bmretriever_jax.serve.metrics import CompileCounter, Metrics

log = logging.getLogger("bmr.serve")

QUERY_TYPES = ("query", "search_query")
DOCUMENT_TYPES = ("document", "passage", "search_document")
RAW_TYPES = ("raw", "none")
INPUT_TYPES = QUERY_TYPES + DOCUMENT_TYPES + RAW_TYPES
TOKEN_ID_HINT = ("`input` holds token ids; this server embeds text (its own tokenizer). LangChain's OpenAIEmbeddings "
                 "sends token ids unless check_embedding_ctx_length=False")


@dataclasses.dataclass
class ServeSettings:
    max_inputs: int = 512            # texts per request (413 above)
    max_input_chars: int = 100_000   # characters per text (413 above)
    max_body_bytes: int = 8_000_000  # request body (413 above)
    max_queue: int = 1024            # texts waiting (429 above)
    max_wait_ms: float = 5.0         # how long a batch gathers while the device is idle
    request_timeout: float = 120.0   # seconds a request may wait for its vectors (503 after, work dropped)
    api_key: Optional[str] = None
    drain_timeout: float = 60.0      # seconds the lifespan shutdown waits for the queue to empty
    retry_after: int = 1             # seconds, on 429
    loading_retry_after: int = 5     # seconds, on 503 while warming up


@dataclasses.dataclass
class ServedModel:
    name: str
    backend: Any
    instruction: str                   # the default query instruction (text)
    instructions: Dict[str, str]       # task name -> instruction
    source: str = ""

    def resolve_instruction(self, value: Optional[str]) -> str:
        if value is None:
            return self.instruction
        return self.instructions.get(value.lower(), value)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: Union[str, List[Any]]
    model: Optional[str] = None
    encoding_format: Optional[str] = None
    dimensions: Optional[int] = None
    input_type: Optional[str] = None
    instruction: Optional[str] = None
    user: Optional[str] = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    inputs: Union[str, List[Any]]
    normalize: bool = True
    truncate: Optional[bool] = None
    truncation_direction: Optional[str] = None
    prompt_name: Optional[str] = None
    dimensions: Optional[int] = None
    model: Optional[str] = None
    input_type: Optional[str] = None
    instruction: Optional[str] = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None, reason: str = "validation"):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers, self.reason = headers or {}, reason


class ClientGone(Exception):
    pass


def _one_line(s: str, limit: int = 300) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _validation_message(e) -> str:
    """pydantic ValidationError -> 'field: message; ...' on one line."""
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(e.errors()) - 3
    return _one_line("; ".join(parts) + (f" (+{more} more)" if more > 0 else ""))


class ServerState:
    """Models, batcher, metrics and readiness of one server (the app's lifespan starts and stops it)."""

    def __init__(self, models: Sequence[ServedModel], settings: Optional[ServeSettings] = None):
        if not models:
            raise ValueError("no models to serve")
        self.settings = settings or ServeSettings()
        self.models: Dict[str, ServedModel] = {}
        for m in models:
            if m.name in self.models:
                raise ValueError(f"two models named {m.name!r}: name them NAME=PATH")
            self.models[m.name] = m
        self.default_model = models[0].name
        self.metrics = Metrics()
        CompileCounter.install()
        self.batcher = Batcher({m.name: m.backend for m in models}, max_wait_ms=self.settings.max_wait_ms,
                               max_queue=self.settings.max_queue, metrics=self.metrics)
        self.ready = False
        self.draining = False
        self.warmup_error: Optional[str] = None
        self.warmup_seconds: Optional[float] = None
        self._warm_thread: Optional[threading.Thread] = None

    # ---- lifecycle --------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Compile (and run once) every bucket shape of every model; then ready. Runs in a thread."""
        t0 = time.perf_counter()
        try:
            for m in self.models.values():
                n = len(m.backend.shapes())
                log.info("warming up %s: %d bucket shapes", m.name, n)

                def progress(i, total, shape, name=m.name):
                    log.info("  %s: compiled %d/%d (rows, length)=%s", name, i, total, shape)

                m.backend.warmup(progress)
        except Exception as e:  # noqa: BLE001 - reported by /health and the log; the process stays up
            self.warmup_error = _one_line(f"{type(e).__name__}: {e}")
            log.error("warm-up failed: %s", self.warmup_error)
            return
        self.warmup_seconds = time.perf_counter() - t0
        self.metrics.compiles_at_ready = CompileCounter.count()
        self.metrics.refresh_compiles()
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready in %.1f s (%d XLA compiles so far)", self.warmup_seconds, self.metrics.compiles_at_ready)

    def start(self, background: bool = True) -> None:
        self.batcher.start()
        if background:
            self._warm_thread = threading.Thread(target=self.warmup, name="bmr-warmup", daemon=True)
            self._warm_thread.start()
        else:
            self.warmup()

    def stop(self) -> None:
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        left = self.batcher.queued
        if left:
            log.info("draining: %d texts still queued", left)
        if not self.batcher.close(self.settings.drain_timeout):
            log.error("draining: the batcher did not finish within %.0f s", self.settings.drain_timeout)

    def request_path_compiles(self) -> int:
        return self.metrics.refresh_compiles()

    # ---- request handling ---------------------------------------------------------------------------------
    def model(self, name: Optional[str]) -> ServedModel:
        if name is None or name == "":
            return self.models[self.default_model]
        m = self.models.get(name)
        if m is None:
            raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(self.models)}",
                           param="model", code="model_not_found", reason="model_not_found")
        return m

    def check_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="draining",
                           headers={"Retry-After": str(self.settings.retry_after)}, reason="draining")
        if not self.ready:
            msg = f"warm-up failed: {self.warmup_error}" if self.warmup_error else "the server is warming up"
            raise ApiError(503, msg, type="server_error", code="loading",
                           headers={"Retry-After": str(self.settings.loading_retry_after)}, reason="loading")

    def texts(self, value: Any, field: str) -> List[str]:
        s = self.settings
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ApiError(422, f"`{field}` must be a string or a list of strings", param=field)
        if not value:
            raise ApiError(400, f"`{field}` is an empty list", param=field, reason="empty")
        if any(isinstance(v, (int, list)) and not isinstance(v, bool) for v in value):
            if all(isinstance(v, int) or (isinstance(v, list) and all(isinstance(x, int) for x in v)) for v in value):
                raise ApiError(400, TOKEN_ID_HINT, param=field)
        bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
        if bad is not None:
            raise ApiError(422, f"`{field}[{bad}]` is {type(value[bad]).__name__}, not a string", param=field)
        if len(value) > s.max_inputs:
            raise ApiError(413, f"{len(value)} inputs in one request; at most {s.max_inputs}", param=field,
                           reason="batch_size")
        for i, v in enumerate(value):
            if not v:
                raise ApiError(400, f"`{field}[{i}]` is an empty string", param=field, reason="empty")
            if len(v) > s.max_input_chars:
                raise ApiError(413, f"`{field}[{i}]` has {len(v)} characters; at most {s.max_input_chars}",
                               param=field, reason="too_long")
        return value

    @staticmethod
    def format(m: ServedModel, texts: List[str], input_type: Optional[str], instruction: Optional[str],
               field: str = "input_type") -> List[str]:
        from bmretriever_jax.embed import format_passage, format_query

        t = (input_type or ("query" if instruction is not None else "document")).lower()
        if t in QUERY_TYPES:
            instr = m.resolve_instruction(instruction)
            return [format_query(x, instr) for x in texts]
        if instruction is not None:
            raise ApiError(400, "`instruction` applies to queries: add input_type=query", param="instruction")
        if t in DOCUMENT_TYPES:
            return [format_passage(x) for x in texts]
        if t in RAW_TYPES:
            return list(texts)
        raise ApiError(400, f"{field}={input_type!r}; allowed: {', '.join(INPUT_TYPES)}", param=field)

    async def embed(self, request, m: ServedModel, texts: List[str], *, truncate: bool = True):
        """-> (vectors [n, dim] float32 as pooled, token counts, timings dict)."""
        backend = self.models[m.name].backend
        t0 = time.perf_counter()
        if not truncate:
            lengths = await asyncio.to_thread(backend.untruncated_lengths, texts)
            too_long = [i for i, n in enumerate(lengths) if n > backend.max_length]
            if too_long:
                raise ApiError(422, f"input {too_long[0]} has more than {backend.max_length} tokens and truncate is "
                                    "false", param="inputs", reason="too_long")
        ids = await asyncio.to_thread(backend.tokenize, texts)
        t_tok = time.perf_counter() - t0
        self.metrics.tokenization_duration.observe(t_tok)
        for s in ids:
            self.metrics.input_length.observe(len(s))
        loop = asyncio.get_running_loop()
        jobs = [Job(s, t, loop.create_future(), loop) for s, t in zip(ids, texts)]
        self.check_ready()
        try:
            self.batcher.submit(m.name, jobs)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({self.settings.max_queue} texts); retry later",
                           type="rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(self.settings.retry_after)}, reason="overloaded")
        except Draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="draining",
                           headers={"Retry-After": str(self.settings.retry_after)}, reason="draining")
        results = await self._wait(request, [j.future for j in jobs])
        vecs = np.stack([r.vector for r in results]).astype(np.float32, copy=False)
        timing = {"tokenization": t_tok, "queue": max(r.queue_s for r in results),
                  "inference": max(r.inference_s for r in results)}
        self.metrics.queue_duration.observe(timing["queue"])
        return vecs, [len(s) for s in ids], timing

    async def _wait(self, request, futures):
        gathered = asyncio.gather(*futures)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({gathered, watcher}, timeout=self.settings.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if gathered in done:
                return gathered.result()
            gathered.cancel()  # cancels every future: the batcher skips them
            if watcher in done:
                raise ClientGone()
            raise ApiError(503, f"no result within {self.settings.request_timeout:g} s; the work was dropped",
                           type="server_error", code="timeout",
                           headers={"Retry-After": str(self.settings.retry_after)}, reason="timeout")
        finally:
            if not watcher.done():
                watcher.cancel()
            if not gathered.done():
                gathered.cancel()

    def finish_vectors(self, m: ServedModel, vecs: np.ndarray, *, normalize: Optional[bool],
                       dimensions: Optional[int], param: str = "dimensions") -> np.ndarray:
        backend = m.backend
        if dimensions is not None:
            if dimensions < 1 or dimensions > backend.dim:
                raise ApiError(400, f"dimensions={dimensions}; this model gives 1..{backend.dim}", param=param)
            vecs = vecs[:, :dimensions]
        if normalize is None:
            normalize = backend.normalize_default
        if normalize or (dimensions is not None and backend.normalized):
            n = np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs / np.maximum(n, 1e-12)
        return np.ascontiguousarray(vecs, dtype=np.float32)


async def _disconnected(request) -> None:
    """Returns when the client goes away (uvicorn answers http.disconnect once the connection is lost)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _b64(vec: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode("ascii")


# ----------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------
def create_app(state: ServerState, *, manage_lifecycle: bool = True):
    """A FastAPI app over `state`; its lifespan starts the batcher and warm-up and drains on shutdown."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_lifecycle:
            state.start(background=True)
        yield
        if manage_lifecycle:
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="bmr serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.bmr = state
    m = state.metrics

    def openai_error(e: ApiError) -> JSONResponse:
        body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    def tei_error(e: ApiError) -> JSONResponse:
        etype = {400: "empty", 404: "validation", 413: "validation", 422: "validation", 429: "overloaded",
                 503: "unhealthy", 500: "backend", 401: "validation"}.get(e.status, "backend")
        return JSONResponse({"error": e.message, "error_type": etype}, status_code=e.status, headers=e.headers)

    def authorize(request: Request) -> None:
        key = state.settings.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}, reason="auth")

    async def read_json(request: Request, schema):
        length = request.headers.get("content-length")
        limit = state.settings.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes; at most {limit}", reason="too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body over {limit} bytes", reason="too_large")
            chunks.append(chunk)
        try:
            obj = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, _one_line(f"invalid JSON: {e}"), reason="bad_json")
        if not isinstance(obj, dict):
            raise ApiError(422, "the body must be a JSON object")
        try:
            return schema.model_validate(obj)
        except ValidationError as e:
            raise ApiError(422, _validation_message(e))

    async def handle(request: Request, route: str, fn, err):
        t0 = time.perf_counter()
        m.requests.labels(request.method, route).inc()
        try:
            authorize(request)
            resp = await fn(request)
            m.success.labels(route).inc()
            return resp
        except ApiError as e:
            m.failure.labels(e.reason).inc()
            log.warning("%s %s -> %d %s", request.method, route, e.status, e.message)
            return err(e)
        except ClientGone:
            m.failure.labels("dropped").inc()
            log.warning("%s %s -> client disconnected; its texts were dropped", request.method, route)
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - one line, a 500, and the server goes on
            m.failure.labels("inference").inc()
            msg = _one_line(f"{type(e).__name__}: {e}")
            log.error("%s %s -> 500 %s", request.method, route, msg)
            return err(ApiError(500, f"internal error: {msg}", type="server_error", reason="inference"))
        finally:
            m.duration.labels(route).observe(time.perf_counter() - t0)

    async def _openai(request: Request):
        body = await read_json(request, EmbeddingsRequest)
        model = state.model(body.model)
        fmt = (body.encoding_format or "float").lower()
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"encoding_format={body.encoding_format!r}; allowed: float, base64",
                           param="encoding_format")
        if body.dimensions is not None and not 1 <= body.dimensions <= model.backend.dim:
            raise ApiError(400, f"dimensions={body.dimensions}; this model gives 1..{model.backend.dim}",
                           param="dimensions")
        texts = state.format(model, state.texts(body.input, "input"), body.input_type, body.instruction)
        state.check_ready()
        vecs, ntok, timing = await state.embed(request, model, texts)
        vecs = state.finish_vectors(model, vecs, normalize=None, dimensions=body.dimensions)
        enc = _b64 if fmt == "base64" else (lambda v: v.tolist())
        data = [{"object": "embedding", "index": i, "embedding": enc(v)} for i, v in enumerate(vecs)]
        total = int(sum(ntok))
        return JSONResponse({"object": "list", "data": data, "model": model.name,
                             "usage": {"prompt_tokens": total, "total_tokens": total}}, headers=_headers(timing, ntok))

    async def _tei(request: Request):
        body = await read_json(request, EmbedRequest)
        model = state.model(body.model)
        if body.truncation_direction is not None and body.truncation_direction.lower() != "right":
            raise ApiError(422, f"truncation_direction={body.truncation_direction!r}; only Right is supported "
                                "(the EOS that pooling reads is kept at the end)", param="truncation_direction")
        if body.dimensions is not None and not 1 <= body.dimensions <= model.backend.dim:
            raise ApiError(400, f"dimensions={body.dimensions}; this model gives 1..{model.backend.dim}",
                           param="dimensions")
        kind, instruction = body.input_type, body.instruction
        if body.prompt_name is not None:
            p = body.prompt_name.lower()
            if p in model.instructions:  # a task name: a query with that task's instruction
                kind, instruction = "query", instruction or p
            elif p in INPUT_TYPES:
                kind = p
            else:
                raise ApiError(422, f"prompt_name={body.prompt_name!r}; allowed: {', '.join(INPUT_TYPES)} or a task "
                                    f"({', '.join(sorted(model.instructions))})", param="prompt_name")
        texts = state.format(model, state.texts(body.inputs, "inputs"), kind, instruction, field="prompt_name")
        state.check_ready()
        truncate = True if body.truncate is None else body.truncate
        vecs, ntok, timing = await state.embed(request, model, texts, truncate=truncate)
        vecs = state.finish_vectors(model, vecs, normalize=body.normalize, dimensions=body.dimensions)
        return JSONResponse(vecs.tolist(), headers=_headers(timing, ntok))

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        return await handle(request, "/v1/embeddings", _openai, openai_error)

    @app.post("/embeddings", include_in_schema=False)
    async def openai_embeddings_noprefix(request: Request):
        return await handle(request, "/v1/embeddings", _openai, openai_error)

    @app.post("/embed")
    async def tei_embed(request: Request):
        return await handle(request, "/embed", _tei, tei_error)

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503,
                                headers={"Retry-After": str(state.settings.retry_after)})
        if not state.ready:
            body = {"status": "error", "error": state.warmup_error} if state.warmup_error else {"status": "loading"}
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(state.settings.loading_retry_after)})
        return {"status": "ok", "models": list(state.models)}

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _info(request: Request):
        return JSONResponse(info(state))

    @app.get("/info")
    async def get_info(request: Request):
        return await handle(request, "/info", _info, openai_error)

    async def _models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "bmretriever_jax"} for name in state.models]})

    @app.get("/v1/models")
    async def list_models(request: Request):
        return await handle(request, "/v1/models", _models, openai_error)

    return app


def _headers(timing: Dict[str, float], ntok: Sequence[int]) -> Dict[str, str]:
    ms = lambda s: str(int(round(s * 1000)))  # noqa: E731
    return {"x-compute-tokens": str(int(sum(ntok))), "x-tokenization-time": ms(timing["tokenization"]),
            "x-queue-time": ms(timing["queue"]), "x-inference-time": ms(timing["inference"])}


def info(state: ServerState) -> Dict:
    s = state.settings
    models = []
    for name, mdl in state.models.items():
        b = mdl.backend
        models.append({"id": name, "source": mdl.source, "backend": b.kind, "dim": b.dim, "max_input_length": b.max_length,
                       "query_instruction": mdl.instruction, "seq_buckets": list(b.seq_buckets),
                       "batch_sizes": {str(T): r for T, r in b.rows.items()}, "shapes": len(b.shapes()),
                       "packed": bool(getattr(b, "pack", False))})
    return {"models": models, "ready": state.ready, "warmup_seconds": state.warmup_seconds,
            "max_inputs": s.max_inputs, "max_input_chars": s.max_input_chars, "max_queue": s.max_queue,
            "max_wait_ms": s.max_wait_ms, "request_timeout": s.request_timeout, "auth": bool(s.api_key),
            "compiles": state.metrics.compiles_at_ready, "request_path_compiles": state.request_path_compiles(),
            "batches": state.batcher.batches, "dropped": state.batcher.dropped,
            "batch_sizes": dict(sorted(state.batcher.batch_sizes.items())),
            "padding_efficiency": (state.batcher.real_tokens / state.batcher.padded_tokens
                                   if state.batcher.padded_tokens else None)}


# ----------------------------------------------------------------------------------------------------
# Loading and running
# ----------------------------------------------------------------------------------------------------
def model_name(spec: str) -> (str, str):
    """'NAME=PATH' or PATH -> (name, path); a path's name is its folder's (or file's) base name."""
    if "=" in spec and not os.path.exists(spec):
        name, _, path = spec.partition("=")
        if name and path:
            return name, path
    base = os.path.basename(os.path.normpath(spec))
    if base.endswith(".gguf"):
        base = base[:-5]
    return base or spec, spec


def load_models(specs: Sequence[str], *, max_length: Optional[int] = None, dtype: str = "auto",
                instruction: Optional[str] = None, seq_buckets=None, batch_sizes=None, max_batch_tokens: int = 16384,
                pack: bool = True, backend: str = "jax", quiet: bool = True) -> List[ServedModel]:
    from bmretriever_jax.convert.export import DEFAULT_INSTRUCTION
    from bmretriever_jax.embed import TASK_INSTRUCTIONS
    from bmretriever_jax.serve.batcher import (DEFAULT_BATCH_SIZES, DEFAULT_SEQ_BUCKETS, JaxBackend,
                                               SentenceTransformerBackend)

    seq_buckets = seq_buckets or DEFAULT_SEQ_BUCKETS
    batch_sizes = batch_sizes or DEFAULT_BATCH_SIZES
    out = []
    for spec in specs:
        name, path = model_name(spec)
        if backend == "sentence-transformers":
            b = SentenceTransformerBackend(path, batch_sizes=batch_sizes, max_batch_tokens=max_batch_tokens)
            settings, instructions = {}, dict(TASK_INSTRUCTIONS)
        else:
            from bmretriever_jax.convert import hub
            from bmretriever_jax.embed import Encoder

            enc = Encoder.load(path, max_length=max_length, dtype=dtype, quiet=quiet)
            b = JaxBackend(enc, seq_buckets=seq_buckets, batch_sizes=batch_sizes, max_batch_tokens=max_batch_tokens,
                           pack=pack)
            settings = hub.retriever_settings(hub.resolve(path, quiet=True))
            instructions = enc.instructions
        instr = instruction or settings.get("instruction") or DEFAULT_INSTRUCTION
        out.append(ServedModel(name, b, instructions.get(instr.lower(), instr), instructions, source=path))
    return out


def run(state: ServerState, host: str = "127.0.0.1", port: int = 8000, *, timeout_graceful_shutdown: Optional[int] = None,
        access_log: bool = False, log_level: str = "info", on_started=None) -> int:
    """Serve until SIGTERM / SIGINT: uvicorn stops accepting, lets the requests in flight finish, then the lifespan
    drains the queue and stops the batcher. Returns 0 (a signal is a normal stop)."""
    import signal

    import uvicorn

    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=timeout_graceful_shutdown, lifespan="on", http="h11")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_started is not None and self.started:
                on_started(self)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                log.info("signal %d: no new connections; finishing the requests in flight", sig)
            super().handle_exit(sig, frame)

    # uvicorn re-raises the signal it caught once it has stopped; with these handlers that is a no-op, so a
    # SIGTERM / SIGINT ends the process with status 0 rather than being killed by the signal
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    Server(config).run()
    return 0
