"""One declarative HF <-> JAX name table per family; it serves import and export alike.

A rule maps one or more JAX parameter paths to one or more transformers tensor names (base-model names,
without the `model.` / `gpt_neox.` prefix; `{i}` is the layer index) with a conversion kind:
  copy        the same array
  linear      HF nn.Linear weight [out, in] <-> our kernel [in, out]
  neox_qkv    GPT-NeoX's fused query_key_value, per head [q, k, v] <-> three separate q, k, v
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.models.decoder import param_shapes


@dataclasses.dataclass(frozen=True)
class Rule:
    jax: Tuple[str, ...]
    hf: str
    kind: str = "copy"
    per_layer: bool = True


HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "gpt_neox.", "transformer.")


def _linear_rules(prefix: str, names: Dict[str, str], bias: bool) -> List[Rule]:
    rules = []
    for ours, theirs in names.items():
        rules.append(Rule((f"layers/{prefix}/{ours}/kernel",), f"layers.{{i}}.{theirs}.weight", "linear"))
        if bias:
            rules.append(Rule((f"layers/{prefix}/{ours}/bias",), f"layers.{{i}}.{theirs}.bias"))
    return rules


def _norm_rules(ours: str, theirs: str, cfg: ModelConfig, per_layer=True) -> List[Rule]:
    fmt = (lambda s: f"layers.{{i}}.{s}") if per_layer else (lambda s: s)
    lead = "layers/" if per_layer else ""
    rules = [Rule((f"{lead}{ours}/scale",), fmt(f"{theirs}.weight"), per_layer=per_layer)]
    if cfg.norm == "layer":
        rules.append(Rule((f"{lead}{ours}/bias",), fmt(f"{theirs}.bias"), per_layer=per_layer))
    return rules


def rules_for(cfg: ModelConfig) -> List[Rule]:
    """The name table of cfg's family (the LM head is handled by `lm_head_name`)."""
    if cfg.family == "gpt_neox":
        rules = [Rule(("embed/embedding",), "embed_in.weight", per_layer=False)]
        rules += _norm_rules("attn_norm", "input_layernorm", cfg) + _norm_rules("mlp_norm", "post_attention_layernorm", cfg)
        rules.append(Rule(("layers/attn/q/kernel", "layers/attn/k/kernel", "layers/attn/v/kernel"),
                          "layers.{i}.attention.query_key_value.weight", "neox_qkv"))
        if cfg.attn_bias:
            rules.append(Rule(("layers/attn/q/bias", "layers/attn/k/bias", "layers/attn/v/bias"),
                              "layers.{i}.attention.query_key_value.bias", "neox_qkv"))
        rules += _linear_rules("attn", {"o": "attention.dense"}, cfg.attn_bias)
        rules += _linear_rules("mlp", {"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, cfg.mlp_bias)
        rules += _norm_rules("final_norm", "final_layer_norm", cfg, per_layer=False)
        return rules
    # Llama-like families: llama, mistral, qwen3, gemma, gemma3
    rules = [Rule(("embed/embedding",), "embed_tokens.weight", per_layer=False)]
    rules += _norm_rules("attn_norm", "input_layernorm", cfg)
    rules += _linear_rules("attn", {k: f"self_attn.{k}_proj" for k in "qkvo"}, cfg.attn_bias)
    rules += _linear_rules("mlp", {k: f"mlp.{k}_proj" for k in ("gate", "up", "down")}, cfg.mlp_bias)
    if cfg.qk_norm:
        rules += _norm_rules("q_norm", "self_attn.q_norm", cfg) + _norm_rules("k_norm", "self_attn.k_norm", cfg)
    if cfg.sandwich_norm:
        rules += _norm_rules("post_attn_norm", "post_attention_layernorm", cfg)
        rules += _norm_rules("mlp_norm", "pre_feedforward_layernorm", cfg)
        rules += _norm_rules("post_mlp_norm", "post_feedforward_layernorm", cfg)
    else:
        rules += _norm_rules("mlp_norm", "post_attention_layernorm", cfg)
    rules += _norm_rules("final_norm", "norm", cfg, per_layer=False)
    return rules


def lm_head_name(cfg: ModelConfig) -> str:
    return "embed_out.weight" if cfg.family == "gpt_neox" else "lm_head.weight"


def _hf_to_jax(rule: Rule, cfg: ModelConfig, a: np.ndarray) -> List[np.ndarray]:
    if rule.kind == "copy":
        return [a]
    if rule.kind == "linear":
        return [a.T]
    if rule.kind == "neox_qkv":
        H, hd = cfg.num_heads, cfg.head_dim
        parts = a.reshape((H, 3, hd) + a.shape[1:])
        return [parts[:, j].reshape((H * hd,) + a.shape[1:]).T if a.ndim == 2 else parts[:, j].reshape(H * hd)
                for j in range(3)]
    raise ValueError(f"unknown conversion kind {rule.kind!r}")


def _jax_to_hf(rule: Rule, cfg: ModelConfig, arrays: List[np.ndarray]) -> np.ndarray:
    if rule.kind == "copy":
        return arrays[0]
    if rule.kind == "linear":
        return np.ascontiguousarray(arrays[0].T)
    if rule.kind == "neox_qkv":
        H, hd = cfg.num_heads, cfg.head_dim
        if arrays[0].ndim == 2:  # kernels [D, H*hd] -> [H, 3, hd, D] -> [3*H*hd, D]
            parts = [x.T.reshape(H, hd, -1) for x in arrays]
            return np.ascontiguousarray(np.stack(parts, 1).reshape(3 * H * hd, -1))
        return np.stack([x.reshape(H, hd) for x in arrays], 1).reshape(3 * H * hd)
    raise ValueError(f"unknown conversion kind {rule.kind!r}")


def _get(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree: dict, path: str, value):
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def hf_to_params(cfg: ModelConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool],
                 dtype=np.float32, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Build our param tree from HF tensors. `get(name)` returns a tensor by base-model name.

    Every tensor is checked against the shape the config implies; a missing tensor or a wrong shape
    raises naming both the HF name and our parameter path.
    """
    shapes = param_shapes(cfg)
    params: dict = {}
    for rule in rules_for(cfg):
        layers = range(cfg.num_layers) if rule.per_layer else [None]
        per_path: Dict[str, list] = {p: [] for p in rule.jax}
        for i in layers:
            name = rule.hf.format(i=i)
            if not has(name):
                raise KeyError(f"checkpoint has no tensor {name!r} (needed for {' / '.join(rule.jax)}, family {cfg.family})")
            outs = _hf_to_jax(rule, cfg, np.asarray(get(name)))
            for p, x in zip(rule.jax, outs):
                want = _get(shapes, p)[1:] if rule.per_layer else _get(shapes, p)
                if tuple(x.shape) != tuple(want):
                    raise ValueError(f"tensor {name!r} -> {p}: shape {tuple(x.shape)}, config expects {tuple(want)}")
                per_path[p].append(x.astype(dtype))
        for p, xs in per_path.items():
            _set(params, p, np.stack(xs) if rule.per_layer else xs[0])
        if progress:
            progress(1)
    # An untied LM head is only needed to generate text; base-model checkpoints (AutoModel) have none.
    if not cfg.tie_embeddings and has(lm_head_name(cfg)):
        params["lm_head"] = {"kernel": np.asarray(get(lm_head_name(cfg))).T.astype(dtype)}
    return params


def params_to_hf(cfg: ModelConfig, params: dict, prefix: str = "") -> Dict[str, np.ndarray]:
    """Our param tree -> {hf base-model name: array} (per-layer tensors unstacked)."""
    out: Dict[str, np.ndarray] = {}
    for rule in rules_for(cfg):
        arrays = [np.asarray(_get(params, p)) for p in rule.jax]
        if rule.per_layer:
            for i in range(cfg.num_layers):
                out[prefix + rule.hf.format(i=i)] = _jax_to_hf(rule, cfg, [a[i] for a in arrays])
        else:
            out[prefix + rule.hf] = _jax_to_hf(rule, cfg, arrays)
    if "lm_head" in params:
        out[lm_head_name(cfg)] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
    return out


def strip_prefix(names: Iterable[str]) -> Dict[str, str]:
    """Map base-model name -> stored name, dropping the CausalLM wrapper prefix (`model.`, `gpt_neox.`)."""
    names = list(names)
    out = {}
    for n in names:
        base = n
        for p in HF_PREFIXES:
            if n.startswith(p):
                base = n[len(p):]
                break
        out.setdefault(base, n)
    return out
