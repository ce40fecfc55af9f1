"""`bmr sweep`: grid parsing, per-run summaries, the plot, and a real 2-point sweep of a tiny model with a dev
set (each point a short training run in its own process)."""
import argparse
import json
import math
import os

import pytest

from bmretriever_jax.studies import sweep
from bmretriever_jax.config import ConfigError
from bmretriever_jax.data.pairs import write_pairs
from hf_tiny import tiny_model_dir, tiny_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_grid_and_points():
    axes = sweep.parse_grid(["train.global_batch_size=8,16,32", "train.temperature=0.02, 0.05",
                             "model.bidirectional=true"])
    assert axes == [("train.global_batch_size", [8, 16, 32]), ("train.temperature", [0.02, 0.05]),
                    ("model.bidirectional", [True])]
    points = sweep.grid_points(axes)
    assert len(points) == 6
    name, assign = points[3]
    assert name == "global_batch_size=16,temperature=0.05,bidirectional=True"
    assert assign == {"train.global_batch_size": 16, "train.temperature": 0.05, "model.bidirectional": True}
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        sweep.parse_grid(["train.global_batch_size"])
    with pytest.raises(ConfigError, match="given twice"):
        sweep.parse_grid(["train.lr=1e-4", "train.lr=2e-4"])


def test_point_overrides_order_user_then_grid_win():
    ov = sweep.point_overrides(["model.name=gemma3-270m", "train.log_every=5", "train.temperature=0.1"],
                               {"train.temperature": 0.05}, 10, "out/p")
    from bmretriever_jax.config import load_config

    run = load_config(None, ov)
    assert run.train.log_every == 5 and run.train.temperature == 0.05 and run.train.steps == 10
    assert run.train.save_every == 2 and run.out == "out/p"  # a checkpoint every quarter: resumable points


def test_summarize_run_skips_the_compiling_step(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "accuracy": 0.1, "examples_per_s": 2.0},
            {"step": 2, "loss": 2.5, "accuracy": 0.2, "examples_per_s": 40.0},
            {"step": 3, "loss": 2.0, "accuracy": 0.5, "examples_per_s": 44.0},
            {"step": 4, "loss": 1.5, "accuracy": 0.6, "examples_per_s": 50.0},
            {"step": 4, "dev_ndcg@10": 0.3, "dev_recall@100": 0.8}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    s = sweep.summarize_run(str(tmp_path))
    assert s == {"final_loss": 1.5, "final_accuracy": 0.6, "examples_per_s": 44.0, "steps": 4,
                 "dev_ndcg@10": 0.3, "dev_recall@100": 0.8}


