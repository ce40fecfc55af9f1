"""The layering of ARCHITECTURE.md, checked on the import graph (module-level and function-level imports alike):
nothing below the command line imports it, models import no converters, and `bmr --help` stays jax-free."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bmretriever_jax")


def _modules():
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(path):
    """Every bmretriever_jax module a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("bmretriever_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bmretriever_jax"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


GRAPH = {mod: _imports(path) for mod, path in _modules()}


def _importers(target):
    return sorted(m for m, deps in GRAPH.items()
                  if any(d == target or d.startswith(target + ".") for d in deps) and not m.startswith(target))


def test_the_graph_is_read():
    assert len(GRAPH) > 40 and "bmretriever_jax.cli.main" in GRAPH


def test_nothing_below_the_command_line_imports_it():
    assert _importers("bmretriever_jax.cli") == []


@pytest.mark.parametrize("lower, upper", [
    ("bmretriever_jax.models", "bmretriever_jax.convert"),  # converters know models, not the reverse
    ("bmretriever_jax.data", "bmretriever_jax.eval"),       # evaluation reads data sets, not the reverse
    ("bmretriever_jax.models", "bmretriever_jax.train"),
    ("bmretriever_jax.data", "bmretriever_jax.train"),
    ("bmretriever_jax.merge", "bmretriever_jax.train"),
])
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    bad = sorted(m for m, deps in GRAPH.items() if (m == lower or m.startswith(lower + "."))
                 and any(d == upper or d.startswith(upper + ".") for d in deps))
    assert bad == [], f"{lower} must not import {upper}: {bad}"


def test_the_user_error_family_is_one_module():
    import bmretriever_jax.errors as errors
    from bmretriever_jax.config import ConfigError
    from bmretriever_jax.data.beir import DataFormatError
    from bmretriever_jax.data.pairs import PairsFormatError

    assert ConfigError is errors.ConfigError and DataFormatError is errors.DataFormatError
    assert issubclass(PairsFormatError, errors.UserError)
