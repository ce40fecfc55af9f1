"""`bmr pairs` (training pairs from the shipped data) and `bmr mine` (hard negatives)."""
from __future__ import annotations

import logging

from bmretriever_jax.data import builders, mining  # numpy and the JSONL readers only: no jax


def cmd_pairs(a):
    if not a.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return builders.run(a)


def cmd_mine(a):
    if not a.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return mining.run(a)


def cmd_prepare(a):
    from bmretriever_jax.data import prepared  # datasets / the tokenizer load here, not at `bmr --help`

    return prepared.run_cli(a)


def add_commands(sub) -> None:
    s = sub.add_parser("pairs", help="build training pairs from shipped data (scifact, pubmedqa, medquad, pretrain)")
    builders.add_arguments(s)
    s.set_defaults(fn=cmd_pairs)

    s = sub.add_parser("mine", help="add hard negatives to a pairs file (BM25, or a dense retriever)")
    mining.add_arguments(s)
    s.set_defaults(fn=cmd_mine)

    s = sub.add_parser("prepare", help="write training pairs as memory-mapped Arrow (+ token ids) for the grain "
                                       "loader (data.prepared)")
    s.add_argument("sources", nargs="+", help="what data.train takes: pairs .jsonl(.gz) files, builder names "
                                              "(scifact, pubmedqa, medquad, pretrain), pretrain:CORPUS.jsonl")
    s.add_argument("--out", required=True, help="the prepared folder to write (data.prepared: OUT)")
    s.add_argument("--tokenizer", help="also store token ids and lengths for this model's tokenizer (a name from "
                                       "`bmr info` or a folder): length statistics, text share, fast packing calibration")
    s.add_argument("--max-length", type=int, default=512, help="passage tokens kept (model.max_length)")
    s.add_argument("--query-max-length", type=int, default=64, help="query tokens kept (model.query_max_length)")
    s.add_argument("--shard-rows", type=int, default=100_000, help="pairs per Arrow shard")
    s.add_argument("--texts-per-shard", type=int, default=64,
                   help="texts per device batch for the manifest's padded-vs-packed text share estimate")
    s.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    s.set_defaults(fn=cmd_prepare)
