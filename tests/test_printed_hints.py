"""Every `bmr ...` command the package prints as advice (messages, errors, --help texts, labels) is exercised.

The hints are found in the code itself: every string literal and f-string of bmretriever_jax/ that is not a
docstring and names `bmr <something>`. Each must match one row of HINTS, which says how it is exercised: its
command is parsed by the real parser after its placeholders are filled (PARSE), or also run on small fixtures
(RUN: a tiny model and a folder holding two tiny training runs, as `make quickstart` leaves runs/quickstart), or
the message is provoked and checked (MESSAGE), or another test provokes it (COVERED: that test must assert it).
A new hint that no row matches fails the test, and so does a row that matches no hint any more.
"""
import argparse
import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest

from bmretriever_jax.cli import build_parser
from test_readme_commands import BMR, ROOT, make_clone, tiny_fixtures

PACKAGE = os.path.join(ROOT, "bmretriever_jax")
NAMES_BMR = re.compile(r"(?<![\w/.-])bmr (?=\S)")
COMMANDS = set(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)


def names_a_command(text: str) -> bool:
    """`bmr X` in backticks, or bmr followed by a command, an option or an f-string field ("this bmr reads" is
    prose about the program, not a command)."""
    for m in NAMES_BMR.finditer(text):
        word = text[m.end():].split()[0].rstrip(":,;.)`'")
        if text[m.start() - 1:m.start()] == "`" or word in COMMANDS or word.startswith(("-", "{")):
            return True
    return False


@dataclass(frozen=True)
class Found:
    path: str  # relative to the repository
    line: int
    text: str  # f-string fields as {expression}

    def __str__(self):
        return f"{self.path}:{self.line}: {self.text!r}"


def _text(node) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    return None


def printed_hints() -> List[Found]:
    """String literals and f-strings (not docstrings, not parts of a larger f-string) naming `bmr ...`."""
    found = []
    for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        skip = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                    and isinstance(body[0], ast.Expr) and _text(body[0].value) is not None:
                skip.add(id(body[0].value))  # a docstring: read in the code, never printed
            if isinstance(node, ast.JoinedStr):
                skip.update(id(v) for v in ast.walk(node) if v is not node)
        for node in ast.walk(tree):
            text = _text(node)
            if text is not None and id(node) not in skip and names_a_command(text):
                found.append(Found(os.path.relpath(path, ROOT), node.lineno, text))
    return found


# ------------------------------------------------------------------------------------------------ the table
RUN, PARSE, MESSAGE, COVERED = "run", "parse", "message", "covered"


@dataclass
class Hint:
    path: str  # the file printing it
    pattern: str  # a regex the hint's text matches (re.search)
    how: str  # RUN / PARSE: the commands below are parsed (and run); MESSAGE: `provoke` makes the message;
    # COVERED: `covered` = (test file, a string it asserts)
    why: str
    # the commands exercised: None = the hint's own command (its `backticked` spans, else from `bmr ` to the end),
    # with `fill` replacing f-string fields / placeholder words; or argv lists the hint's prose names (words that
    # are keys of the fixture's fills - TINY_MODEL, TINY_RUN - are replaced)
    argvs: Optional[List[List[str]]] = None
    fill: Dict[str, str] = field(default_factory=dict)
    check: Optional[Callable] = None  # RUN: (argv, completed process, clone folder)
    provoke: Optional[Callable] = None  # MESSAGE: (clone folder) -> None, asserts the message
    covered: tuple = ()
    known_bad: str = ""  # a hint that does not work today: xfail(strict) with this reason, until it is fixed


def _quickstart_default_out():
    """The quickstart's --out default, from its own parser (parse_args stopped before anything runs)."""
    from bmretriever_jax.recipes import quickstart

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    argparse.ArgumentParser.parse_args = stop
    try:
        quickstart.main([])
    except Parsed as e:
        return e.args[0].out
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError("the quickstart did not parse its arguments")


def _check_two_runs_plotted(argv, r, clone):
    from bmretriever_jax.studies.plot import run_curves

    png = clone / r.stdout.strip().splitlines()[-1]
    assert png == clone / argv[1] / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stdout
    single, curves, _ = run_curves(str(clone / argv[1]))
    assert not single and sorted(curves) == ["consumer", "literature"], list(curves)


