"""Load test of `bmr serve` against an anchor server of the same model, with the official `openai` client.

    python benchmarks/serve.py                       # gemma3-270m, concurrency 1/8/32/128, both workloads
    python benchmarks/serve.py --soak 600 --only-soak  # 10 minutes at concurrency 32: RSS and errors

Both servers run as subprocesses on this machine, one at a time per measurement cell (the other idles), in
alternating order: `bmr serve MODEL` (JAX, every bucket shape compiled at start-up) and the anchor serving the
`bmr export --format sentence-transformers` folder of the same model: infinity-emb (its own virtualenv, named by
--infinity or $INFINITY_EMB; it needs sentence-transformers < 4 and numpy < 2, so not this venv) when it is there,
else sentence-transformers behind our own HTTP layer (`bmr serve --backend sentence-transformers`).

Workloads over SciFact: claims as queries (1 per request; ours applies the instruction from input_type=query, the
anchor gets the same formatted text, as infinity applies no prompts) and abstracts as documents (--docs-per-request
per request, the passage template applied the same way). Each cell is closed-loop: C workers (asyncio, one
`AsyncOpenAI` client, max_retries=0 so no retry hides an error), each sending --rounds requests back to back.
Throughput = texts (and real tokens: the served token ids, instruction and EOS included) / wall time of the cell;
latency percentiles over every request; errors by kind. Afterwards: parity of the two servers' vectors on the same
texts, our batch-size histogram, padding efficiency and compiles on the request path (/info, /metrics), peak RSS.

Writes benchmarks/results/serve.json and the `serve` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402

from bmretriever_jax.embed import TASK_INSTRUCTIONS, format_passage, format_query, tokenize  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MB."""
    def children(p):
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == p:
                            out.append(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        return out

    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        except (OSError, StopIteration):
            continue
        todo += children(p)
    return total


class Server:
    def __init__(self, name: str, cmd: List[str], port: int, health: str, model: str, formats_itself: bool,
                 env: Optional[Dict] = None, log_path: str = ""):
        self.name, self.cmd, self.port, self.health, self.model = name, cmd, port, health, model
        self.formats_itself = formats_itself  # applies query instruction / passage template from input_type
        self.env, self.log_path = env, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None
        self.ready_s = None
        self.rss_samples: List[float] = []

    def start(self):
        self.t0 = time.time()
        self.logf = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(self.env or {})), cwd=ROOT)

    def wait_ready(self, timeout: float):
        import httpx

        while time.time() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + self.health, timeout=5).status_code == 200:
                    self.ready_s = time.time() - self.t0
                    log(f"{self.name} ready in {self.ready_s:.0f} s (RSS {rss_mb(self.proc.pid):.0f} MB)")
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def sample_rss(self) -> float:
        r = rss_mb(self.proc.pid)
        self.rss_samples.append(r)
        return r

    def stop(self) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


# ----------------------------------------------------------------------------------------------------
# Workloads and cells
# ----------------------------------------------------------------------------------------------------
def load_scifact(n_queries: int, n_docs: int):
    def read(path, n):
        out = []
        with open(path) as f:
            for line in f:
                out.append(json.loads(line))
                if len(out) >= n:
                    break
        return out

    queries = [d["text"] for d in read(os.path.join(ROOT, "data", "scifact", "queries.jsonl"), n_queries)]
    docs = [f"{d.get('title', '')} {d['text']}".strip()
            for d in read(os.path.join(ROOT, "data", "scifact", "corpus.jsonl"), n_docs)]
    return queries, docs


def request_kwargs(server: Server, kind: str, texts: List[str], instruction: str, encoding_format: Optional[str]):
    if server.formats_itself:
        kw = {"input": texts, "model": server.model, "extra_body": {"input_type": kind}}
    elif kind == "query":
        kw = {"input": [format_query(t, instruction) for t in texts], "model": server.model}
    else:
        kw = {"input": [format_passage(t) for t in texts], "model": server.model}
    if encoding_format:
        kw["encoding_format"] = encoding_format
    return kw


