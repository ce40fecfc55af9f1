"""`bmr serve`: an HTTP embedding server (OpenAI /v1/embeddings, text-embeddings-inference /embed, /health, /metrics)
over one batching queue whose batch shapes are all compiled at start-up. See docs/serving.md.

    app.py      routes, validation, errors, the uvicorn runner (`run`), model loading (`load_models`)
    batcher.py  the queue and its device thread; the JAX and sentence-transformers backends
    metrics.py  Prometheus metrics and the XLA compile counter
"""