def test_plot_groups_the_other_grid_axes(tmp_path):
    rows = []
    for t in (0.02, 0.05):
        for b in (8, 16, 32):
            rows.append({"point": f"global_batch_size={b},temperature={t}", "global_batch_size": b,
                         "candidates_per_query": 2 * b, "final_loss": math.log(2 * b) * t * 20,
                         "chance_loss": math.log(2 * b), "final_accuracy": 0.5, "dev_ndcg@10": 0.2 + b / 100,
                         "examples_per_s": 10.0 + b, "peak_rss_mb": 1000.0 + b, "plan_estimate_mb": 500.0 + b,
                         "step_peak_mb": 450.0 + b,
                         "steps": 5})
    groups = sweep._series(rows, ("global_batch_size", "num_negatives"))
    assert sorted(groups) == ["temperature=0.02", "temperature=0.05"] and all(len(g) == 3 for g in groups.values())
    path = sweep.plot_sweep(rows, str(tmp_path / "sweep.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _tiny_beir(root, pairs):
    """A dev split in the BEIR layout: each pair's query must find its positive among all positives."""
    os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
    with open(os.path.join(root, "corpus.jsonl"), "w") as f:
        for i, p in enumerate(pairs):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": p["positive"]["text"]}) + "\n")
    with open(os.path.join(root, "queries.jsonl"), "w") as f:
        for i, p in enumerate(pairs):
            f.write(json.dumps({"_id": f"q{i}", "text": p["query"]}) + "\n")
    with open(os.path.join(root, "qrels", "dev.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(pairs))))
    return root


def _stub_run(fail_points=()):
    """Stands in for the point subprocess: writes the files a finished 3-step run leaves behind."""
    import subprocess

    calls = []

    def run(cmd, **kw):
        spec = json.load(open(cmd[-1]))
        out = [o.split("=", 1)[1] for o in spec["overrides"] if o.startswith("out=")][-1]
        name = os.path.basename(out)
        calls.append(name)
        if name in fail_points:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nValueError: boom")
        b = int(name.split("global_batch_size=")[1].split(",")[0])
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            for step in (1, 2, 3):
                rec = {"step": step, "loss": 2.0 / step, "accuracy": 0.3, "examples_per_s": 10.0 * b}
                f.write(json.dumps(rec) + "\n")
        os.makedirs(os.path.join(out, "model"))
        res = dict(sweep.summarize_run(out), seconds=1.0, peak_rss_mb=500.0 + b, plan_estimate_mb=100.0 + b,
                   step_peak_mb=90.0 + b)
        json.dump(res, open(os.path.join(out, sweep.POINT_FILE), "w"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run, calls


def test_sweep_loop_results_failures_and_resume(tmp_path, monkeypatch):
    out = str(tmp_path / "sweep")
    grid = ["train.global_batch_size=8,16", "train.temperature=0.02,0.05"]
    run, calls = _stub_run(fail_points={"global_batch_size=16,temperature=0.05"})
    monkeypatch.setattr(sweep.subprocess, "run", run)
    rows = sweep.sweep(None, grid, out, overrides=["model.name=tiny", "data.num_negatives=3"], steps=3, quiet=True)
    assert len(calls) == 4 and [("error" in r) for r in rows] == [False, False, False, True]
    assert "boom" in rows[3]["error"]
    with open(os.path.join(out, "results.tsv")) as f:
        header, *lines = [ln.rstrip("\n").split("\t") for ln in f]
    got = [dict(zip(header, ln)) for ln in lines]
    assert [g["candidates_per_query"] for g in got] == ["32", "32", "64", "64"]  # batch x (1 + 3 negatives)
    assert [g["temperature"] for g in got] == ["0.02", "0.05", "0.02", "0.05"]
    assert got[2]["examples_per_s"] == "160" and got[0]["peak_rss_mb"] == "508" and got[3]["error"]
    assert got[1]["step_peak_mb"] == "98" and got[1]["plan_estimate_mb"] == "108"
    assert got[0]["chance_loss"] == f"{math.log(32):.6g}"
    assert os.path.exists(os.path.join(out, "sweep.png"))
    assert not os.path.exists(os.path.join(out, "global_batch_size=8,temperature=0.02", "model"))
    # rerun: finished points are read back, the failed one runs again; a note added to results.json by hand
    # (which machines ran a study before points recorded it) survives the rewrite
    path = os.path.join(out, "results.json")
    doc = json.load(open(path))
    json.dump(dict(doc, machines="points 1-2: an AVX2 machine"), open(path, "w"))
    run2, calls2 = _stub_run()
    monkeypatch.setattr(sweep.subprocess, "run", run2)
    rows2 = sweep.sweep(None, grid, out, overrides=["model.name=tiny", "data.num_negatives=3"], steps=3, quiet=True)
    assert calls2 == ["global_batch_size=16,temperature=0.05"] and not any("error" in r for r in rows2)
    again = json.load(open(path))
    assert again["machines"] == "points 1-2: an AVX2 machine" and len(again["points"]) == 4


def test_cli_sweep_exits_nonzero_when_a_point_fails(tmp_path, monkeypatch):
    run, _ = _stub_run(fail_points={"global_batch_size=8"})
    monkeypatch.setattr(sweep.subprocess, "run", run)
    p = argparse.ArgumentParser()
    sweep.add_commands(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["sweep", "/dev/null", "model.name=tiny", "--grid", "train.global_batch_size=8,16", "--out",
                      str(tmp_path / "s")])
    with pytest.raises(SystemExit) as e:
        a.fn(a)
    assert e.value.code == 1
    with pytest.raises(ConfigError, match="unknown key"):
        sweep.sweep(None, ["train.batchsize=8"], str(tmp_path / "t"), overrides=["model.name=tiny"], quiet=True)


@pytest.mark.slow
def test_two_point_sweep_of_a_tiny_model(tmp_path, monkeypatch):
    """The real thing: two short training runs in their own processes (~45 s of CPU, hence slow)."""
    model = tiny_model_dir(str(tmp_path / "model"))
    pairs = str(tmp_path / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(64))
    dev = _tiny_beir(str(tmp_path / "dev"), tiny_pairs(24, seed=1))
    out = str(tmp_path / "sweep")
    p = argparse.ArgumentParser()
    sweep.add_commands(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["sweep", "/dev/null", f"model.name={model}", f"data.train=[{pairs}]", f"data.dev={dev}",
                      "data.dev_task=scifact", "model.max_length=16", "model.query_max_length=8", "mesh.data=1",
                      "train.warmup_steps=1", "train.lr=3e-3", "train.temperature=0.05", "model.dtype=float32",
                      "--grid", "train.global_batch_size=4,16", "--steps", "3", "--out", out])
    a.fn(a)
    with open(os.path.join(out, "results.tsv")) as f:
        header, *lines = [ln.rstrip("\n").split("\t") for ln in f]
    assert len(lines) == 2 and "error" not in header
    rows = [dict(zip(header, ln)) for ln in lines]
    assert [r["point"] for r in rows] == ["global_batch_size=4", "global_batch_size=16"]
    assert [int(r["candidates_per_query"]) for r in rows] == [8, 32]  # one hard negative per query
    for r in rows:
        assert int(r["steps"]) == 3
        assert math.isfinite(float(r["final_loss"])) and float(r["final_loss"]) > 0
        assert 0.0 <= float(r["dev_ndcg@10"]) <= 1.0
        assert float(r["examples_per_s"]) > 0 and float(r["peak_rss_mb"]) > 100
        assert float(r["plan_estimate_mb"]) > 0 and float(r["step_peak_mb"]) > 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["grid"] == ["train.global_batch_size"] and len(res["points"]) == 2
    with open(os.path.join(out, "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the short runs' exported models are dropped, their metrics kept
    assert not os.path.exists(os.path.join(out, "global_batch_size=4", "model"))
    assert os.path.exists(os.path.join(out, "global_batch_size=4", "metrics.jsonl"))

    # a finished sweep resumes without training again; a new grid value is the only new run
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        RuntimeError("no point should run")))
    again = sweep.sweep("/dev/null", ["train.global_batch_size=4,16"], out, overrides=a.overrides, steps=3, quiet=True)
    assert not calls and [r["final_loss"] for r in again] == pytest.approx([float(r["final_loss"]) for r in rows],
                                                                          rel=1e-5)


def _study_args(model, pairs, dev, out):
    return ["sweep", "/dev/null", f"model.name={model}", f"data.train=[{pairs}]", "data.num_negatives=0",
            "model.max_length=16", "model.query_max_length=8", "mesh.data=1", "train.lr=3e-3",
            "train.temperature=0.05", "model.dtype=float32", "--point", "train.global_batch_size=4",
            "--point", "train.global_batch_size=8,data.num_negatives=1", "--examples", "16",
            "--lr-rule", "sqrt", "--lr-base-batch", "4", "--dev", dev, "--out", out]


STUDY_KEYS = ("point", "steps", "examples", "lr", "final_loss", "final_accuracy", "dev_ndcg@10",
              "dev_ndcg@10:dev", "dev_recall@100")


@pytest.mark.slow  # ~3.5 min of subprocess training: `make test-slow`
def test_fixed_examples_study_resumes_after_a_kill_with_the_same_table(tmp_path):
    """A tiny-model study as `bmr sweep` runs it: the same 16 training queries at every point (4 steps of 4,
    2 steps of 8), sqrt lr scaling, a dev metric for every point and for the untrained model; killed (SIGKILL
    of its process group) in the middle of its second point, rerun, it gives the uninterrupted table."""
    import signal
    import subprocess
    import sys
    import time

    model = tiny_model_dir(str(tmp_path / "model"))
    pairs = str(tmp_path / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(64))
    dev = _tiny_beir(str(tmp_path / "dev"), tiny_pairs(24, seed=1))
    cmd = [sys.executable, "-m", "bmretriever_jax.cli", "-q"]
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(cmd + _study_args(model, pairs, dev, ref), check=True, capture_output=True, text=True)

    second = os.path.join(killed, "global_batch_size=8,num_negatives=1")
    proc = subprocess.Popen(cmd + _study_args(model, pairs, dev, killed) + ["--no-baseline"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(second, "checkpoints", "1")) and time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(second, sweep.POINT_FILE))  # killed mid-point, after step 1's checkpoint
    early = json.load(open(os.path.join(killed, "results.json")))  # written after the first point, before the kill
    assert [r["point"] for r in early["points"]] == ["global_batch_size=4"]  # the first point, finished
    subprocess.run(cmd + _study_args(model, pairs, dev, killed) + ["--no-baseline"], check=True, capture_output=True,
                   text=True)

    a = json.load(open(os.path.join(ref, "results.json")))
    b = json.load(open(os.path.join(killed, "results.json")))
    assert [r["resumed_from_step"] for r in b["points"]] == [0, 1] and b["baseline"] is None
    assert 0 <= a["baseline"]["dev_ndcg@10"] == a["baseline"]["dev_ndcg@10:dev"] <= 1 and a["baseline"]["eval_seconds"] > 0
    for ra, rb in zip(a["points"], b["points"]):
        assert {k: ra[k] for k in STUDY_KEYS} == {k: rb[k] for k in STUDY_KEYS}
    rows = a["points"]
    assert [(r["steps"], r["examples"]) for r in rows] == [(4, 16), (2, 16)]
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 3e-3 * math.sqrt(2)])
    assert [r["candidates_per_query"] for r in rows] == [4, 16]
    import jax
    from bmretriever_jax.util.machine import cpu_info
    for r in rows + [a["baseline"]]:  # every number says where it was measured
        assert r["cpu"] == cpu_info() and r["versions"]["jax"] == jax.__version__
    for r in rows:
        assert 0.0 <= r["dev_ndcg@10"] <= 1.0 and r["dev_ndcg@10"] == r["dev_ndcg@10:dev"]
        assert r["step_peak_mb"] > 0 and r["seconds"] > r["train_seconds"] > 0 and r["eval_seconds"] > 0
    with open(os.path.join(killed, "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the README's study table (benchmarks/study_report.py) renders from the same results.json
    report = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "study_report.py"), "--dir", ref,
                             "--no-readme"], check=True, capture_output=True, text=True).stdout
    assert "| untrained |" in report and "| dev dev NDCG@10 |" in report and report.count("| 4 | 0 | 4 x 4 |") == 1
    assert f"Machines: {cpu_info()['model']}, {os.cpu_count()} cores, " in report and "(batch/hard negatives 4/0, 8/1)" in report
    # before a study's first point finishes there is no results.json: one line, no traceback
    empty = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "study_report.py"), "--dir",
                            str(tmp_path / "nothing"), "--no-readme"], capture_output=True, text=True)
    assert empty.returncode == 1 and "no results yet" in empty.stderr and "Traceback" not in empty.stderr
    # a point whose training had finished before a stop only evaluated after it: no train minutes
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import study_report
    assert study_report.train_minutes({"steps": 4, "resumed_from_step": 4, "train_seconds": 34.0}) == "-"
    assert study_report.train_minutes({"steps": 4, "resumed_from_step": 2, "train_seconds": 90.0}) == "1.5"