def _check_usage(argv, r, clone):
    assert r.stdout.startswith(f"usage: bmr {argv[0]}"), r.stdout[:300]


def _check_mined(argv, r, clone):
    assert "wrote" in r.stdout and (clone / argv[argv.index("--out") + 1]).stat().st_size > 0, r.stdout


def _check_prepared(argv, r, clone):
    """The folder made is one that the reader printing the hints accepts."""
    from bmretriever_jax.data.prepared import read_manifest

    assert read_manifest(str(clone / argv[argv.index("--out") + 1]))


def _provoke_error_prefix(clone):
    """`bmr CMD: error: MESSAGE` is how main.py prints every user error: one line, exit code 2."""
    (clone / "no-runs-here").mkdir()
    r = subprocess.run([*BMR, "plot", "no-runs-here"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr == "bmr plot: error: no-runs-here: no training run here (no metrics.jsonl in it or in its " \
                       "subfolders)\n", r.stderr


def _provoke_run_left_out(clone):
    folder = clone / "one-run-just-started"
    shutil.copytree(clone / "runs" / "quickstart" / "consumer", folder / "a", ignore=shutil.ignore_patterns(
        "checkpoints", "model"))
    (folder / "b").mkdir()
    (folder / "b" / "metrics.jsonl").write_text("")
    r = subprocess.run([*BMR, "plot", str(folder)], cwd=clone, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == f"{folder / 'loss.png'}\n", (r.stdout, r.stderr)
    assert f"bmr plot: {folder / 'b'}: no loss records yet, left out\n" in r.stderr, r.stderr


def _provoke_plan_without_target(clone):
    r = subprocess.run([*BMR, "plan", "configs/quickstart.yaml"], cwd=clone, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "give --devices N (fake CPU devices) or --target T (e.g. v5p-64, h100x8)" in r.stderr, r.stderr
    for argv in (["--devices", "8"], ["--target", "v5p-64"], ["--target", "h100x8"]):  # what it suggests
        a = build_parser().parse_args(["plan", "configs/quickstart.yaml", *argv])
        assert a.devices == 8 or a.target in ("v5p-64", "h100x8")


CONFIG = "configs/quickstart.yaml"
PAPER = "configs/papers/bmretriever-2b-finetune.yaml"
HINTS = [
    Hint("bmretriever_jax/recipes/quickstart.py", r"loss curves? .*: bmr plot \{", RUN,
         "the quickstart's last line, on a folder holding two runs as its runs/quickstart does (issue 32)",
         fill={"{shlex.quote(a.out)}": "QUICKSTART_OUT"}, check=_check_two_runs_plotted),
    Hint("bmretriever_jax/recipes/quickstart.py", r"\(bmr mine over each expert's pool", RUN,
         "--hard-negatives help: BM25 mining of a small pairs file",
         argvs=[["mine", "pairs.jsonl", "--out", "pairs_hn.jsonl", "--num-negatives", "1"]], check=_check_mined),
    Hint("bmretriever_jax/convert/sources.py", r"base model folder .* is gone; re-create it \(e\.g\. `bmr info \{",
         RUN, "re-converts a packaged model's cache; run on the tiny model folder",
         fill={"{run.get('model', {}).get('name', 'MODEL')}": "TINY_MODEL"},
         check=lambda a, r, c: "parameters" in r.stdout),
    Hint("bmretriever_jax/cli/main.py", r"^bmr \{args\.cmd\}: error: \{e\}$", MESSAGE,
         "the prefix of every user error", provoke=_provoke_error_prefix),
    Hint("bmretriever_jax/studies/plot.py", r"^bmr plan estimate$", PARSE,
         "a legend label of the sweep figure naming `bmr plan`'s estimate",
         argvs=[["plan", CONFIG, "--devices", "8"]]),
    Hint("bmretriever_jax/studies/sweep.py", r"internal; use `bmr sweep`", RUN, "its usage message names the command",
         argvs=[["sweep", "--help"]], check=_check_usage),
    Hint("bmretriever_jax/pods/plan.py", r"`bmr plan CONFIG --target T` compiles for the real chips", PARSE,
         "the target compile takes minutes (test_plan_targets.py)", fill={"CONFIG": PAPER, "T": "v5p-64"}),
    Hint("bmretriever_jax/pods/plan.py", r"internal; use `bmr plan`\)", RUN, "its usage message names the command",
         argvs=[["plan", "--help"]], check=_check_usage),
    Hint("bmretriever_jax/pods/podplan.py", r"CPU-calibrated, `bmr plan --devices`", RUN,
         "the estimate it compares with: the memory table on fake devices",
         argvs=[["plan", CONFIG, "--devices", "8", "--no-compile"]], check=lambda a, r, c: "GiB" in r.stdout),
    Hint("bmretriever_jax/pods/podplan.py", r"internal; use `bmr plan --target`\)", PARSE,
         "the target compile takes minutes (test_plan_targets.py)", argvs=[["plan", PAPER, "--target", "v5p-64"]]),
    Hint("bmretriever_jax/studies/plot.py", r"^bmr plot: \{r\}: no loss records yet, left out$", MESSAGE,
         "`bmr plot` on a folder where one run has logged no step yet", provoke=_provoke_run_left_out),
    Hint("bmretriever_jax/training/loop.py", r"^bmr train: \{why\}: saved step", COVERED,
         "a preempted run's last line (SIGTERM to a real training process)",
         covered=("tests/test_preemption.py", 'f"bmr train: SIGTERM: saved step {saved} in {run}/checkpoints')),
    Hint("bmretriever_jax/training/loop.py", r"^bmr train: process \{jax\.process_index\(\)\}: \{fallbacks\} of", COVERED,
         "each process's count of packed batches in the fallback shape (2 processes whose hosts disagree)",
         covered=("tests/test_multiprocess.py", 'r"(\\d+) of (\\d+) packed batches took the fallback shape"')),
    Hint("bmretriever_jax/serve/app.py", r"^bmr serve$", RUN, "the server's title names the command",
         argvs=[["serve", "--help"]], check=_check_usage),
    Hint("bmretriever_jax/cli/serving.py", r"`bmr export` folder, as `bmr encode --model` takes", RUN,
         "`bmr serve MODEL` help: a run exported, then encoded with, as the help says",
         argvs=[["export", "TINY_RUN", "--format", "hf", "--out", "exported"],
                ["encode", "--model", "exported", "--input", "few.jsonl", "--out", "vecs"]],
         check=lambda a, r, c: ("hf export written to exported" if a[0] == "export" else "wrote 4 x 64 vectors")
         in r.stdout),
    Hint("bmretriever_jax/data/prepared.py", r"`bmr prepare`", RUN,
         "errors reading data.prepared name the command that makes the folder: run on a small pairs file",
         argvs=[["prepare", "pairs.jsonl", "--out", "prepared"]],
         check=_check_prepared),
    Hint("bmretriever_jax/eval/index.py", r"`bmr index", RUN,
         "errors of `bmr search` (not an index, damaged, unknown system, one system to fuse, model changed) say to "
         "index: run on 4 documents with the tiny model and BM25 (tests/test_index_search.py provokes the errors)",
         argvs=[["index", "few.jsonl", "--model", "TINY_MODEL", "--model", "bm25", "--out", "idx"]],
         check=lambda a, r, c: "indexed 4 documents" in r.stdout and (c / "idx" / "index.json").is_file()),
    Hint("bmretriever_jax/data/mining.py", r"as `bmr prepare` writes", PARSE,
         "`bmr mine --out` help names the format bmr prepare writes: parse a prepare of a pairs file",
         argvs=[["prepare", "pairs.jsonl", "--out", "prepared"]]),
    Hint("bmretriever_jax/cli/retrieval.py", r"^search it: bmr search \{out\}", PARSE,
         "`bmr index`'s last line (run with an index by tests/test_index_search.py)", fill={"{out}": "idx"}),
    Hint("bmretriever_jax/cli/data.py", r"a name from `bmr info` or a folder", RUN,
         "`bmr prepare --tokenizer` help: what `bmr info` takes; run on the tiny model folder",
         argvs=[["info", "TINY_MODEL"]], check=lambda a, r, c: "parameters" in r.stdout),
]


def _rows(found):
    return [h for h in HINTS if found.path == h.path and re.search(h.pattern, found.text)]


FOUND = printed_hints()


def test_the_scan_finds_the_hints():
    assert len(FOUND) >= 8 and any("bmr plot" in f.text for f in FOUND), [str(f) for f in FOUND]


@pytest.mark.parametrize("found", FOUND, ids=str)
def test_every_printed_hint_has_a_row(found):
    rows = _rows(found)
    assert len(rows) == 1, f"{found}: {len(rows)} rows of HINTS match; add one saying how it is exercised"


@pytest.mark.parametrize("hint", HINTS, ids=lambda h: f"{h.path}:{h.pattern}")
def test_every_row_matches_a_printed_hint(hint):
    assert any(hint in _rows(f) for f in FOUND), f"no printed hint matches {hint.pattern!r} in {hint.path}: " \
                                                 "remove or update the row"


def _commands(hint, fills):
    """-> argv lists (without `bmr`) that the hint's printed text(s) or its row name."""
    texts = [f.text for f in FOUND if hint in _rows(f)]
    if hint.argvs is not None:
        for t in texts:  # the command exercised is the one the hint names
            named = {m.group(1) for m in re.finditer(r"(?<![\w/.-])bmr ([a-z][\w-]*)", t)}
            assert named == {a[0] for a in hint.argvs}, (t, hint.argvs)
        return [[fills.get(w, w) for w in a] for a in hint.argvs]
    out = []
    for t in texts:
        for key, value in hint.fill.items():
            if key.startswith("{"):
                t = t.replace(key, fills.get(value, value))
        spans = [s for s in re.findall(r"`([^`]+)`", t) if s.startswith("bmr ")]
        for cmd in spans or [t[NAMES_BMR.search(t).start():]]:
            argv = shlex.split(cmd)[1:]
            out.append([fills.get(hint.fill.get(w), hint.fill.get(w, w)) for w in argv])
    assert out, hint
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder as a clone after `make quickstart`: data/, configs/, runs/quickstart/{literature,consumer}, a
    small pairs file and 4 SciFact documents."""
    model, run = tiny_fixtures(tmp_path_factory)
    root = make_clone(tmp_path_factory.mktemp("hints"), model, run)
    r = subprocess.run([*BMR, "pairs", "scifact", "--out", "all.jsonl", "-q"], cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(root / "all.jsonl") as f:
        (root / "pairs.jsonl").write_text("".join(line for _, line in zip(range(100), f)))
    with open(os.path.join(ROOT, "data", "scifact", "corpus.jsonl")) as f:
        (root / "few.jsonl").write_text("".join(line for _, line in zip(range(4), f)))
    fills = {"QUICKSTART_OUT": shlex.quote(_quickstart_default_out()), "TINY_MODEL": str(model),
             "TINY_RUN": str(root / "runs" / "quickstart" / "literature")}
    return root, fills


@pytest.mark.parametrize("hint", [pytest.param(h, marks=pytest.mark.xfail(strict=True, reason=h.known_bad))
                                  if h.known_bad else h for h in HINTS], ids=lambda h: f"{h.path}:{h.pattern}")
def test_hint_is_exercised(hint, clone):
    root, fills = clone
    if hint.how == MESSAGE:
        hint.provoke(root)
        return
    if hint.how == COVERED:
        test_file, asserted = hint.covered
        assert asserted in open(os.path.join(ROOT, test_file), encoding="utf-8").read(), \
            f"{test_file} no longer asserts {asserted!r}: exercise the hint here instead"
        return
    parser = build_parser()
    for argv in _commands(hint, fills):
        if argv[-1] in ("--help", "-h"):
            with pytest.raises(SystemExit) as e:
                parser.parse_args(argv)
            assert e.value.code == 0
        else:
            try:
                ns = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"the hint's command does not parse: bmr {shlex.join(argv)}")
            assert callable(ns.fn), argv
        if hint.how == RUN:
            r = subprocess.run([*BMR, *argv], cwd=root, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"bmr {shlex.join(argv)}\n{r.stderr[-3000:]}"
            assert hint.check is not None and hint.check(argv, r, root) is not False, r.stdout[-3000:]


def test_plan_without_devices_or_target_is_one_line_that_suggests_both(clone):
    """`bmr plan CONFIG` with neither option: one line (no doubled prefix), and what it suggests parses."""
    root, _ = clone
    _provoke_plan_without_target(root)
