"""Decoder backbones: a `ModelConfig` plus a pytree of arrays; `forward` is a pure function."""
from bmretriever_jax.models.config import FAMILIES, ModelConfig
from bmretriever_jax.models.decoder import forward, init_params, logits, param_shapes

__all__ = ["FAMILIES", "ModelConfig", "forward", "init_params", "logits", "param_shapes"]
