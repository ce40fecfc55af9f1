"""Passage encoding: bmretriever_jax (JAX) vs transformers (PyTorch), Gemma 3 270M, same weights, same run.

    python benchmarks/encode.py            # 256 SciFact passages x 256 tokens, batch 32, 3 interleaved rounds
    python benchmarks/encode.py --quick    # 64 passages, 1 round: a smoke run (does not touch BENCHMARKS.md)

Both sides read the same transformers folder (the cached conversion of the packaged Gemma 3 270M GGUF) and
encode the same token ids: real SciFact abstracts in BMRetriever's passage template, truncated to 255 tokens
+ EOS and LEFT-padded to exactly 256 positions, so both do the same work per batch. Both pool the last
token and L2-normalise. Precisions:
  ours fp32   float32 everywhere                    (embed_batch(dtype=float32))
  ours bf16   bf16 matmul inputs, float32 accumulation, float32 residual/norms/softmax (the default)
  torch fp32  AutoModel in float32
  torch bf16  AutoModel.to(torch.bfloat16) (everything in bf16, as users run it)
The four contenders run round-robin (one full pass over the passages each per round) and report the
median pass. FLOPs per sequence: 2 * non-embedding params * T + 4 * T^2 * heads * head_dim * layers
(full attention matrix; neither side skips the causal half). The matmul peak of this CPU is measured in
the same run (2048^2 jitted JAX matmul; torch.mm for reference). Vectors are checked: cosine per passage
between ours and torch (min over passages) and bf16 vs fp32 agreement (cosine, top-10 neighbour overlap).
Writes benchmarks/results/encode.json (encode-fp32.json with --precisions fp32) and, for full runs, the table into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # run from a checkout
sys.path.insert(0, HERE)
from bmretriever_jax.util.allocator import keep_freed_memory  # noqa: E402

ALLOCATOR = "keep" if keep_freed_memory() else "system"  # before jax starts its threads: see allocator.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from bmretriever_jax.convert import hub  # noqa: E402
from bmretriever_jax.embed import embed_batch, format_passage, pad_left, tokenize  # noqa: E402
from bmretriever_jax.models import decoder  # noqa: E402

CORPUS = os.path.join(HERE, "..", "data", "scifact", "corpus.jsonl")
OWN_PEAK = {"ours bf16": "jax bf16->f32", "ours fp32": "jax fp32", "torch bf16": "torch bf16",
            "torch fp32": "torch fp32"}


def log(msg: str) -> None:
    print(f"[encode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_batches(tok, n: int, seq_len: int, batch: int):
    """First n SciFact passages -> list of (ids, mask) int32 [batch, seq_len] (left padded), real tokens."""
    docs = []
    with open(CORPUS) as f:
        for line in f:
            docs.append(json.loads(line))
            if len(docs) == n:
                break
    if len(docs) < n or n % batch:
        raise ValueError(f"need n={n} passages (have {len(docs)}) and n a multiple of batch={batch}")
    seqs = tokenize(tok, [format_passage(d) for d in docs], seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = [pad_left(seqs[i:i + batch], seq_len, pad) for i in range(0, n, batch)]
    return batches, sum(len(s) for s in seqs)


def flops_per_sequence(cfg, params, seq_len: int) -> float:
    non_embed = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                    if "embed" not in jax.tree_util.keystr(p))
    attn = 4 * seq_len * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return 2.0 * non_embed * seq_len + attn, non_embed


def ours(cfg, params, batches, dtype: str):
    """-> encode(): all batches -> [n, D] float32 vectors (device results fetched to host)."""
    fn = jax.jit(functools.partial(embed_batch, cfg, pooling="last", normalize=True, dtype=jnp.dtype(dtype)))
    dev = [(jnp.asarray(i), jnp.asarray(m)) for i, m in batches]

    def encode():
        return np.concatenate([np.asarray(fn(params, i, m)) for i, m in dev])

    return encode


def theirs(model, batches):
    import torch

    dev = []
    for ids, mask in batches:
        ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
        # the same positions as ours (first real token = 0); rotary attention is shift-invariant anyway
        dev.append((ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)))

    def encode():
        out = []
        with torch.inference_mode():
            for ids, mask, pos in dev:
                h = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
                out.append(torch.nn.functional.normalize(h.float(), dim=-1).numpy())
        return np.concatenate(out)

    return encode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--passages", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved passes per contender (median reported)")
    ap.add_argument("--quick", action="store_true", help="64 passages, 1 round, no BENCHMARKS.md update")
    ap.add_argument("--precisions", choices=["auto", "all", "fp32"], default="auto",
                    help="fp32: fp32 contenders only, for CPUs without bf16 units (bf16 is emulated there: torch bf16 "
                         "matmul ~0.3 GFLOP/s); writes the encode-fp32 section; auto: by the CPU")
    ap.add_argument("--out", default=None,
                    help="results JSON (default: benchmarks/results/encode.json, or encode-fp32.json for fp32 only)")
    ap.add_argument("--markdown", default=os.path.join(HERE, "..", "BENCHMARKS.md"),
                    help="file whose encode section gets the table ('' to skip)")
    args = ap.parse_args()
    if args.precisions == "auto":
        from bmretriever_jax.util.precision import bf16_is_fast

        args.precisions = "all" if bf16_is_fast() else "fp32"
    if args.quick:
        args.passages, args.rounds, args.markdown = 64, 1, ""
    fp32_only = args.precisions == "fp32"
    args.out = args.out or common.results_path("encode", fp32_only=fp32_only, quick=args.quick)

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    load_start = common.load_average()
    log(f"load average {load_start}; loading {args.model}")
    cfg, params_np, tok, folder = hub.load(args.model, quiet=True)
    params = jax.tree.map(jnp.asarray, params_np)
    del params_np
    batches, real_tokens = load_batches(tok, args.passages, args.seq_len, args.batch)
    positions = args.passages * args.seq_len
    fl_seq, non_embed = flops_per_sequence(cfg, params, args.seq_len)
    flops = fl_seq * args.passages

    t32 = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    contenders = {"ours fp32": ours(cfg, params, batches, "float32"), "torch fp32": theirs(t32, batches)}
    if not fp32_only:
        t16 = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).to(torch.bfloat16).eval()
        contenders = {"ours bf16": ours(cfg, params, batches, "bfloat16"), **contenders,
                      "torch bf16": theirs(t16, batches)}

    log("matmul peaks (2048^2)")
    peaks = {"jax bf16->f32": common.jax_matmul_peak("bfloat16"), "jax fp32": common.jax_matmul_peak("float32"),
             "torch fp32": common.torch_matmul_peak("float32")}
    if not fp32_only:
        peaks["torch bf16"] = common.torch_matmul_peak("bfloat16")

    # warm-up pass (compilation, lazy init): also the vectors the checks use
    vecs = {}
    for name, fn in contenders.items():
        t = time.perf_counter()
        vecs[name] = fn()
        log(f"warm-up {name}: {time.perf_counter() - t:.1f} s")
    timing = common.interleaved(contenders, args.rounds, log)
    peaks_end = {"jax bf16->f32": common.jax_matmul_peak("bfloat16"), "jax fp32": common.jax_matmul_peak("float32")}
    load_end = common.load_average()

    rows = {}
    for name, t in timing.items():
        s = t["median_s"]
        own_peak = peaks[OWN_PEAK[name]]
        rows[name] = {"seconds": s, "passages_per_s": args.passages / s, "tokens_per_s": positions / s,
                      "gflops": flops / s / 1e9, "fraction_of_jax_bf16_peak": flops / s / 1e9 / peaks["jax bf16->f32"],
                      "fraction_of_own_peak": flops / s / 1e9 / own_peak, **t}
    tps = {k: r["tokens_per_s"] for k, r in rows.items()}
    ratios = {"ours fp32 / torch fp32": tps["ours fp32"] / tps["torch fp32"]}
    cos = {"ours fp32 vs torch fp32": common.cosine_rows(vecs["ours fp32"], vecs["torch fp32"])}
    if not fp32_only:
        ratios = {"ours bf16 / torch bf16": tps["ours bf16"] / tps["torch bf16"],
                  "ours bf16 / torch fp32": tps["ours bf16"] / tps["torch fp32"], **ratios}
        cos.update({"ours bf16 vs torch bf16": common.cosine_rows(vecs["ours bf16"], vecs["torch bf16"]),
                    "ours bf16 vs torch fp32": common.cosine_rows(vecs["ours bf16"], vecs["torch fp32"]),
                    "torch bf16 vs torch fp32": common.cosine_rows(vecs["torch bf16"], vecs["torch fp32"]),
                    "ours bf16 vs ours fp32": common.cosine_rows(vecs["ours bf16"], vecs["ours fp32"])})
    agreement = {k: {"min_cosine": float(v.min()), "mean_cosine": float(v.mean())} for k, v in cos.items()}
    if not fp32_only:
        agreement["ours bf16 vs ours fp32"]["top10_neighbour_overlap"] = common.neighbour_overlap(
            vecs["ours bf16"], vecs["ours fp32"])
        agreement["torch bf16 vs torch fp32"]["top10_neighbour_overlap"] = common.neighbour_overlap(
            vecs["torch bf16"], vecs["torch fp32"])

    cpu = common.cpu_info()
    lines = [f"{args.passages} SciFact passages x {args.seq_len} tokens (left padded; {real_tokens / positions:.0%} "
             f"real tokens), batch {args.batch}, {cfg.num_layers}-layer Gemma 3 270M "
             f"({non_embed / 1e6:.1f} M non-embedding params, {fl_seq / args.seq_len / 1e6:.0f} MFLOP/token); "
             f"median of {args.rounds} interleaved round(s). CPU: {cpu['model']}, {cpu['logical_cpus']} cores "
             f"({', '.join(i for i in cpu['isa'] if 'bf16' in i or 'amx' in i) or 'no bf16 ISA'}); load average "
             f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end. Matmul peak (2048^2, this run): jax bf16->f32 "
             f"{peaks['jax bf16->f32']:.0f} GFLOP/s (end: {peaks_end['jax bf16->f32']:.0f}), jax fp32 "
             f"{peaks['jax fp32']:.0f}, torch bf16 {peaks.get('torch bf16', float('nan')):.0f}, torch fp32 "
             f"{peaks['torch fp32']:.0f}.",
             "",
             "| contender | s / pass | passages/s | tokens/s | GFLOP/s | of jax bf16 peak | of own matmul peak "
             "| CPU-s / pass |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['passages_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['gflops']:.0f} | {r['fraction_of_jax_bf16_peak']:.0%} | {r['fraction_of_own_peak']:.0%} "
                     f"| {r['median_cpu_s']:.1f} |")
    lines += ["", "| ratio (tokens/s) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    lines += ["", "| vectors | min cosine | mean cosine | top-10 neighbour overlap |", "|---|---|---|---|"]
    for k, v in agreement.items():
        ov = f"{v['top10_neighbour_overlap']:.3f}" if "top10_neighbour_overlap" in v else ""
        lines.append(f"| {k} | {v['min_cosine']:.5f} | {v['mean_cosine']:.6f} | {ov} |")
    table = "\n".join(lines)
    print(table)

    common.write_json(args.out, {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")},
        "workload": {"positions": positions, "real_tokens": real_tokens, "flops_per_sequence": fl_seq,
                     "non_embedding_params": non_embed, "total_gflop": flops / 1e9},
        "matmul_peak_gflops": peaks, "matmul_peak_gflops_at_end": peaks_end, "results": rows, "ratios": ratios,
        "vector_agreement": agreement,
        "machine": {**cpu, "load_average_start": load_start, "load_average_end": load_end,
                    "torch_threads": torch.get_num_threads(),
                    "torch_attention": getattr(t32.config, "_attn_implementation", "unknown"),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "allocator": ALLOCATOR,
                    "ours_cpu_chunk_tokens": decoder.CPU_CHUNK_TOKENS,
                    **common.versions("jax", "jaxlib", "torch", "transformers", "numpy")},
        "table": lines})
    log(f"wrote {args.out}")
    if args.markdown:
        section, cmd = ("encode-fp32", "python benchmarks/encode.py --precisions fp32") if fp32_only else (
            "encode", "python benchmarks/encode.py")
        common.replace_section(args.markdown, section, f"Command: `{cmd}`\n\n" + table)
        log(f"updated the encode section of {args.markdown}")


if __name__ == "__main__":
    main()
