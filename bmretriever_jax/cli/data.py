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


def add_commands(sub) -> None:
    s = sub.add_parser("pairs", help="build training pairs from shipped data (scifact, pubmedqa, medquad, pretrain)")
    builders.add_arguments(s)
    s.set_defaults(fn=cmd_pairs)

    s = sub.add_parser("mine", help="add hard negatives to a pairs file (BM25, or a dense retriever)")
    mining.add_arguments(s)
    s.set_defaults(fn=cmd_mine)