def test_explicit_points_lr_rule_and_examples_validation(tmp_path):
    assert sweep.parse_point("train.global_batch_size=4,data.num_negatives=1") == {
        "train.global_batch_size": 4, "data.num_negatives": 1}
    pts = sweep.grid_points(sweep.parse_grid(["train.global_batch_size=4,8"]),
                            [{"train.global_batch_size": 8}, {"train.global_batch_size": 4, "data.num_negatives": 1}])
    assert [n for n, _ in pts] == ["global_batch_size=4", "global_batch_size=8",
                                   "global_batch_size=4,num_negatives=1"]
    assert sweep.steps_for(1024, 256) == 4 and sweep.steps_for(1000, 64) == 16
    assert sweep.scaled_lr(2e-4, 64, "sqrt", 16) == pytest.approx(4e-4)
    assert sweep.scaled_lr(2e-4, 64, "linear", 16) == pytest.approx(8e-4)
    with pytest.raises(ConfigError, match="allowed: none, sqrt, linear"):
        sweep.scaled_lr(2e-4, 64, "cubic", 16)
    with pytest.raises(ConfigError, match="expected KEY=V,KEY=V"):
        sweep.parse_point("train.global_batch_size")
    with pytest.raises(ConfigError, match="exclude each other"):
        sweep.sweep(None, ["train.global_batch_size=4"], str(tmp_path / "s"), overrides=["model.name=tiny"],
                    steps=3, examples=16, quiet=True)
    with pytest.raises(ConfigError, match="no qrels/dev.tsv"):
        sweep.sweep(None, ["train.global_batch_size=4"], str(tmp_path / "s"), overrides=["model.name=tiny"],
                    dev=[str(tmp_path)], quiet=True)


