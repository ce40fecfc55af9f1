"""`bmr prepare` (data/prepared.py): what the manifest and the stored token ids hold, one-line errors naming the
file for a corrupt / incomplete folder or another tokenizer (before any model loads), and the training loop
fed from a prepared folder giving the same losses as the pairs file."""
import json
import os

import numpy as np
import pytest
import transformers

from bmretriever_jax.cli.main import main as bmr
from bmretriever_jax.config import load_config
from bmretriever_jax.data.pairs import read_pairs, write_pairs
from bmretriever_jax.data.prepared import (MANIFEST, MissingShardError, Prepared, PreparedDataError,
                                           TokenizerMismatchError, check_tokenizer, file_sha256, prepare)
from bmretriever_jax.embed import tokenize
from bmretriever_jax.data.batches import _texts
from bmretriever_jax.util.errors import InputPathError
from hf_tiny import save_tiny_tokenizer, tiny_model_dir, tiny_pairs


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    model = tiny_model_dir(str(root / "model"))
    pairs = str(root / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(40))
    out = str(root / "prepared")
    assert bmr(["-q", "prepare", pairs, "--out", out, "--tokenizer", model, "--max-length", "12",
                "--query-max-length", "8", "--shard-rows", "16"]) == 0
    return model, pairs, out


