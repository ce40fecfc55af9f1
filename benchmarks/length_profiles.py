"""Token lengths of the shipped training data (Gemma 3 tokenizer), kept in data/length_profiles.json for the
planner: `bmr plan` packs sampled batches of these lengths to size packed rows and count text tokens.

    python benchmarks/length_profiles.py

pretrain: title -> abstract pairs of the SciFact corpus (`pretrain` builder, 5,183 records); finetune: the
scifact, pubmedqa and medquad builders' training pairs (a seeded sample of 3,000 of them), queries with their
instruction template, passages with the passage template, as `training/step.py` formats them. Lengths count the
EOS and are cut at 2048; the planner cuts them again at the config's max_length, as `embed.tokenize` does.
"""
import argparse
import json
import os
import random
import sys

import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bmretriever_jax.convert.hub import resolve  # noqa: E402
from bmretriever_jax.data import builders  # noqa: E402
from bmretriever_jax.embed import format_passage, format_query, instruction_for, tokenize  # noqa: E402
from bmretriever_jax.util.machine import run_facts  # noqa: E402

CAP = 2048
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "length_profiles.json")


def lengths(tok, pairs):
    q = [format_query(p.query, p.instruction or instruction_for(p.task)) for p in pairs]
    d = [format_passage(p.positive) for p in pairs]
    return sorted(map(len, tokenize(tok, q, CAP))), sorted(map(len, tokenize(tok, d, CAP)))


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(resolve("gemma3-270m", quiet=True))
    pre = builders.build("pretrain")
    fine = builders.build("scifact") + builders.build("pubmedqa") + builders.build("medquad")
    fine = random.Random(0).sample(fine, 3000)
    out = {"tokenizer": "gemma3-270m", "cap": CAP, "command": "python benchmarks/length_profiles.py",
           "facts": run_facts(), "profiles": {}}
    for name, pairs in (("pretrain", pre), ("finetune", fine)):
        q, p = lengths(tok, pairs)
        out["profiles"][name] = {"pairs": len(pairs), "query": q, "passage": p}
        print(name, len(pairs), "query p50", q[len(q) // 2], "passage p50", p[len(p) // 2], "p90", p[int(len(p) * .9)])
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