def test_the_study_scripts_run_real_commands(tmp_path):
    """benchmarks/scaling_study.sh (the README's study) and benchmarks/study_test.sh (its test numbers), run by
    bash with a stand-in `bmr` that records its arguments: every command goes through the real parser, the
    study sweeps the eight points over the shipped dev folders with 1,024 training queries each, and the test
    script retrains the two points it evaluates, with the study's settings."""
    import subprocess
    import sys

    from bmretriever_jax.cli import build_parser

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log, stub = tmp_path / "argv.jsonl", tmp_path / "bmr"
    stub.write_text(f"#!{sys.executable}\n" + """import json, os, sys
with open(os.environ["BMR_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if len(sys.argv) > 1 and sys.argv[1] in ("pairs", "mine"):  # the files the next shell line reads
    open(sys.argv[sys.argv.index("--out") + 1], "w").write("{}\\n")
""")
    stub.chmod(0o755)
    parser = build_parser()

    def run(script, **env):
        if log.exists():
            log.unlink()
        subprocess.run(["bash", os.path.join(root, "benchmarks", script)], check=True, capture_output=True,
                       env=dict(os.environ, BMR=str(stub), PYTHON=str(stub), BMR_LOG=str(log),
                                STUDY_DATA=str(tmp_path / "pairs"),
                                **env))
        return [json.loads(line) for line in log.read_text().splitlines()]

    study = run("scaling_study.sh", STUDY_OUT=str(tmp_path / "study"))
    assert [c[0] for c in study] == ["pairs", "pairs", "pairs", "mine", "sweep"]
    for argv in study:
        parser.parse_args(argv)
    a = parser.parse_args(study[-1])
    assert a.examples == 1024 and a.dev == ["data/scifact", "data/medquad"] and a.dev_docs == 1000
    for d in a.dev:
        assert os.path.isfile(os.path.join(root, d, "qrels", "dev.tsv"))
    assert "model.dtype=float32" in a.overrides and a.out == str(tmp_path / "study")
    points = [sweep.parse_point(p) for p in a.point]
    assert len(points) == 8 and {p["train.global_batch_size"] for p in points} == {4, 16, 64, 256}
    assert {p["data.num_negatives"] for p in points} == {0, 1}

    test = run("study_test.sh")  # the pairs exist now: straight to the sweep
    assert [c[0] for c in test] == ["sweep", "eval", "eval", "benchmarks/study_report.py"]
    assert test[-1][1:] == ["--test-from", "runs/study-test"]  # the digest: the committed test.json
    for argv in test[:-1]:
        parser.parse_args(argv)
    t = parser.parse_args(test[0])
    assert t.overrides == a.overrides and t.examples == a.examples and t.out == "runs/study-test" and not t.baseline
    assert [sweep.parse_point(p) for p in t.point] == [
        {"train.global_batch_size": 16, "data.num_negatives": 1}, {"train.global_batch_size": 4, "data.num_negatives": 0}]
    ev = parser.parse_args(test[1])
    assert ev.split == "test" and ev.data == ["data/scifact", "data/medquad"]
    assert ev.model == [f"runs/study-test/{sweep._name(p)}/model" for p in (
        {"train.global_batch_size": 16, "data.num_negatives": 1}, {"train.global_batch_size": 4, "data.num_negatives": 0})]


