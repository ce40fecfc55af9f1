"""`make quickstart-synth`: synthetic training data and instruction search on the embedded models.

1. synthetic claims for SciFact corpus passages (SmolLM2-135M-Instruct, the packaged GGUF), none of them a
   document judged for a SciFact test claim, filtered (empty, length, copied text, duplicates, and a BM25
   round trip: the source passage must come back in the top 10 for its claim)
2. two LoRA fine-tunes of Gemma 3 270M with configs/quickstart.yaml, the same steps and seed: on the SciFact
   train claims alone, and on the SciFact train claims plus the kept synthetic claims
3. instruction search (`bmr optimize-prompt`) for the second model on the SciFact dev claims
4. NDCG@10 on SciFact test (the quickstart's corpus for the profile) of the untrained model, both
   fine-tunes, and the second with the instruction found

Every step resumes: generation appends to its JSONL, training resumes from its checkpoints, vectors are
cached; a second run only redoes the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bmretriever_jax.util import paths
from bmretriever_jax.util.allocator import keep_freed_memory
from bmretriever_jax.config import load_config
from bmretriever_jax.data.beir import subset_beir
from bmretriever_jax.recipes.quickstart import PROFILES, banner, pick_profile


def _judged(beir_dir: str, split: str) -> set:
    with open(os.path.join(beir_dir, "qrels", f"{split}.tsv")) as f:
        return {line.split("\t")[1] for line in list(f)[1:] if line.strip()}


def synth_corpus(src: str, dst: str, n: int, exclude: set) -> str:
    """The first `n` corpus documents of `src` not in `exclude`, as a corpus.jsonl at `dst`."""
    if not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        kept = []
        with open(os.path.join(src, "corpus.jsonl")) as f:
            for line in f:
                if line.strip() and json.loads(line)["_id"] not in exclude:
                    kept.append(line)
                    if len(kept) == n:
                        break
        with open(dst + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(dst + ".tmp", dst)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "quickstart-synth"))
    p.add_argument("--passages", type=int, default=200, help="SciFact corpus passages to write claims for")
    p.add_argument("--steps", type=int, default=40, help="train.steps of both fine-tunes")
    p.add_argument("--profile", choices=["auto", *PROFILES], default="auto",
                   help="corpus size, passage length and batch of `make quickstart`'s profile (auto: by hardware)")
    p.add_argument("--budget", type=int, default=6, help="instruction candidates scored")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--llm", default="smollm2-135m")
    a = p.parse_args(argv)
    keep_freed_memory()  # before jax starts its threads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.time()
    # jax and everything built on it: imported after keep_freed_memory(), and not for `--help`
    from bmretriever_jax.embed import instruction_for
    from bmretriever_jax.eval.suite import evaluate_all, make_encoder, print_table
    from bmretriever_jax.synth import pipeline
    from bmretriever_jax.synth.prompt_opt import optimize_instruction, write_report
    from bmretriever_jax.synth.queries import count_rejected, generate_queries, read_corpus_items
    from bmretriever_jax.training import train

    scifact = paths.shipped_data("scifact")
    os.makedirs(a.out, exist_ok=True)
    size = PROFILES[pick_profile(a.profile)]
    n_docs, max_len = size["scifact_docs"], size["max_length"]
    bench = subset_beir(scifact, os.path.join(a.out, "data", f"scifact-{n_docs}"), n_docs)
    print(f"profile '{pick_profile(a.profile)}': SciFact corpus {n_docs} docs, passages {max_len} tokens, "
          f"batch {size['batch']}")

    banner(f"1. synthetic claims for {a.passages} SciFact passages ({a.llm}), filtered")
    corpus = synth_corpus(scifact, os.path.join(a.out, "synth", "corpus.jsonl"), a.passages,
                          _judged(scifact, "test") | _judged(scifact, "dev"))
    raw = os.path.join(a.out, "synth", "claims.jsonl")
    kept = os.path.join(a.out, "synth", "claims.filtered.jsonl")
    # what `bmr synth queries --style claim --task scifact --filter` does, with its defaults
    llm = pipeline.make_llm(a.llm, batch_size=8)
    print(generate_queries(read_corpus_items(corpus, None), llm, "claim", raw, batch_size=8, max_new_tokens=64,
                           temperature=0.7, top_p=0.9, seed=0, task="scifact", model_name=a.llm, progress=True))
    pipeline.run_filter("queries", raw, kept, retriever="bm25", corpus_path=corpus, top_k=10,
                        instruction=pipeline.instruction_for_pairs(raw, None), generated_empty=count_rejected(raw))
    n_kept = sum(1 for line in open(kept) if line.strip())
    print(f"kept {n_kept} of {a.passages} synthetic claims")

    banner("2. LoRA fine-tunes: SciFact train alone, and with the synthetic claims")
    runs = {}
    for name, data in (("scifact", ["scifact"]), ("scifact+synth", ["scifact", kept])):
        print(f"\n--- {name}: {', '.join(data)}", flush=True)
        run = load_config(paths.shipped_config("quickstart.yaml"),
                          [f"out={os.path.join(a.out, name)}", f"model.name={a.model}", f"train.steps={a.steps}",
                           f"data.train={json.dumps(data)}", "data.dev=null", f"model.max_length={max_len}",
                           f"train.global_batch_size={size['batch']}"])
        train(run)
        runs[name] = os.path.join(a.out, name, "model")

    banner("3. instruction search on the SciFact dev claims (model trained with synthetic data)")
    report = os.path.join(a.out, "prompt_opt", "scifact-dev")
    # what `bmr optimize-prompt --task scifact --split dev --no-write` does
    encoder = make_encoder(runs["scifact+synth"], max_length=max_len, quiet=True)
    found = optimize_instruction(encoder, bench, pipeline.make_llm(a.llm, batch_size=1), task="scifact", split="dev",
                                 budget=a.budget, n_batches=4, cache_dir=os.path.join(a.out, "vector_cache"),
                                 rng_seed=0, max_new_tokens=64, temperature=0.7, current=None, progress=True)
    write_report(found, report)
    winner = found["winner"]

    banner(f"4. SciFact test NDCG@10 ({n_docs:,}-document corpus)")
    cache = os.path.join(a.out, "vector_cache")
    results = {}
    for label, model, instr in (("untrained", a.model, None), ("LoRA SciFact", runs["scifact"], None),
                                ("LoRA SciFact + synthetic", runs["scifact+synth"], None),
                                ("LoRA SciFact + synthetic, searched instruction", runs["scifact+synth"], winner)):
        row = evaluate_all([model], [bench], instruction=instr, max_length=max_len, cache_dir=cache, quiet=True)
        results[label] = next(iter(row.values()))
    table = print_table(results)
    summary = {"synthetic_claims": a.passages, "kept": n_kept, "steps": a.steps,
               "default_instruction": instruction_for("scifact"), "searched_instruction": winner,
               "dev_ndcg@10_default": found.get("baseline"), "dev_ndcg@10_searched": found.get("winner_score"),
               "test": results}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\ninstruction: {instruction_for('scifact')!r} -> {winner!r} "
          f"(dev NDCG@10 {found.get('baseline'):.4f} -> {found.get('winner_score'):.4f})")
    print(f"quickstart-synth finished in {(time.time() - t_start) / 60:.1f} min; {a.out}/results.json")
    return 0 if table else 1


if __name__ == "__main__":
    sys.exit(main())
