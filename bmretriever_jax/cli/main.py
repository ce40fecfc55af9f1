"""The `bmr` parser and entry point: global options, the command groups, and the one place user errors are printed."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from bmretriever_jax.util.allocator import keep_freed_memory
from bmretriever_jax.cli import data, evaluation, merging, models, planning, synth, training
from bmretriever_jax.parallel.distributed import maybe_initialize
from bmretriever_jax.util.errors import UserError

# command groups, in the order `bmr --help` lists them; sweep keeps its parser beside its code
GROUPS = (models, data, training, evaluation, merging, synth, planning)
EXTERNAL = ("bmretriever_jax.studies.sweep", "bmretriever_jax.cli.serving", "bmretriever_jax.cli.retrieval")


def _add_quiet(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars or per-step lines (before or after the command)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bmr", description="decoder-only LLMs -> biomedical dense retrievers (JAX)")
    _add_quiet(p, False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    for mod in EXTERNAL:
        importlib.import_module(mod).add_commands(sub)
    # `bmr eval -q` as well as `bmr -q eval`: SUPPRESS keeps the global value unless -q follows the command
    for s in sub.choices.values():
        if not any("-q" in a.option_strings for a in s._actions):
            _add_quiet(s, argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # before jax starts its threads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        maybe_initialize()
        rc = args.fn(args)
    except (UserError, FileNotFoundError) as e:  # a missing input file is the user's too; bugs keep tracebacks
        print(f"bmr {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
