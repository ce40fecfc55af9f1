"""`bmr`: the command line. One thin module per command group; each parses arguments and calls the library.

Nothing in the library imports from here. Building the parser imports no jax (`bmr --help` stays fast): every
command imports the jax-side library it drives inside its function (light helpers are imported at the top).
"""
from bmretriever_jax.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
