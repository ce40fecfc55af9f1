"""Helpers over nested-dict pytrees addressed by "/"-joined path strings.

A parameter tree is nested dicts with string keys and array leaves (see notes/INTERFACES.md), so a leaf
is named by its path, e.g. "layers/attn/q/kernel". Regexes over these paths are the one selector for
LoRA targets, merging options, freezing and sharding rules. Patterns are matched with `re.fullmatch`,
as in big_vision's `tree_map_with_regex`: "layers/attn/q/kernel" is matched by r"layers/attn/.*" but not
by r"attn/q".
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

SEP = "/"


def path_str(keypath) -> str:
    """A jax key path -> the "/"-joined parameter path every selector here matches ("layers/attn/q/kernel")."""
    import jax  # here: `bmr --help` imports this module and no jax

    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts -> {"a/b/c": leaf}, in insertion order. Empty dicts vanish (they hold no leaf)."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"expected a nested dict of arrays, got {type(tree).__name__}")
    out: dict[str, Any] = {}

    def visit(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if not isinstance(key, str) or not key or SEP in key:
                    raise ValueError(f"tree key {key!r} under {path or '<root>'!r} must be a non-empty str "
                                     f"without {SEP!r}")
                visit(value, f"{path}{SEP}{key}" if path else key)
        else:
            out[path] = node

    visit(tree, "")
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dicts; the inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        keys = path.split(SEP)
        node = tree
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(f"path {path!r} runs through leaf {SEP.join(keys[:i + 1])!r}")
            node = child
        if keys[-1] in node:
            raise ValueError(f"path {path!r} is given twice or is also a prefix of another path")
        node[keys[-1]] = leaf
    return tree


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def matches_within(path: str, pattern: str) -> bool:
    """The same full match as `matches`, of `path` or of any "/"-suffix of it: one rule for a parameter also names
    that parameter inside an optimizer or train state ("opt_state/0/mu/model/layers/attn/q/kernel")."""
    return re.fullmatch(rf"(?:.*/)?(?:{pattern})", path) is not None


def select(tree_or_paths: Mapping[str, Any] | Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Paths (of a nested tree, or from a list of path strings) fully matched by any of `patterns`."""
    patterns = list(patterns)
    paths = flatten(tree_or_paths) if isinstance(tree_or_paths, Mapping) else tree_or_paths
    return [p for p in paths if matches(p, patterns)]


def check_patterns(patterns: Iterable[str], paths: Iterable[str], what: str = "pattern") -> None:
    """Raise ValueError for the first regex that matches none of `paths`, listing a few that exist.

    A silent no-op selector (a typo in a LoRA target or a freeze rule) is the bug this guards against.
    """
    paths = list(paths)
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}") from None
        if not any(rx.fullmatch(p) for p in paths):
            shown = ", ".join(repr(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")
            raise ValueError(f"{what} {pattern!r} matches no parameter path (matched with re.fullmatch); "
                             f"available paths include: {shown or '<none>'}")


def tree_map_with_regex(fn: Callable[[Any, Any], Any], tree: Mapping[str, Any],
                        regex_rules: Iterable[tuple[str, Any]],
                        not_fn: Callable[[Any], Any] = lambda x: x) -> dict[str, Any]:
    """Like big_vision's: for each leaf, fn(leaf, value) of the FIRST rule whose regex fully matches the
    leaf's path, else not_fn(leaf)."""
    rules = [(re.compile(r), v) for r, v in regex_rules]

    def one(path: str, leaf: Any) -> Any:
        for rx, value in rules:
            if rx.fullmatch(path):
                return fn(leaf, value)
        return not_fn(leaf)

    return unflatten({p: one(p, leaf) for p, leaf in flatten(tree).items()})


def first_match(path: str, regex_rules: Iterable[tuple[str, Any]], default: Any = None) -> Any:
    """Value of the first (regex, value) rule fully matching `path`, else `default`."""
    for pattern, value in regex_rules:
        if re.fullmatch(pattern, path):
            return value
    return default
