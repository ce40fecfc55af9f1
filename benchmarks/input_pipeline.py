"""The input pipeline a pod host runs: prepared data (`bmr prepare`) read by the grain loader.

    .venv/bin/python benchmarks/input_pipeline.py [--big 5000000] [--small 100000] [--work DIR]

Measures, with the Gemma 3 tokenizer (`gemma3-270m`) and the 410M pre-training config's host batch (v5e-64:
16 hosts x 256 pairs, 4 chips a host, max_length 512, packed):

1. memory: host RSS (training process + grain workers) while iterating prepared synthetic pre-training pairs,
   `--small` vs `--big` of them (title -> abstract records of data/scifact/corpus.jsonl repeated with new ids);
   the difference must stay < 300 MB. Also the time to the first batch (< 30 s), workers started included.
2. throughput: text tokens / s one host delivers (read + tokenized + packed + prefetched) with 0, 1, 2 workers.
3. text share: the share of the computed tokens that are text, padded vs packed, for the pre-training data
   (SciFact titles -> abstracts, max_length 512) and the fine-tune data (scifact + pubmedqa + medquad pairs,
   one padded negative, max_length 512), with the paper configs' batch split over devices.

Results: benchmarks/results/input_pipeline.json (CPU model / ISA, versions, load average). The synthetic
corpora are kept in --work (default /tmp/bmr_input_bench) and reused by later runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PRETRAIN = dict(global_batch=4096, hosts=16, chips=64, max_length=512, query_max_length=512,
                config="bmretriever-410m-pretrain.yaml")  # 410M pre-training, v5e-64
FINETUNE = dict(global_batch=512, hosts=4, chips=16, max_length=512, query_max_length=512,
                config="bmretriever-410m-finetune.yaml")  # 410M fine-tune, v5e-16


def _tail_sigmas(cfg: dict) -> float:
    """The packing tail room (data.pack_tail_sigmas) the paper config this benchmark stands for trains with."""
    from bmretriever_jax.config import load_config

    return load_config(os.path.join(ROOT, "configs", "papers", cfg["config"]), []).data.pack_tail_sigmas


def _run_config(prepared: str, cfg: dict, *, packing: bool, num_negatives: int, workers: int = 0):
    from bmretriever_jax.config import load_config

    return load_config(None, ["model.name=gemma3-270m", f"data.prepared={prepared}", f"data.packing={str(packing).lower()}",
                              f"data.num_negatives={num_negatives}", f"data.workers={workers}",
                              f"model.max_length={cfg['max_length']}", f"model.query_max_length={cfg['query_max_length']}",
                              f"train.global_batch_size={cfg['global_batch']}", "data.pack_calibration_batches=32",
                              f"data.pack_tail_sigmas={_tail_sigmas(cfg)}"])


def _tokenizer():
    import transformers

    from bmretriever_jax.convert import hub

    return transformers.AutoTokenizer.from_pretrained(hub.resolve("gemma3-270m", quiet=True))


# ---------------------------------------------------------------------------------------------- synthetic corpus
def synthetic_pairs(n: int):
    """n title -> abstract pairs: the shipped SciFact records over and over, each copy with a new id."""
    from bmretriever_jax.data.builders import PRETRAIN_INSTRUCTION
    from bmretriever_jax.data.pairs import Pair
    from bmretriever_jax.data.prepared import _stream_pretrain

    records = [(p.query, p.positive["text"]) for p in _stream_pretrain(os.path.join(ROOT, "data/scifact/corpus.jsonl"))]
    for i in range(n):
        title, text = records[i % len(records)]
        yield Pair(query=title, positive={"title": "", "text": text, "id": f"syn{i}"}, instruction=PRETRAIN_INSTRUCTION,
                   id=f"syn{i}")


def ensure_synthetic(work: str, n: int, copy_from: str | None = None) -> dict:
    """A prepared folder of n synthetic pairs (kept in `work`). copy_from: build it from copies of that prepared
    folder's shards instead (rows and ids repeat; the same text, keys and file layout as preparing n pairs)."""
    import shutil

    from bmretriever_jax.data.prepared import MANIFEST, write_prepared

    path = os.path.join(work, f"synthetic-tok-{n}" + ("-copies" if copy_from else ""))
    mpath = os.path.join(path, MANIFEST)
    if os.path.exists(mpath):
        m = json.load(open(mpath))
        return {"path": path, "pairs": m["count"], "prepare_s": m.get("bench_prepare_s"), "reused": True,
                "made_by": m.get("bench_made_by"), "bytes": _du(path)}
    t = time.time()
    if copy_from:
        src = json.load(open(os.path.join(copy_from, MANIFEST)))
        per = src["count"]
        if n % per:
            raise SystemExit(f"--big {n} must be a multiple of --small {per} to be made from copies")
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shards = []
        for c in range(n // per):
            for s in src["shards"]:
                name = f"pairs-{len(shards):05d}"
                shutil.copytree(os.path.join(copy_from, s["path"]), os.path.join(tmp, name))  # real copies, no links
                shards.append(dict(s, path=name))
        shutil.copytree(os.path.join(copy_from, src["groups"]["path"]), os.path.join(tmp, src["groups"]["path"]))
        m = dict(src, count=n, shards=shards)
        m["bench_made_by"] = f"{n // per} copies of the {per}-pair folder's shards"
        json.dump(m, open(os.path.join(tmp, MANIFEST), "w"), indent=1)
        os.replace(tmp, path)
    else:
        # tokenized as a pod's data is prepared (`bmr prepare --tokenizer`): balancing reads the stored lengths
        write_prepared(path, synthetic_pairs(n), sources=[{"entry": "synthetic", "path": "data/scifact/corpus.jsonl"}],
                       tokenizer=_tokenizer(), tokenizer_name="gemma3-270m", max_length=PRETRAIN["max_length"],
                       query_max_length=PRETRAIN["query_max_length"], overwrite=True, progress=False)
    took = round(time.time() - t, 1)
    m = json.load(open(mpath))
    m["bench_prepare_s"] = took
    m.setdefault("bench_made_by", "write_prepared of n synthetic pairs (new ids), tokenized")
    json.dump(m, open(mpath, "w"), indent=1)
    return {"path": path, "pairs": n, "prepare_s": took, "reused": False, "made_by": m["bench_made_by"],
            "bytes": _du(path)}


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------- child: one host
def child(args) -> None:
    """One host (process 0 of 16) iterating a prepared folder; prints JSON (memory, first batch, tokens/s)."""
    import psutil

    from bmretriever_jax.data.grain_loader import GrainPairLoader
    from bmretriever_jax.training.step import make_tokenize_fn

    proc = psutil.Process()
    rows = int(json.loads(args.pack_rows))
    run = _run_config(args.child, PRETRAIN, packing=True, num_negatives=0, workers=args.workers)
    t0 = time.time()
    tok = _tokenizer()
    fn = make_tokenize_fn(tok, run, pack_rows=rows, n_local_shards=PRETRAIN["chips"] // PRETRAIN["hosts"])
    loader = GrainPairLoader(args.child, PRETRAIN["global_batch"], seed=0, num_negatives=0, drop_last=False,
                             process_index=0, process_count=PRETRAIN["hosts"], tokenize_fn=fn,
                             worker_count=args.workers, prefetch=2, balance_shards=PRETRAIN["chips"])
    batch = next(loader)
    first = time.time() - t0

    def memory():
        procs = [proc] + proc.children(recursive=True)
        rss = anon = 0
        for p in procs:
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            rss += m.rss
            anon += m.rss - m.shared  # private: what the corpus would add if it were loaded
        return {"processes": len(procs), "rss_mb": round(rss / 2**20, 1), "private_mb": round(anon / 2**20, 1)}

    def text(b):
        return int((b["seg"] > 0).sum())

    # the rate is timed after `warm` batches: by then the batches the workers made while the first one was
    # awaited are used up, and what arrives is what the workers make
    warm = min(args.batches // 3, 2 + 4 * max(args.workers, 1))
    tokens, t = 0, time.time()
    peak = memory()
    for i in range(args.batches):
        batch = next(loader)
        if i == warm - 1:
            tokens, t = 0, time.time()
        elif i >= warm:
            tokens += text(batch)
        if i % 5 == 4:
            m = memory()
            peak = m if m["rss_mb"] > peak["rss_mb"] else peak
    el = time.time() - t
    rate = tokens / el if args.batches > warm else 0.0
    end = memory()
    loader.close()
    print(json.dumps({"workers": args.workers, "first_batch_s": round(first, 2), "batches": args.batches + 1,
                      "rate_timed_batches": max(args.batches - warm, 0),
                      "text_tokens_per_s": round(rate), "seconds": round(el, 1), "memory_end": end, "memory_peak": peak,
                      "pairs": len(loader.data)}))
    sys.stdout.flush()
    os._exit(0)


def run_child(path: str, workers: int, batches: int, pack_rows) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--workers", str(workers),
                          "--batches", str(batches), "--pack-rows", json.dumps(pack_rows)],
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- text share
def text_share(tok, work: str, name: str, entries, cfg: dict, num_negatives: int, host_batches: int) -> dict:
    """Calibrate packing on global batches (from the prepared token lengths), then count text vs computed tokens
    of `host_batches` host batches (several hosts, several steps) padded and packed."""

    from bmretriever_jax.data.pipeline import make_loader, pack_rows_from_lengths
    from bmretriever_jax.data.prepared import Prepared, prepare
    from bmretriever_jax.training.step import make_tokenize_fn

    path = os.path.join(work, f"share-{name}")
    t = time.time()
    m = prepare(entries, path, tokenizer_name="gemma3-270m", max_length=cfg["max_length"],
                query_max_length=cfg["query_max_length"], overwrite=True, quiet=True,
                texts_per_shard=cfg["global_batch"] // cfg["chips"])
    prep_s = time.time() - t
    data = Prepared(path)
    n_shards, hosts = cfg["chips"], cfg["hosts"]
    packed_run = _run_config(path, cfg, packing=True, num_negatives=num_negatives)
    padded_run = _run_config(path, cfg, packing=False, num_negatives=num_negatives)
    probe = make_loader(packed_run, None, 0, 1, prepared=data, n_shards=n_shards)  # balanced global batches
    rows = pack_rows_from_lengths(data, probe, packed_run, n_shards, 32)
    calibration = "the first 32 global batches, from the stored token lengths"
    over, checked = fallback_steps(data, probe, packed_run, n_shards, rows)
    local_shards = n_shards // hosts
    out = {"fallback_steps": over, "fallback_checked": checked, "pairs": m["count"], "prepare_s": round(prep_s, 1), "pack_rows_per_device": rows,
           "global_batch": cfg["global_batch"], "devices": n_shards, "hosts": hosts, "max_length": cfg["max_length"],
           "query_max_length": cfg["query_max_length"], "num_negatives": num_negatives,
           "token_stats": {k: m["stats"][k] for k in ("query_tokens", "passage_tokens")}, "calibration": calibration,
           "tail_sigmas": packed_run.data.pack_tail_sigmas, "config": cfg["config"]}
    # padded: queries and passages in rows of their own; packed: both share the rows (packing.pack_pairs)
    counts = {k: [0, 0] for k in ("padded_queries", "padded_passages", "packed")}
    for mode, run in (("padded", padded_run), ("packed", packed_run)):
        fn = make_tokenize_fn(tok, run, pack_rows=rows if mode == "packed" else None, n_local_shards=local_shards)
        for b in range(host_batches):
            host, step = b % hosts, b // hosts
            loader = make_loader(run, fn, host, hosts, prepared=data, n_shards=n_shards)
            batch = loader.batch_at(0, step % loader.steps_per_epoch)
            keys = (("packed", "seg"),) if mode == "packed" else (("padded_queries", "q_mask"),
                                                                  ("padded_passages", "p_mask"))
            for name, k in keys:
                counts[name][0] += int((batch[k] > 0).sum())
                counts[name][1] += int(batch[k].size)
    out["padded"] = round((counts["padded_queries"][0] + counts["padded_passages"][0]) /
                          (counts["padded_queries"][1] + counts["padded_passages"][1]), 4)
    for k, (txt, total) in counts.items():
        out[k] = round(txt / total, 4)
    out["pack_max_segments"] = packed_run.data.pack_max_segments
    out["host_batches_measured"] = host_batches
    return out


def fallback_steps(data, loader, run, n_shards: int, rows: int, limit: int = 400):
    """(steps whose batch some device cannot pack into `rows` rows, steps checked): `limit` global batches
    after the calibration's first 32 of epoch 0 (out of sample; later epochs, reshuffled, as a longer run
    meets them), from the stored token lengths; such a step runs the padded shape."""
    from bmretriever_jax.data import packing
    from bmretriever_jax.data.batches import pack_length

    hb = loader._host_batch(False, 0, 1)
    hb._data = data
    per_epoch = loader.steps_per_epoch
    steps = [(e, s) for e in range(1 + limit // per_epoch + 1) for s in range(per_epoch) if e or s >= 32][:limit]
    over = 0
    for e, s in steps:
        per_pair = hb.token_lengths(hb.global_indices(e, s), e)
        blocks = packing.joint_blocks([int(q) for q, _ in per_pair], [int(x) for _, ps in per_pair for x in ps],
                                      n_shards)[0]
        t = len(blocks) // n_shards
        over += any(packing.rows_needed(blocks[i * t:(i + 1) * t], pack_length(run), run.data.pack_max_segments)
                    > rows for i in range(n_shards))
    return over, len(steps)


def text_shares(args, tok) -> dict:
    share = {"pretrain": text_share(tok, args.work, "pretrain",
                                    ["pretrain:" + os.path.join(ROOT, "data/scifact/corpus.jsonl")], PRETRAIN, 0, 8),
             "finetune": text_share(tok, args.work, "finetune", ["scifact", "pubmedqa", "medquad"], FINETUNE, 1, 8)}
    print("text share:", json.dumps({k: (v["padded"], v["packed"]) for k, v in share.items()}), flush=True)
    return share


# ---------------------------------------------------------------------------------------------- workers needed
HOSTS = {"v5e-64": 16, "v5e-16": 4, "v4-32": 4, "v5p-64": 8, "v5p-128": 16, "v6e-16": 4}  # 4 chips a host


def workers_needed(res: dict) -> list:
    """Per paper config on its target: text tokens a host must deliver per second for the compiled step at 40%
    utilisation (benchmarks/results/plan_pods.json: the configs' packed step, compiled), and the grain workers
    that takes at the measured rate of one worker."""
    path = os.path.join(HERE, "results", "plan_pods.json")
    if not os.path.exists(path):
        return []
    plans = json.load(open(path))
    share, per_worker = res["text_share"], res["throughput"]["runs"]["1"]["text_tokens_per_s"]
    rows = []
    for key, plan in sorted(plans.items()):
        target = plan.get("target")
        if target not in HOSTS or "at_40pct" not in plan:
            continue
        kind = "pretrain" if "pretrain" in key else "finetune"
        st = share[kind]["token_stats"]
        group = 1 + share[kind]["num_negatives"] if kind == "pretrain" else 2  # the paper fine-tunes: 1 negative
        text = plan["global_batch_size"] / HOSTS[target] * (st["query_tokens"]["mean"] + group * st["passage_tokens"]["mean"])
        step = plan["at_40pct"]["step_s"]
        need = text / step
        rows.append({"config": plan["config"], "target": target, "hosts": HOSTS[target],
                     "host_text_tokens_per_step": round(text), "packed_step_s_at_40pct": round(step, 3),
                     "text_tokens_per_s_needed": round(need), "workers_needed": round(need / per_worker, 2)})
    return rows


# ---------------------------------------------------------------------------------------------- report
PAGE = os.path.join(ROOT, "BENCHMARKS.md")


def render(res: dict) -> str:
    cpu, mem, rate, share = res["cpu"], res["memory"], res["throughput"], res["text_share"]
    lines = [f"{cpu['model']}, {cpu['logical_cpus']} logical CPUs ({', '.join(cpu['isa']) or 'no AVX-512'}); "
             f"{res['date']}; load average {res['load_average_start']} -> {res['load_average_end']} (a shared "
             f"machine: times are what this host got, not what a pod host's cores give); grain "
             f"{res['versions'].get('grain')}, datasets {res['versions'].get('datasets')}, pyarrow "
             f"{res['versions'].get('pyarrow')}; `{res['command'].strip()}` ({res['seconds']:.0f} s).", "",
             "**Memory** (one host of the 410M pre-training config: 256 pairs a batch, Gemma 3 tokenizer, packed, "
             "1 grain worker; RSS of the training process + its worker, peak over the run):", "",
             "| prepared pairs | made by | on disk | RSS | private (RSS - shared) | vs smallest | first batch |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for n, run in mem["runs"].items():
        c = mem["corpora"][n]
        d = mem["difference_to_small_mb"].get(n)
        diff = "" if d is None else f"{d['rss']:+.0f} MB"
        lines.append(f"| {int(n):,} | {c.get('made_by') or ''} | {c['bytes'] / 2**30:.2f} GiB | "
                     f"{run['memory_peak']['rss_mb']:.0f} MB | {run['memory_peak']['private_mb']:.0f} MB | "
                     f"{diff} | {run['first_batch_s']:.1f} s |")
    lines += ["", "**Throughput** (text tokens a host gets per second, read + tokenized + packed + prefetched, "
              "as the training process receives them, timed after the batches made while the first was awaited; "
              "first batch includes starting the workers"
              + (f"; `{rate['command']}`, load average {res.get('load_average_throughput_start')} -> "
                 f"{res.get('load_average_throughput_end')}" if rate.get("command") else "") + "):", "",
              "| grain workers | text tokens / s | first batch |", "|---:|---:|---:|"]
    for w, run in rate["runs"].items():
        lines.append(f"| {w}{' (in-process thread)' if w == '0' else ''} | {run['text_tokens_per_s']:,} | "
                     f"{run['first_batch_s']:.1f} s |")
    need = workers_needed(res)
    if need:
        lines += ["", "**Workers a host needs** for each paper config's compiled (packed) step at 40% utilisation "
                  "(`bmr plan --target`, benchmarks/results/plan_pods.json), at the rate of one worker above:", "",
                  "| config | target (hosts) | host text tokens / step | packed step at 40% | "
                  "text tokens / s needed | workers |", "|---|---|---:|---:|---:|---:|"]
        for w in need:
            lines.append(f"| {os.path.basename(w['config'])} | {w['target']} ({w['hosts']}) | "
                         f"{w['host_text_tokens_per_step']:,} | {w['packed_step_s_at_40pct']:.2f} s | "
                         f"{w['text_tokens_per_s_needed']:,} | {w['workers_needed']:.2f} |")
    lines += ["", "**Text share** of the tokens the step computes (the rest is padding), on "
              f"{share['pretrain']['host_batches_measured']} host batches each (several hosts and steps), at most "
              f"{share['pretrain'].get('pack_max_segments', 16)} texts a row. Packed, queries and passages share "
              "the rows and each global batch is balanced over the devices (`data.pack_balance`); the rows per "
              "device are what `choose_rows` picks from the calibration batches with the tail room "
              "(`data.pack_tail_sigmas`) of the paper config the row stands for (the shape the run compiles):", "",
              "| data | config split | padded | packed | rows / device | tail room | padded fallback | calibrated on |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    names = {"pretrain": "pre-training: SciFact titles -> abstracts", "finetune": "fine-tune: scifact + pubmedqa + medquad, 1 negative"}
    for k, v in share.items():
        lines.append(f"| {names[k]} | {v['global_batch']} pairs over {v['devices']} devices, {v['hosts']} hosts, "
                     f"max_length {v['max_length']} | {v['padded']:.1%} | {v['packed']:.1%} | "
                     f"{v['pack_rows_per_device']} | {v.get('tail_sigmas', 6.0):g} sigmas ({v.get('config', '')}) | "
                     f"{v.get('fallback_steps', '?')} of {v.get('fallback_checked', '?')} later steps | "
                     f"{v.get('calibration') or 'the first 32 global batches, from the stored token lengths'} |")
    return "\n".join(lines)


def write_section(res: dict) -> None:
    text = open(PAGE, encoding="utf-8").read()
    begin, end = "<!-- input:begin -->", "<!-- input:end -->"
    if begin in text and end in text:
        a, b = text.index(begin) + len(begin), text.index(end)
        text = text[:a] + "\n" + render(res) + "\n" + text[b:]
        with open(PAGE, "w", encoding="utf-8") as f:
            f.write(text)


# ---------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=5_000_000)
    ap.add_argument("--genuine", type=int, default=1_000_000, help="also a corpus of this many pairs prepared "
                    "pair by pair; --big is then made of copies of the --small folder's shards (0: --big genuine)")
    ap.add_argument("--work", default="/tmp/bmr_input_bench")
    ap.add_argument("--batches", type=int, default=30, help="host batches per memory run (after the first)")
    ap.add_argument("--rate-batches", type=int, default=8, help="host batches per throughput run")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "input_pipeline.json"))
    ap.add_argument("--report", action="store_true", help="only rewrite the BENCHMARKS.md section from --out")
    ap.add_argument("--only-throughput", action="store_true", help="rerun the throughput part into --out")
    ap.add_argument("--only-text-share", action="store_true", help="rerun the text-share part into --out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--pack-rows", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.report:
        res = json.load(open(args.out))
        res["workers_needed"] = workers_needed(res)
        json.dump(res, open(args.out, "w"), indent=1)
        return write_section(res)
    if args.only_throughput:
        res = json.load(open(args.out))
        t = time.time()
        res["load_average_throughput_start"] = [round(x, 2) for x in os.getloadavg()]
        res = _throughput(args, res, res["memory"]["corpora"], res["text_share"]["pretrain"]["pack_rows_per_device"])
        res["load_average_throughput_end"] = [round(x, 2) for x in os.getloadavg()]
        res["throughput"]["command"] = "benchmarks/input_pipeline.py " + " ".join(sys.argv[1:])
        res["throughput"]["seconds"] = round(time.time() - t, 1)
        json.dump(res, open(args.out, "w"), indent=1)
        write_section(res)
        return None

    from bmretriever_jax.util.machine import cpu_info, versions

    os.makedirs(args.work, exist_ok=True)
    if args.only_text_share:
        res = json.load(open(args.out))
        res["text_share"] = text_shares(args, _tokenizer())
        res["text_share_run"] = {"command": "benchmarks/input_pipeline.py " + " ".join(sys.argv[1:]),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_info()}
        json.dump(res, open(args.out, "w"), indent=1)
        write_section(res)
        return None
    t_start = time.time()
    res = {"command": "benchmarks/input_pipeline.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_info(),
           "versions": versions("bmretriever_jax", "grain", "datasets", "pyarrow", "tokenizers", "transformers", "jax",
                                "numpy"),
           "load_average_start": [round(x, 2) for x in os.getloadavg()],
           "note": "a shared 2-core machine (other agents' jobs run beside it): times are lower bounds of what a "
                   "pod host's cores deliver; memory and text shares do not depend on the load"}
    tok = _tokenizer()

    # 3. text share (also gives the pre-training config's packed rows for the host runs below)
    share = res["text_share"] = text_shares(args, tok)
    rows = share["pretrain"]["pack_rows_per_device"]

    # 1. memory: small vs big corpus, 1 worker (the training process + its grain worker)
    corpora = {}
    sizes = [args.small] + ([args.genuine] if args.genuine else []) + [args.big]
    for n in sizes:
        copy = corpora[str(args.small)]["path"] if n == args.big and n > (args.genuine or args.small) else None
        corpora[str(n)] = ensure_synthetic(args.work, n, copy_from=copy)
        print("corpus:", corpora[str(n)], flush=True)
    mem = {}
    for n in sizes:
        mem[str(n)] = run_child(corpora[str(n)]["path"], 1, args.batches, rows)
        print("memory:", n, mem[str(n)], flush=True)
    small = mem[str(args.small)]
    res["memory"] = {"corpora": corpora, "runs": mem, "bound_mb": 300, "first_batch_bound_s": 30,
                     "difference_to_small_mb": {
                         str(n): {"rss": round(mem[str(n)]["memory_peak"]["rss_mb"] - small["memory_peak"]["rss_mb"], 1),
                                  "private": round(mem[str(n)]["memory_peak"]["private_mb"]
                                                   - small["memory_peak"]["private_mb"], 1)} for n in sizes[1:]}}

    res = _throughput(args, res, corpora, rows)
    res["workers_needed"] = workers_needed(res)
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    res["seconds"] = round(time.time() - t_start, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    write_section(res)
    print(f"wrote {args.out} ({res['seconds']} s) and the input section of {PAGE}")


def _throughput(args, res, corpora, rows):
    # 2. throughput per worker count
    rate = {}
    for w in (0, 1, 2):
        rate[str(w)] = run_child(corpora[str(args.small)]["path"], w, args.rate_batches, rows)
        print("rate:", w, rate[str(w)], flush=True)
    res["throughput"] = {"host_batch_pairs": PRETRAIN["global_batch"] // PRETRAIN["hosts"], "runs": rate,
                         "text_tokens_per_s_per_worker": round(rate["1"]["text_tokens_per_s"])}
    return res


if __name__ == "__main__":
    main()
