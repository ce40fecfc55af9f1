"""GGUF import: dequantise with the `gguf` package, map llama.cpp names to transformers names, and cache
the result as an ordinary transformers folder (config.json + model.safetensors + tokenizer.json), so that
the conversion (and the slow 262k-entry tokenizer build) happens once.

llama.cpp quirks undone here (the same ones transformers' modeling_gguf_pytorch_utils.py undoes):
- Gemma / Gemma 3 RMSNorm weights are stored as w + 1: subtract 1.
- Llama / Mistral q and k projections are permuted for llama.cpp's interleaved rope: reverse it.
- Gemma 3 GGUFs lack the local rope theta and layer pattern: the architecture's defaults (10k local,
  every 6th layer global) fill them in, as transformers does.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Dict, Optional

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from bmretriever_jax.util.atomic import atomic_dir, cached_dir

ARCH_FAMILY = {"llama": "llama", "mistral": "mistral", "qwen3": "qwen3", "gemma": "gemma", "gemma3": "gemma3"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def hf_config_from_gguf(reader) -> dict:
    """GGUF metadata -> a transformers-style config.json dict."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCH_FAMILY:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(ARCH_FAMILY))}")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    heads = g("attention.head_count")
    d = dict(
        model_type={"gemma3": "gemma3_text"}.get(arch, arch), vocab_size=vocab, hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
        num_attention_heads=heads, num_key_value_heads=g("attention.head_count_kv", heads),
        max_position_embeddings=g("context_length", 8192), tie_word_embeddings="output.weight" not in names,
        rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-6), rope_theta=g("rope.freq_base", 10000.0),
    )
    key_len = g("attention.key_length")
    if key_len:
        d["head_dim"] = key_len
    if arch in ("gemma", "gemma3"):
        d["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma3":
        d.update(sliding_window=g("attention.sliding_window", 4096), rope_local_base_freq=10000.0,
                 query_pre_attn_scalar=key_len or 256, sliding_window_pattern=6)
    if arch == "mistral":
        d["sliding_window"] = g("attention.sliding_window")
    scaling = g("rope.scaling.type")
    if scaling and scaling != "none":
        d["rope_scaling"] = {"rope_type": scaling, "factor": g("rope.scaling.factor", 1.0)}
    return d


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_tensors_to_hf(reader, hf_cfg: dict, progress=None) -> Dict[str, np.ndarray]:
    """Dequantise every tensor to float32 and rename to transformers base-model names."""
    arch = _field(reader, "general.architecture")
    out = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if m:
            i, part, kind = m.groups()
            if part == "ffn_norm":
                base = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
            elif part in _LAYER_NAMES:
                base = _LAYER_NAMES[part]
            else:
                raise ValueError(f"GGUF tensor {t.name!r}: unknown layer part {part!r} for architecture {arch}")
            name = f"layers.{i}.{base}.{kind}"
        elif t.name == "token_embd.weight":
            name = "embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif t.name in ("rope_freqs.weight",):
            continue
        else:
            raise ValueError(f"GGUF tensor {t.name!r} has no mapping for architecture {arch}")
        if arch in ("gemma", "gemma3") and name.endswith("norm.weight"):
            w = w - 1.0
        if arch in ("llama", "mistral"):
            if name.endswith("q_proj.weight"):
                w = _reverse_permute(w, hf_cfg["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                w = _reverse_permute(w, hf_cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
        if progress:
            progress(1)
    return out


def file_fingerprint(path: str) -> str:
    """Cheap identity of a (large) file: size + first and last MiB."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _write_converted(gguf_path: str, folder: str, *, tokenizer: bool = True, quiet: bool = False) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) + source.json into an existing folder."""
    reader = GGUFReader(gguf_path)
    hf_cfg = hf_config_from_gguf(reader)
    with tqdm(total=len(reader.tensors), desc=f"dequantising {os.path.basename(gguf_path)}", disable=quiet) as bar:
        tensors = gguf_tensors_to_hf(reader, hf_cfg, progress=bar.update)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    if tokenizer:
        import transformers  # ~0.8 s (tokenizers ~2 s more), on a first conversion only

        if not quiet:
            print("building the tokenizer from the GGUF vocabulary (once) ...", flush=True)
        tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                                         gguf_file=os.path.basename(gguf_path))
        tok.save_pretrained(folder)
        hf_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    with open(os.path.join(folder, "source.json"), "w") as f:
        json.dump({"gguf": os.path.basename(gguf_path), "fingerprint": file_fingerprint(gguf_path)}, f)


def convert_gguf(gguf_path: str, out_dir: str, *, tokenizer: bool = True, quiet: bool = False) -> str:
    """Convert a GGUF file into a transformers folder at out_dir (atomically, with a checksum manifest)."""
    with atomic_dir(out_dir) as tmp:
        _write_converted(gguf_path, tmp, tokenizer=tokenizer, quiet=quiet)
    return out_dir


def cache_root() -> str:
    return os.environ.get("BMR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bmretriever_jax"))


def cached_gguf(gguf_path: str, cache_dir: Optional[str] = None, quiet: bool = False) -> str:
    """Path of the converted folder for this GGUF, converting on first use (or when the entry is damaged)."""
    fp = file_fingerprint(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    out = os.path.join(cache_dir or cache_root(), "gguf", f"{stem}-{fp}")
    # Locked, atomic and checked on every read (sizes; sha256 when a file changed since it was hashed): a
    # killed or concurrent first conversion, or a damaged entry, is rebuilt instead of failing every load.
    return cached_dir(out, lambda tmp: _write_converted(gguf_path, tmp, quiet=quiet))
