"""Decoder backbones: a `ModelConfig`, the flax.linen modules (`Decoder`, `Encoder`) and a pytree of arrays;
`forward`, `encode`, `logits` are pure functions over that pytree.

The modules (and so jax and flax) are imported on first use of one of their names, so that reading a config -
what `bmr --help` and `bmr plan --no-compile` need - stays cheap.
"""
from bmretriever_jax.models.config import FAMILIES, ModelConfig

__all__ = ["FAMILIES", "Decoder", "Encoder", "ModelConfig", "encode", "forward", "init_params", "logits",
           "param_shapes"]
_DECODER = ("encode", "forward", "init_params", "logits", "param_shapes")
_MODULES = ("Decoder", "Encoder")


def __getattr__(name):
    if name in _DECODER:
        from bmretriever_jax.models import decoder

        return getattr(decoder, name)
    if name in _MODULES:
        from bmretriever_jax.models import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
