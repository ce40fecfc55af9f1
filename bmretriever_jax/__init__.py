"""bmretriever_jax: decoder-only LLMs -> biomedical dense retrievers, in JAX.

    import bmretriever_jax as bmr
    model = bmr.load("gemma3-270m")
    vectors = model.encode_queries(["Vitamin D prevents fractures."], task="scifact")

`load`, `train`, `evaluate`, `index`, `search`, `merge`, `export` (see `bmretriever_jax.api`) are imported on first use, so that
`import bmretriever_jax` (and `bmr --help`) stays free of jax.
"""

__version__ = "0.1.0"
__all__ = ["load", "train", "evaluate", "index", "search", "merge", "export", "Encoder", "UserError"]


def __getattr__(name):
    if name in ("load", "train", "evaluate", "index", "search", "merge", "export", "Encoder"):
        from bmretriever_jax import api

        return getattr(api, name)
    if name == "UserError":
        from bmretriever_jax.util.errors import UserError

        return UserError
    raise AttributeError(f"module 'bmretriever_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
