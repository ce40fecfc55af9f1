"""Every command the README (and docs/*.md) shows is parsed by the real parser it is meant for, and every cheap
`bmr` command runs as printed, against small fixtures this test makes.

Commands are taken from the documents themselves (fenced blocks and inline `code` spans that start with `bmr`,
`python`, `make`, `launch/`, `sbatch` or `bash`), so an edit that stops parsing fails here. Each `bmr` command is
classified by its subcommand (and options) in BMR_RULES, never by its exact line: RUN commands are run in a scratch
folder laid out as a clone after `make quickstart` (data/ and configs/ symlinked, runs/quickstart/{literature,
consumer} = copies of a 4-step training run of a tiny model, model names -> that tiny model, big --input files ->
their first lines); PARSE commands (minutes to hours as printed) are parsed, and their config + key=value
overrides loaded; a command no rule classifies fails the test.
"""
import argparse
import glob
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest

from bmretriever_jax.cli import build_parser
from bmretriever_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIXES = ("bmr ", "python ", "make ", "launch/", "sbatch ", "bash ")
DOCUMENTS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                 recursive=True))


def readme_commands(path=os.path.join(ROOT, "README.md")):
    """-> command lines (continuations joined, comments kept for shlex to drop), in document order."""
    text = open(path, encoding="utf-8").read()
    cmds, outside, in_block, pending = [], [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
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
        if line.startswith("$ "):  # a shell prompt
            line = line[2:]
        if line.startswith(PREFIXES):
            cmds.append(line)
    for m in re.finditer(r"`([^`]+)`", "\n".join(outside)):
        span = " ".join(m.group(1).replace("\\\n", " ").split())
        if span.startswith(PREFIXES) or span in ("bmr",):
            cmds.append(span)
    return cmds


COMMANDS = [c for path in DOCUMENTS for c in readme_commands(path)]


def test_the_readme_shows_commands_of_every_kind():
    assert os.path.isfile(DOCUMENTS[0])
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


# ------------------------------------------------------------------------------------ which bmr lines run
RUN, PARSE, NAMED = "run", "parse", "named"
MODEL_NAMES = ("gemma3-270m", "smollm2-135m")  # the packaged models: the tiny model stands in when a line runs
FEW = 4  # lines kept of an --input file


@dataclass
class Rule:
    name: str
    how: str  # RUN: run as printed on the fixtures; PARSE: parsed (+ config loaded); NAMED: a command named in prose
    why: str
    match: Callable[[list], bool]
    prepare: Optional[Callable] = None  # (argv, clone) -> argv to run
    check: Optional[Callable] = None  # (argv, completed process, clone): what the command must have done


def _opt(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def _cut_input(argv, clone):
    """--input -> a copy of its first FEW lines (a file of the clone: data/ is the repository's)."""
    src = clone / _opt(argv, "--input")
    few = clone / "few" / os.path.basename(src)
    few.parent.mkdir(exist_ok=True)
    with open(src) as f:
        few.write_text("".join(line for _, line in zip(range(FEW), f)))
    argv = list(argv)
    argv[argv.index("--input") + 1] = str(few)
    return argv


def _check_encode(argv, r, clone):
    out = clone / _opt(argv, "--out")
    vecs, ids = np.load(out / "vectors.npy"), json.load(open(out / "ids.json"))
    assert vecs.shape == (FEW, 64) and len(ids) == FEW, (vecs.shape, len(ids))  # the tiny model: hidden 64
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert f"wrote {FEW} x 64 vectors" in r.stdout


def _check_pairs(argv, r, clone):
    out = _opt(argv, "--out")
    n = sum(1 for _ in open(clone / out))
    assert n > 0 and f"wrote {n} pairs to {out}" in r.stdout, r.stdout


def _prepare_mine(argv, clone):
    src = clone / argv[1]
    if not src.exists():  # the README makes it with `bmr pairs` first; run alone, a small pairs file does
        subprocess.run([*BMR, "pairs", "scifact", "--out", str(src), "-q"], cwd=clone, check=True)
    return argv


def _check_mine(argv, r, clone):
    rows = [json.loads(line) for line in open(clone / _opt(argv, "--out"))]
    k = int(_opt(argv, "--num-negatives", 1))
    assert rows and all(len(row["negatives"]) == k for row in rows)
    assert all(n["id"] != row["positive"]["id"] for row in rows for n in row["negatives"])


def _prepare_plot(argv, clone):
    """A folder the fixtures do not hold yet gets two runs, as runs/quickstart has."""
    target = clone / argv[1]
    if not target.exists():
        for name in ("literature", "consumer"):
            shutil.copytree(clone / "runs" / "quickstart" / name, target / name)
    return argv


def _check_plot(argv, r, clone):
    from bmretriever_jax.studies.plot import run_curves

    png = clone / r.stdout.strip().splitlines()[-1]
    assert png == clone / (_opt(argv, "--out") or os.path.join(argv[1], "loss.png")), r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single, curves, _ = run_curves(str(clone / argv[1]))
    if os.path.normpath(argv[1]) == os.path.join("runs", "quickstart"):  # the line: both experts drawn
        assert not single and sorted(curves) == ["consumer", "literature"], list(curves)
        assert curves["literature"][1], "the fixture logs dev NDCG@10"


def _check_prepared(argv, r, clone):
    from bmretriever_jax.data.prepared import read_manifest  # the reader data.prepared uses

    assert read_manifest(str(clone / _opt(argv, "--out")))


def _prepare_plan(argv, clone):
    return argv if "--no-compile" in argv else argv + ["--no-compile"]  # the compile is tested in test_plan.py


def _check_help(argv, r, clone):
    assert r.stdout.startswith(f"usage: bmr {argv[0]}"), r.stdout[:200]


def _prepare_merge(argv, clone):
    assert (clone / argv[1]).is_file(), f"{argv[1]}: the fixtures have runs/quickstart/merge.yaml only"
    return argv


def _check_model_folder(argv, r, clone):
    out = clone / _opt(argv, "--out")
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors")), sorted(os.listdir(out))


def _prepare_export(argv, clone):
    """A source the fixtures lack (`runs/merged` when `bmr merge` did not run first) is the tiny run's model."""
    src = clone / argv[1]
    if not src.exists():
        shutil.copytree(clone / "runs" / "quickstart" / "literature" / "model", src)
    return argv


def _check_export(argv, r, clone):
    out = clone / _opt(argv, "--out")
    fmt = _opt(argv, "--format", "hf")
    want = {"hf": "config.json", "sentence-transformers": "modules.json", "peft": "adapter_config.json"}[fmt]
    assert (out / want).is_file(), sorted(os.listdir(out))


INDEX_DOCS = 40  # documents of the corpus a shown `bmr index` line indexes here


def _tiny_model_at(path, clone):
    """A model path of the docs that the fixtures lack (runs/quickstart/merged before the quickstart) is the tiny
    run's model."""
    if not path.exists():
        shutil.copytree(clone / "runs" / "quickstart" / "literature" / "model", path)


def _prepare_index(argv, clone):
    """The corpus cut to its first documents; --model paths the fixtures lack -> the tiny run's model."""
    argv = list(argv)
    src = clone / argv[1]
    src = src / "corpus.jsonl" if src.is_dir() else src
    few = clone / "few" / "index" / "corpus.jsonl"
    few.parent.mkdir(parents=True, exist_ok=True)
    with open(src) as f:
        few.write_text("".join(line for _, line in zip(range(INDEX_DOCS), f)))
    argv[1] = str(few)
    for i, w in enumerate(argv[:-1]):
        if w == "--model" and argv[i + 1] != "bm25" and "/" in argv[i + 1]:
            _tiny_model_at(clone / argv[i + 1], clone)
    return argv


def _check_index(argv, r, clone):
    man = json.load(open(clone / _opt(argv, "--out") / "index.json"))
    assert len(man["systems"]) == argv.count("--model") and man["corpus"]["documents"] == INDEX_DOCS, man
    assert r.stdout.startswith(f"indexed {INDEX_DOCS} documents"), r.stdout


def _prepare_search(argv, clone):
    """An index the docs made earlier is used as it is; else one of the tiny model and BM25 is built."""
    if not (clone / argv[1] / "index.json").exists():
        model = clone / "runs" / "quickstart" / "merged"
        _tiny_model_at(model, clone)
        index = _prepare_index(["index", "data/scifact/corpus.jsonl", "--model", str(model), "--model", "bm25",
                                "--out", argv[1], "-q"], clone)
        subprocess.run([*BMR, *index], cwd=clone, check=True, capture_output=True)
    return argv


def _check_search(argv, r, clone):
    top_k = int(_opt(argv, "--top-k", 10))
    if "--json" in argv:
        hits = json.loads(r.stdout)["results"]
    else:
        lines = r.stdout.splitlines()
        assert re.match(r"\d+ of \d+ documents \(", lines[0]), r.stdout
        hits = lines[1:]
    assert len(hits) <= top_k and (hits or _opt(argv, "--system") == "bm25"), r.stdout  # BM25 may match nothing


BMR_RULES = [
    Rule("--help", RUN, "prints the options: a second", lambda a: "--help" in a or "-h" in a, check=_check_help),
    Rule("named in prose", NAMED, "`bmr merge`, `bmr encode --model` in a sentence: the command and its options "
         "must exist", lambda a: all(w.startswith("-") for w in a[1:])),
    Rule("info", RUN, "a config.json read: a second", lambda a: a[0] == "info",
         check=lambda a, r, c: "parameters" in r.stdout and "gemma3" in r.stdout),
    Rule("encode", RUN, "--input cut to its first lines, tiny model", lambda a: a[0] == "encode",
         prepare=_cut_input, check=_check_encode),
    Rule("pairs", RUN, "reads the shipped data: seconds", lambda a: a[0] == "pairs", check=_check_pairs),
    Rule("mine", RUN, "BM25 over a pairs file: seconds", lambda a: a[0] == "mine", prepare=_prepare_mine,
         check=_check_mine),
    Rule("plot", RUN, "on the fixture runs", lambda a: a[0] == "plot", prepare=_prepare_plot, check=_check_plot),
    Rule("prepare", RUN, "shipped pairs -> Arrow (token ids with the tiny tokenizer): seconds",
         lambda a: a[0] == "prepare", check=_check_prepared),
    Rule("merge of the quickstart's experts", RUN, "the tiny experts of the fixture: seconds",
         lambda a: a[0] == "merge" and a[1].startswith("runs/quickstart/"), prepare=_prepare_merge,
         check=_check_model_folder),
    Rule("export", RUN, "a tiny model folder: seconds", lambda a: a[0] == "export", prepare=_prepare_export,
         check=_check_export),
    Rule("plan --devices", RUN, "the memory table without the tiny-model compile (test_plan.py compiles)",
         lambda a: a[0] == "plan" and "--devices" in a and "--target" not in a, prepare=_prepare_plan,
         check=lambda a, r, c: "GiB" in r.stdout),
    Rule("plan --target", PARSE, "compiles the full-size step with libtpu / the CUDA plugin: minutes "
         "(test_plan_targets.py)", lambda a: a[0] == "plan" and "--target" in a),
    Rule("train", PARSE, "trains the real config's model: minutes (test_train.py trains tiny models)",
         lambda a: a[0] == "train"),
    Rule("eval", PARSE, "full evaluations over the shipped test sets: minutes", lambda a: a[0] == "eval"),
    Rule("sweep", PARSE, "a training run per point: hours (test_sweep.py runs tiny sweeps)",
         lambda a: a[0] == "sweep"),
    Rule("merge-search", PARSE, "scores merges of trained experts on dev sets (test_merge_cli.py: tiny models)",
         lambda a: a[0] == "merge-search"),
    Rule("merge of other models", PARSE, "needs models the fixtures do not have (test_merge_cli.py)",
         lambda a: a[0] == "merge"),
    Rule("synth / optimize-prompt", PARSE, "an LLM generating text: minutes (test_synth.py: tiny models)",
         lambda a: a[0] in ("synth", "optimize-prompt")),
    Rule("index", RUN, "the corpus cut to its first documents, tiny model: seconds", lambda a: a[0] == "index",
         prepare=_prepare_index, check=_check_index),
    Rule("search", RUN, "the index the docs made (else one of the tiny model + BM25): seconds",
         lambda a: a[0] == "search", prepare=_prepare_search, check=_check_search),
    Rule("serve", PARSE, "a server runs until it is stopped (test_serve.py queries real servers of tiny models)",
         lambda a: a[0] == "serve"),
]


def _id(cmd):
    return " ".join(_argv(cmd))[:100]


def classify(cmd) -> Optional[Rule]:
    argv = _argv(cmd)[1:]
    return next((rule for rule in BMR_RULES if rule.match(argv)), None)


_seen: dict = {}
for _c in COMMANDS:
    if _c.startswith("bmr ") or _c == "bmr":
        _seen.setdefault(tuple(_argv(_c)), _c)  # once each, in document order (pairs before mine)
BMR_COMMANDS = list(_seen.values())
RUN_COMMANDS = [c for c in BMR_COMMANDS if getattr(classify(c), "how", None) == RUN]
PARSE_COMMANDS = [c for c in BMR_COMMANDS if getattr(classify(c), "how", None) == PARSE]


@pytest.mark.parametrize("cmd", BMR_COMMANDS, ids=_id)
def test_every_bmr_command_is_run_or_parsed(cmd):
    rule = classify(cmd)
    assert rule is not None, f"neither run nor parsed: add a rule for it to BMR_RULES: {cmd}"
    argv = _argv(cmd)[1:]
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert not argv or argv[0] in sub.choices, f"the docs name an unknown command: {cmd}"
    if rule.how == NAMED:
        options = {o for action in sub.choices[argv[0]]._actions for o in action.option_strings} if argv else set()
        assert set(argv[1:]) <= options, f"{cmd}: no such option of `bmr {argv[0]}`"
        return
    if rule.name == "--help":
        return  # `--help` exits the parser: the RUN test runs it
    a = parser.parse_args(argv)
    assert callable(a.fn)


def test_a_command_no_rule_knows_is_neither_run_nor_parsed():
    assert classify("bmr plan configs/quickstart.yaml") is None  # neither --devices nor --target: no rule
    assert classify("bmr frobnicate x") is None


def test_the_cheap_commands_are_run():
    """The line of issue 32 (`bmr plot runs/quickstart`) and the data commands run, whichever document shows them."""
    ran = {classify(c).name for c in RUN_COMMANDS}
    assert {"plot", "pairs", "mine", "info", "encode"} <= ran, ran


@pytest.mark.parametrize("cmd", PARSE_COMMANDS, ids=_id)
def test_parse_only_command_names_files_that_exist_and_a_loadable_config(cmd):
    """What a parse-only line names must be there: shipped data/configs, and its config with its overrides loads."""
    argv = _argv(cmd)[1:]
    a = build_parser().parse_args(argv)
    for w in argv:
        for path in re.findall(r"(?<![\w./])((?:data|configs)/[\w./-]+)", w):
            if not re.search(r"[A-Z]", path):  # not a placeholder (CONFIG, data/X)
                assert os.path.exists(os.path.join(ROOT, path)), f"{cmd}: {path} does not exist"
    config = getattr(a, "config", None)
    if isinstance(config, str) and config.endswith(".yaml") and os.path.isfile(os.path.join(ROOT, config)):
        load_config(os.path.join(ROOT, config), getattr(a, "overrides", None) or [])


# ------------------------------------------------------------------------------------------- run as printed
BMR = [sys.executable, "-m", "bmretriever_jax.cli"]


def tiny_fixtures(tmp_path_factory):
    """A tiny random Gemma 3 model and a 4-step LoRA run of it with dev NDCG@10 logged, made once per session
    (test_printed_hints.py uses them too) -> (model folder, run folder)."""
    from hf_tiny import tiny_beir, tiny_model_dir, tiny_pairs

    from bmretriever_jax.data.pairs import write_pairs
    from bmretriever_jax.training import train

    base = tmp_path_factory.getbasetemp() / "tiny_fixtures"
    model, run = base / "model", base / "run"
    if not (base / "done").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        tiny_model_dir(str(model))
        write_pairs(str(base / "pairs.jsonl"), tiny_pairs(32))
        cfg = load_config(None, [
            f"model.name={model}", f"data.train=[{base / 'pairs.jsonl'}]", f"data.dev={tiny_beir(str(base / 'dev'))}",
            f"out={run}", "model.max_length=16", "model.query_max_length=8", "model.dtype=float32",
            "train.global_batch_size=8", "train.steps=4", "train.log_every=1", "train.warmup_steps=1",
            "train.save_every=4", "train.eval_every=2", "mesh.data=1"])
        train(cfg, quiet=True)
        (base / "done").touch()
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert sum("loss" in r for r in rows) == 4 and sum("dev_ndcg@10" in r for r in rows) >= 2
    return model, run


def make_clone(root, model, run):
    """`root` laid out as a clone after `make quickstart`: data/ and configs/ of the repository, the experts
    runs/quickstart/literature (the tiny run, dev NDCG@10 logged) and consumer (the same run, its loss records
    only, as the quickstart's experts log), and runs/quickstart/merge.yaml as the quickstart writes it."""
    root.mkdir(exist_ok=True)
    for name in ("data", "configs"):
        os.symlink(os.path.join(ROOT, name), root / name)
    qs = root / "runs" / "quickstart"
    for name in ("literature", "consumer"):
        shutil.copytree(run, qs / name, ignore=shutil.ignore_patterns("vector_cache"))
    rows = [line for line in open(run / "metrics.jsonl") if '"loss"' in line]
    (qs / "consumer" / "metrics.jsonl").write_text("".join(rows))
    experts = [{"model": os.path.join("runs", "quickstart", k), "parameters": {"weight": 0.5}}
               for k in ("literature", "consumer")]
    (qs / "merge.yaml").write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": experts}))
    return root


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    model, run = tiny_fixtures(tmp_path_factory)
    return make_clone(tmp_path_factory.mktemp("clone"), model, run), model


@pytest.mark.parametrize("cmd", RUN_COMMANDS, ids=_id)
def test_cheap_command_runs_as_printed(cmd, clone):
    root, model = clone
    rule = classify(cmd)
    argv = [str(model) if w in MODEL_NAMES else w for w in _argv(cmd)[1:]]
    if rule.prepare:
        argv = rule.prepare(argv, root)
    r = subprocess.run([*BMR, *argv], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
    assert rule.check is not None, f"rule {rule.name}: a command that runs must check what it did"
    assert rule.check(argv, r, root) is not False, f"{cmd}\n{r.stdout[-3000:]}"


@pytest.fixture
def in_clone_dir(tmp_path, monkeypatch):
    """A scratch working directory that sees the repository's data/ and configs/ as a clone does."""
    for name in ("data", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _bmr(argv, **kw):
    return subprocess.run([*BMR, *argv], capture_output=True, text=True, timeout=900, **kw)


def _readme(prefix):
    found = [c for c in COMMANDS if c.startswith(prefix)]
    assert found, f"the docs show no `{prefix}` command"
    return _argv(found[0])[1:]


def test_quiet_after_the_command_is_accepted_and_prints_no_progress(in_clone_dir):
    r = _bmr(["pairs", "scifact", "--out", "q.jsonl", "-q"])
    assert r.returncode == 0, r.stderr
    r = _bmr(["mine", "q.jsonl", "--out", "q_hn.jsonl", "-q"])
    assert r.returncode == 0 and "mining" not in r.stderr, r.stderr
    assert build_parser().parse_args(["eval", "--baseline", "bm25", "--data", "x", "-q"]).quiet
    assert build_parser().parse_args(["-q", "eval", "--baseline", "bm25", "--data", "x"]).quiet
    assert not build_parser().parse_args(["eval", "--baseline", "bm25", "--data", "x"]).quiet


@pytest.mark.parametrize("group", ["merging"])
def test_parser_choices_equal_the_library_tables(group):
    """The CLI spells out choices so that `bmr --help` imports no jax; they must stay the library's."""
    from bmretriever_jax.convert import export
    from bmretriever_jax.cli import merging
    from bmretriever_jax.merging import search

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
