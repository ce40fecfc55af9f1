"""The layering of ARCHITECTURE.md, checked on the import graph (module-level and function-level imports alike):
nothing below the command line imports it, models import no converters, no two modules import each other (in a
cycle of any length), and `bmr --help` stays jax-free."""
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
    ("bmretriever_jax.models", "bmretriever_jax.training"),
    ("bmretriever_jax.data", "bmretriever_jax.training"),
    ("bmretriever_jax.merging", "bmretriever_jax.training"),
])
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    bad = sorted(m for m, deps in GRAPH.items() if (m == lower or m.startswith(lower + "."))
                 and any(d == upper or d.startswith(upper + ".") for d in deps))
    assert bad == [], f"{lower} must not import {upper}: {bad}"


def _module_imports(mod, path, anywhere):
    """The bmretriever_jax modules that importing `mod` runs: module-level imports (but not under `if
    TYPE_CHECKING`), or with `anywhere` also those inside functions. `from pkg import sub` of a submodule depends
    on `sub` (and on `pkg` unless pkg is mod's own package, which is always imported first); of a name, on `pkg`."""
    def top(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test):
                yield from top(node.body)
                yield from top(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                    yield from top(block)

    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if anywhere else top(tree.body)
    out = set()

    def depend(name):
        if name in MODULES and name != mod and not mod.startswith(name + "."):
            out.add(name)

    for node in nodes:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                depend(".".join(parts[:i]))
        if isinstance(node, ast.ImportFrom) and node.module in MODULES:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in MODULES:
                    depend(sub)
                elif node.module != mod:
                    out.add(node.module)  # a name of the package: its __init__ must have run
    return out


MODULES = dict(_modules())


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# none, even counting imports inside functions (`bmr plan`'s parser lives in cli/planning.py, above both planners)
KNOWN_CYCLES = []


def test_no_import_cycles():
    module_level = {m: _module_imports(m, p, anywhere=False) for m, p in MODULES.items()}
    assert "bmretriever_jax.models.config" in module_level["bmretriever_jax.models.decoder"]
    assert _cycles(module_level) == []
    anywhere = {m: _module_imports(m, p, anywhere=True) for m, p in MODULES.items()}
    assert _cycles(anywhere) == KNOWN_CYCLES
    # models/config.py is the bottom of models/: it imports nothing from the package
    assert not any(d.startswith("bmretriever_jax.models") for d in anywhere["bmretriever_jax.models.config"])
    # and the check sees a cycle: config importing the decoder back (what num_params once did, in a function)
    anywhere["bmretriever_jax.models.config"].add("bmretriever_jax.models.decoder")
    assert any({"bmretriever_jax.models.config", "bmretriever_jax.models.decoder"} <= set(c)
               for c in _cycles(anywhere))


def test_the_user_error_family_is_one_module():
    import bmretriever_jax.util.errors as errors
    from bmretriever_jax.config import ConfigError
    from bmretriever_jax.data.beir import DataFormatError
    from bmretriever_jax.data.pairs import PairsFormatError

    assert ConfigError is errors.ConfigError and DataFormatError is errors.DataFormatError
    assert issubclass(PairsFormatError, errors.UserError)


def test_no_subpackage_shadows_a_python_api_name():
    """`from bmretriever_jax import merge` must never mean two things: a subpackage named like an API function
    (`bmr.train`, `bmr.merge`, ...) would replace the function once it is imported."""
    import bmretriever_jax as bmr

    subs = {name for name in os.listdir(PKG) if os.path.isdir(os.path.join(PKG, name)) or name.endswith(".py")}
    subs = {name[:-3] if name.endswith(".py") else name for name in subs}
    assert not subs & set(bmr.__all__), subs & set(bmr.__all__)
    import bmretriever_jax.merging  # noqa: F401
    import bmretriever_jax.training  # noqa: F401

    assert callable(bmr.train) and callable(bmr.merge) and bmr.merge.__module__ == "bmretriever_jax.api"
