"""The one model config every decoder family is described by.

Families differ only in switches (norm type, gated MLP, parallel residual, q/k norms, sandwich norms,
rope theta per layer type, ...), so a single set of modules in `modules.py` serves GPT-NeoX, Llama/Mistral,
Gemma, Gemma 3 and Qwen3.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Tuple

FAMILIES = ("gpt_neox", "llama", "mistral", "gemma", "gemma3", "qwen3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w - 1: scale = offset + w
    act: str = "silu"  # "silu" | "gelu" (exact erf) | "gelu_tanh"
    gated_mlp: bool = True
    attn_bias: bool = False  # bias on q/k/v/o
    mlp_bias: bool = False
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    qk_norm: bool = False  # Gemma 3, Qwen3: RMSNorm over head_dim on q and k
    sandwich_norm: bool = False  # Gemma 2/3: post-attention and pre/post-feedforward norms
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden)
    rope_theta: float = 10000.0
    rope_local_theta: Optional[float] = None  # Gemma 3: theta of the sliding-window layers
    rotary_pct: float = 1.0  # GPT-NeoX rotates only a fraction of each head
    rope_scaling: Optional[Tuple[Tuple[str, float], ...]] = None  # llama3-style scaling, as sorted items
    sliding_window: Optional[int] = None
    # per layer: True = sliding-window (local) attention; None = every layer global (or all sliding when
    # sliding_window is set, as in Mistral v0.1).
    sliding_layers: Optional[Tuple[bool, ...]] = None
    query_pre_attn_scalar: Optional[float] = None  # attention scale = scalar ** -0.5 (default head_dim)
    attn_logit_softcap: Optional[float] = None
    tie_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries, num_layers={self.num_layers}")

    @property
    def layer_is_sliding(self) -> Tuple[bool, ...]:
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.sliding_layers is None:
            return (True,) * self.num_layers
        return tuple(self.sliding_layers)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def num_params(self) -> int:
        """Parameters of the backbone (`modules.Decoder`: embedding, layers, final norm; no LM head), counted from
        the switches here (tests/test_modules.py checks it against the initialised tree of every family)."""
        D, F, L, hd = self.hidden_size, self.intermediate_size, self.num_layers, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd

        def linear(n_in, n_out, bias):
            return n_in * n_out + (n_out if bias else 0)

        def norm(dim):
            return dim * (2 if self.norm == "layer" else 1)

        attn = (linear(D, q, self.attn_bias) + 2 * linear(D, kv, self.attn_bias) + linear(q, D, self.attn_bias)
                + (2 * norm(hd) if self.qk_norm else 0))
        mlp = (2 if self.gated_mlp else 1) * linear(D, F, self.mlp_bias) + linear(F, D, self.mlp_bias)
        norms = (4 if self.sandwich_norm else 2) * norm(D)
        return self.vocab_size * D + L * (attn + mlp + norms) + norm(D)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; allowed: {sorted(names)}")
        for k in ("sliding_layers", "rope_scaling"):
            if d.get(k) is not None:
                d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