async def run_cell(server: Server, kind: str, texts: List[str], tokens: List[int], per_request: int,
                   concurrency: int, rounds: int, instruction: str, encoding_format: Optional[str]) -> Dict:
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    lat, errors, done_texts, done_tokens = [], {}, 0, 0
    n_requests = max(rounds * concurrency, 3 * rounds)
    next_req = 0

    async def worker(w):
        nonlocal next_req, done_texts, done_tokens
        while next_req < n_requests:
            i = next_req
            next_req += 1
            idx = [(i * per_request + k) % len(texts) for k in range(per_request)]
            t = time.perf_counter()
            try:
                r = await client.embeddings.create(**request_kwargs(server, kind, [texts[j] for j in idx],
                                                                    instruction, encoding_format))
                assert len(r.data) == per_request and len(r.data[0].embedding) > 0
                lat.append(time.perf_counter() - t)
                done_texts += per_request
                done_tokens += sum(tokens[j] for j in idx)
            except openai.APIStatusError as e:
                errors[str(e.status_code)] = errors.get(str(e.status_code), 0) + 1
            except Exception as e:  # noqa: BLE001 - counted by kind
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    lat_sorted = sorted(lat)
    pct = lambda p: lat_sorted[min(len(lat_sorted) - 1, int(round(p * (len(lat_sorted) - 1))))] if lat else None  # noqa: E731
    return {"requests": n_requests, "ok": len(lat), "errors": errors, "wall_s": wall, "texts_per_s": done_texts / wall,
            "tokens_per_s": done_tokens / wall, "requests_per_s": len(lat) / wall, "p50_s": pct(0.5),
            "p90_s": pct(0.9), "p99_s": pct(0.99), "max_s": lat_sorted[-1] if lat else None,
            "mean_s": statistics.mean(lat) if lat else None}


async def fetch_vectors(server: Server, kind: str, texts: List[str], instruction: str, encoding_format=None):
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    out = []
    for i in range(0, len(texts), 8):
        r = await client.embeddings.create(**request_kwargs(server, kind, texts[i:i + 8], instruction,
                                                            encoding_format))
        out += [d.embedding for d in r.data]
    await client.close()
    return np.asarray(out, np.float32)


