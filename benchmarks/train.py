"""Contrastive LoRA training step: bmretriever_jax (JAX) vs transformers + peft (PyTorch), Gemma 3 270M.

    python benchmarks/train.py            # speed (batch 8, 5 interleaved steps) + memory vs batch 64..4096
    python benchmarks/train.py --quick    # batch 2, 64-token passages, 1 step, memory at 64 and 512: a smoke run

Both sides train the same model (the cached transformers conversion of the packaged Gemma 3 270M GGUF) on
the same batch: real SciFact train pairs (query in BMRetriever's instruction template, positive abstract,
one hard negative = another pair's positive, as `PairLoader(short="pad")` fills it), tokenised by our
`make_tokenize_fn` (EOS appended, LEFT padded to exactly --query-len / --passage-len), so both do the same
work. Both: last-token pooling, L2 norm, InfoNCE with cosine similarity at temperature 0.02 over every
passage of the batch (in-batch + 1 hard negative), LoRA r16 / alpha 32 on q,k,v,o,gate,up,down (no dropout),
AdamW (b 0.9/0.999, eps 1e-8, wd 0.01) on the adapters only, global-norm clipping at 1.0.

Ours is the real training step: `bmretriever_jax.training.make_train_step` on a RunConfig from `load_config`,
state / frozen params / mesh (mesh.data=1) / batches built as `train()` builds them. Precisions:
  ours bf16           model.dtype=bfloat16: bf16 matmul inputs, f32 accumulation, f32 master weights (frozen
                      base and adapters in f32), f32 norms / softmax / loss. model.remat=true (the default:
                      each layer's activations are recomputed in the backward pass).
  ours bf16 no-remat  the same with model.remat=false (like-for-like with torch, which keeps activations).
  ours fp32           model.dtype=float32, model.remat=false.
  torch fp32          AutoModel in float32 + peft LoRA.
  torch bf16 autocast float32 model + adapters (master weights), forward under torch.autocast(cpu, bf16):
                      the same numerics as ours bf16.
  torch bf16 weights  base model cast to bf16, peft's default keeps the adapters (and their matmuls) in f32:
                      how people usually run LoRA in bf16; less memory traffic for the frozen weights.
The contenders run round-robin, one training step each per round (after --warmup steps each: compilation,
lazy init, and our heap reaching its steady size), and report the median step. Memory: see train_memory.py (compiled-program memory of our step vs
global batch with and without the gradient cache; measured process RSS of single steps of both sides).
Writes benchmarks/results/train.json (train-fp32.json with --precisions fp32) and
benchmarks/results/train_memory.png; prints markdown tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # run from a checkout
sys.path.insert(0, HERE)
# torch's OpenMP threads spin while they wait; on a shared, oversubscribed machine a spinning thread whose
# partner is descheduled stalls every parallel region (measured here at load ~8: a 2-thread torch step took
# 40-90 s with the default policy, 3-4 s with PASSIVE, 3-4 s with 1 thread). XLA does not use OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from bmretriever_jax.util.allocator import keep_freed_memory  # noqa: E402

ALLOCATOR = "keep" if keep_freed_memory() else "system"  # before jax starts its threads: see allocator.py

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from bmretriever_jax.parallel import sharding  # noqa: E402
from bmretriever_jax.config import load_config  # noqa: E402
from bmretriever_jax.training import (init_state, make_mesh, make_optimizer, make_tokenize_fn,  # noqa: E402
                                   make_train_step, split_params, to_global)

TEMPERATURE = 0.02
LORA_R, LORA_ALPHA = 16, 32.0
TORCH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, WD, CLIP = 1e-4, 0.01, 1.0


def log(msg: str) -> None:
    print(f"[train-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Config and batches (shared with train_memory.py)
# ----------------------------------------------------------------------------------------------------
def make_run(batch: int, query_len: int, passage_len: int, negatives: int, *, dtype: str = "bfloat16",
             remat: bool = True, grad_cache: int = 0, model: str = "gemma3-270m"):
    """The RunConfig a user would write for this benchmark (everything else: the package defaults)."""
    return load_config(None, [
        f"model.name={model}", f"model.dtype={dtype}", f"model.remat={str(remat).lower()}",
        f"model.max_length={passage_len}", f"model.query_max_length={query_len}", "model.pooling=last",
        "model.normalize=true", "model.param_dtype=float32",
        f"train.global_batch_size={batch}", f"train.grad_cache_chunk={grad_cache}",
        f"train.temperature={TEMPERATURE}", "train.similarity=cos", f"train.lr={LR}", f"train.weight_decay={WD}",
        f"train.clip={CLIP}", "train.steps=100000", "train.warmup_steps=1", "train.schedule=constant",
        "lora.enabled=true", f"lora.rank={LORA_R}", f"lora.alpha={LORA_ALPHA}", "lora.dropout=0.0",
        f"data.num_negatives={negatives}", "data.short=pad", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])


def real_batch(tok, run) -> dict:
    """One global batch of real SciFact train pairs -> {q_ids, q_mask [B, Tq], p_ids, p_mask [B*G, Tp]} int32."""
    from bmretriever_jax.data import builders
    from bmretriever_jax.data.loader import PairLoader

    pairs = builders.build("scifact")
    loader = PairLoader(pairs, run.train.global_batch_size, seed=0, num_negatives=run.data.num_negatives,
                        negatives="random", short="pad", drop_last=False, tokenize_fn=make_tokenize_fn(tok, run))
    return next(iter(loader))


# ----------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------
class Ours:
    """Our real train step, set up the way bmretriever_jax.training.train() sets it up."""

    def __init__(self, model_cfg, base_np: dict, frozen, run, batch_np: dict):
        self.run = run
        self.mesh = make_mesh(run)
        optimizer = make_optimizer(run)
        trainable_model, _ = split_params(base_np, run, jax.random.PRNGKey(run.train.seed))
        state = init_state(run, trainable_model, optimizer)
        shardings = sharding.tree_shardings(state, self.mesh)
        self.state = jax.device_put(state, shardings)
        self.frozen = frozen
        self.batch = to_global(batch_np, self.mesh)
        self.fn = make_train_step(model_cfg, run, optimizer, self.mesh, shardings)

    def step(self) -> float:
        self.state, metrics = self.fn(self.state, self.frozen, self.batch)
        return float(metrics["loss"])  # waits for the step


def ours_frozen(base_np: dict, run):
    """The frozen base on the device, laid out as train() lays it out (shared by all our contenders)."""
    return sharding.shard(jax.tree.map(np.asarray, base_np), make_mesh(run))


# ----------------------------------------------------------------------------------------------------
# PyTorch: transformers + peft
# ----------------------------------------------------------------------------------------------------
class Torch:
    """transformers AutoModel (Gemma3TextModel) + peft LoRA + torch.optim.AdamW, our loss in torch.

    mode: "fp32" | "bf16-autocast" (f32 weights, bf16 autocast) | "bf16-weights" (bf16 base, f32 adapters).
    checkpointing: transformers' gradient checkpointing (non-reentrant), the analogue of our model.remat.
    """

    def __init__(self, folder: str, mode: str, batch_np: dict, group: int, checkpointing: bool = False):
        import peft
        import torch
        import transformers

        self.torch, self.mode, self.group = torch, mode, group
        model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32)
        if mode == "bf16-weights":
            model = model.to(torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TORCH_TARGETS,
                              bias="none")
        # autocast_adapter_dtype=True (peft's default) keeps the adapters in f32 on a bf16 base
        self.model = peft.get_peft_model(model, cfg)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)

        def prep(ids, mask):
            ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
            # positions counted from the first real token, as ours (left padding)
            return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

        self.q = prep(batch_np["q_ids"], batch_np["q_mask"])
        self.p = prep(batch_np["p_ids"], batch_np["p_mask"])
        self.attn = getattr(self.model.config, "_attn_implementation", "unknown")

    def _embed(self, ids, mask, pos):
        h = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
        return self.torch.nn.functional.normalize(h.float(), dim=-1)  # last token, L2 norm (as pool())

    def step(self) -> float:
        torch = self.torch
        F = torch.nn.functional
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.mode == "bf16-autocast"):
            q = self._embed(*self.q)
            p = self._embed(*self.p)
        # InfoNCE, cosine, every query against all B*G passages; query i's positive is passage i*G
        q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
        logits = q @ p.T / TEMPERATURE
        labels = torch.arange(q.shape[0]) * self.group
        loss = F.cross_entropy(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        return float(loss.detach())


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def speed(args, model_cfg, base_np, tok, folder) -> dict:
    import torch

    G = 1 + args.negatives
    mk = lambda dtype, remat: make_run(args.batch, args.query_len, args.passage_len, args.negatives,  # noqa: E731
                                       dtype=dtype, remat=remat)
    if args.precisions == "fp32":
        runs = {"ours fp32": mk("float32", False), "ours fp32 remat": mk("float32", True)}
        torch_modes = {"torch fp32": "fp32"}
    else:
        runs = {"ours bf16": mk("bfloat16", True), "ours bf16 no-remat": mk("bfloat16", False),
                "ours fp32": mk("float32", False)}
        torch_modes = {"torch fp32": "fp32", "torch bf16 autocast": "bf16-autocast",
                       "torch bf16 weights": "bf16-weights"}
    first = next(iter(runs.values()))
    batch_np = real_batch(tok, first)
    frozen = ours_frozen(base_np, first)
    contenders, info = {}, {}
    for name, run in runs.items():
        contenders[name] = Ours(model_cfg, base_np, frozen, run, batch_np).step
    for name, mode in torch_modes.items():
        t = Torch(folder, mode, batch_np, G)
        contenders[name] = t.step
        info["torch_trainable_params"], info["torch_attention"] = t.trainable, t.attn
    from bmretriever_jax.models import lora as lora_lib
    info["ours_trainable_params"] = lora_lib.num_params(split_params(base_np, first,
                                                                     jax.random.PRNGKey(0))[0])

    losses = {}
    for i in range(args.warmup):
        for name, fn in contenders.items():
            t = time.perf_counter()
            loss = fn()
            losses.setdefault(name, loss)  # the first step's loss: the same batch and weights on every side
            log(f"warm-up {i + 1}/{args.warmup} {name}: {time.perf_counter() - t:.1f} s (loss {loss:.4f})")
    timing = common.interleaved(contenders, args.steps, log)
    real = int(batch_np["q_mask"].sum() + batch_np["p_mask"].sum())
    positions = batch_np["q_ids"].size + batch_np["p_ids"].size
    rows = {}
    for name, t in timing.items():
        rows[name] = {"step_s": t["median_s"], "examples_per_s": args.batch / t["median_s"],
                      "tokens_per_s": positions / t["median_s"], "first_step_loss": losses[name], **t}
    eps = {k: r["examples_per_s"] for k, r in rows.items()}
    if args.precisions == "fp32":
        ratios = {"ours fp32 / torch fp32": eps["ours fp32"] / eps["torch fp32"],
                  "ours fp32 remat / torch fp32": eps["ours fp32 remat"] / eps["torch fp32"]}
        return {"rows": rows, "ratios": ratios, "real_tokens": real, "positions": positions, "info": info,
                "torch_threads": torch.get_num_threads()}
    torch_bf16_best = max(eps["torch bf16 autocast"], eps["torch bf16 weights"])
    ratios = {
        "ours bf16 / torch bf16 (faster of the two)": eps["ours bf16"] / torch_bf16_best,
        "ours bf16 no-remat / torch bf16 (faster of the two)": eps["ours bf16 no-remat"] / torch_bf16_best,
        "ours bf16 / torch bf16 autocast": eps["ours bf16"] / eps["torch bf16 autocast"],
        "ours bf16 no-remat / torch bf16 autocast": eps["ours bf16 no-remat"] / eps["torch bf16 autocast"],
        "ours bf16 / torch fp32": eps["ours bf16"] / eps["torch fp32"],
        "ours bf16 no-remat / torch fp32": eps["ours bf16 no-remat"] / eps["torch fp32"],
        "ours fp32 / torch fp32": eps["ours fp32"] / eps["torch fp32"],
    }
    del contenders
    return {"rows": rows, "ratios": ratios, "real_tokens": real, "positions": positions, "info": info,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--batch", type=int, default=8, help="global batch (queries) of the speed runs")
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--passage-len", type=int, default=128)
    ap.add_argument("--negatives", type=int, default=1, help="hard negatives per query")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender (interleaved, median)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps per contender first: compilation and lazy init, and on our side the heap "
                         "reaching its steady size (the first steps page-fault fresh temporaries: util/allocator.py)")
    ap.add_argument("--mem-batches", default="16,32,64,128,256,512,1024,2048,4096",
                    help="global batches of the compiled-memory analysis of our step")
    ap.add_argument("--grad-cache", default="16", help="chunk sizes (sequences) of the gradient cache, comma list")
    ap.add_argument("--rss-batches", default="16,32",
                    help="global batches of the measured-RSS single steps (both sides, one subprocess each)")
    ap.add_argument("--precisions", choices=["auto", "all", "fp32"], default="auto",
                    help="all: bf16 and fp32 contenders; fp32: fp32 only, for CPUs without bf16 units, where bf16 is "
                         "emulated on both sides (torch bf16 matmul ~0.3 GFLOP/s on such a CPU); auto: by the CPU")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="batch 2, 64-token passages, 1 step, memory analysis at 64 and 512, RSS of ours at batch 4")
    ap.add_argument("--out", default=None,
                    help="results JSON (default: benchmarks/results/train.json, or train-fp32.json for fp32 only)")
    ap.add_argument("--plot", default=os.path.join(HERE, "results", "train_memory.png"))
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step compiles)")
    if args.precisions == "auto":
        from bmretriever_jax.util.precision import bf16_is_fast

        args.precisions = "all" if bf16_is_fast() else "fp32"
    args.out = args.out or common.results_path("train", fp32_only=args.precisions == "fp32", quick=args.quick)
    if args.quick:
        args.plot = args.plot.replace("train_memory.png", "train_memory_quick.png")
        args.batch, args.passage_len, args.steps, args.mem_batches, args.rss_batches = 2, 64, 1, "64,512", "4"
        args.warmup = 1

    import torch

    import train_memory

    torch.set_num_threads(os.cpu_count())
    load_start = common.load_average()
    log(f"load average {load_start}; loading {args.model}")
    from bmretriever_jax.convert import hub

    model_cfg, base_np, tok, folder = hub.load(args.model, quiet=True)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
              "model": {"name": args.model, "layers": model_cfg.num_layers, "hidden": model_cfg.hidden_size}}

    if not args.skip_speed:
        result["speed"] = speed(args, model_cfg, base_np, tok, folder)
        result["speed"]["load_average_after"] = common.load_average()
        log(f"speed done; load average {result['speed']['load_average_after']}")

    if not args.skip_memory:
        mem_batches = [int(b) for b in args.mem_batches.split(",") if b]
        chunks = [int(c) for c in args.grad_cache.split(",") if c]
        result["memory"] = train_memory.compiled_sweep(model_cfg, base_np, mem_batches, chunks, args, log)
        result["memory"]["load_average_after"] = common.load_average()
        rss_batches = [int(b) for b in args.rss_batches.split(",") if b]
        result["rss"] = train_memory.rss_sweep(args, rss_batches, chunks[0], log, torch_too=not args.quick)
    load_end = common.load_average()
    cpu = common.cpu_info()
    result["machine"] = {**cpu, "load_average_start": load_start, "load_average_end": load_end,
                         "xla_flags": os.environ.get("XLA_FLAGS", ""), "allocator": ALLOCATOR,
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                         **common.versions("jax", "jaxlib", "torch", "transformers", "peft", "optax", "numpy")}
    if "memory" in result:
        train_memory.plot(result, args.plot)
    lines = tables(result, args, cpu, load_start, load_end)
    result["table"] = lines
    common.write_json(args.out, result)
    print("\n".join(lines))
    if not args.quick and args.precisions == "fp32" and not args.skip_speed:
        common.replace_section(os.path.join(HERE, "..", "BENCHMARKS.md"), "train-fp32", "\n".join(lines))
    elif not args.quick and not args.skip_speed and not args.skip_memory:
        common.replace_section(os.path.join(HERE, "..", "BENCHMARKS.md"), "train",
                               "\n".join(lines) + "\n\n![peak memory vs global batch](benchmarks/results/train_memory.png)")
    log(f"wrote {args.out}" + (f" and {args.plot}" if "memory" in result else ""))


def tables(result, args, cpu, load_start, load_end):
    cmd = ("python benchmarks/train.py" + (" --quick" if args.quick else "")
           + (" --precisions fp32" if args.precisions == "fp32" else "") + (" --skip-memory" if args.skip_memory else ""))
    G = 1 + args.negatives
    lines = [f"Command: `{cmd}`", ""]
    sp = result.get("speed")
    if sp:
        lines += [f"Training step, Gemma 3 270M + LoRA r{LORA_R}/a{LORA_ALPHA:g} (q,k,v,o,gate,up,down), global "
                  f"batch {args.batch} queries x {args.query_len} tokens + {args.batch * G} passages "
                  f"(positive + {args.negatives} hard negative) x {args.passage_len} tokens, real SciFact pairs, "
                  f"left padded ({sp['real_tokens'] / sp['positions']:.0%} real tokens), InfoNCE t={TEMPERATURE} "
                  f"over all {args.batch * G} passages, AdamW, clip {CLIP}; median of {args.steps} interleaved "
                  f"steps after {args.warmup} warm-up step(s). CPU: {cpu['model']}, {cpu['logical_cpus']} cores, torch threads "
                  f"{sp['torch_threads']} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}), torch attention '{sp['info']['torch_attention']}'; load average "
                  f"{load_start[0]:.1f} at start, {sp['load_average_after'][0]:.1f} after the speed runs. Trainable "
                  f"params: ours {sp['info']['ours_trainable_params']:,}, torch {sp['info']['torch_trainable_params']:,}.",
                  "", "| contender | s / step | examples/s | tokens/s | step times (s) |", "|---|---|---|---|---|"]
        for name, r in sp["rows"].items():
            lines.append(f"| {name} | {r['step_s']:.2f} | {r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{', '.join(f'{x:.2f}' for x in r['times_s'])} |")
        lines += ["", "| ratio (examples/s) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in sp["ratios"].items()]
        lines.append("")
    if "memory" in result:
        lines += result["memory"]["table"] + [""] + result["rss"]["table"]
    lines += ["", f"Load average (1/5/15 min): start {load_start}, end {load_end}."]
    return lines


if __name__ == "__main__":
    main()
