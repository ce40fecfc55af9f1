"""Greedy generation: bmretriever_jax's KV-cache generator (JAX) vs transformers `generate` (PyTorch), same run.

    python benchmarks/generate.py              # SmolLM2-135M-Instruct, batch 8, 128-token prompts, 64 new tokens
    python benchmarks/generate.py --quick      # batch 4, 64-token prompts, 16 new tokens, 1 round

Both sides load the same transformers folder (the cached conversion of the packaged SmolLM2 GGUF: tied
embeddings, so AutoModelForCausalLM loads it with its LM head) and generate from the same token ids: real
SciFact abstracts in SmolLM2's chat template, cut to exactly --prompt-len tokens, so no row is padded and
both do the same work. Greedy, no EOS stop (transformers: eos_token_id=None, min_new_tokens = max_new_tokens),
so every row generates exactly --new-tokens tokens. Precisions:
  ours fp32   float32 everywhere
  ours bf16   bf16 matmul inputs, float32 accumulation, float32 residual/norms/softmax (the default)
  torch fp32  AutoModelForCausalLM in float32
  torch bf16  AutoModelForCausalLM.to(torch.bfloat16) (everything in bf16, as users run it)
The contenders run round-robin (common.interleaved) and report the median. tokens/s = batch * new tokens /
wall time of the whole call (prefill included); decode tokens/s = batch * (new - 1) / (t(new) - t(1)), from
a second, 1-token run of each contender. Agreement: fraction of rows whose greedy tokens equal torch fp32's
(ours fp32 should be 1.0 up to near-ties), and the mean common-prefix length. Writes
benchmarks/results/generate.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # run from a checkout
sys.path.insert(0, HERE)
from bmretriever_jax.util.allocator import keep_freed_memory  # noqa: E402

ALLOCATOR = "keep" if keep_freed_memory() else "system"  # before jax starts its threads: see allocator.py


def _threads_from_argv(argv) -> int:
    """--threads must act before jax is imported (XLA reads its flags once)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=0)
    return pre.parse_known_args(argv)[0].threads


THREADS = _threads_from_argv(sys.argv[1:])
if THREADS == 1:
    # one intra-op thread for XLA, as torch.set_num_threads(1) below: the same budget on both sides
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from bmretriever_jax.convert import hub  # noqa: E402
from bmretriever_jax.convert.hf import load_hf  # noqa: E402
from bmretriever_jax.data.beir import load_corpus  # noqa: E402
from bmretriever_jax.synth.generate import Generator  # noqa: E402


