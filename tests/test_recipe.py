"""The recipe ablation study (`python -m bmretriever_jax.studies.recipe`) end to end at smoke size on a tiny model:
every row trains, evaluates alone and fused with BM25 on the three test sets, and a rerun resumes (trains nothing)."""
import json
import os

import pytest

from hf_tiny import tiny_model_dir

from bmretriever_jax.studies import recipe


@pytest.mark.slow
def test_recipe_smoke_every_row_and_resume(tmp_path, capsys):
    model = tiny_model_dir(str(tmp_path / "m"), "gemma3")
    cfg_path = os.path.join(model, "config.json")  # room for the recipe's 256-token passages (rotary positions)
    cfg = json.load(open(cfg_path))
    cfg["max_position_embeddings"] = 512
    json.dump(cfg, open(cfg_path, "w"))
    out = tmp_path / "r"
    assert recipe.main(["--smoke", "--model", model, "--out", str(out)]) == 0
    res = json.load(open(out / "results.json"))
    assert list(res["rows"]) == list(recipe.ROWS)
    names = [os.path.basename(d) for d in res["data"]]
    assert len(names) == 3
    for row in recipe.ROWS:
        for n in names:
            for kind in ("alone", "fused"):
                m = res["rows"][row][n][kind]
                assert 0 <= m["ndcg@10"] <= 1 and 0 <= m["recall@100"] <= 1, (row, n, kind)
    assert set(res["baselines"]) == {"bm25", "minilm"}
    # stage 1 ran once and the stage-2 rows after it started from its weights
    s1 = json.load(open(out / "stage1" / "done.json"))
    assert "model.name=" + str(out / "stage1") in json.load(open(out / "s1" / "done.json"))["overrides"]
    assert s1["config"] == "recipe/stage1-pretrain.yaml"
    # the hard-negative rows trained on mined pairs with one negative each
    first = json.loads(open(out / "data" / "all-hn1.jsonl").readline())
    assert len(first["negatives"]) == 1
    table = (out / "table.md").read_text()
    assert table.count("fused with BM25") == len(recipe.ROWS)
    # a rerun trains nothing and evaluates nothing: every row is in results.json
    mtime = os.path.getmtime(out / "s1" / "done.json")
    capsys.readouterr()
    assert recipe.main(["--smoke", "--model", model, "--out", str(out)]) == 0
    assert "--- train" not in capsys.readouterr().out
    assert os.path.getmtime(out / "s1" / "done.json") == mtime
    # the folder is bound to its sizes: a full-size run there is refused, not fed the smoke models
    with pytest.raises(SystemExit) as e:
        recipe.main(["--model", model, "--out", str(out)])
    assert e.value.code == 2 and "another --out" in capsys.readouterr().err


def test_status_reads_where_a_study_stands(tmp_path, capsys):
    """--status runs nothing: rows scored, stages trained or at their newest checkpoint, chunks encoded."""
    out = tmp_path / "r"
    assert recipe.main(["--status", "--out", str(out)]) == 0
    assert "no study here yet" in capsys.readouterr().out
    (out / "ft128").mkdir(parents=True)
    (out / "ft128" / "done.json").write_text("{}")
    (out / "stage1" / "checkpoints" / "40" / "state").mkdir(parents=True)
    (out / "stage1" / "checkpoints" / "20" / "state").mkdir(parents=True)
    (out / "stage1" / "checkpoints" / "60.orbax-checkpoint-tmp-7").mkdir()  # a save being written
    (out / "stage1" / "checkpoints" / "80" / "meta").mkdir(parents=True)  # no state/: not a checkpoint
    (out / "merge" / "literature" / "done.json").parent.mkdir(parents=True)
    (out / "merge" / "literature" / "done.json").write_text("{}")
    (out / "stage1" / "config.yaml").write_text("train: {steps: 300}\n")
    (out / "vector_cache" / "scifact-x").mkdir(parents=True)
    for i in range(3):
        (out / "vector_cache" / "scifact-x" / f"chunk_0000{i}.npy").write_bytes(b"")
    (out / "results.json").write_text(json.dumps({"model": "m", "sizes": {}, "baselines": {},
                                                  "rows": {"ft128": {}}, "seconds": {"ft128": 12.5}}))
    assert recipe.main(["--status", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  baselines: scored" in lines and "  ft128: scored (12.5 s)" in lines
    assert "  ft256: to do" in lines
    assert "  s1: to do (stage1 training: checkpoint at step 40 of 300)" in lines
    assert ("  merge: to do (stage1 training: checkpoint at step 40 of 300; merge/literature trained)"
            in lines)
    assert lines[-1] == "  vector cache: 1 corpus encodings, 3 chunks of 1,024 vectors"


def test_build_row_trains_in_the_folders_row_stages_names(tmp_path, monkeypatch):
    """build_row and --status read one map of a row's stage folders, and it is the layout earlier studies wrote
    (a study resumes from those folders)."""
    import argparse

    from bmretriever_jax.merging import folder as merging_folder

    assert {row: recipe.row_stages(row) for row in recipe.ROWS} == {
        "ft128": ["ft128"], "ft256": ["ft256"], "s1": ["stage1", "s1"], "hn": ["stage1", "hn"],
        "merge": ["stage1", "merge/literature", "merge/consumer", "merge/merged"]}
    seen = []

    def fake_train(config, out, overrides):
        os.makedirs(out, exist_ok=True)
        seen.append(os.path.relpath(out, tmp_path).replace(os.sep, "/"))
        return out

    monkeypatch.setattr(recipe, "train_stage", fake_train)
    monkeypatch.setattr(recipe, "mined", lambda names, out, limit=None: out)
    monkeypatch.setattr(merging_folder, "merge_to_folder", lambda spec, out: os.makedirs(out))
    a = argparse.Namespace(out=str(tmp_path), model="m")
    for row in recipe.ROWS:
        seen.clear()
        model = recipe.build_row(row, a, recipe.SIZES["smoke"])
        assert seen + (["merge/merged"] if row == "merge" else []) == recipe.row_stages(row), row
        assert os.path.relpath(model, tmp_path).replace(os.sep, "/") == recipe.row_stages(row)[-1]
