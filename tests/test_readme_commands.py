"""Every command the README shows is parsed by the real parser it is meant for, and the cheap ones run as printed.

Commands are taken from the README itself (fenced blocks and inline `code` spans that start with `bmr`, `python`,
`make`, `launch/`, `sbatch` or `bash`), so a README edit that stops parsing fails here.
"""
import argparse
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from bmretriever_jax.cli import build_parser
from bmretriever_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIXES = ("bmr ", "python ", "make ", "launch/", "sbatch ", "bash ")


def readme_commands(path=os.path.join(ROOT, "README.md")):
    """-> command lines (continuations joined, comments kept for shlex to drop), in README order."""
    text = open(path, encoding="utf-8").read()
    cmds, outside, in_block, pending = [], [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            outside.append(line)
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith(PREFIXES):
            cmds.append(line)
    for m in re.finditer(r"`([^`]+)`", "\n".join(outside)):
        span = " ".join(m.group(1).replace("\\\n", " ").split())
        if span.startswith(PREFIXES) or span in ("bmr",):
            cmds.append(span)
    return cmds


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_every_kind():
    kinds = {c.split()[0] for c in COMMANDS}
    assert {"bmr", "make", "python"} <= kinds, kinds
    assert sum(c.startswith("bmr ") for c in COMMANDS) >= 10


class _Parsed(Exception):
    def __init__(self, ns):
        self.ns = ns


@pytest.fixture
def parse_only(monkeypatch):
    """argparse's parse_args parses (errors exit as usual), then stops the program before it does anything."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)


def _argv(cmd):
    return shlex.split(cmd, comments=True)


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith("bmr ")])
def test_bmr_command_parses(cmd):
    argv = _argv(cmd)[1:]
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert argv[0] in sub.choices, f"README names an unknown command: {cmd}"
    if len(argv) == 1:
        return  # a reference to the command in prose (`bmr merge`), not an invocation
    a = parser.parse_args(argv)
    assert callable(a.fn)


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith("python ")])
def test_python_command_parses(cmd, parse_only, monkeypatch):
    argv = _argv(cmd)
    if argv[1] == "-c":
        compile(argv[2], "<README>", "exec")  # syntax; the names it uses must exist:
        for mod, name in re.findall(r"from ([\w.]+) import (\w+)", argv[2]):
            assert hasattr(__import__(mod, fromlist=[name]), name), (mod, name)
        return
    if argv[1] == "-m":
        module = __import__(argv[2], fromlist=["main"])
        with pytest.raises(_Parsed):
            module.main(argv[3:])
        return
    script = os.path.join(ROOT, argv[1])
    assert os.path.exists(script), cmd
    monkeypatch.setattr(sys, "argv", [script, *argv[2:]])
    monkeypatch.syspath_prepend(os.path.dirname(script))
    with pytest.raises(_Parsed):
        runpy.run_path(script, run_name="__main__")


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith("make ")])
def test_make_target_exists(cmd):
    targets = re.findall(r"^([\w-]+):", open(os.path.join(ROOT, "Makefile")).read(), re.M)
    assert _argv(cmd)[1] in targets, cmd


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith(("launch/", "sbatch "))])
def test_launch_command_names_a_script_and_a_loadable_config(cmd):
    argv = _argv(cmd)
    i = next(i for i, w in enumerate(argv) if w.startswith("launch/"))
    script, args = argv[i], argv[i + 1:]
    assert os.access(os.path.join(ROOT, script), os.X_OK), f"{script} is not executable"
    if not args:
        return  # the script named in prose
    config = next(w for w in args if w.endswith(".yaml"))
    overrides = args[args.index(config) + 1:]
    load_config(os.path.join(ROOT, config), overrides)


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith("bash ")])
def test_bash_script_exists_and_parses(cmd):
    """`bash benchmarks/X.sh`: the script is there and bash accepts its syntax (what its `bmr` lines pass to the
    real parser is run with a stand-in `bmr` in test_sweep.py for the study scripts)."""
    script = os.path.join(ROOT, _argv(cmd)[1])
    assert os.path.isfile(script), cmd
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------- run as printed
@pytest.fixture
def in_clone_dir(tmp_path, monkeypatch):
    """A scratch working directory that sees the repository's data/ and configs/ as a clone does."""
    for name in ("data", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _bmr(argv, **kw):
    return subprocess.run([sys.executable, "-m", "bmretriever_jax.cli", *argv], capture_output=True, text=True,
                          timeout=900, **kw)


def _readme(prefix):
    found = [c for c in COMMANDS if c.startswith(prefix)]
    assert found, f"the README shows no `{prefix}` command"
    return _argv(found[0])[1:]


def test_pairs_then_mine_run_as_printed(in_clone_dir):
    r = _bmr(_readme("bmr pairs"))
    assert r.returncode == 0, r.stderr
    assert "scifact: wrote 807 pairs to train.jsonl" in r.stdout
    r = _bmr(_readme("bmr mine"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(in_clone_dir / "train_hn.jsonl")]
    assert len(rows) == 807 and all(len(row["negatives"]) == 1 for row in rows)
    assert all(row["negatives"][0]["id"] != row["positive"]["id"] for row in rows)


def test_quiet_after_the_command_is_accepted_and_prints_no_progress(in_clone_dir):
    r = _bmr(["pairs", "scifact", "--out", "q.jsonl", "-q"])
    assert r.returncode == 0, r.stderr
    r = _bmr(["mine", "q.jsonl", "--out", "q_hn.jsonl", "-q"])
    assert r.returncode == 0 and "mining" not in r.stderr, r.stderr
    assert build_parser().parse_args(["eval", "--baseline", "bm25", "--data", "x", "-q"]).quiet
    assert build_parser().parse_args(["-q", "eval", "--baseline", "bm25", "--data", "x"]).quiet
    assert not build_parser().parse_args(["eval", "--baseline", "bm25", "--data", "x"]).quiet


def test_plan_memory_table_runs_as_printed(in_clone_dir):
    argv = _readme("bmr plan")
    if "--devices" in argv and "--no-compile" not in argv:
        argv.append("--no-compile")  # the compile itself is tested in test_plan.py
    r = _bmr(argv)
    assert r.returncode == 0, r.stderr
    assert "GiB" in r.stdout


@pytest.mark.parametrize("group", ["merging"])
def test_parser_choices_equal_the_library_tables(group):
    """The CLI spells out choices so that `bmr --help` imports no jax; they must stay the library's."""
    from bmretriever_jax.convert import export
    from bmretriever_jax.cli import merging
    from bmretriever_jax.merge import search

    assert merging.EXPORT_FORMATS == export.FORMATS
    assert merging.WEIGHTED_METHODS == search.WEIGHTED_METHODS
    assert merging.DEFAULT_DENSITIES == search.DEFAULT_DENSITIES


def test_help_imports_no_jax():
    code = "import sys; from bmretriever_jax.cli import build_parser; build_parser(); print('jax' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


@pytest.fixture(scope="module")
def gemma():
    """The packaged Gemma 3 270M, converted once into the user's cache (as `bmr info gemma3-270m` does)."""
    from bmretriever_jax.convert import hub

    return hub.resolve("gemma3-270m", quiet=True)


def test_info_runs_as_printed(gemma):
    r = _bmr(_readme("bmr info"))
    assert r.returncode == 0, r.stderr
    assert "gemma3" in r.stdout and "268,098,176" in r.stdout


def test_encode_runs_as_printed_on_a_few_documents(gemma, in_clone_dir):
    """The README's two encode lines, with --input pointing at the first 4 documents / 3 claims."""
    import numpy as np

    few = in_clone_dir / "few.jsonl"
    with open(os.path.join(ROOT, "data", "scifact", "corpus.jsonl")) as f:
        few.write_text("".join(next(f) for _ in range(4)))
    claims = in_clone_dir / "claims3.jsonl"
    with open(os.path.join(ROOT, "data", "scifact", "queries.jsonl")) as f:
        claims.write_text("".join(next(f) for _ in range(3)))
    lines = list(dict.fromkeys(c for c in COMMANDS if c.startswith("bmr encode") and "--input" in c))
    assert len(lines) == 2, lines
    for line, path, n in zip(lines, (few, claims), (4, 3)):
        argv = _argv(line)[1:]
        argv[argv.index("--input") + 1] = str(path)
        r = _bmr(argv + ["--max-length", "32", "-q"])
        assert r.returncode == 0, r.stderr
        out = argv[argv.index("--out") + 1]
        vecs = np.load(os.path.join(out, "vectors.npy"))
        ids = json.load(open(os.path.join(out, "ids.json")))
        assert vecs.shape == (n, 640) and len(ids) == n
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)


def test_a_wheel_carries_the_shipped_configs_and_data(tmp_path):
    """`pip install .` (not editable): the wheel holds configs/ and data/ and `bmr pairs` finds them from any folder."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "wheel"), ROOT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "wheel").glob("bmretriever_jax-*.whl")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (site / "bmretriever_jax" / "_shipped" / "configs" / "quickstart.yaml").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install of this checkout
    r = _bmr(["pairs", "scifact", "--out", "train.jsonl", "-q"], cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    assert "_shipped" in subprocess.run([sys.executable, "-c", "import bmretriever_jax.util.paths as p; print(p.data_dir())"],
                                        cwd=work, env=env, capture_output=True, text=True).stdout
    assert sum(1 for _ in open(work / "train.jsonl")) == 807
