"""Write any retriever for the PyTorch world: transformers, sentence-transformers, PEFT (reading: convert/sources.py).

Sources (`open_source`):
  RUN/, RUN/checkpoints, RUN/checkpoints/STEP   a training run's Orbax checkpoint (latest step unless given):
                                                LoRA adapters are folded into the base tensor by tensor; a full
                                                fine-tune's leaves are restored one at a time
  a model folder                                config.json + safetensors (+ tokenizer, bmretriever.json,
                                                adapter.safetensors), e.g. RUN/model or a `bmr merge` output
  a known name or .gguf                         gemma3-270m, smollm2-135m, ... (bmretriever_jax.convert.hub)
Every source is a `LeafReader` (weights.py) over transformers base-model tensor names ("layers.3.self_attn.q_proj.weight")
in one canonical order (the name table's), so export and `bmr merge` stream one tensor at a time, and merging acts on
exactly the per-layer tensors mergekit sees.

Formats (`export`):
  hf                     config.json + model.safetensors + tokenizer files + bmretriever.json; `transformers.AutoModel`
  sentence-transformers  hf + modules.json (Transformer -> Pooling(lasttoken | mean) -> Normalize), sentence_bert_config.json,
                         config_sentence_transformers.json (query / passage / per-task prompts); its tokenizer_args
                         make the tokenizer append EOS and pad on the left, so that
                         `SentenceTransformer(DIR).encode(texts, prompt_name="query")` gives our vectors, while the
                         tokenizer files stay as they are (our Encoder.load reads the same folder and appends EOS itself)
  peft                   adapter_config.json + adapter_model.safetensors (LoRA sources only);
                         `peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), DIR)`

Truncation: ours tokenises with the tokenizer's own special tokens truncated to max_length - 1, then appends EOS. With
add_eos_token the tokenizer appends EOS itself, and transformers truncates the text so that text plus special tokens fit
max_seq_length (= our max_length): the same ids, long texts included, checked on probe texts at export time (export
refuses a tokenizer for which they differ). Older sentence-transformers / transformers 4 honour add_eos_token only for
tokenizer classes that implement it (Llama, Gemma, GPT-NeoX fast tokenizers).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from importlib.metadata import version
from typing import Any, Dict, List, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from bmretriever_jax.models import lora as lora_lib
from bmretriever_jax.util import treeutil
from bmretriever_jax.convert.hf import config_to_hf, copy_tokenizer, tokenizer_files  # noqa: F401  (part of this API)
from bmretriever_jax.convert.names import Rule, _hf_to_jax, _jax_to_hf, hf_to_params, rules_for
from bmretriever_jax.embed import PASSAGE_TEMPLATE, QUERY_TEMPLATE, TASK_INSTRUCTIONS, instruction_for, tokenize
from bmretriever_jax.util.errors import ModelSourceError, OutputExistsError
from bmretriever_jax.convert.sources import (ADAPTER_FILE, SETTINGS_FILE, ModelSource, _adapter_modules, _module_of,
                                            hf_layout, open_source)  # noqa: F401  (hf_layout: part of this API)
from bmretriever_jax.models.config import ModelConfig
from bmretriever_jax.convert.weights import SafetensorsWriter

FORMATS = ("hf", "sentence-transformers", "peft")
# BMRetriever's general question-answering instruction (its NFCorpus one); `instruction=` overrides it.
DEFAULT_INSTRUCTION = TASK_INSTRUCTIONS["nfcorpus"]
QUERY_PROMPT = QUERY_TEMPLATE.split("{query}")[0]  # "{instruction}\nQuery: "
PASSAGE_PROMPT = PASSAGE_TEMPLATE.split("{title}")[0]  # "Represent this passage\npassage: "
# Families whose transformers model honours bidirectional attention from config.json (use_bidirectional_attention).
_BIDIRECTIONAL_IN_HF = ("gemma3",)


# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------
def _prepare_out(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):
        raise OutputExistsError(f"{out} exists and is not empty; export to a new directory")
    os.makedirs(out, exist_ok=True)


def write_weights(reader, out: str, dtype: str = "float32", progress: bool = False) -> None:
    """Stream every tensor of `reader` into out/model.safetensors (sharded above 5 GiB)."""
    writer = SafetensorsWriter(out)
    for name in tqdm(list(reader.keys()), desc=f"writing {os.path.basename(os.path.normpath(out))}", unit="tensor",
                     disable=not progress, leave=False):
        writer.write(name, np.asarray(reader.read(name)).astype(_np_dtype(dtype)))
    writer.close()


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        return ml_dtypes.bfloat16
    if dtype not in ("float32", "float16"):
        raise ModelSourceError(f"dtype {dtype!r}; allowed: float32, float16, bfloat16")
    return np.dtype(dtype)


def write_model_files(cfg: ModelConfig, out: str, settings: Mapping[str, Any], tokenizer_folder: Optional[str], *,
                      dtype: str = "float32") -> None:
    """config.json (AutoModel base class of the family) + tokenizer files + bmretriever.json beside the weights."""
    bidirectional = bool(settings.get("bidirectional", False))
    if bidirectional and cfg.family not in _BIDIRECTIONAL_IN_HF:
        warnings.warn(f"{cfg.family}: transformers has no bidirectional switch for this family; AutoModel will run the "
                      f"exported model causally (our Encoder.load reads bidirectional from {SETTINGS_FILE})")
    d = config_to_hf(cfg, bidirectional=bidirectional)
    d["torch_dtype"] = d["dtype"] = dtype
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    if not copy_tokenizer(tokenizer_folder, out):
        warnings.warn(f"no tokenizer files found in {tokenizer_folder!r}; {out} holds weights only")
    with open(os.path.join(out, SETTINGS_FILE), "w") as f:
        json.dump(dict(settings), f, indent=2)


def _settings_for_export(source: ModelSource, max_length: Optional[int] = None) -> Dict[str, Any]:
    s = {"pooling": "last", "normalize": True, "max_length": min(512, source.cfg.max_position_embeddings),
         "bidirectional": False, "base_model": None, "lora": None}
    s.update(source.settings)
    if max_length is not None:
        s["max_length"] = int(max_length)
    return s


def export_hf(source: ModelSource, out: str, *, dtype: str = "float32", max_length: Optional[int] = None,
              progress: bool = False) -> str:
    """Weights (LoRA folded) + config.json + tokenizer + bmretriever.json; `load_hf(out)` gives the same tree."""
    _prepare_out(out)
    settings = _settings_for_export(source, max_length)
    if source.adapters is not None:
        settings["lora"] = dataclasses.asdict(source.lora) | {"enabled": True}
    write_weights(source.reader, out, dtype, progress=progress)
    write_model_files(source.cfg, out, settings, source.tokenizer_folder, dtype=dtype)
    if source.adapters is not None:  # keep the adapter beside the merged weights, so `--format peft` works on `out`
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in source.adapters.items()},
                  os.path.join(out, ADAPTER_FILE))
    return out


# ---------------------------------------------------------------------------------------- sentence-transformers
def _probe_texts(max_length: int) -> List[str]:
    long = " ".join(["retrieve documents that support the claim"] * (max_length + 8))
    return ["", "a", "Given a claim\nQuery: gene expression in cancer cells", PASSAGE_PROMPT + "blood pressure", long]


def st_tokenizer_args(folder: str, max_length: int) -> Dict[str, Any]:
    """Tokenizer arguments that make sentence-transformers' tokenizer of `folder` append EOS and pad on the left,
    checked: for every probe text (long ones included) its ids equal our embed.tokenize's.

    They go to sentence_bert_config.json ("tokenizer_args", passed to AutoTokenizer.from_pretrained), not into the
    tokenizer files, so the same folder still loads unchanged in our Encoder (which appends EOS itself).
    add_eos_token / add_bos_token make transformers rebuild the post-processor as [BOS] text EOS."""
    import transformers  # ~0.8 s (tokenizers ~2 s more), for this export only: not for every importer of merge/

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if tok.eos_token_id is None:
        raise ModelSourceError(f"{folder}: the tokenizer has no EOS token; last-token pooling needs one")
    probe = tok("a", add_special_tokens=True)["input_ids"]
    adds_bos = bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id
    args = {"add_eos_token": True, "add_bos_token": adds_bos, "padding_side": "left"}
    st_tok = transformers.AutoTokenizer.from_pretrained(folder, **args)
    texts = _probe_texts(max_length)
    ours = tokenize(tok, texts, max_length)
    theirs = st_tok(texts, truncation=True, max_length=max_length)["input_ids"]
    for text, a, b in zip(texts, ours, theirs):
        if a != b:
            raise RuntimeError(f"{folder}: with {args} the tokenizer gives {b} for {text[:40]!r}, ours {a}: cannot "
                               "make sentence-transformers tokenise like our encoder")
    return args


def st_prompts(instruction: str, instructions: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Prompt names -> prefixes: query (the default instruction), passage / document, and one per known task."""
    prompts = {"query": QUERY_PROMPT.format(instruction=instruction), "passage": PASSAGE_PROMPT,
               "document": PASSAGE_PROMPT}
    for task, instr in {**TASK_INSTRUCTIONS, **(instructions or {})}.items():
        prompts.setdefault(task, QUERY_PROMPT.format(instruction=instr))
    return prompts


