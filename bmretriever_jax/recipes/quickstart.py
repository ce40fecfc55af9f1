"""`make quickstart`: the main job end to end on the embedded Gemma 3 270M and the shipped data.

1. load Gemma 3 270M (converted from its GGUF once, then cached)
2. encode the SciFact corpus, show a few claims' top 3 abstracts and score every test claim (untrained)
3. two LoRA experts (configs/quickstart.yaml): literature (SciFact-train + PubMedQA-train) and consumer
   health (MedQuAD, its benchmark documents held out)
4. a linear merge of the two (mergekit YAML), exported for sentence-transformers and loaded there
5. the same claims with the merged model
6. the evaluation table: BM25, MiniLM and the merged model on SciFact, PubMedQA, BIOSSES (SciFact and BIOSSES
   with passages at 256 tokens, PubMedQA at the training length), the merged model fused with BM25 (weights chosen
   on SciFact's dev split), and step 2's untrained score

Everything long has a progress bar; corpus vectors are cached, so a second run re-encodes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import yaml

from bmretriever_jax.util import paths
from bmretriever_jax.util.allocator import keep_freed_memory
from bmretriever_jax.config import load_config
from bmretriever_jax.data.beir import load_beir, subset_beir

CLAIMS = 3

# The same flow at two sizes, so that it stays under 30 minutes on a 2-core CPU either way. "full" where
# the hardware has bf16 units (compute dtype auto -> bfloat16: ~1,460 tokens/s encoding Gemma 3 270M on 2
# AVX512-BF16 cores); "lite" where it has not (auto -> float32: ~610 tokens/s on 2 AVX2 cores, and a LoRA
# step costs ~2.4x more). Measured sizes and times: docs/quickstart.md. The consumer-health expert of `full`
# trains 20 steps: its loss is 0.003 at step 10 and mostly stays near there (in-batch MedQuAD answers are easy to
# tell apart), and 20 steps scored within +-0.006 of 60 on every column in 25.0 instead of 32.3 minutes
# (docs/quickstart.md, "Trials"). One hard negative per pair (`--hard-negatives 1`) did not raise the table
# and cost 1.45x the time.
# Training cuts passages at max_length; the table scores them at eval_length, where a trained model scores higher
# (measured: docs/quickstart.md, "Passage length in the table").
PROFILES = {
    "full": {"scifact_docs": 1500, "max_length": 128, "eval_length": 256, "steps": {"literature": 60, "consumer": 20},
             "batch": 16, "hard_negatives": 0},
    "lite": {"scifact_docs": 800, "max_length": 96, "eval_length": 256, "steps": {"literature": 30, "consumer": 30},
             "batch": 8, "hard_negatives": 0},
}
EXPERTS = {"literature": ["scifact", "pubmedqa"], "consumer": ["medquad"]}  # expert -> training data (builders)


def parse_steps(text: str) -> dict:
    """--steps: `N` (every expert) or `literature=N,consumer=M` (those named; the rest keep the profile's)."""
    def count(n: str) -> int:
        if not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"{n.strip()!r} is not a step count; allowed: N or literature=N,consumer=M with N >= 1")
        return int(n)

    if "=" not in text:
        return dict.fromkeys(EXPERTS, count(text))
    out = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if name.strip() not in EXPERTS:
            raise ValueError(f"unknown expert {name.strip()!r}; allowed: {', '.join(EXPERTS)}")
        out[name.strip()] = count(n)
    return out


def pick_profile(name: str) -> str:
    if name != "auto":
        return name
    from bmretriever_jax.util.precision import resolve_dtype  # jax: after keep_freed_memory (see main)

    return "full" if resolve_dtype("auto").name == "bfloat16" else "lite"


