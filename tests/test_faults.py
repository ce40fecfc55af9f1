"""Faults and bad input, as a user meets them: damaged checkpoints fall back, a changed config is not resumed
silently, and every bad input gives exit code 2 with one line and no traceback (file:line or parameter path)."""
import json
import os
import shutil

import numpy as np
import pytest

from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.util import treeutil
from bmretriever_jax.cli import main as bmr
from bmretriever_jax.config import ConfigError, load_config
from bmretriever_jax.data.pairs import write_pairs
from bmretriever_jax.training import train
from hf_tiny import tiny_beir, tiny_model_dir, tiny_pairs

COMMON = ["model.max_length=16", "model.query_max_length=8", "train.global_batch_size=8", "train.log_every=1",
          "train.warmup_steps=2", "train.lr=3e-3", "mesh.data=1", "model.dtype=float32", "train.steps=8",
          "train.save_every=2", "train.keep=5"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = tiny_model_dir(str(root / "model"))
    pairs = str(root / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(64))
    return model, pairs


def _cfg(setup, out, *extra):
    model, pairs = setup
    return load_config(None, [f"model.name={model}", f"data.train=[{pairs}]", f"out={out}", *COMMON, *extra])


def _trainable(run_dir):
    _, state, _ = ckpt.restore_params_only(os.path.join(run_dir, "checkpoints"))
    return treeutil.flatten(state["trainable"])


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(_cfg(setup, out), quiet=True)
    return out


def _damage_latest(run_dir, how):
    ck = os.path.join(run_dir, "checkpoints")
    latest = max(int(d) for d in os.listdir(ck) if d.isdigit())
    step_dir = os.path.join(ck, str(latest))
    if how == "truncate":  # every array file cut in half: what a crash in the middle of a write leaves
        for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
            for f in files:
                p = os.path.join(dirpath, f)
                if os.path.getsize(p) > 64 and not f.startswith("_"):
                    with open(p, "r+b") as fh:
                        fh.truncate(os.path.getsize(p) // 2)
    else:  # the metadata file gone
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    return latest


@pytest.mark.parametrize("how", ["truncate", "no_metadata"])
def test_a_damaged_latest_checkpoint_falls_back_and_finishes_bit_identical(setup, reference, tmp_path, how, capsys):
    run_dir = tmp_path / "run"
    train(_cfg(setup, run_dir), quiet=True, max_steps_this_run=6)  # checkpoints at 2, 4, 6
    damaged = _damage_latest(run_dir, how)
    assert damaged == 6
    capsys.readouterr()
    train(_cfg(setup, run_dir), quiet=True)
    out = capsys.readouterr().out
    assert "checkpoint step 6 cannot be restored" in out and "resuming from step 4" in out
    assert os.listdir(str(run_dir / "checkpoints") + "-damaged")  # set aside, not deleted
    a, b = _trainable(reference), _trainable(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    # metrics.jsonl: steps 5 and 6 ran twice, but are logged once
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_a_resume_with_another_lr_is_refused_unless_allowed(setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(_cfg(setup, run_dir), quiet=True, max_steps_this_run=2)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.003 -> 0\.001.*--allow-config-change"):
        train(_cfg(setup, run_dir, "train.lr=1e-3"), quiet=True)
    # more steps is not a change of the run
    train(_cfg(setup, run_dir, "train.steps=10"), quiet=True, max_steps_this_run=1)
    train(_cfg(setup, run_dir, "train.lr=1e-3", "train.steps=10"), quiet=True, max_steps_this_run=1,
          allow_config_change=True)
    (rec,) = [json.loads(line) for line in open(run_dir / "config_changes.jsonl")]
    assert rec["step"] == 2 and rec["changes"] == ["train.lr: 0.003 -> 0.001"]
    # through the command line: exit 2, one line
    model, pairs = setup
    argv = ["-q", "train", "/dev/null", f"model.name={model}", f"data.train=[{pairs}]", f"out={run_dir}", *COMMON,
            "train.lr=5e-4"]
    capsys.readouterr()
    assert bmr(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bmr train: error: ") and err.count("\n") == 1 and "train.lr" in err


# ------------------------------------------------------------------------------------ bad input: one line, exit 2
def _one_line_error(capsys, argv, *expected):
    capsys.readouterr()
    rc = bmr(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"bmr {argv[argv[0] == '-q']}: error: "), err
    for e in expected:
        assert e in lines[0], (e, lines[0])
    return lines[0]


@pytest.fixture
def bad_config(tmp_path):
    def write(text):
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        return str(p)
    return write


@pytest.mark.parametrize("yaml_text, expected", [
    ("model: {name: x}\ntrain:\n  steps: -5\n", ["bad.yaml:3: train.steps", ">= 1"]),
    ("model: {name: x}\ntrain:\n  steps: 0\n", ["train.steps", ">= 1"]),
    ("model: {name: x}\ntrain:\n  save_every: 0\n", ["train.save_every"]),
    ("model: {name: x}\ntrain:\n  log_every: 0\n", ["train.log_every"]),
    ("model: {name: x}\nlora:\n  rank: 0\n", ["lora.rank"]),
    ("model: {name: x}\ntrain:\n  global_batch_size: 0\n", ["train.global_batch_size"]),
    ("model: {name: x}\ntrain:\n  temperature: 0\n", ["train.temperature", "> 0"]),
    ("train:\n  steps: 10\n", ["model.name: required"]),
    ("model: {name: x}\ndata:\n  train: [no/such/pairs.jsonl]\n", ["no/such/pairs.jsonl: no such file"]),
    ("model: {name: x}\ndata:\n  train: [scifakt]\n", ["'scifakt' is neither a file nor a builder", "scifact"]),
])
def test_bad_train_configs(capsys, bad_config, yaml_text, expected):
    _one_line_error(capsys, ["train", bad_config(yaml_text)], *expected)


def test_an_empty_pairs_file_is_named(capsys, bad_config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(capsys, ["train", bad_config(f"model: {{name: x}}\ndata:\n  train: [{empty}]\n")], "empty.jsonl")


def test_bad_data_files(capsys, tmp_path):
    beir = tiny_beir(str(tmp_path / "beir"))
    # qrels that match no document
    with open(os.path.join(beir, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\nq-none\td-none\t1\n")
    _one_line_error(capsys, ["eval", "--baseline", "bm25", "--data", beir], "test.tsv", "none of its 1 judgement")
    # a Latin-1 corpus
    latin = tmp_path / "latin"
    shutil.copytree(tiny_beir(str(tmp_path / "beir2")), latin)
    with open(latin / "corpus.jsonl", "ab") as f:
        f.write('{"_id": "x", "text": "caf\u00e9"}\n'.encode("latin-1"))
    n = sum(1 for _ in open(latin / "corpus.jsonl", "rb"))
    _one_line_error(capsys, ["eval", "--baseline", "bm25", "--data", str(latin)], f"corpus.jsonl:{n}: not UTF-8",
                    "iconv")
    # a bad qrels score
    bad = tmp_path / "badq"
    shutil.copytree(tiny_beir(str(tmp_path / "beir3")), bad)
    with open(bad / "qrels" / "test.tsv", "a") as f:
        f.write("q0\td0\thigh\n")
    _one_line_error(capsys, ["eval", "--baseline", "bm25", "--data", str(bad)], "test.tsv:", "score")


def test_sts_files(capsys, tmp_path):
    const = tmp_path / "const.tsv"
    const.write_text("sentence1\tsentence2\tscore\na b\tc d\t2.0\ne f\tg h\t2.0\n")
    _one_line_error(capsys, ["eval", "--baseline", "minilm", "--data", str(const)], "const.tsv", "every gold score")
    cols = tmp_path / "cols.tsv"
    cols.write_text("s1\ts2\tscore\na\tb\t1\n")
    _one_line_error(capsys, ["eval", "--baseline", "minilm", "--data", str(cols)], "cols.tsv:1", "sentence1")


def test_encode_inputs_and_outputs(capsys, tmp_path, setup):
    model, _ = setup
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n{"_id": "a", "text": "z"}\n')
    _one_line_error(capsys, ["encode", "--model", model, "--input", str(dup), "--out", str(tmp_path / "o")],
                    "dup.jsonl:3: duplicate id 'a' (first on line 1)")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    _one_line_error(capsys, ["encode", "--model", model, "--input", str(binary), "--out", str(tmp_path / "o")],
                    "bin.jsonl:1: not UTF-8")
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"_id": "a", "text": "x"}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    _one_line_error(capsys, ["encode", "--model", model, "--input", str(ok), "--out", str(a_file)],
                    "names an existing file")
    _one_line_error(capsys, ["encode", "--model", model, "--input", str(tmp_path / "nope.jsonl"), "--out",
                             str(tmp_path / "o")], "nope.jsonl: no such file")


def test_a_huge_one_line_document_is_cut_before_tokenizing(setup):
    """The char budget keeps a 30 MB line cheap and gives the same tokens as tokenizing it whole."""
    import time

    import transformers

    from bmretriever_jax.embed import char_budget, tokenize

    model, _ = setup
    tok = transformers.AutoTokenizer.from_pretrained(model)
    words = "protein binding gene expression of the receptor in mice cells "
    text = words * 2000  # ~130k characters: tokenizing it whole is still affordable for the comparison
    assert len(text) > char_budget(tok, 32)
    whole = tok([text], add_special_tokens=True, truncation=True, max_length=31)["input_ids"][0] + [tok.eos_token_id]
    assert tokenize(tok, [text], 32)[0] == whole
    huge = words * 480_000  # ~30 MB on one line
    t0 = time.time()
    assert tokenize(tok, [huge], 32)[0] == whole
    assert time.time() - t0 < 2.0
