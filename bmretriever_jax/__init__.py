"""bmretriever_jax: decoder-only LLMs -> biomedical dense retrievers, in JAX."""

__version__ = "0.1.0"
