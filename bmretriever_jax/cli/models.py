"""`bmr info` and `bmr encode`: what a model is, and texts -> vectors."""
from __future__ import annotations

import json
import os

import numpy as np

from bmretriever_jax.util.atomic import check_writable_dir
from bmretriever_jax.data.beir import jsonl_records
from bmretriever_jax.util.errors import DataFormatError, InputPathError
from bmretriever_jax.util.vector_files import write_vectors

DTYPES = ["auto", "bfloat16", "float32"]
DTYPE_HELP = "matmul inputs (f32 accumulation); auto: bfloat16 where the hardware has bf16 units"
MODEL_HELP = "gemma3-270m | smollm2-135m | a .gguf file | a model folder"


def cmd_info(a):
    from bmretriever_jax.convert import hub
    from bmretriever_jax.convert.hf import config_from_hf

    folder = hub.resolve(a.model, quiet=a.quiet)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    n = cfg.num_params()
    emb = cfg.vocab_size * cfg.hidden_size
    import jax

    from bmretriever_jax.util.precision import resolve_dtype

    w = 25
    print(f"{'model':<{w}}{a.model}\n{'folder':<{w}}{folder}\n{'family':<{w}}{cfg.family}")
    print(f"{'parameters':<{w}}{n:,} ({emb:,} in the embedding, {n - emb:,} in the layers)")
    fields = ["num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
              "act", "norm", "rope_theta", "rope_local_theta", "sliding_window", "qk_norm", "sandwich_norm",
              "tie_embeddings", "max_position_embeddings"]
    for k in fields:
        print(f"{k:<{w}}{getattr(cfg, k)}")
    if cfg.sliding_window:
        print(f"{'layers':<{w}}" + "".join("L" if s else "G" for s in cfg.layer_is_sliding) + "  (L local, G global)")
    s = hub.retriever_settings(folder)
    if s:
        print(f"{'retriever':<{w}}{json.dumps(s)}")
    print(f"{'compute dtype (auto)':<{w}}{resolve_dtype('auto').name} on {jax.default_backend()}")


def read_jsonl_texts(path: str):
    """-> ids, items; each line {"_id"|"id", "text", "title"?} (a BEIR corpus) or {"id", "query"}. Ids must be
    unique (they name the rows of vectors.npy); a line without one is named by its line number."""
    if not os.path.isfile(path):
        raise InputPathError(f"--input {path}: no such file")
    ids, items, first = [], [], {}
    for n, d in jsonl_records(path):
        text = d.get("text", d.get("query"))
        if not isinstance(text, str):
            raise DataFormatError(f"{path}:{n}: needs a string field 'text' (or 'query')")
        i = str(d.get("_id", d.get("id", n)))
        if i in first:
            raise DataFormatError(f"{path}:{n}: duplicate id {i!r} (first on line {first[i]})")
        first[i] = n
        ids.append(i)
        items.append(d)
    if not ids:
        raise DataFormatError(f"{path}: no texts (empty file)")
    return ids, items


def cmd_encode(a):
    from bmretriever_jax.embed import Encoder

    ids, items = read_jsonl_texts(a.input)  # bad input and an unwritable --out fail before the model loads
    check_writable_dir(a.out)
    enc = Encoder.load(a.model, max_length=a.max_length, pooling=a.pooling, dtype=a.dtype, quiet=a.quiet)
    if a.kind == "query":
        vecs = enc.encode_queries([d.get("text", d.get("query")) for d in items], a.instruction,
                                  batch_size=a.batch_size, progress=not a.quiet)
    elif a.kind == "passage":
        vecs = enc.encode_passages(items, batch_size=a.batch_size, progress=not a.quiet)
    else:
        vecs = enc.encode_texts([d["text"] for d in items], batch_size=a.batch_size, progress=not a.quiet)
    write_vectors(a.out, np.asarray(vecs), ids)  # both files or neither: a reader never sees a mismatched pair
    print(f"wrote {vecs.shape[0]} x {vecs.shape[1]} vectors to {a.out}/vectors.npy (+ ids.json)")


def add_commands(sub) -> None:
    s = sub.add_parser("info", help="architecture and parameter count of a model")
    s.add_argument("model", help=MODEL_HELP)
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("encode", help="texts (JSONL) -> vectors.npy + ids.json")
    s.add_argument("--model", default="gemma3-270m", help=MODEL_HELP)
    s.add_argument("--input", required=True, help="JSONL with {_id|id, text, title?} per line")
    s.add_argument("--out", required=True, help="folder for vectors.npy + ids.json")
    s.add_argument("--kind", choices=["passage", "query", "raw"], default="passage")
    s.add_argument("--instruction", default=None, help="task name (scifact, nfcorpus, ...) or literal instruction")
    s.add_argument("--max-length", type=int, default=None)
    s.add_argument("--pooling", choices=["last", "mean"], default=None)
    s.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    s.add_argument("--batch-size", type=int, default=32)
    s.set_defaults(fn=cmd_encode)
