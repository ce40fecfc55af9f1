"""The two-stage recipe at CPU scale, stage by stage, with and without BM25 fusion: an ablation table.

    python -m bmretriever_jax.studies.recipe                 # every row, full SciFact / MedQuAD / PubMedQA test
    python -m bmretriever_jax.studies.recipe --smoke         # tiny sizes: checks the flow in minutes
    python -m bmretriever_jax.studies.recipe --rows ft128,ft256
    python -m bmretriever_jax.studies.recipe --status        # where the study folder stands (nothing runs)

Rows (each one change on top of the row before; Gemma 3 270M + LoRA, configs/recipe/*.yaml):
  ft128   fine-tune only, passages at 128 tokens: SciFact-train + PubMedQA-train + MedQuAD (the quickstart data)
  ft256   + 256-token passages
  s1      + stage 1 first: contrastive pre-training on the SciFact, MedQuAD and PubMedQA corpora used unlabelled
          (no query, no qrels: domain-adaptive pre-training): title -> abstract, and for the untitled documents
          opening sentence -> the rest (8,627 pairs; no question lead); stage 2 starts from its weights
  hn      + one BM25-mined hard negative per training pair (`bmr mine` over the pooled positives of the
          row's training data; the merge row's experts mine over their own data's)
  merge   + two stage-2 experts (literature: SciFact + PubMedQA; consumer: MedQuAD) merged linearly
Every row is evaluated on the test splits of SciFact (all 5,183 abstracts), MedQuAD and PubMedQA (NDCG@10,
recall@100), alone and fused with BM25 (min-max weighted sum, weights chosen on the data set's dev split where it
has one, else equal: never on test), with BM25 and all-MiniLM-L6-v2 in the same table.

A stage that finished is not run again (its folder holds `done.json`), so an interrupted study resumes where it
stopped; a study folder is bound to its sizes and model (results.json says which), and another --smoke / --model
is refused there. Results: OUT/results.json after every row, and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List

from bmretriever_jax.util import paths

ROWS = ("ft128", "ft256", "s1", "hn", "merge")
ROW_TITLES = {"ft128": "fine-tune only, 128-token passages (the quickstart recipe)", "ft256": "+ 256-token passages",
              "s1": "+ stage 1: title / lead -> text pre-training", "hn": "+ 1 BM25 hard negative per pair",
              "merge": "+ merge of two experts (literature, consumer)"}
DATA = ("scifact", "medquad", "pubmedqa_pqal")
EXPERTS = {"literature": ["scifact", "pubmedqa"], "consumer": ["medquad"]}
SIZES = {  # steps x batch; eval_docs: corpus subsets (0 = whole corpora); pairs: mined pairs per source
    "full": {"stage1_steps": 300, "stage2_steps": 120, "expert_steps": 80, "batch": 16, "eval_docs": 0, "pairs": None},
    "smoke": {"stage1_steps": 2, "stage2_steps": 2, "expert_steps": 2, "batch": 8, "eval_docs": 120, "pairs": 200},
}


def row_stages(row: str) -> List[str]:
    """The stage folders (relative to the study folder) that row `row` trains, in order; the last is its model."""
    first = ["stage1"] if row in ("s1", "hn", "merge") else []
    if row != "merge":
        return first + [row]
    return first + [f"merge/{name}" for name in EXPERTS] + ["merge/merged"]


def _done(folder: str):
    path = os.path.join(folder, "done.json")
    return json.load(open(path)) if os.path.exists(path) else None


def _mark_done(folder: str, info: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "done.json"), "w") as f:
        json.dump(info, f, indent=1)


def train_stage(config: str, out: str, overrides: List[str]) -> str:
    """One `bmr train` run (in this process) unless OUT/done.json says it finished; -> the run folder."""
    from bmretriever_jax.config import load_config
    from bmretriever_jax.training import train

    done = _done(out)
    if done is not None and (done.get("config"), done.get("overrides")) != (config, overrides):
        raise SystemExit(f"{out} holds a finished {done.get('config')} run with other settings "
                         f"({' '.join(done.get('overrides') or [])}); remove it or give another --out")
    if done is None:
        t = time.time()
        print(f"--- train {config} -> {out} {' '.join(overrides)}", flush=True)
        run = load_config(paths.shipped_config(config), [f"out={out}", *overrides])
        res = train(run)
        _mark_done(out, {"config": config, "overrides": overrides, "seconds": round(time.time() - t, 1),
                         **{k: v for k, v in res.items() if isinstance(v, (int, float))}})
    return out


def mined(names: List[str], out: str, limit=None) -> str:
    """The builders' pairs (the first `limit` of each, None = all) with one BM25 hard negative each, mined over
    their own pool of positives (what `bmr pairs` + `bmr mine --num-negatives 1` make), written once."""
    if not os.path.exists(out):
        from bmretriever_jax.data import builders
        from bmretriever_jax.data.mining import mine_hard_negatives
        from bmretriever_jax.data.pairs import write_pairs

        pairs = [p for name in names for p in builders.build(name)[:limit]]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_pairs(out + ".part.jsonl", mine_hard_negatives(pairs, num_negatives=1, top_k=100, progress=True))
        os.replace(out + ".part.jsonl", out)
    return out


def build_row(row: str, a, size: dict) -> str:
    """Train what row `row` needs (reusing finished stages) -> the model folder to evaluate."""
    out = a.out
    length = 128 if row == "ft128" else 256
    base = [f"model.name={a.model}", f"model.max_length={length}", f"train.global_batch_size={size['batch']}"]
    stages = row_stages(row)
    folders = [os.path.join(out, *stage.split("/")) for stage in stages]
    start = []
    if stages[0] == "stage1":
        # the three corpora, unlabelled: no query, no qrels of any split
        corpora = ["pretrain:" + paths.shipped_data(name, "corpus.jsonl") for name in DATA]
        s1 = train_stage("recipe/stage1-pretrain.yaml", folders[0],
                         [f"model.name={a.model}", f"train.steps={size['stage1_steps']}",
                          f"train.global_batch_size={size['batch']}", f"data.train={json.dumps(corpora)}"])
        start = [f"model.name={s1}"]
    if row != "merge":
        data = [n for names in EXPERTS.values() for n in names]
        over = base + start + [f"train.steps={size['stage2_steps']}"]
        if row == "hn":
            hn = mined(data, os.path.join(out, "data", "all-hn1.jsonl"), size["pairs"])
            over += [f"data.train={json.dumps([hn])}", "data.num_negatives=1"]
        else:
            over += [f"data.train={json.dumps(data)}"]
        return train_stage("recipe/stage2-finetune.yaml", folders[-1], over)
    experts = []
    for (name, data), folder in zip(EXPERTS.items(), folders[-1 - len(EXPERTS):-1], strict=True):
        hn = mined(data, os.path.join(out, "data", name + "-hn1.jsonl"), size["pairs"])
        over = base + start + [f"train.steps={size['expert_steps']}", f"data.train={json.dumps([hn])}",
                               "data.num_negatives=1"]
        experts.append(train_stage("recipe/stage2-finetune.yaml", folder, over))
    merged = folders[-1]
    if _done(merged) is None:
        import yaml

        from bmretriever_jax.merging.folder import merge_to_folder

        spec = os.path.join(out, "merge", "merge.yaml")
        with open(spec, "w") as f:
            yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                            "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts]}, f,
                           sort_keys=False)
        shutil.rmtree(merged, ignore_errors=True)
        merge_to_folder(spec, merged)
        _mark_done(merged, {"experts": experts})
    return merged


def evaluate_row(model: str, data: List[str], cache: str) -> Dict[str, dict]:
    """{data name: {"alone": metrics, "fused": metrics}} for one model (fused: + BM25, weights on dev)."""
    from bmretriever_jax.eval.suite import evaluate_all

    # not quiet: an evaluation encodes three corpora for about an hour on 2 AVX2 cores, so it shows its bars
    res = evaluate_all([model, "bm25"], data, max_length=256, cache_dir=cache, quiet=False, fusion_method="wsum")
    out = {}
    for key, row in res.items():
        system, _, dname = key.partition(" | ")
        if system == "bm25":
            continue
        out.setdefault(dname, {})["fused" if system.startswith("wsum") else "alone"] = row
    return out


def baselines(data: List[str], cache: str) -> Dict[str, Dict[str, dict]]:
    from bmretriever_jax.eval.suite import evaluate_all

    res = evaluate_all(["bm25", "minilm"], data, max_length=256, cache_dir=cache, quiet=False)
    out: Dict[str, Dict[str, dict]] = {}
    for key, row in res.items():
        system, _, dname = key.partition(" | ")
        out.setdefault(system, {})[dname] = row
    return out


def render(results: dict) -> str:
    names = [os.path.basename(d) for d in results["data"]]
    head = "| row | " + " | ".join(f"{n} NDCG@10 | {n} R@100" for n in names) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(names)]
    for system, per in results.get("baselines", {}).items():
        lines.append(f"| {system} | " + " | ".join(f"{per[n]['ndcg@10']:.4f} | {per[n]['recall@100']:.4f}"
                                                   if n in per else "- | -" for n in names) + " |")
    for row in ROWS:
        if row not in results["rows"]:
            continue
        per = results["rows"][row]
        for kind, label in (("alone", ROW_TITLES[row]), ("fused", "  fused with BM25 (wsum, dev weights)")):
            cells = []
            for n in names:
                m = per.get(n, {}).get(kind)
                cells.append(f"{m['ndcg@10']:.4f} | {m['recall@100']:.4f}" if m else "- | -")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stage_state(folder: str) -> str:
    """'trained', 'training: step N of M' (its newest checkpoint) or '' for a stage folder."""
    if _done(folder) is not None:
        return "trained"
    ck = os.path.join(folder, "checkpoints")
    steps = paths.checkpoint_steps(ck)
    if not steps and not os.path.isdir(folder):
        return ""
    total = "?"
    cfg = os.path.join(folder, "config.yaml")
    if os.path.exists(cfg):
        import yaml

        total = (yaml.safe_load(open(cfg)) or {}).get("train", {}).get("steps", "?")
    return f"training: checkpoint at step {steps[-1] if steps else 0} of {total}"


def status(out: str) -> str:
    """Where a study folder stands, read from its files (nothing runs): rows scored, stages trained or in
    progress, corpus chunks encoded."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return f"{out}: no study here yet (no results.json)"
    results = json.load(open(path))
    lines = [f"{out}: model {results.get('model')}, sizes {results.get('sizes')}",
             f"  baselines: {'scored' if 'baselines' in results else 'to do'}"]
    for row in ROWS:
        if row in results.get("rows", {}):
            lines.append(f"  {row}: scored ({results.get('seconds', {}).get(row, '?')} s)")
            continue
        parts = [f"{name} {state}" for name in row_stages(row)
                 for state in [_stage_state(os.path.join(out, *name.split("/")))] if state]
        lines.append(f"  {row}: to do" + (f" ({'; '.join(parts)})" if parts else ""))
    cache = os.path.join(out, "vector_cache")
    if os.path.isdir(cache):
        chunks = sum(f.endswith(".npy") for d in os.listdir(cache) for f in os.listdir(os.path.join(cache, d)))
        lines.append(f"  vector cache: {len(os.listdir(cache))} corpus encodings, {chunks} chunks of 1,024 vectors")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="study folder (default runs/recipe, runs/recipe-smoke with --smoke)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (2 steps, 120-document corpora)")
    p.add_argument("--status", action="store_true", help="print where the study folder stands and exit")
    a = p.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--rows {','.join(bad)}: allowed: {', '.join(ROWS)}")
    size = SIZES["smoke" if a.smoke else "full"]
    a.out = a.out or os.path.join("runs", "recipe-smoke" if a.smoke else "recipe")
    if a.status:
        print(status(a.out))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bmretriever_jax.data.beir import subset_beir
    from bmretriever_jax.util.machine import cpu_info

    data = [paths.shipped_data(d) for d in DATA]
    if size["eval_docs"]:
        data = [subset_beir(d, os.path.join(a.out, "data", f"{os.path.basename(d)}-{size['eval_docs']}"),
                            size["eval_docs"]) for d in data]
    cache = os.path.join(a.out, "vector_cache")
    path = os.path.join(a.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"rows": {}}
    if results.get("sizes", size) != size or results.get("model", a.model) != a.model:
        p.error(f"--out {a.out}: that study ran with sizes {results['sizes']} and model {results.get('model')}; "
                "give another --out for these settings")
    results.update(data=data, cpu=cpu_info(), sizes=size, model=a.model, command="python -m bmretriever_jax.studies.recipe " +
                   " ".join(argv if argv is not None else sys.argv[1:]))

    def save():
        os.makedirs(a.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    if "baselines" not in results:
        results["baselines"] = baselines(data, cache)
        save()
    for row in rows:
        if row in results["rows"]:
            continue
        t = time.time()
        model = build_row(row, a, size)
        results["rows"][row] = evaluate_row(model, data, cache)
        results.setdefault("seconds", {})[row] = round(time.time() - t, 1)
        save()
        print(render(results), flush=True)
    table = render(results)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