def test_study_report_digests_the_test_evaluation(tmp_path):
    """study_test.sh's last step: bmr eval's outputs + the retrained points -> DIR/test.json -> the README table."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import study_report

    src, study = tmp_path / "study-test", tmp_path / "study"
    src.mkdir(), study.mkdir()
    m = {"ndcg@10": 0.5, "mrr@10": 0.4, "recall@100": 0.9, "ndcg@100": 0.55, "recall@1000": 1.0, "p@5": 0.1,
         "seconds": 3.0}
    name = "global_batch_size=16,num_negatives=1"
    json.dump({f"{name}/model | scifact": m, f"{name}/model | medquad": dict(m, **{"ndcg@10": 0.8})},
              open(src / "test.json", "w"))
    json.dump({"bm25 | scifact": dict(m, **{"ndcg@10": 0.6863}), "minilm | medquad": dict(m, **{"ndcg@10": 0.761})},
              open(src / "test-baselines.json", "w"))
    point = {"point": name, "dev_ndcg@10": 0.7658, "final_loss": 0.117, "train_seconds": 961.55}
    json.dump({"points": [dict(point, cpu={"model": "x"})]}, open(src / "results.json", "w"))
    json.dump({"points": [point]}, open(study / "results.json", "w"))
    doc = study_report.digest_test(str(src), str(study))
    assert json.load(open(study / "test.json")) == doc
    assert doc["points"] == {name: {"scifact": {k: m[k] for k in study_report.TEST_KEYS},
                                    "medquad": {**{k: m[k] for k in study_report.TEST_KEYS}, "ndcg@10": 0.8}}}
    assert doc["reproduction"][name]["dev_ndcg@10 study"] == doc["reproduction"][name]["dev_ndcg@10 retrained"]
    assert doc["cpu"]["logical_cpus"] == os.cpu_count() and doc["versions"]["jax"]
    table = study_report.test_markdown(doc).splitlines()
    assert table[2] == "| BM25 (bm25s, full passages) | 0.6863 | 0.9000 |  |  |"
    assert table[3] == "| all-MiniLM-L6-v2 |  |  | 0.7610 | 0.9000 |"
    assert table[4].startswith("| Gemma 3 270M + LoRA, batch 16 + 1 hard negative (best dev) | 0.5000 | 0.9000 | 0.8000 |")
    with pytest.raises(SystemExit, match="missing; run bash benchmarks/study_test.sh"):
        study_report.digest_test(str(tmp_path / "nothing"), str(study))
