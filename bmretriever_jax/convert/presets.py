"""The papers' backbones as `ModelConfig`s, without their weights: for `bmr plan` when the model folder of a
config is not on this machine (configs/papers/*.yaml name folders like models/pythia-410m).

Each preset is the architecture part of the model's public transformers `config.json`, copied from the
Hugging Face Hub pages named in the comments, and goes through the same `config_from_hf` as a real folder,
so a preset and a downloaded model give the same `ModelConfig`.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

from bmretriever_jax.convert.hf import config_from_hf
from bmretriever_jax.models.config import ModelConfig

# name -> config.json fields (only those config_from_hf reads; the rest of each file is training metadata)
HF_CONFIGS: Dict[str, dict] = {
    # EleutherAI/pythia-410m config.json (GPTNeoXForCausalLM): BMRetriever-410M's backbone.
    "pythia-410m": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5,
        use_parallel_residual=True, tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=0,
        eos_token_id=0),
    # EleutherAI/pythia-1b config.json: BMRetriever-1B's backbone.
    "pythia-1b": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=8, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5,
        use_parallel_residual=True, tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=0,
        eos_token_id=0),
    # google/gemma-2b config.json (GemmaForCausalLM; multi-query attention, 1 KV head): BMRetriever-2B and
    # STM's Gemma experts.
    "gemma-2b": dict(
        model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, hidden_act="gelu",
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # BioMistral/BioMistral-7B config.json = mistralai/Mistral-7B-v0.1's architecture (sliding window 4096 on
    # every layer): BMRetriever-7B's backbone.
    "biomistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=4096, max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2),
    # Qwen/Qwen3-0.6B config.json (head_dim 128 > hidden / heads; q/k RMSNorm): STM's small backbone.
    "qwen3-0.6b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
        rope_theta=1000000.0, use_sliding_window=False, sliding_window=None, max_window_layers=28,
        attention_bias=False, tie_word_embeddings=True, max_position_embeddings=40960, bos_token_id=151643,
        eos_token_id=151645),
    # google/gemma-3-270m config.json (gemma3_text): 5 sliding-window layers (512, rope 10k) per global layer
    # (rope 1M). The quickstart's backbone (`bmr` reads the packaged GGUF of the same model).
    "gemma3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, query_pre_attn_scalar=256,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0),
}

# Other names the same backbones go by: BMRetriever's released models (BMRetriever/BMR-410M, ...), upstream
# repository names, and this project's run folders (runs/bmretriever-410m-pretrain/model).
ALIASES: Dict[str, str] = {
    "bmr-410m": "pythia-410m", "bmretriever-410m": "pythia-410m", "pythia-410m-deduped": "pythia-410m",
    "bmr-1b": "pythia-1b", "bmretriever-1b": "pythia-1b", "pythia-1b-deduped": "pythia-1b",
    "bmr-2b": "gemma-2b", "bmretriever-2b": "gemma-2b",
    "bmr-7b": "biomistral-7b", "bmretriever-7b": "biomistral-7b", "mistral-7b-v0.1": "biomistral-7b",
    "stm-qwen3-0.6b": "qwen3-0.6b", "gemma-3-270m": "gemma3-270m",
}


def preset(name: str) -> ModelConfig:
    """A preset by its key (see `names()`) or alias -> ModelConfig."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in HF_CONFIGS:
        raise KeyError(f"no preset {name!r}; known: {', '.join(names())}")
    return config_from_hf(dict(HF_CONFIGS[key]))


def names():
    return sorted(HF_CONFIGS)


def _match(component: str) -> Optional[str]:
    c = component.lower()
    if c in HF_CONFIGS:
        return c
    if c in ALIASES:
        return ALIASES[c]
    # a run folder named after its backbone plus a suffix: bmretriever-410m-pretrain, qwen3-0.6b-expert-nlu
    for alias in sorted(list(HF_CONFIGS) + list(ALIASES), key=len, reverse=True):
        if re.match(rf"{re.escape(alias)}($|[-_.])", c):
            return ALIASES.get(alias, alias)
    return None


def preset_for(model_name: str) -> Optional[str]:
    """The preset key a config's model.name refers to, or None.

    The basename decides (models/pythia-410m -> pythia-410m, BMRetriever/BMR-7B -> biomistral-7b); a generic
    basename such as runs/bmretriever-410m-pretrain/model falls back to the nearest named parent folder.
    """
    parts = [p for p in os.path.normpath(model_name).replace("\\", "/").split("/") if p not in ("", ".")]
    for comp in reversed(parts):
        key = _match(comp)
        if key is not None:
            return key
    return None