def mine_pairs(builders_: list, out: str, n: int) -> str:
    """The builders' training pairs with n BM25 hard negatives each, mined over their own pool of positives
    (what `bmr pairs` + `bmr mine --num-negatives n` make), written to `out`; returns `out`."""
    from bmretriever_jax.data import builders
    from bmretriever_jax.data.mining import mine_hard_negatives
    from bmretriever_jax.data.pairs import write_pairs

    pairs = [p for name in builders_ for p in builders.build(name)]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t = time.time()
    write_pairs(out, mine_hard_negatives(pairs, num_negatives=n, top_k=100, progress=True))
    print(f"{len(pairs)} pairs, {n} BM25 hard negative(s) each, in {time.time() - t:.0f} s -> {out}", flush=True)
    return out


def banner(msg: str):
    print(f"\n=== {msg} " + "=" * max(3, 96 - len(msg)), flush=True)


def show_top3(enc, corpus_ids, corpus_vecs, docs, queries, instruction):
    qv = enc.encode_queries([q for _, q in queries], instruction)
    scores = qv @ corpus_vecs.T
    for (qid, q), s in zip(queries, scores):
        print(f"\nclaim {qid}: {q}")
        for r, j in enumerate(np.argsort(-s)[:3], 1):
            d = docs[corpus_ids[j]]
            print(f"  {r}. [{s[j]:.3f}] {corpus_ids[j]}: {(d['title'] or d['text'])[:110]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "quickstart"))
    p.add_argument("--profile", choices=["auto", *PROFILES], default="auto",
                   help="run size: auto = full where bf16 is fast (accelerator, CPU with bf16 units), else lite")
    p.add_argument("--steps", default=None,
                   help="train.steps: N for every expert, or literature=N,consumer=M (default: the profile's)")
    p.add_argument("--batch", type=int, default=None,
                   help="train.global_batch_size of each expert (default: the profile's)")
    p.add_argument("--hard-negatives", type=int, default=None,
                   help="BM25-mined hard negatives per training pair (bmr mine over each expert's pool of positives); "
                        "0 = in-batch negatives only (default: the profile's)")
    p.add_argument("--eval-length", type=int, default=None,
                   help="passage tokens of the trained model on SciFact and BIOSSES in the table, and of its "
                        "sentence-transformers export (default: the profile's, 256; training cuts passages shorter, "
                        "PubMedQA is scored at the training length)")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--model", default="gemma3-270m", help="backbone (a smoke run can pass a tiny model folder)")
    p.add_argument("--scifact-docs", type=int, default=None,
                   help="SciFact corpus size for the demo and table (all judged docs + random others; 0 = all 5,183; "
                        "default: the profile's)")
    a = p.parse_args(argv)
    if a.hard_negatives is not None and a.hard_negatives < 0:
        p.error(f"--hard-negatives {a.hard_negatives}: allowed: 0 or more")
    try:
        steps = parse_steps(a.steps) if a.steps is not None else {}
    except ValueError as e:
        p.error(f"--steps {a.steps}: {e}")
    if a.batch is not None and a.batch < 1:
        p.error(f"--batch {a.batch}: allowed: 1 or more")
    if a.eval_length is not None and a.eval_length < 8:
        p.error(f"--eval-length {a.eval_length}: allowed: 8 or more")
    keep_freed_memory()  # before jax starts its threads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.time()
    profile = pick_profile(a.profile)
    size = dict(PROFILES[profile])
    size["steps"] = {**size["steps"], **steps}
    if a.batch:
        size["batch"] = a.batch
    if a.scifact_docs is not None:
        size["scifact_docs"] = a.scifact_docs
    if a.eval_length is not None:
        size["eval_length"] = a.eval_length
    if a.hard_negatives is not None:
        size["hard_negatives"] = a.hard_negatives

    # jax and everything built on it: imported after keep_freed_memory(), and not for `--help`
    from bmretriever_jax.convert.export import export
    from bmretriever_jax.embed import Encoder, instruction_for
    from bmretriever_jax.eval.evaluate import cached_corpus_vectors, evaluate_retrieval
    from bmretriever_jax.eval.baselines import MiniLMEncoder
    from bmretriever_jax.eval.suite import evaluate_all, model_labels, print_table
    from bmretriever_jax.merging.folder import merge_to_folder
    from bmretriever_jax.training import train

    scifact = paths.shipped_data("scifact")
    if size["scifact_docs"]:
        n_docs = size["scifact_docs"]
        scifact = subset_beir(scifact, os.path.join(a.out, "data", f"scifact-{n_docs}"), n_docs)
    cache = os.path.join(a.out, "vector_cache")
    overrides = [f"out={a.out}", f"model.name={a.model}", f"train.global_batch_size={size['batch']}",
                 f"model.max_length={size['max_length']}"]
    run = load_config(paths.shipped_config("quickstart.yaml"), overrides)
    if run.data.dev and run.data.dev.startswith("data/"):  # the config names the shipped data as in a clone
        run.data.dev = paths.shipped_data(run.data.dev[len("data/"):])

    banner("1. Gemma 3 270M (embedded GGUF -> JAX)")
    enc = Encoder.load(a.model, max_length=run.model.max_length, dtype=run.model.dtype)
    print(f"{enc.cfg.family}: {enc.cfg.num_layers} layers, hidden {enc.cfg.hidden_size}, "
          f"{enc.cfg.num_params() / 1e6:.0f}M parameters; compute {enc.dtype} with f32 accumulation")
    if size["eval_length"] > enc.cfg.max_position_embeddings:  # fail now, not after the training
        p.error(f"--eval-length {size['eval_length']}: exceeds the model's context; allowed: 8 to "
                f"{enc.cfg.max_position_embeddings}")
    steps_text = ", ".join(f"{k} {n}" for k, n in size["steps"].items())
    print(f"profile '{profile}': SciFact corpus {size['scifact_docs'] or 'all'} docs, passages {size['max_length']} "
          f"tokens in training and {size['eval_length']} for SciFact in the table, experts {steps_text} steps x "
          f"{size['batch']} pairs, {size['hard_negatives']} hard negative(s) each (--profile full|lite to choose)")

    banner("2. SciFact corpus -> vectors, top 3 abstracts for a few claims (untrained)")
    corpus, queries, _ = load_beir(scifact, "test")
    ids = list(corpus)
    vecs = np.concatenate(cached_corpus_vectors(enc, corpus, scifact, cache))
    claims = sorted(queries.items(), key=lambda kv: int(kv[0]))[:CLAIMS]
    show_top3(enc, ids, vecs, corpus, claims, instruction_for("scifact"))
    # the untrained score from the vectors above, at the training length (its row of the table: scoring the
    # untrained model at 256 tokens, and on the other data sets, would cost minutes for numbers near 0)
    untrained = evaluate_retrieval(enc, scifact, "test", instruction_for("scifact"), cache_dir=cache)
    untrained["tokens"] = run.model.max_length
    print(f"\nuntrained, all {len(queries)} test claims: NDCG@10 {untrained['ndcg@10']:.4f}")
    del enc

    banner("3. two LoRA experts: biomedical literature (SciFact + PubMedQA) and consumer health (MedQuAD)")
    experts = {}
    for name, train_data in EXPERTS.items():
        print(f"\n--- expert '{name}': {', '.join(train_data)}, {size['steps'][name]} steps", flush=True)
        data_ov = [f"data.train={json.dumps(train_data)}"]
        if size["hard_negatives"]:
            mined = os.path.join(a.out, "data", f"{name}-hn{size['hard_negatives']}.jsonl")
            data_ov = [f"data.train={json.dumps([mine_pairs(train_data, mined, size['hard_negatives'])])}",
                       f"data.num_negatives={size['hard_negatives']}"]
        exp_run = load_config(paths.shipped_config("quickstart.yaml"), overrides + [
            f"out={os.path.join(a.out, name)}", f"train.steps={size['steps'][name]}"] + data_ov)
        exp_run.data.dev = None  # the table below evaluates the merge; `bmr train` alone reports dev NDCG
        res = train(exp_run)
        print(json.dumps({k: round(v, 4) for k, v in res.items() if isinstance(v, float)}))
        experts[name] = os.path.join(a.out, name)

    banner("4. merge the experts (linear, mergekit YAML) and export for sentence-transformers")
    merge_cfg = {"merge_method": "linear", "dtype": "float32",
                 "models": [{"model": experts[k], "parameters": {"weight": 0.5}} for k in ("literature", "consumer")]}
    with open(os.path.join(a.out, "merge.yaml"), "w") as f:
        yaml.safe_dump(merge_cfg, f, sort_keys=False)  # quoted as needed: paths with ':' or '#' stay paths
    merged = os.path.join(a.out, "merged")
    for d in (merged, merged + "-st"):
        shutil.rmtree(d, ignore_errors=True)
    merge_to_folder(os.path.join(a.out, "merge.yaml"), merged)
    st_dir = export(merged, merged + "-st", "sentence-transformers", instruction=instruction_for("scifact"),
                    max_length=size["eval_length"])
    print(f"merged model: {merged}\nsentence-transformers export: {st_dir}")
    from sentence_transformers import SentenceTransformer  # an optional extra (demo)

    st = SentenceTransformer(st_dir, device="cpu")
    st_q = st.encode([q for _, q in claims], prompt_name="query", normalize_embeddings=True)
    menc = Encoder.load(merged, dtype="float32")
    ours_q = menc.encode_queries([q for _, q in claims], "scifact")
    print(f"SentenceTransformer(...).encode(claims, prompt_name='query') vs ours (fp32): "
          f"max |diff| = {np.abs(st_q - ours_q).max():.2e}")
    trained_dir = merged

    banner("5. the same claims, merged model")
    tenc = Encoder.load(trained_dir, max_length=size["eval_length"], dtype=run.model.dtype)
    tvecs = np.concatenate(cached_corpus_vectors(tenc, corpus, scifact, cache))
    show_top3(tenc, ids, tvecs, corpus, claims, instruction_for("scifact"))

    banner("6. evaluation (test splits)")
    models = ["bm25"] + ([] if a.skip_minilm else ["minilm"]) + [trained_dir]
    # Passages at eval_length where that pays (SciFact's abstracts; BIOSSES' sentences are short either way), at
    # the training length for PubMedQA, where 256 tokens scored lower and took twice the time (docs/quickstart.md).
    # Hybrid retrieval: the merged model fused with BM25 (min-max weighted sum, a row per retrieval set), the
    # weights chosen on the data set's dev split where it has one (SciFact), equal otherwise.
    untrained_label = model_labels([*models, a.model])[a.model]
    results = {f"{untrained_label} | {os.path.basename(os.path.normpath(scifact))}": untrained}
    for data, length in (([scifact, paths.shipped_data("biosses", "biosses.tsv")], size["eval_length"]),
                         ([paths.shipped_data("pubmedqa_pqal")], run.model.max_length)):
        res = evaluate_all(models, data, max_length=length, cache_dir=cache, fusion_method="wsum",
                           fuse=[trained_dir, "bm25"])
        for key, row in res.items():
            system = key.split(" | ")[0]
            if system == "minilm":  # it stops at its own limit
                row["tokens"] = MiniLMEncoder.DEFAULT_MAX_LENGTH
            elif system != "bm25":  # BM25 reads whole documents; fused rows: their dense half's length
                row["tokens"] = length
        results.update(res)
    order = {label: i for i, label in enumerate(model_labels(models).values())}  # as listed, fused last
    order[untrained_label] = len(models) - 1.5                                     # just before the merged model
    results = dict(sorted(results.items(), key=lambda kv: (order.get(kv[0].split(" | ")[0], len(order)),
                                                           kv[0].endswith(".tsv"))))
    table = print_table(results)
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(a.out, "eval.md"), "w") as f:
        f.write(table + "\n")
    import shlex  # the command below is pasted into a shell: --out may hold spaces

    print(f"\nquickstart finished in {(time.time() - t_start) / 60:.1f} min; results in {a.out}/eval.json, "
          f"loss curves of both experts: bmr plot {shlex.quote(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
