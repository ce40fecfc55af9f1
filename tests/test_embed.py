"""Text -> vectors: templates, EOS after truncation, left padding, pooling, batching order, edge cases."""
import re
import json

import numpy as np
import pytest

from bmretriever_jax.cli import main as bmr
from bmretriever_jax.embed import Encoder, format_passage, format_query, instruction_for, tokenize
from hf_tiny import tiny_model_dir


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    d = tiny_model_dir(str(tmp_path_factory.mktemp("m") / "model"))
    return Encoder.load(d, max_length=12, dtype="float32")


def test_templates():
    assert format_query("x causes y", instruction_for("scifact")) == (
        "Given a scientific claim, retrieve documents that support or refute the claim\nQuery: x causes y")
    assert format_passage({"title": "T", "text": "body"}) == "Represent this passage\npassage: T body"
    assert format_passage({"title": "", "text": "body"}) == "Represent this passage\npassage: body"


def test_truncation_keeps_eos(enc):
    tok = enc.tokenizer
    long = " ".join(["gene"] * 50)
    ids = tokenize(tok, [long, "gene"], 12)
    assert len(ids[0]) == 12 and ids[0][-1] == tok.eos_token_id and ids[0][0] == tok.bos_token_id
    assert ids[1] == [tok.bos_token_id, tok("gene", add_special_tokens=False)["input_ids"][0], tok.eos_token_id]


def test_batching_order_and_padding_invariance(enc):
    texts = ["gene protein cell", "virus", "heart brain blood cancer drug dose", "the"]
    together = enc.encode_texts(texts, batch_size=3)
    alone = np.stack([enc.encode_texts([t], batch_size=1)[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_mean_pooling_differs_and_is_normalised(tmp_path):
    d = tiny_model_dir(str(tmp_path / "m"))
    last = Encoder.load(d, max_length=12, dtype="float32").encode_texts(["gene protein", "virus"])
    mean = Encoder.load(d, max_length=12, dtype="float32", pooling="mean").encode_texts(["gene protein", "virus"])
    assert np.abs(last - mean).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, atol=1e-5)


def test_edge_cases(enc, tmp_path):
    # empty text: documented as BOS + EOS, a finite unit vector
    v = enc.encode_texts([""])
    assert np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-5
    # longer than max_length: truncated, same vector as its first max_length-1 tokens + EOS
    a = enc.encode_texts([" ".join(["gene"] * 40)])
    b = enc.encode_texts([" ".join(["gene"] * 10)])  # BOS + 10 + EOS = 12 tokens
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(TypeError, match="text 1 is NoneType"):
        enc.encode_texts(["ok", None])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Encoder(enc.cfg, enc.params, enc.tokenizer, max_length=10_000)
    with pytest.raises(ValueError, match="pooling='cls'"):
        Encoder(enc.cfg, enc.params, enc.tokenizer, pooling="cls")
    assert enc.encode_texts([]).shape == (0, enc.dim)


def test_fingerprint_changes_with_settings(tmp_path):
    d = tiny_model_dir(str(tmp_path / "m"))
    a = Encoder.load(d, max_length=12, dtype="float32").fingerprint
    assert a == Encoder.load(d, max_length=12, dtype="float32").fingerprint
    assert a != Encoder.load(d, max_length=16, dtype="float32").fingerprint
    assert a != Encoder.load(d, max_length=12, dtype="bfloat16").fingerprint


def test_cli_encode_and_info(tmp_path, capsys):
    d = tiny_model_dir(str(tmp_path / "m"))
    inp = tmp_path / "docs.jsonl"
    inp.write_text("\n".join(json.dumps({"_id": f"d{i}", "title": "", "text": t})
                             for i, t in enumerate(["gene protein", "virus covid", "heart"])) + "\n")
    assert bmr(["-q", "encode", "--model", d, "--input", str(inp), "--out", str(tmp_path / "o"), "--dtype",
                "float32"]) == 0
    v = np.load(tmp_path / "o" / "vectors.npy")
    assert v.shape == (3, 64)
    assert json.load(open(tmp_path / "o" / "ids.json")) == ["d0", "d1", "d2"]
    assert bmr(["info", d]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^family +gemma3$", out, re.M) and "parameters" in out
    assert re.search(r"^intermediate_size +\d+$", out, re.M)  # the column is wide enough for every key
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "ok"}\n{"_id": "b"}\n')
    assert bmr(["-q", "encode", "--model", d, "--input", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert re.search(r"^bmr encode: error: .*bad.jsonl:2: needs a string field 'text'", capsys.readouterr().err)
    assert bmr(["info", str(tmp_path / "nope")]) == 2