def export_sentence_transformers(source: ModelSource, out: str, *, instruction: Optional[str] = None,
                                 max_length: Optional[int] = None, dtype: str = "float32",
                                 progress: bool = False) -> str:
    """The hf export + the sentence-transformers module files (legacy layout, which every version since 2.x loads)."""
    settings = _settings_for_export(source, max_length)
    if settings.get("bidirectional") and source.cfg.family not in _BIDIRECTIONAL_IN_HF:
        raise ModelSourceError(f"a bidirectional {source.cfg.family} retriever cannot be expressed for sentence-transformers "
                         "(transformers runs this family causally); export --format hf and load it with our Encoder")
    pooling = settings["pooling"]
    if pooling not in ("last", "mean"):
        raise ModelSourceError(f"pooling {pooling!r}; allowed: last, mean")
    if not source.tokenizer_folder:
        raise ModelSourceError(f"{source.label}: no tokenizer files; sentence-transformers needs the tokenizer")
    instr = instruction_for(instruction) if instruction else settings.get("instruction") or DEFAULT_INSTRUCTION
    L = int(settings["max_length"])
    tokenizer_args = st_tokenizer_args(source.tokenizer_folder, L)  # before writing anything: it may refuse
    export_hf(source, out, dtype=dtype, max_length=max_length, progress=progress)

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if settings.get("normalize", True):
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    pool = {"word_embedding_dimension": source.cfg.hidden_size, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": pooling == "last", "include_prompt": True}
    files = {"modules.json": modules, "1_Pooling/config.json": pool,
             "sentence_bert_config.json": {"max_seq_length": L, "do_lower_case": False, "tokenizer_args": tokenizer_args},
             "config_sentence_transformers.json": {
                 "__version__": {"bmretriever_jax": _version()}, "model_type": "SentenceTransformer",
                 "prompts": st_prompts(instr, settings.get("instructions")), "default_prompt_name": None,
                 "similarity_fn_name": "cosine" if settings.get("normalize", True) else "dot"}}
    for name, obj in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(_ST_README.format(L=L, pooling=pooling, instruction=instr))
    return out


_ST_README = """# BMRetriever-style dense retriever (exported by bmretriever_jax)

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(PATH)
q = model.encode(["what lowers blood pressure?"], prompt_name="query")      # instruction + "\\nQuery: "
d = model.encode(["Beta blockers reduce ..."], prompt_name="passage")        # "Represent this passage\\npassage: "
```
Prompts: `query` ({instruction!r}), `passage` / `document`, and one per task (e.g. `scifact`). With a title,
pass `f"{{title}} {{text}}"`. Pooling: {pooling} token, L2-normalised; the tokenizer pads on the left and appends EOS;
max_seq_length {L} (EOS included).
"""


def _version() -> str:
    try:
        return version("bmretriever_jax")
    except Exception:  # noqa: BLE001 - a missing distribution only loses the version stamp
        return "unknown"


# ---------------------------------------------------------------------------------------------------------- PEFT
PEFT_PREFIX = "base_model.model."
_QKV_META = "bmretriever_neox_qkv"  # safetensors metadata: which of q,k,v the fused adapter blocks hold


def _hf_module(rule: Rule) -> str:
    return rule.hf[: -len(".weight")]


def peft_tensors(cfg: ModelConfig, adapters: Mapping[str, Any], lcfg: lora_lib.LoraConfig
                 ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], Dict[str, str]]:
    """Our adapter tree -> (PEFT state dict, adapter_config fields, safetensors metadata).

    lora_A.weight = lora_a[i].T [r, in], lora_B.weight = lora_b[i].T [out, r] (PEFT multiplies by its own scale).
    GPT-NeoX's fused query_key_value: the q/k/v adapters become one of rank r * (number adapted): A stacks their
    A's, B places each B in its heads' rows of the fused [q,k,v]-per-head layout (zeros elsewhere), so B @ A is
    exactly the fused delta; rank_pattern / alpha_pattern keep the scale alpha / r (or alpha / sqrt(r))."""
    modules = _adapter_modules(cfg, adapters)
    tensors: Dict[str, np.ndarray] = {}
    targets, rank_pattern, alpha_pattern, meta = set(), {}, {}, {}
    r = lcfg.rank
    for rule in rules_for(cfg):
        if not rule.per_layer or rule.kind not in ("linear", "neox_qkv"):
            continue
        mods = [_module_of(p) for p in rule.jax]
        present = [j for j, m in enumerate(mods) if m in modules]
        if not present:
            continue
        name = _hf_module(rule)
        leaf_name = name.rsplit(".", 1)[-1]
        targets.add(leaf_name)
        for i in range(cfg.num_layers):
            if rule.kind == "linear":
                a, b = modules[mods[0]]
                A, B = np.asarray(a[i], np.float32).T, np.asarray(b[i], np.float32).T
            else:
                r_tot = r * len(present)
                A = np.concatenate([np.asarray(modules[mods[j]][0][i], np.float32).T for j in present], 0)
                ext = []
                for j in range(3):  # per component a "kernel" [r_tot, H*hd] holding its B in its rank block
                    e = np.zeros((r_tot, cfg.num_heads * cfg.head_dim), np.float32)
                    if j in present:
                        n = present.index(j)
                        e[n * r:(n + 1) * r] = np.asarray(modules[mods[j]][1][i], np.float32)
                    ext.append(e)
                B = _jax_to_hf(rule, cfg, ext)  # [3*H*hd, r_tot]
            key = f"{PEFT_PREFIX}{name.format(i=i)}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(A)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(B)
        if rule.kind == "neox_qkv":
            k = len(present)
            rank_pattern[leaf_name] = k * r
            alpha_pattern[leaf_name] = lcfg.alpha * (math.sqrt(k) if lcfg.rslora else k)
            meta[_QKV_META] = ",".join("qkv"[j] for j in present)
    config = {"r": r, "lora_alpha": lcfg.alpha, "use_rslora": lcfg.rslora, "lora_dropout": lcfg.dropout,
              "target_modules": sorted(targets), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return tensors, config, meta


def export_peft(source: ModelSource, out: str, *, base_model: Optional[str] = None) -> str:
    """adapter_config.json + adapter_model.safetensors (+ tokenizer files and bmretriever.json, which PEFT ignores)."""
    if source.adapters is None or source.lora is None:
        raise ModelSourceError(f"{source.label} has no LoRA adapter (a full fine-tune, a merge or a plain model): "
                         "export it with --format hf or sentence-transformers instead")
    base = base_model or source.base_folder or source.settings.get("base_model")
    if not base:
        raise ModelSourceError(f"{source.label}: unknown base model; pass base_model= (--base-model)")
    _prepare_out(out)
    tensors, fields, meta = peft_tensors(source.cfg, source.adapters, source.lora)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt", **meta})
    config = {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "base_model_name_or_path": base,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "revision": None, **fields}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copy_tokenizer(source.tokenizer_folder, out)
    settings = _settings_for_export(source)
    settings["lora"] = dataclasses.asdict(source.lora) | {"enabled": True}
    with open(os.path.join(out, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2)
    return out


def load_peft(folder: str, cfg: ModelConfig) -> Tuple[lora_lib.LoraConfig, dict]:
    """A PEFT LoRA folder (ours or PEFT's own, for a base model of cfg's family) -> (LoraConfig, adapter tree)."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        c = json.load(f)
    if c.get("peft_type") != "LORA":
        raise ModelSourceError(f"{folder}: peft_type {c.get('peft_type')!r}, only LORA is supported")
    r, alpha, rslora = int(c["r"]), float(c["lora_alpha"]), bool(c.get("use_rslora", False))
    path = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        stored = {k: f.get_tensor(k) for k in f.keys()}
    # PEFT's own saves drop the adapter name; tolerate both "lora_A.weight" and "lora_A.default.weight"
    stored = {k.replace(".default.weight", ".weight"): v for k, v in stored.items()}
    flat: Dict[str, np.ndarray] = {}
    for rule in rules_for(cfg):
        if not rule.per_layer or rule.kind not in ("linear", "neox_qkv"):
            continue
        name = PEFT_PREFIX + _hf_module(rule)
        if f"{name.format(i=0)}.lora_A.weight" not in stored:
            continue
        A = np.stack([stored[f"{name.format(i=i)}.lora_A.weight"] for i in range(cfg.num_layers)])
        B = np.stack([stored[f"{name.format(i=i)}.lora_B.weight"] for i in range(cfg.num_layers)])
        mods = [_module_of(p) for p in rule.jax]
        if rule.kind == "linear":
            flat[f"{mods[0]}/lora_a"] = np.swapaxes(A, 1, 2)
            flat[f"{mods[0]}/lora_b"] = np.swapaxes(B, 1, 2)
            continue
        comps = meta.get(_QKV_META)
        if not comps:
            raise ModelSourceError(f"{folder}: a fused query_key_value adapter without the {_QKV_META} metadata (not written by "
                             "bmretriever_jax) cannot be split into q/k/v adapters")
        for n, ch in enumerate(comps.split(",")):
            j = "qkv".index(ch)
            a = np.swapaxes(A[:, n * r:(n + 1) * r], 1, 2)  # [L, D, r]
            b = np.stack([_hf_to_jax(rule, cfg, B[i])[j][n * r:(n + 1) * r] for i in range(cfg.num_layers)])
            flat[f"{mods[j]}/lora_a"], flat[f"{mods[j]}/lora_b"] = a, b
    if not flat:
        raise ModelSourceError(f"{folder}: no LoRA tensors of a {cfg.family} model found")
    modules = sorted({p.rpartition("/")[0] for p in flat})
    lcfg = lora_lib.LoraConfig(rank=r, alpha=alpha, rslora=rslora, dropout=float(c.get("lora_dropout", 0.0)),
                               targets=tuple(f"{m}/kernel" for m in modules))
    return lcfg, treeutil.unflatten(flat)


# ----------------------------------------------------------------------------------------------------------- API
def export(src, out: str, fmt: str = "hf", *, step: Optional[int] = None, instruction: Optional[str] = None,
           max_length: Optional[int] = None, dtype: str = "float32", base_model: Optional[str] = None,
           quiet: bool = True) -> str:
    """Export `src` (run folder / checkpoint / model folder / name, or an opened ModelSource) to `out` as fmt:
    "hf", "sentence-transformers" or "peft". Returns out."""
    if fmt not in FORMATS:
        raise ModelSourceError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    source = src if isinstance(src, ModelSource) else open_source(src, step=step, quiet=quiet)
    if fmt == "hf":
        return export_hf(source, out, dtype=dtype, max_length=max_length, progress=not quiet)
    if fmt == "sentence-transformers":
        return export_sentence_transformers(source, out, instruction=instruction, max_length=max_length, dtype=dtype,
                                            progress=not quiet)
    return export_peft(source, out, base_model=base_model)


def load_tree(source: ModelSource) -> dict:
    """The whole model of a source as our parameter tree (numpy float32): for in-memory use (search, tests)."""
    flat = {n: source.reader.read(n) for n in source.reader.keys()}
    return hf_to_params(source.cfg, flat.__getitem__, flat.__contains__)
