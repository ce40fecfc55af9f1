"""`bmr index` / `bmr search` (eval/index.py, cli/retrieval.py, bmr.index / bmr.search) on a tiny corpus with a
tiny model: what search returns equals encoding the query and the documents directly (and BM25 / fusion of the
evaluation code), the folder is written atomically with its manifest, and bad input is one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hf_tiny import tiny_beir, tiny_model_dir

import bmretriever_jax as bmr
from bmretriever_jax.cli import main as bmr_main
from bmretriever_jax.data.beir import load_corpus
from bmretriever_jax.embed import Encoder, instruction_for
from bmretriever_jax.eval import fusion, metrics
from bmretriever_jax.eval.baselines import bm25_search
from bmretriever_jax.eval.evaluate import retrieve
from bmretriever_jax.eval.index import Index
from bmretriever_jax.util.errors import (ConfigError, DataFormatError, InputPathError, ModelSourceError,
                                         OutputExistsError)

QUERY = "cancer drug query"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("index")
    model = tiny_model_dir(str(base / "model"))
    data = tiny_beir(str(base / "scifact_tiny"))  # the folder name sets the default task: scifact
    idx = bmr.index(data, [model, "bm25"], str(base / "idx"))
    return model, data, idx


def test_index_folder_manifest_and_checksums(built):
    model, data, idx = built
    man = json.load(open(os.path.join(idx, "index.json")))
    corpus = os.path.join(data, "corpus.jsonl")
    from bmretriever_jax.util.atomic import check_manifest, sha256_file

    assert man["corpus"] == {"path": corpus, "sha256": sha256_file(corpus), "documents": 12}
    assert man["task"] == "scifact"
    assert [(s["name"], s["kind"]) for s in man["systems"]] == [(model, "dense"), ("bm25", "bm25")]
    assert man["systems"][0]["fingerprint"] == Encoder.load(model, quiet=True).fingerprint
    assert check_manifest(idx, full=True) is None  # every file recorded in checksums.json
    assert not [f for f in os.listdir(os.path.dirname(idx)) if ".tmp-" in f]


def _direct_dense(model, data, query, instruction):
    enc = Encoder.load(model, quiet=True)
    corpus = load_corpus(os.path.join(data, "corpus.jsonl"))
    q = enc.encode_queries([query], instruction)
    p = enc.encode_passages(list(corpus.values()))
    sims = enc.similarity(q, p)[0]
    return {d: float(s) for d, s in zip(corpus, sims)}


def test_search_equals_a_direct_encode_of_the_query(built):
    model, data, idx = built
    hits = bmr.search(idx, QUERY, top_k=12, systems=[model])
    direct = _direct_dense(model, data, QUERY, instruction_for("scifact"))  # the index's default task
    assert [h["id"] for h in hits] == metrics.rank(direct)
    np.testing.assert_allclose([h["score"] for h in hits], [direct[h["id"]] for h in hits], atol=1e-5)
    assert [h["rank"] for h in hits] == list(range(1, 13)) and "title" in hits[0]
    # another instruction is another query vector
    other = bmr.search(idx, QUERY, top_k=12, systems=[model], instruction="Find it")
    direct = _direct_dense(model, data, QUERY, "Find it")
    np.testing.assert_allclose([h["score"] for h in other], [direct[h["id"]] for h in other], atol=1e-5)


def test_bm25_and_fused_search_equal_the_evaluation_code(built):
    model, data, idx = built
    corpus = load_corpus(os.path.join(data, "corpus.jsonl"))
    bm = bm25_search(corpus, {"0": QUERY})
    hits = bmr.search(idx, QUERY, top_k=12, systems=["bm25"])
    assert [(h["id"], h["score"]) for h in hits] == [(d, bm["0"][d]) for d in metrics.rank(bm["0"])]
    dense = retrieve(Encoder.load(model, quiet=True), corpus, {"0": QUERY}, instruction_for("scifact"),
                     data_dir=data, progress=False)
    for method, kw in (("rrf", {}), ("wsum", {"weights": [0.3, 0.7]})):
        want = fusion.fuse([dense, bm], method, kw or None)["0"]
        got = bmr.search(idx, QUERY, top_k=5, fusion=method, **kw)
        assert [h["id"] for h in got] == list(want)[:5]
        np.testing.assert_allclose([h["score"] for h in got], [want[h["id"]] for h in got], atol=1e-6)
    assert [h["id"] for h in bmr.search(idx, QUERY, top_k=5)] == list(fusion.rrf([dense, bm])["0"])[:5]  # default
    many = bmr.search(idx, [QUERY, "virus vaccine"], top_k=3)
    assert len(many) == 2 and [h["id"] for h in many[0]] == [h["id"] for h in bmr.search(idx, QUERY, top_k=3)]


def test_cli_search_prints_ranked_ids_titles_scores_and_json(built, capsys):
    model, data, idx = built
    capsys.readouterr()
    assert bmr_main(["search", idx, QUERY, "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fusion"] == "rrf" and out["systems"] == ["model", "bm25"]
    assert [h["id"] for h in out["results"]] == [h["id"] for h in bmr.search(idx, QUERY, top_k=3)]
    assert bmr_main(["search", idx, QUERY, "--top-k", "3", "--system", "bm25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 of 12 documents (bm25)" and len(lines) == 4
    first = bmr.search(idx, QUERY, top_k=1, systems=["bm25"])[0]
    assert lines[1].split()[:3] == ["1", f"{first['score']:.4f}", first["id"]]


def test_bmr_index_command_runs(built, tmp_path):
    """The command as a user runs it, in a fresh interpreter (jax stays out of `bmr --help`: test_readme_commands)."""
    _, data, _ = built
    out = tmp_path / "bm"
    r = subprocess.run([sys.executable, "-m", "bmretriever_jax.cli", "index", os.path.join(data, "corpus.jsonl"),
                        "--model", "bm25", "--out", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"indexed 12 documents with bm25 in {out}")
    assert Index(str(out)).names == ["bm25"]


def _one_line_error(capsys, argv, start):
    capsys.readouterr()
    assert bmr_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line(built, tmp_path, capsys):
    model, data, idx = built
    _one_line_error(capsys, ["search", str(tmp_path / "nope"), "q"], "bmr search: error: ")
    _one_line_error(capsys, ["search", idx, "   "], "bmr search: error: empty query")
    _one_line_error(capsys, ["search", idx, "q", "--system", "minilm"], "bmr search: error: ")
    _one_line_error(capsys, ["search", idx, "q", "--system", "bm25", "--fusion", "rrf"], "bmr search: error: ")
    _one_line_error(capsys, ["search", idx, "q", "--fusion", "wsum", "--weights", "1"], "bmr search: error: ")
    _one_line_error(capsys, ["index", str(tmp_path / "none.jsonl"), "--model", "bm25", "--out", str(tmp_path / "i")],
                    "bmr index: error: ")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    _one_line_error(capsys, ["index", data, "--model", "bm25", "--out", str(tmp_path / "full")], "bmr index: error: ")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(InputPathError, match="not an index"):
        bmr.search(str(tmp_path), "q")
    with pytest.raises(ConfigError, match="empty query"):
        bmr.search(idx, "")
    with pytest.raises(OutputExistsError):
        bmr.index(data, "bm25", str(tmp_path / "full"))
    with pytest.raises(ConfigError, match="named twice"):
        bmr.index(data, ["bm25", "bm25"], str(tmp_path / "x"))


def test_model_changed_since_indexing_and_damaged_index(built, tmp_path, capsys):
    model, data, _ = built
    mine = shutil.copytree(model, tmp_path / "model")
    idx = bmr.index(data, [str(mine), "bm25"], str(tmp_path / "idx"))
    assert bmr.search(idx, QUERY, top_k=2)
    for f in mine.glob("*.safetensors"):  # the model is retrained / replaced after indexing
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(ModelSourceError, match="not the one indexed"):
        Index(idx).search([QUERY])
    assert bmr.search(idx, QUERY, top_k=2, systems=["bm25"])  # BM25 needs no model
    _one_line_error(capsys, ["search", idx, QUERY], "bmr search: error: ")
    # a damaged file is found by the checksums written with the index
    vec = os.path.join(idx, "dense-0", "vectors.npy")
    with open(vec, "r+b") as f:
        f.truncate(os.path.getsize(vec) - 8)
    with pytest.raises(DataFormatError, match="vectors.npy"):
        Index(idx)
    # indexing again replaces the index in place
    bmr.index(data, ["bm25"], idx)
    assert Index(idx).names == ["bm25"]