def test_manifest_and_token_ids(made):
    model, pairs, out = made
    m = json.load(open(os.path.join(out, MANIFEST)))
    assert m["count"] == 40 and [s["rows"] for s in m["shards"]] == [16, 16, 8]
    assert m["sources"] == [{"entry": pairs, "path": os.path.abspath(pairs), "bytes": os.path.getsize(pairs),
                             "sha256": file_sha256(pairs)}]
    assert m["tokenizer"]["name"] == model and len(m["tokenizer"]["vocab_sha256"]) == 64
    for key in ("query_tokens", "passage_tokens", "query_chars", "passage_chars"):
        assert {"p50", "p90", "p99", "max"} <= set(m["stats"][key])
    share = m["text_share"]["passages"]
    assert 0 < share["padded"] <= share["packed"] <= 1
    # the ids are what a run's tokenize_fn computes: queries with their instruction, cut like embed.tokenize
    tok = transformers.AutoTokenizer.from_pretrained(model)
    p = Prepared(out)
    rows = p.rows(range(40), ("q_ids", "p_ids", "n_ids", "q_len"))
    items = [{"query": x.query, "instruction": x.instruction, "task": x.task, "positive": x.positive,
              "negatives": list(x.negatives)} for x in read_pairs(pairs)]
    queries, passages = _texts(items)
    assert rows["q_ids"] == tokenize(tok, queries, 8)
    assert rows["q_len"] == [len(t) for t in rows["q_ids"]]
    assert [t for i in range(40) for t in [rows["p_ids"][i]] + rows["n_ids"][i]] == tokenize(tok, passages, 12)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_folders_are_one_line_errors_naming_the_file(made, tmp_path, capsys):
    _, _, out = made
    # a missing shard file
    bad = _copy(out, str(tmp_path / "missing"))
    arrow = os.path.join(bad, "pairs-00001", "data-00000-of-00001.arrow")
    os.remove(arrow)
    with pytest.raises(MissingShardError, match=arrow):
        Prepared(bad)
    # a corrupt Arrow file (same size, so only the reader can tell)
    bad = _copy(out, str(tmp_path / "corrupt"))
    arrow = os.path.join(bad, "pairs-00000", "data-00000-of-00001.arrow")
    size = os.path.getsize(arrow)
    with open(arrow, "wb") as f:
        f.write(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    with pytest.raises(PreparedDataError, match=arrow):
        Prepared(bad)
    # a truncated one
    bad = _copy(out, str(tmp_path / "short"))
    arrow = os.path.join(bad, "pairs-00002", "data-00000-of-00001.arrow")
    with open(arrow, "r+b") as f:
        f.truncate(100)
    with pytest.raises(PreparedDataError, match="truncated"):
        Prepared(bad)
    # a corrupt manifest, no manifest, no folder
    bad = _copy(out, str(tmp_path / "manifest"))
    with open(os.path.join(bad, MANIFEST), "w") as f:
        f.write("{not json")
    with pytest.raises(PreparedDataError, match=os.path.join(bad, MANIFEST)):
        Prepared(bad)
    os.remove(os.path.join(bad, MANIFEST))
    with pytest.raises(MissingShardError, match="not a prepared folder"):
        Prepared(bad)
    with pytest.raises(InputPathError):
        Prepared(str(tmp_path / "nowhere"))
    # through bmr train: one line, exit code 2, before any model loads (model.name does not even exist)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tmp_path / 'no-model'}}}\ndata: {{prepared: {tmp_path / 'corrupt'}}}\n"
                   f"out: {tmp_path / 'run'}\n")
    capsys.readouterr()
    assert bmr(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt Arrow file" in err[0] and "pairs-00000" in err[0], err


def test_another_tokenizer_is_refused(made, tmp_path):
    model, _, out = made
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    same = transformers.AutoTokenizer.from_pretrained(model)
    check_tokenizer(out, manifest, same, model)  # no error
    other_dir = str(tmp_path / "other")
    other = save_tiny_tokenizer(other_dir)
    other.add_tokens(["brandnewword"])
    with pytest.raises(TokenizerMismatchError, match=os.path.join(out, MANIFEST)):
        check_tokenizer(out, manifest, other, other_dir)


def test_prepare_refuses_to_overwrite(made, tmp_path):
    _, pairs, _ = made
    out = str(tmp_path / "p")
    prepare([pairs], out, quiet=True)
    with pytest.raises(OSError, match="--overwrite"):
        prepare([pairs], out, quiet=True)
    m = prepare([pairs], out, quiet=True, overwrite=True)
    assert m["tokenizer"] is None and m["count"] == 40


def test_train_from_prepared_equals_train_from_pairs(made, tmp_path):
    """The loop fed by the grain loader (in-process) trains exactly as from the pairs file: same losses."""
    from bmretriever_jax.training import train

    model, pairs, out = made
    common = [f"model.name={model}", "model.max_length=12", "model.query_max_length=8", "train.global_batch_size=8",
              "train.log_every=1", "train.warmup_steps=1", "train.steps=3", "train.save_every=3", "mesh.data=1",
              "data.num_negatives=1", "data.workers=0"]
    losses = []
    for i, source in enumerate([f"data.train=[{pairs}]", f"data.prepared={out}"]):
        run_dir = tmp_path / f"run{i}"
        train(load_config(None, common + [source, f"out={run_dir}"]), quiet=True)
        losses.append([json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl") if "loss" in line])
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


def test_mine_writes_a_prepared_folder(made, tmp_path):
    """`bmr mine --out DIR` writes the prepared format: the same pairs as its JSONL output."""
    from bmretriever_jax.data.grain_loader import GrainPairLoader
    from bmretriever_jax.data.loader import PairLoader

    _, pairs, _ = made
    jsonl, folder = str(tmp_path / "mined.jsonl"), str(tmp_path / "mined")
    for out in (jsonl, folder):
        assert bmr(["-q", "mine", pairs, "--out", out, "--num-negatives", "2"]) == 0
    m = json.load(open(os.path.join(folder, MANIFEST)))
    assert m["count"] == 40 and m["stats"]["negatives_per_pair"]["p50"] >= 2
    mined = read_pairs(jsonl)
    a = PairLoader(mined, 8, seed=1, num_negatives=2)
    b = GrainPairLoader(folder, 8, seed=1, num_negatives=2)
    assert [next(a) for _ in range(6)] == [next(b) for _ in range(6)]
