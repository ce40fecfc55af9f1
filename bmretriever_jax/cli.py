"""`bmr` command line: thin argument parsing over library functions."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def cmd_info(a):
    from bmretriever_jax import hub
    from bmretriever_jax.convert.hf import config_from_hf

    folder = hub.resolve(a.model, quiet=a.quiet)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    n = cfg.num_params()
    emb = cfg.vocab_size * cfg.hidden_size
    import jax

    from bmretriever_jax.precision import resolve_dtype

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
    from bmretriever_jax.hub import retriever_settings

    s = retriever_settings(folder)
    if s:
        print(f"{'retriever':<{w}}{json.dumps(s)}")
    print(f"{'compute dtype (auto)':<{w}}{resolve_dtype('auto').name} on {jax.default_backend()}")


def _read_jsonl_texts(path: str):
    """-> ids, items; each line {"_id"|"id", "text", "title"?} (a BEIR corpus) or {"id","query"}."""
    ids, items = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: invalid JSON ({e.msg})")
            if not isinstance(d, dict):
                raise SystemExit(f"{path}:{n}: expected a JSON object")
            text = d.get("text", d.get("query"))
            if not isinstance(text, str):
                raise SystemExit(f"{path}:{n}: needs a string field 'text' (or 'query')")
            ids.append(str(d.get("_id", d.get("id", n))))
            items.append(d)
    return ids, items


def cmd_encode(a):
    import numpy as np

    from bmretriever_jax.embed import Encoder

    enc = Encoder.load(a.model, max_length=a.max_length, pooling=a.pooling, dtype=a.dtype, quiet=a.quiet)
    ids, items = _read_jsonl_texts(a.input)
    if a.kind == "query":
        vecs = enc.encode_queries([d.get("text", d.get("query")) for d in items], a.instruction,
                                  batch_size=a.batch_size, progress=not a.quiet)
    elif a.kind == "passage":
        vecs = enc.encode_passages(items, batch_size=a.batch_size, progress=not a.quiet)
    else:
        vecs = enc.encode_texts([d["text"] for d in items], batch_size=a.batch_size, progress=not a.quiet)
    os.makedirs(a.out, exist_ok=True)
    np.save(os.path.join(a.out, "vectors.npy"), vecs)
    with open(os.path.join(a.out, "ids.json"), "w") as f:
        json.dump(ids, f)
    print(f"wrote {vecs.shape[0]} x {vecs.shape[1]} vectors to {a.out}/vectors.npy (+ ids.json)")


def cmd_train(a):
    from bmretriever_jax.config import load_config
    from bmretriever_jax.train import train

    run = load_config(a.config, a.overrides)
    res = train(run, quiet=a.quiet)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in res.items()}, indent=1))


def cmd_plot(a):
    from bmretriever_jax.plot import plot_run

    print(plot_run(a.run_dir, a.out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bmr", description="decoder-only LLMs -> biomedical dense retrievers (JAX)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="architecture and parameter count of a model")
    s.add_argument("model", help="gemma3-270m | smollm2-135m | a .gguf file | a model folder")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("encode", help="texts (JSONL) -> vectors.npy + ids.json")
    s.add_argument("--model", default="gemma3-270m")
    s.add_argument("--input", required=True, help="JSONL with {_id|id, text, title?} per line")
    s.add_argument("--out", required=True)
    s.add_argument("--kind", choices=["passage", "query", "raw"], default="passage")
    s.add_argument("--instruction", default=None, help="task name (scifact, nfcorpus, ...) or literal instruction")
    s.add_argument("--max-length", type=int, default=None)
    s.add_argument("--pooling", choices=["last", "mean"], default=None)
    s.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="matmul inputs (f32 accumulation); auto: bfloat16 where the hardware has bf16 units")
    s.add_argument("--batch-size", type=int, default=32)
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser("train", help="contrastive training (both stages) from a YAML config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 lora.rank=8")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("plot", help="loss curve of a run to PNG")
    s.add_argument("run_dir")
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_plot)

    import importlib

    # subcommands live beside the code they drive; each module adds its own parsers
    for mod in ("cli_more", "merge_cli", "plan", "sweep", "synth.cli"):
        importlib.import_module(f"bmretriever_jax.{mod}").add_commands(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from bmretriever_jax.allocator import keep_freed_memory

    keep_freed_memory()  # before jax starts its threads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from bmretriever_jax.config import ConfigError
    from bmretriever_jax.distributed import maybe_initialize

    maybe_initialize()

    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"bmr {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
