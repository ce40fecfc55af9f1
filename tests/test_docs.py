"""The README and docs/ stay short, true and runnable, and no file narrates how the project was made.

- README.md is under 200 lines; every page of docs/ starts with the question it answers; relative links resolve.
- Every fenced ```python block of README.md and docs/ runs (the README's API example loads Gemma 3 270M, cached
  after its first conversion, with a tiny max_length); a plain block of `bmr.` calls names functions of the API.
- Every `bmr` line of docs/ is parsed by the real parser (read with tests/test_readme_commands.py's reader, which
  also runs the cheap ones and checks the other commands of README and docs/).
- The marked sections that benchmark scripts rewrite exist, once, in the page each script writes.
- No tracked text file or file name narrates the project's history (numbered work sessions and the like): a
  figure carries its machine, date, command and versions instead.
"""
import argparse
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

import test_readme_commands as rc  # its command reader: docs/ is read as the README is

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
PAGES = [README] + DOCS


def _rel(path):
    return os.path.relpath(path, ROOT)


def fenced_blocks(path):
    """-> [(language, first line number, code)] of a markdown file's fenced blocks."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip() or "-", n + 1, []
            else:
                blocks.append((lang, start, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{_rel(path)}:{start - 1}: unclosed code block"
    return blocks


# ------------------------------------------------------------------------------------------------ shape
def test_readme_is_short():
    n = len(open(README, encoding="utf-8").read().splitlines())
    assert n < 200, f"README.md has {n} lines; move detail to docs/"


def test_docs_exist_and_each_page_starts_with_its_question():
    assert len(DOCS) >= 5, DOCS
    for path in DOCS:
        lines = open(path, encoding="utf-8").read().splitlines()
        assert lines and lines[0].startswith("# "), f"{_rel(path)}:1: a page starts with a '# ' title"
        assert any("?" in line for line in lines[:5]), f"{_rel(path)}: the first lines ask the page's question"


@pytest.mark.parametrize("path", PAGES, ids=_rel)
def test_relative_links_resolve(path):
    text = open(path, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
        assert os.path.exists(file), f"{_rel(path)}: link to {target} ({_rel(file)} does not exist)"


# ------------------------------------------------------------------------------------------- code blocks
PYTHON_BLOCKS = [pytest.param(path, start, code, id=f"{_rel(path)}:{start}")
                 for path in PAGES for lang, start, code in fenced_blocks(path) if lang == "python"]


def test_the_readme_shows_a_python_example():
    assert any(p.values[0] == README and "bmr.load(" in p.values[2] for p in PYTHON_BLOCKS)


@pytest.mark.parametrize("path, start, code", PYTHON_BLOCKS)
def test_python_block_runs(path, start, code, tmp_path):
    """Each block in a fresh interpreter, in a scratch folder that sees data/ and configs/ as a clone does."""
    for name in ("data", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{_rel(path)}:{start}: the block fails:\n{r.stderr[-3000:]}"


def test_api_calls_shown_without_running_name_the_api():
    """Plain blocks of `bmr.` calls (training, merging: too slow to run here) are valid Python naming the API."""
    import bmretriever_jax as bmr

    seen = 0
    for path in PAGES:
        for lang, start, code in fenced_blocks(path):
            if lang != "-" or not code.lstrip().startswith("bmr."):
                continue
            tree = ast.parse(code, filename=f"{_rel(path)}:{start}")
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "bmr":
                    assert node.attr in bmr.__all__, f"{_rel(path)}:{start}: bmr.{node.attr} is not in the API"
                    seen += 1
    assert seen >= 3


# -------------------------------------------------------------------------------------- docs/ commands
DOC_COMMANDS = [pytest.param(cmd, id=f"{_rel(path)}: {cmd[:60]}") for path in DOCS for cmd in rc.readme_commands(path)
                if cmd.startswith("bmr ")]


def test_docs_show_commands():
    assert len(DOC_COMMANDS) >= 8


@pytest.mark.parametrize("cmd", DOC_COMMANDS)
def test_docs_bmr_command_parses(cmd):
    """The real parser accepts every `bmr` line of docs/ (`--help` lines: the command exists)."""
    from bmretriever_jax.cli.main import build_parser

    argv = rc._argv(cmd)[1:]
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert argv[0] in sub.choices, f"docs/ names an unknown command: {cmd}"
    if len(argv) == 1 or "--help" in argv or "-h" in argv:
        return  # named in prose, or its options listed: the command exists
    assert callable(parser.parse_args(argv).fn), cmd


def test_the_command_tests_read_every_docs_page():
    """python / make / launch / bash lines of docs/ are checked (and cheap `bmr` lines run) by
    tests/test_readme_commands.py, which reads the same pages."""
    assert set(DOCS) <= set(getattr(rc, "DOCUMENTS", [])), "test_readme_commands.py does not read docs/"


# ------------------------------------------------------------------------------------ rewritten sections
# (script, page it rewrites, marked sections); sections without a script are edited by hand but keep markers
SECTIONS = [
    ("benchmarks/plan_pods.py", "README.md", ["pods"]),
    ("benchmarks/study_report.py", "docs/studies/scaling.md", ["study", "studytest"]),
    (None, "docs/pods.md", ["maxbatch"]),
    (None, "docs/quickstart.md", ["qstrial"]),
    ("benchmarks/encode.py", "BENCHMARKS.md", ["encode", "encode-fp32"]),
    ("benchmarks/train.py", "BENCHMARKS.md", ["train", "train-fp32"]),
    ("benchmarks/search.py", "BENCHMARKS.md", ["search"]),
    ("benchmarks/merge.py", "BENCHMARKS.md", ["merge"]),
    ("benchmarks/generate.py", "BENCHMARKS.md", ["generate"]),
    ("benchmarks/profile_ops.py", "BENCHMARKS.md", ["profile"]),
    ("benchmarks/int8_matmul.py", "BENCHMARKS.md", ["int8"]),
]


@pytest.mark.parametrize("script, page, names", SECTIONS, ids=lambda v: v if isinstance(v, str) else None)
def test_marked_sections_live_where_their_writer_writes(script, page, names):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    for name in names:
        for mark in (f"<!-- {name}:begin -->", f"<!-- {name}:end -->"):
            assert text.count(mark) == 1, f"{page}: {mark} appears {text.count(mark)} times, not once"
        others = [_rel(p) for p in PAGES if p != os.path.join(ROOT, page)
                  and f"<!-- {name}:begin -->" in open(p, encoding="utf-8").read()]
        assert not others, f"the {name} section is also in {others}"
    if script:
        src = open(os.path.join(ROOT, script), encoding="utf-8").read()
        parts = os.path.splitext(page)[0].split("/")  # "README" or "docs", "studies", "scaling" in its os.path.join
        assert all(f'"{p}' in src for p in parts), f"{script} does not write {page}"


def test_study_report_writes_the_study_page():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import study_report
    finally:
        sys.path.pop(0)
    assert os.path.relpath(study_report.PAGE, ROOT) == os.path.join("docs", "studies", "scaling.md")


# ------------------------------------------------------------------------------------------- narration
NARRATION = [re.compile(p, re.I) for p in (
    r"\bsessions?[ _-]?\d",                                      # session 3, session-9, sessions 4
    r"\b(this|that|an?|the|earlier|previous|next|last|same|another)\s+(work\s+)?session\b",
    r"\bin\s+session\b",
    r"\bsession\s+(notes|log)\b",
    r"\bwork(ing)?\s+period\b",
    r"\bfixed\s+earlier\b",
    r"\bearlier\s+(session|commit|version)s?\b",
    r"\b(the\s+)?default\s+before\b",
    r"\bthe\s+default\s+now\b",
    r"\bthis\s+time\b",
)]
TEXT_EXTS = (".md", ".py", ".json", ".yaml", ".yml", ".sh", ".sbatch", ".txt", ".cfg", ".toml", ".log")
DATA_SETS = ("data/",)  # third-party texts (MedQuAD answers say "at this time"); their README is scanned


def _repo_files():
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")  # an sdist or wheel: nothing to scan
    return sorted({f for f in r.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))})


def test_no_file_narrates_how_the_project_was_made():
    found = []
    for rel in _repo_files():
        if (rel.startswith(DATA_SETS) and not rel.endswith(".md")) or rel == _rel(__file__):  # this file holds the patterns and examples
            continue
        if any(p.search(rel) for p in NARRATION):
            found.append(f"{rel}: the file name")
        if not (rel.endswith(TEXT_EXTS) or os.path.basename(rel) in ("Makefile", "run")):
            continue
        try:
            text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for p in NARRATION:
                m = p.search(line)
                if m:
                    found.append(f"{rel}:{n}: {m.group(0)!r} in {line.strip()[:120]}")
    assert not found, ("say what the project is, not how it was made (a figure carries its machine, date, "
                       "command and versions):\n" + "\n".join(found))


def test_the_narration_patterns_catch_what_they_should():
    def hit(s):
        return any(p.search(s) for p in NARRATION)
    for s in ("measured in session 3", "Session 9: both orders", "ab-flax-session9.json", "an earlier session",
              "Fixed earlier: the cache", "the default before: 60 steps", "this session's devices"):
        assert hit(s), s
    for s in ("a test process on 8 fake devices", "sessionmaker", "start_new_session=True", "earlier candidates win",
              "at 40% of peak", "2026-12-04, jax 0.10.2"):
        assert not hit(s), s
