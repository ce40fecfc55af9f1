"""Chat backends for synthetic data: the in-process JAX generator and an OpenAI-compatible HTTP client.

Both expose one method,

    chat(messages_batch, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, stop=()) -> list[str]

where messages_batch is a list of conversations ([{"role": "system"|"user"|"assistant", "content": str}]).
`seed` is an int (row i gets seed + i) or one seed per conversation: the JAX backend turns it into the row's
PRNG key, the HTTP backend sends it as the request's "seed" (servers that honour it, e.g. vLLM and
llama.cpp, are then reproducible too). Per-row seeds make a row's output independent of its batch.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.request
from typing import Optional, Protocol, Sequence

from bmretriever_jax.util.errors import UserError
from bmretriever_jax.synth.generate import Generator, row_seeds, truncate_at_stop

Messages = Sequence[dict]


class ChatBackend(Protocol):
    def chat(self, messages_batch: Sequence[Messages], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: "int | Sequence[int]" = 0, stop: Sequence[str] = ()) -> list[str]: ...


class BackendError(UserError, RuntimeError):
    """A backend could not produce an answer (server down, bad response, HTTP error): printed as one line by `bmr`."""


# ----------------------------------------------------------------------------------------------------
# In-process JAX
# ----------------------------------------------------------------------------------------------------
class JaxBackend:
    """A local causal LM run by `synth.generate.Generator` (KV cache, jitted decode loop).

    model_name_or_path: smollm2-135m | gemma3-270m | a .gguf file | a transformers folder with an LM head.
    """

    def __init__(self, model_name_or_path: str = "smollm2-135m", *, dtype: str = "auto", batch_size: int = 8,
                 quiet: bool = False, generator: Optional[Generator] = None):
        self.generator = generator or Generator.load(model_name_or_path, dtype=dtype, batch_size=batch_size,
                                                     quiet=quiet)
        self.name = model_name_or_path

    def chat(self, messages_batch, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, stop=()):
        return self.generator.chat(list(messages_batch), max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed, stop=stop)


# ----------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP
# ----------------------------------------------------------------------------------------------------
def chat_completions_url(base_url: str) -> str:
    """http://host:port, http://host:port/v1 or the full .../v1/chat/completions -> the endpoint URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class OpenAIBackend:
    """Client of an OpenAI-compatible server (vLLM, llama.cpp server, TGI, Ollama, OpenAI): POST
    {base_url}/v1/chat/completions, one request per conversation, `concurrency` requests in flight.

    Retries (with exponential backoff: backoff, 2 x backoff, ...) on connection errors, timeouts, HTTP 429
    and 5xx; other HTTP errors (400, 401, 404, ...) fail at once with the server's message. After the last
    attempt a BackendError names the URL and the cause. api_key: argument, else $BMR_LLM_API_KEY, else
    $OPENAI_API_KEY, else none (local servers need none).
    """

    RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, concurrency: int = 4):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key = api_key or os.environ.get("BMR_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency = max(1, int(concurrency))
        self.name = f"{model}@{self.url}"

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                last = f"HTTP {e.code}: {detail or e.reason}"
                if e.code in self.RETRY_STATUS:
                    continue
                raise BackendError(f"{self.url} answered {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
                continue
            try:
                return json.loads(payload)
            except json.JSONDecodeError:
                raise BackendError(f"{self.url} returned non-JSON: {payload[:200]!r}") from None
        raise BackendError(f"could not get an answer from the OpenAI-compatible server at {self.url} after "
                           f"{self.retries + 1} attempt(s) (last error: {last}); is the server running and the "
                           "base URL right?")

    def _one(self, messages: Messages, max_new_tokens, temperature, top_p, seed, stop) -> str:
        body = {"model": self.model, "messages": list(messages), "max_tokens": int(max_new_tokens),
                "temperature": float(temperature), "top_p": float(top_p), "seed": int(seed)}
        if stop:
            body["stop"] = list(stop)[:4]  # the OpenAI API takes at most 4; the rest are applied below
        out = self._post(body)
        try:
            text = out["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.url}: unexpected response (no choices[0].message.content): "
                               f"{json.dumps(out)[:300]}") from None
        return truncate_at_stop(text or "", stop)

    def chat(self, messages_batch, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, stop=()):
        messages_batch = list(messages_batch)
        seeds = row_seeds(seed, len(messages_batch))
        if self.concurrency == 1 or len(messages_batch) <= 1:
            return [self._one(m, max_new_tokens, temperature, top_p, s, stop) for m, s in zip(messages_batch, seeds)]
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, m, max_new_tokens, temperature, top_p, s, stop)
                       for m, s in zip(messages_batch, seeds)]
            return [f.result() for f in futures]


def make_backend(llm: str = "smollm2-135m", *, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = 120.0, retries: int = 3, concurrency: int = 4, dtype: str = "auto",
                 batch_size: int = 8, quiet: bool = False) -> ChatBackend:
    """base_url given: an OpenAIBackend serving model `llm`; otherwise a JaxBackend of model `llm`."""
    if base_url:
        return OpenAIBackend(base_url, llm, api_key=api_key, timeout=timeout, retries=retries,
                             concurrency=concurrency)
    return JaxBackend(llm, dtype=dtype, batch_size=batch_size, quiet=quiet)
