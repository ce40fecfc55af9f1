"""`bmr` subcommands beyond encode / info / train / plot."""
from __future__ import annotations


def add_commands(sub) -> None:
    return None