async def soak(server: Server, queries, docs, qtok, dtok, seconds: float, concurrency: int, instruction: str,
               docs_per_request: int) -> Dict:
    """Concurrency C, alternating query and document requests, for `seconds`; RSS sampled every 5 s."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    t_end = time.time() + seconds
    stats = {"ok": 0, "errors": {}, "texts": 0}
    lat: List[float] = []
    samples = []

    async def worker(w):
        i = w
        while time.time() < t_end:
            kind = "query" if i % 2 == 0 else "document"
            n = 1 if kind == "query" else docs_per_request
            pool = queries if kind == "query" else docs
            texts = [pool[(i * 7 + k) % len(pool)] for k in range(n)]
            t = time.perf_counter()
            try:
                r = await client.embeddings.create(**request_kwargs(server, kind, texts, instruction, None))
                assert len(r.data) == n
                lat.append(time.perf_counter() - t)
                stats["ok"] += 1
                stats["texts"] += n
            except openai.APIStatusError as e:
                stats["errors"][str(e.status_code)] = stats["errors"].get(str(e.status_code), 0) + 1
            except Exception as e:  # noqa: BLE001
                stats["errors"][type(e).__name__] = stats["errors"].get(type(e).__name__, 0) + 1
            i += concurrency

    async def sampler():
        t0 = time.time()
        while time.time() < t_end:
            samples.append((round(time.time() - t0, 1), round(server.sample_rss(), 1)))
            await asyncio.sleep(5)

    await asyncio.gather(sampler(), *(worker(w) for w in range(concurrency)))
    await client.close()
    rss = [r for _, r in samples]
    after_warm = rss[max(1, len(rss) // 10):] or rss
    base = after_warm[0]
    lat.sort()
    return {"seconds": seconds, "concurrency": concurrency, **stats, "texts_per_s": stats["texts"] / seconds,
            "p50_s": lat[len(lat) // 2] if lat else None, "p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None,
            "rss_mb_samples": samples, "rss_mb_after_warmup": base, "rss_mb_max_after_warmup": max(after_warm),
            "rss_mb_end": rss[-1], "rss_growth_after_warmup": max(after_warm) / base - 1}


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def our_metrics(server: Server) -> Dict:
    import httpx

    info = httpx.get(server.url + "/info", timeout=30).json()
    text = httpx.get(server.url + "/metrics", timeout=30).text
    compiles = next((float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("bmr_request_path_compiles_total ")), None)
    return {"request_path_compiles": compiles, "batches": info["batches"], "batch_sizes": info["batch_sizes"],
            "padding_efficiency": info["padding_efficiency"], "dropped": info["dropped"],
            "warmup_seconds": info["warmup_seconds"], "shapes": info["models"][0]["shapes"],
            "packed": info["models"][0].get("packed", False),
            "seq_buckets": info["models"][0]["seq_buckets"], "batch_rows": info["models"][0]["batch_sizes"]}


def markdown(res: Dict) -> str:
    cfg, cpu = res["config"], res["cpu"]
    names = [s["name"] for s in res["servers"]]
    lines = [f"Command: `{res['command']}`", "",
             f"{cfg['model']} (fp32, max length {cfg['max_length']}), SciFact claims as queries (1 per request) and "
             f"abstracts as documents ({cfg['docs_per_request']} per request); closed loop, {cfg['rounds']} requests "
             f"per worker, official `openai` client (AsyncOpenAI, max_retries=0, default base64 encoding). CPU: "
             f"{cpu['model']}, {cpu['logical_cpus']} cores ({', '.join(cpu['isa']) or 'no matmul ISA flags'}), "
             + (f"**shared with other jobs during the run** (load average {res['load_average_start'][0]} at start, "
                f"{res['load_average_end'][0]} at end on {cpu['logical_cpus']} cores): absolute numbers are low and "
                "noisy, compare the contenders cell by cell (they ran alternately)."
                if res["load_average_start"][0] > 0.5 * cpu["logical_cpus"] else
                f"no other job running (load average {res['load_average_start'][0]} at start, "
                f"{res['load_average_end'][0]} at end, the load test's own); the contenders ran alternately, cell "
                "by cell."), ""]
    for s in res["servers"]:
        lines.append(f"- **{s['name']}**: {s['description']}; ready in {s['ready_s']:.0f} s; peak RSS "
                     f"{max(s['rss_mb']):.0f} MB.")
    lines.append("")
    lines.append("| workload | concurrency | " + " | ".join(f"{n} texts/s | {n} tokens/s | {n} p50 / p99 s | {n} errors"
                                                         for n in names) + " | texts/s ratio |")
    lines.append("|---|---|" + "---|---|---|---|" * len(names) + "---|")
    for kind in ("query", "document"):
        for c in cfg["concurrency"]:
            row = [kind, str(c)]
            tps = []
            for n in names:
                cell = res["cells"][n][kind][str(c)]
                tps.append(cell["texts_per_s"])
                err = sum(cell["errors"].values())
                row += [f"{cell['texts_per_s']:.1f}", f"{cell['tokens_per_s']:.0f}",
                        f"{cell['p50_s']:.2f} / {cell['p99_s']:.2f}" if cell["p50_s"] is not None else "-",
                        str(err) if not err else f"{err} {cell['errors']}"]
            row.append(f"{tps[0] / tps[1]:.2f}x" if len(tps) > 1 and tps[1] else "")
            lines.append("| " + " | ".join(row) + " |")
    ours = res.get("ours_server_stats", {})
    if ours:
        lines += ["", f"Ours: {ours['shapes']} bucket shapes compiled at start-up (lengths {ours['seq_buckets']}, rows "
                  f"{ours['batch_rows']}) in {ours['warmup_seconds']:.0f} s; **{int(ours['request_path_compiles'])} "
                  f"compiles on the request path**; {ours['batches']} batches"
                  f"{' packed several texts a row' if ours.get('packed') else ', one text a row'}, padding efficiency "
                  f"{ours['padding_efficiency']:.2f} (real / padded tokens); batch sizes {ours['batch_sizes']}."]
    if res.get("parity"):
        p = res["parity"]
        lines.append(f"Parity on {p['n']} queries + {p['n']} documents: min cosine ours vs {p['anchor']} "
                     f"{p['min_cosine']:.6f} (mean {p['mean_cosine']:.6f}); ours base64 vs float replies: max abs "
                     f"difference {p['base64_vs_float_max_abs']:.1e}.")
    if res.get("ratios"):
        r = res["ratios"]
        lines.append(f"Throughput ratio ours / {names[1]} (texts/s): geometric mean {r['geomean']:.2f}x, min "
                     f"{r['min']:.2f}x, max {r['max']:.2f}x; p99 ours <= anchor in {r['p99_not_worse']} of "
                     f"{r['cells']} cells.")
    if res.get("soak"):
        s = res["soak"]
        lines.append(f"Soak: {s['seconds']:.0f} s at concurrency {s['concurrency']} (queries and documents "
                     f"alternating): {s['ok']} requests, errors {s['errors'] or 0}, RSS {s['rss_mb_after_warmup']:.0f}"
                     f" MB after warm-up, max {s['rss_mb_max_after_warmup']:.0f} MB "
                     f"({100 * s['rss_growth_after_warmup']:+.1f}%).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--st-folder", default=os.path.join(ROOT, "runs", "serve-bench", "gemma3-270m-st"),
                    help="the model exported with `bmr export --format sentence-transformers` (made if missing)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--rounds", type=int, default=2, help="requests per worker in each cell")
    ap.add_argument("--docs-per-request", type=int, default=2)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--docs", type=int, default=512)
    ap.add_argument("--anchor", choices=["auto", "infinity", "st", "none"], default="auto")
    ap.add_argument("--infinity", default=os.environ.get("INFINITY_EMB") or shutil.which("infinity_emb"),
                    help="the infinity_emb executable of its own virtualenv")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32")
    ap.add_argument("--seq-buckets", default="32,64")
    ap.add_argument("--max-batch-tokens", type=int, default=2048,
                    help="rows x length per batch: 2048 ran 1.28x the anchor in geometric mean on 2 AVX2 cores, 4096 1.18x")
    ap.add_argument("--soak", type=float, default=0, help="seconds of soak at concurrency 32 (0: none)")
    ap.add_argument("--only-soak", action="store_true", help="only the soak (ours), into serve-soak.json")
    ap.add_argument("--ready-timeout", type=float, default=900)
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"), help="'' to skip")
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    args.out = args.out or common.results_path("serve-soak" if args.only_soak else "serve")
    workdir = os.path.join(ROOT, "runs", "serve-bench")
    os.makedirs(workdir, exist_ok=True)
    instruction = TASK_INSTRUCTIONS["scifact"]

    if not os.path.exists(os.path.join(args.st_folder, "modules.json")):
        log(f"exporting {args.model} to {args.st_folder}")
        subprocess.run([sys.executable, "-m", "bmretriever_jax.cli", "-q", "export", args.model, "--format",
                        "sentence-transformers", "--out", args.st_folder, "--max-length", str(args.max_length)],
                       check=True, cwd=ROOT)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(args.st_folder)
    queries, docs = load_scifact(args.queries, args.docs)
    qtok = [len(s) for s in tokenize(tok, [format_query(q, instruction) for q in queries], args.max_length)]
    dtok = [len(s) for s in tokenize(tok, [format_passage(d) for d in docs], args.max_length)]
    log(f"{len(queries)} claims ({np.mean(qtok):.0f} tokens on average), {len(docs)} abstracts "
        f"({np.mean(dtok):.0f} tokens, cut at {args.max_length})")

    load_start = common.load_average()
    bmr = [sys.executable, "-m", "bmretriever_jax.cli", "serve"]
    common_flags = ["--max-length", str(args.max_length), "--dtype", "float32", "--instruction", "scifact",
                    "--batch-sizes", args.batch_sizes, "--max-batch-tokens", str(args.max_batch_tokens),
                    "--max-queue", "2048"]
    port = free_port()
    cache = os.path.join(workdir, "xla-cache")
    cache_state = "warm" if os.path.isdir(cache) and os.listdir(cache) else "cold"
    ours = Server("bmr serve", bmr + [f"ours={args.model}", "--port", str(port), "--seq-buckets", args.seq_buckets,
                                      "--compile-cache", cache] + common_flags, port, "/health", "ours", True, log_path=os.path.join(workdir, "ours.log"))
    ours.description = (f"`bmr serve {args.model} --dtype float32 --max-length {args.max_length} --seq-buckets "
                        f"{args.seq_buckets} --batch-sizes {args.batch_sizes} --max-batch-tokens "
                        f"{args.max_batch_tokens} --compile-cache DIR` (JAX, XLA CPU; compile cache {cache_state} at "
                        f"start)")
    servers = [ours]
    anchor = args.anchor
    if args.only_soak:
        anchor = "none"
    elif anchor == "auto":
        anchor = "infinity" if args.infinity and os.path.exists(args.infinity) else "st"
    if anchor == "infinity":
        port = free_port()
        a = Server("infinity-emb", [args.infinity, "v2", "--model-id", args.st_folder, "--served-model-name", "anchor",
                                    "--engine", "torch", "--device", "cpu", "--dtype", "float32", "--batch-size", "32",
                                    "--lengths-via-tokenize", "--no-bettertransformer", "--no-compile", "--port",
                                    str(port), "--url-prefix", "/v1"],
                   port, "/health", "anchor", False, env={"DO_NOT_TRACK": "1"},
                   log_path=os.path.join(workdir, "infinity.log"))
        a.description = "infinity-emb (torch engine, float32, --batch-size 32) serving the exported folder"
        servers.append(a)
    elif anchor == "st":
        port = free_port()
        a = Server("sentence-transformers", bmr + [f"anchor={args.st_folder}", "--backend", "sentence-transformers",
                                                   "--port", str(port)] + common_flags,
                   port, "/health", "anchor", True, log_path=os.path.join(workdir, "st.log"))
        a.description = "sentence-transformers (torch, float32) behind the same HTTP layer and batcher"
        servers.append(a)

    res: Dict = {"command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]), "cpu": common.cpu_info(),
                 "versions": common.versions("jax", "jaxlib", "numpy", "fastapi", "uvicorn", "openai", "torch",
                                             "sentence_transformers"),
                 "config": {"model": args.model, "max_length": args.max_length, "concurrency": conc,
                            "rounds": args.rounds, "docs_per_request": args.docs_per_request,
                            "queries": len(queries), "docs": len(docs), "mean_query_tokens": float(np.mean(qtok)),
                            "mean_doc_tokens": float(np.mean(dtok)), "instruction": instruction,
                            "cores_shared_with_other_jobs": True},
                 "load_average_start": load_start}
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(args.ready_timeout)
            s.sample_rss()
        if not args.only_soak:
            cells: Dict = {s.name: {"query": {}, "document": {}} for s in servers}
            # parity on the same texts (and base64 vs float replies of ours)
            n = 16
            qv = {s.name: asyncio.run(fetch_vectors(s, "query", queries[:n], instruction)) for s in servers}
            dv = {s.name: asyncio.run(fetch_vectors(s, "document", docs[:n], instruction)) for s in servers}
            qf = asyncio.run(fetch_vectors(ours, "query", queries[:n], instruction, "float"))
            res["parity"] = {"n": n, "base64_vs_float_max_abs": float(np.abs(qf - qv[ours.name]).max())}
            if len(servers) > 1:
                cos = np.concatenate([common.cosine_rows(qv[ours.name], qv[servers[1].name]),
                                      common.cosine_rows(dv[ours.name], dv[servers[1].name])])
                res["parity"].update(anchor=servers[1].name, min_cosine=float(cos.min()),
                                     mean_cosine=float(cos.mean()))
                log(f"parity: min cosine {cos.min():.6f}")
            k = 0
            for kind, texts, toks, per in (("query", queries, qtok, 1),
                                           ("document", docs, dtok, args.docs_per_request)):
                for c in conc:
                    order = servers if k % 2 == 0 else servers[::-1]
                    k += 1
                    for s in order:
                        cell = asyncio.run(run_cell(s, kind, texts, toks, per, c, args.rounds, instruction, None))
                        cell["rss_mb"] = s.sample_rss()
                        cells[s.name][kind][str(c)] = cell
                        log(f"{s.name:>22} {kind:>8} c={c:<4} {cell['texts_per_s']:7.1f} texts/s "
                            f"{cell['tokens_per_s']:7.0f} tok/s p50 {cell['p50_s']:.2f} p99 {cell['p99_s']:.2f} "
                            f"errors {cell['errors']}")
            res["cells"] = cells
            res["ours_server_stats"] = our_metrics(ours)
            if len(servers) > 1:
                ratios, p99_ok = [], 0
                for kind in ("query", "document"):
                    for c in conc:
                        a, b = cells[ours.name][kind][str(c)], cells[servers[1].name][kind][str(c)]
                        ratios.append(a["texts_per_s"] / b["texts_per_s"])
                        p99_ok += a["p99_s"] <= b["p99_s"]
                res["ratios"] = {"geomean": float(np.exp(np.mean(np.log(ratios)))), "min": min(ratios),
                                 "max": max(ratios), "p99_not_worse": p99_ok, "cells": len(ratios)}
        if args.soak:
            log(f"soak: {args.soak:.0f} s at concurrency 32")
            res["soak"] = asyncio.run(soak(ours, queries, docs, qtok, dtok, args.soak, 32, instruction,
                                           args.docs_per_request))
            res["soak"]["request_path_compiles"] = our_metrics(ours)["request_path_compiles"]
            log(f"soak: {res['soak']['ok']} requests, errors {res['soak']['errors']}, RSS growth "
                f"{100 * res['soak']['rss_growth_after_warmup']:+.1f}%")
    finally:
        res["exit_codes_after_sigterm"] = {}
        for s in servers:
            res["exit_codes_after_sigterm"][s.name] = s.stop()
    res["load_average_end"] = common.load_average()
    res["servers"] = [{"name": s.name, "description": getattr(s, "description", ""), "ready_s": s.ready_s,
                       "rss_mb": s.rss_samples} for s in servers]
    common.write_json(args.out, res)
    log(f"wrote {args.out}")
    if args.markdown and not args.only_soak:
        body = markdown(res)
        common.replace_section(args.markdown, "serve", body)
        print(body)


if __name__ == "__main__":
    main()