def prompts_of_length(tok, n: int, length: int, corpus_path: str) -> list:
    """n chat prompts (SmolLM2's template around a SciFact abstract) cut to exactly `length` tokens each."""
    corpus = load_corpus(corpus_path)
    out = []
    for doc in corpus.values():
        msgs = [{"role": "user", "content": "Write one question answered by this passage.\n\n" + doc["text"]}]
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if len(ids) >= length:
            # keep the template's head and the generation prompt at the end; cut the passage in between
            out.append(list(ids[:length - 8]) + list(ids[-8:]))
        if len(out) == n:
            return out
    raise ValueError(f"not enough SciFact abstracts of >= {length} tokens")


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="1: one thread on both sides (XLA and torch); 0: defaults "
                   "(all cores). On a loaded machine torch's OpenMP threads suffer more from contention than XLA's")
    p.add_argument("--data", default=os.path.join(HERE, "..", "data", "scifact", "corpus.jsonl"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "generate.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.prompt_len, a.new_tokens, a.rounds = 4, 64, 16, 1
    import torch
    import transformers

    if a.threads:
        torch.set_num_threads(a.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    folder = hub.resolve(a.model, quiet=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = prompts_of_length(tok, a.batch, a.prompt_len, a.data)
    B, P, N = a.batch, a.prompt_len, a.new_tokens
    load_before = common.load_average()

    cfg, params = load_hf(folder)
    ours = {dt: Generator(cfg, params, tok, dtype=dt, batch_size=B) for dt in ("float32", "bfloat16")}
    del params
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(torch.bfloat16).eval()
    assert ref32.lm_head.weight.data_ptr() == ref32.model.embed_tokens.weight.data_ptr(), "tied LM head expected"
    ids_t = torch.tensor(prompts, dtype=torch.long)
    mask_t = torch.ones_like(ids_t)

    def run_ours(dt, n):
        return lambda: ours[dt].generate_ids(prompts, max_new_tokens=n, eos_ids=())

    def run_torch(model, n):
        def f():
            with torch.inference_mode():
                out = model.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
            return out[:, P:].tolist()
        return f

    fns, outputs = {}, {}
    for n in (N, 1):
        fns[f"ours fp32|{n}"] = run_ours("float32", n)
        fns[f"ours bf16|{n}"] = run_ours("bfloat16", n)
        fns[f"torch fp32|{n}"] = run_torch(ref32, n)
        fns[f"torch bf16|{n}"] = run_torch(ref16, n)
    compile_s = {}
    for name, fn in fns.items():   # warm-up: compilation (ours), lazy init (torch); keep the outputs
        t = time.perf_counter()
        outputs[name] = fn()
        compile_s[name] = time.perf_counter() - t
        log(f"warm-up {name}: {compile_s[name]:.1f} s")
    timings = common.interleaved(fns, a.rounds, log)
    load_after = common.load_average()

    ref_tokens = outputs[f"torch fp32|{N}"]
    results = {}
    for name in ("ours fp32", "ours bf16", "torch fp32", "torch bf16"):
        t_full = timings[f"{name}|{N}"]["median_s"]
        t_one = timings[f"{name}|1"]["median_s"]
        toks = outputs[f"{name}|{N}"]
        assert all(len(t) == N for t in toks), name
        exact = float(np.mean([list(x) == list(y) for x, y in zip(toks, ref_tokens)]))
        prefix = float(np.mean([common_prefix(x, y) for x, y in zip(toks, ref_tokens)]))
        decode = B * (N - 1) / max(t_full - t_one, 1e-9)
        results[name] = {"seconds": t_full, "tokens_per_s": B * N / t_full, "prefill_plus_1_token_s": t_one,
                         "decode_tokens_per_s": decode, "rows_equal_to_torch_fp32": exact,
                         "mean_common_prefix_with_torch_fp32": prefix, "first_call_s": compile_s[f"{name}|{N}"],
                         "times_s": timings[f"{name}|{N}"]["times_s"]}
    for dt in ("fp32", "bf16"):
        results[f"ours {dt}"]["speedup_vs_torch_same_dtype"] = (results[f"ours {dt}"]["tokens_per_s"]
                                                                / results[f"torch {dt}"]["tokens_per_s"])
        results[f"ours {dt}"]["decode_speedup_vs_torch_same_dtype"] = (
            results[f"ours {dt}"]["decode_tokens_per_s"] / results[f"torch {dt}"]["decode_tokens_per_s"])

    head = f"| {'':<11}| tokens/s | vs torch | decode tok/s | vs torch | rows = torch fp32 | common prefix |"
    lines = [f"SmolLM2-135M greedy, batch {B}, prompt {P} tokens, {N} new tokens, median of {a.rounds} rounds, "
             f"threads {a.threads or 'default'}, torch threads {torch.get_num_threads()} "
             f"(load {load_before[0]:.1f} -> {load_after[0]:.1f})", head, "|" + "---|" * 7]
    for name, r in results.items():
        sp = r.get("speedup_vs_torch_same_dtype")
        dsp = r.get("decode_speedup_vs_torch_same_dtype")
        lines.append(f"| {name:<11}| {r['tokens_per_s']:8.1f} | {'' if sp is None else f'{sp:.2f}x':>8} | "
                     f"{r['decode_tokens_per_s']:12.1f} | {'' if dsp is None else f'{dsp:.2f}x':>8} | "
                     f"{r['rows_equal_to_torch_fp32']:17.2f} | {r['mean_common_prefix_with_torch_fp32']:13.1f} |")
    table = "\n".join(lines)
    print(table)
    common.write_json(a.out, {"model": a.model, "batch": B, "prompt_len": P, "new_tokens": N, "rounds": a.rounds,
                              "threads": a.threads or "default", "torch_threads": torch.get_num_threads(),
                              "xla_flags": os.environ.get("XLA_FLAGS", ""), "allocator": ALLOCATOR,
                              "results": results, "table": table, "cpu": common.cpu_info(),
                              "load_before": load_before, "load_after": load_after,
                              "versions": common.versions("jax", "torch", "transformers"),
                              "jax_devices": [str(d) for d in jax.devices()]})
    print(f"wrote {a.out}")
    if not a.quick:
        common.replace_section(os.path.join(HERE, "..", "BENCHMARKS.md"), "generate",
                               f"Command: `python benchmarks/generate.py{' --threads ' + str(a.threads) if a.threads else ''}`"
                               f"\n\n{table}")


if __name__ == "__main__":
    main()
