"""Decoder backbones: a `ModelConfig` plus a pytree of arrays; `forward` is a pure function.

The decoder (and so jax) is imported on first use of one of its names, so that reading a config - what
`bmr --help` and `bmr plan --no-compile` need - stays cheap.
"""
from bmretriever_jax.models.config import FAMILIES, ModelConfig

__all__ = ["FAMILIES", "ModelConfig", "forward", "init_params", "logits", "param_shapes"]
_DECODER = ("forward", "init_params", "logits", "param_shapes")


def __getattr__(name):
    if name in _DECODER:
        from bmretriever_jax.models import decoder

        return getattr(decoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
