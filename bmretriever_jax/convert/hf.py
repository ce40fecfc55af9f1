"""transformers checkpoints (config.json + safetensors, sharded or not) <-> ModelConfig + params."""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bmretriever_jax.convert.names import hf_to_params, params_to_hf, strip_prefix
from bmretriever_jax.models.config import ModelConfig

MODEL_TYPES = {
    "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "mistral", "gemma": "gemma",
    "gemma3_text": "gemma3", "gemma3": "gemma3", "qwen3": "qwen3",
}
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _rope(d: dict, key: Optional[str] = None) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer type for Gemma 3); older
    configs use rope_theta / rope_scaling at the top level. Return one flat dict."""
    rp = d.get("rope_parameters") or {}
    if key is not None:
        rp = rp.get(key) or {}
    out = dict(d.get("rope_scaling") or {}) if key in (None, "full_attention") else {}
    out.update(rp)
    return out


def config_from_hf(d: dict) -> ModelConfig:
    """A transformers config.json dict -> ModelConfig; raises naming the unsupported model_type."""
    if d.get("model_type") == "gemma3" and "text_config" in d:
        d = {**d["text_config"], "model_type": "gemma3_text"}
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"unsupported architecture model_type={mt!r} ({d.get('architectures')}); "
                         f"supported: {', '.join(sorted(MODEL_TYPES))}")
    fam = MODEL_TYPES[mt]
    H = d["num_attention_heads"]
    D = d["hidden_size"]
    act_name = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if fam == "gemma" and act_name == "gelu":  # legacy Gemma configs mean the tanh approximation
        act_name = "gelu_pytorch_tanh"
    if act_name not in ACTS:
        raise ValueError(f"unsupported activation {act_name!r}; supported: {sorted(ACTS)}")
    common = dict(
        family=fam, vocab_size=d["vocab_size"], hidden_size=D, num_layers=d["num_hidden_layers"], num_heads=H,
        num_kv_heads=d.get("num_key_value_heads") or H, head_dim=d.get("head_dim") or D // H,
        act=ACTS[act_name], tie_embeddings=bool(d.get("tie_word_embeddings", fam != "gpt_neox")),
        max_position_embeddings=d.get("max_position_embeddings", 8192),
        bos_token_id=d.get("bos_token_id"), eos_token_id=_first(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )
    rope = _rope(d, "full_attention" if fam == "gemma3" else None)
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    common["rope_scaling"] = tuple(sorted(scaling.items())) or None
    if fam == "gpt_neox":
        return ModelConfig(
            **common, intermediate_size=d.get("intermediate_size") or 4 * D, norm="layer",
            norm_eps=d.get("layer_norm_eps", 1e-5), gated_mlp=False, attn_bias=d.get("attention_bias", True),
            mlp_bias=True, parallel_residual=d.get("use_parallel_residual", True),
            rope_theta=rope.get("rope_theta", d.get("rotary_emb_base", 10000.0)),
            rotary_pct=rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25)))
    common.update(intermediate_size=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
                  attn_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
                  rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    if fam in ("llama", "mistral"):
        return ModelConfig(**common, sliding_window=d.get("sliding_window") if fam == "mistral" else None)
    if fam == "qwen3":
        window = d.get("sliding_window") if d.get("use_sliding_window") else None
        layers = None
        if window is not None:
            types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 0) else
                                             "full_attention" for i in range(d["num_hidden_layers"])]
            layers = tuple(t == "sliding_attention" for t in types)
        return ModelConfig(**common, qk_norm=True, sliding_window=window, sliding_layers=layers)
    if fam == "gemma":
        return ModelConfig(**common, norm_offset=1.0, embed_scale=True)
    # gemma3
    n = d["num_hidden_layers"]
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % d.get("sliding_window_pattern", 6) else
                                     "full_attention" for i in range(n)]
    local = _rope(d, "sliding_attention").get("rope_theta", d.get("rope_local_base_freq", 10000.0))
    common["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
    return ModelConfig(
        **common, norm_offset=1.0, embed_scale=True, qk_norm=True, sandwich_norm=True,
        rope_local_theta=local, sliding_window=d.get("sliding_window", 4096),
        sliding_layers=tuple(t == "sliding_attention" for t in types),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256), attn_logit_softcap=d.get("attn_logit_softcapping"))


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


HF_CLASSES = {
    "gpt_neox": ("gpt_neox", "GPTNeoXModel"), "llama": ("llama", "LlamaModel"), "mistral": ("mistral", "MistralModel"),
    "gemma": ("gemma", "GemmaModel"), "gemma3": ("gemma3_text", "Gemma3TextModel"), "qwen3": ("qwen3", "Qwen3Model"),
}


def config_to_hf(cfg: ModelConfig, bidirectional: bool = False) -> dict:
    """ModelConfig -> a transformers 5 config.json dict for the family's base model class."""
    model_type, arch = HF_CLASSES[cfg.family]
    d = dict(model_type=model_type, architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
             max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
             bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
             torch_dtype="float32")
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.act]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(dict(cfg.rope_scaling))
    if cfg.family == "gpt_neox":
        rope["partial_rotary_factor"] = cfg.rotary_pct
        d.update(hidden_act=act, layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
                 attention_bias=cfg.attn_bias, rope_parameters=rope)
        del d["num_key_value_heads"], d["head_dim"]
        return d
    d.update(rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attn_bias)
    if cfg.family in ("llama", "mistral", "qwen3"):
        d.update(hidden_act=act, rope_parameters=rope, mlp_bias=cfg.mlp_bias)
        if cfg.family == "mistral":
            d["sliding_window"] = cfg.sliding_window
        if cfg.family == "qwen3":
            d.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                     max_window_layers=cfg.num_layers)
            if cfg.sliding_window is not None:
                d["layer_types"] = ["sliding_attention" if s else "full_attention" for s in cfg.layer_is_sliding]
    elif cfg.family == "gemma":
        d.update(hidden_act=act, hidden_activation=act, rope_parameters=rope)
    else:
        d.update(hidden_activation=act, sliding_window=cfg.sliding_window,
                 layer_types=["sliding_attention" if s else "full_attention" for s in cfg.layer_is_sliding],
                 query_pre_attn_scalar=cfg.query_pre_attn_scalar, attn_logit_softcapping=cfg.attn_logit_softcap,
                 use_bidirectional_attention=bidirectional,
                 rope_parameters={"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": cfg.rope_local_theta or cfg.rope_theta}})
    return d


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
class SafetensorsDir:
    """Lazy reader over model.safetensors or a sharded model.safetensors.index.json; refuses pickles."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = ["model.safetensors"], None
        else:
            pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(path, p))]
            if pickles:
                raise ValueError(f"{path}: only pickle checkpoints ({', '.join(pickles)}); refusing to load pickle "
                                 "files (they can run arbitrary code). Convert them to safetensors first.")
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self._handles = {f: safe_open(os.path.join(path, f), framework="numpy") for f in files}
        stored = {}
        for f, h in self._handles.items():
            for k in h.keys():
                stored[k] = f
        self._file_of = stored
        self._names = strip_prefix(stored)

    def has(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str) -> np.ndarray:
        stored = self._names[name]
        return self._handles[self._file_of[stored]].get_tensor(stored)


def load_hf(path: str, dtype=np.float32) -> Tuple[ModelConfig, Dict]:
    """A transformers checkpoint folder -> (ModelConfig, params as numpy arrays)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (not a transformers checkpoint folder)")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f))
    reader = SafetensorsDir(path)
    return cfg, hf_to_params(cfg, reader.get, reader.has, dtype=dtype)


def save_hf(cfg: ModelConfig, params: Dict, path: str, *, bidirectional: bool = False,
            dtype=np.float32, extra_config: Optional[dict] = None) -> None:
    """Write config.json + model.safetensors that transformers' AutoModel loads (base-model names)."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in params_to_hf(cfg, params).items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    d = config_to_hf(cfg, bidirectional=bidirectional)
    d.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


# Files that make a tokenizer besides tokenizer*.json / tokenizer.model / tokenizer_config.json.
_TOKENIZER_EXTRA = ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
                    "spiece.model")


def tokenizer_files(folder: Optional[str]) -> List[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.startswith("tokenizer") or f in _TOKENIZER_EXTRA)


def copy_tokenizer(folder: Optional[str], out: str) -> List[str]:
    files = tokenizer_files(folder)
    for f in files:
        shutil.copy(os.path.join(folder, f), os.path.join(out, f))
    return files
