"""Both quickstarts end to end with tiny random models (slow: a few minutes). `make quickstart` and
`make quickstart-synth` run the same code on Gemma 3 270M / SmolLM2; these catch wiring errors cheaply."""
import json
import os

import pytest
import yaml

from hf_tiny import tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_model_dir(str(tmp_path_factory.mktemp("tiny") / "model"))
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["max_position_embeddings"] = 2048  # room for the synth prompts (a passage + instructions)
    json.dump(cfg, open(cfg_path, "w"))
    return path


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tiny, tmp_path):
    from bmretriever_jax.recipes import quickstart

    out = str(tmp_path / "qs")
    assert quickstart.main(["--out", out, "--model", tiny, "--steps", "literature=2,consumer=1", "--skip-minilm",
                            "--scifact-docs", "400", "--eval-length", "48",
                            "--hard-negatives", "1", "--batch", "8"]) == 0
    # the table's vectors are at --eval-length, step 2's (untrained) at the training length: two SciFact caches
    lengths = sorted(json.load(open(os.path.join(out, "vector_cache", d, "manifest.json")))["key"]["max_length"]
                     for d in os.listdir(os.path.join(out, "vector_cache")) if d.startswith("scifact-400-"))
    train_length = yaml.safe_load(open(os.path.join(out, "literature", "config.yaml")))["model"]["max_length"]
    assert lengths == sorted([48, train_length])
    (pubmedqa_cache,) = [d for d in os.listdir(os.path.join(out, "vector_cache")) if d.startswith("pubmedqa_pqal-")]
    manifest = json.load(open(os.path.join(out, "vector_cache", pubmedqa_cache, "manifest.json")))
    assert manifest["key"]["max_length"] == train_length  # PubMedQA is encoded at the training length only
    assert json.load(open(os.path.join(out, "merged-st", "sentence_bert_config.json")))["max_seq_length"] == 48
    # SciFact and BIOSSES at --eval-length, PubMedQA at the training length; systems in order, the untrained
    # model (step 2, training length) before the merged one, fused rows last
    res = json.load(open(os.path.join(out, "eval.json")))
    assert {k: r.get("tokens") for k, r in res.items()} == {
        "bm25 | scifact-400": None, "bm25 | pubmedqa_pqal": None, "model | scifact-400": train_length,
        "merged | scifact-400": 48, "merged | pubmedqa_pqal": train_length, "merged | biosses.tsv": 48,
        "wsum(merged + bm25) | scifact-400": 48, "wsum(merged + bm25) | pubmedqa_pqal": train_length}
    assert list(res) == ["bm25 | scifact-400", "bm25 | pubmedqa_pqal", "model | scifact-400", "merged | scifact-400",
                         "merged | pubmedqa_pqal", "merged | biosses.tsv", "wsum(merged + bm25) | scifact-400",
                         "wsum(merged + bm25) | pubmedqa_pqal"]
    assert os.path.exists(os.path.join(out, "data", "consumer-hn1.jsonl"))
    for expert, steps in (("literature", 2), ("consumer", 1)):  # --steps, --batch, --hard-negatives reach the runs
        cfg = yaml.safe_load(open(os.path.join(out, expert, "config.yaml")))
        assert cfg["train"]["global_batch_size"] == 8 and cfg["data"]["num_negatives"] == 1
        assert cfg["train"]["steps"] == steps
    res = json.load(open(os.path.join(out, "eval.json")))
    fused = {k.split(" | ")[1]: r for k, r in res.items() if k.startswith("wsum(")}
    assert set(fused) == {"scifact-400", "pubmedqa_pqal"}  # retrieval sets only; weights from dev where there is one
    assert "chosen on dev" in fused["scifact-400"]["fusion"] and "default" in fused["pubmedqa_pqal"]["fusion"]
    for key, r in res.items():  # every row has its metric: NDCG@10 for retrieval, Spearman for BIOSSES
        if key.endswith("biosses.tsv"):
            assert -1.0 <= r["spearman"] <= 1.0, key
        else:
            assert 0.0 <= r["ndcg@10"] <= 1.0, key
    assert os.path.exists(os.path.join(out, "merged-st", "modules.json"))


def test_quickstart_refuses_an_eval_length_beyond_the_context_before_training(tiny, tmp_path, capsys):
    from bmretriever_jax.recipes import quickstart

    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(tmp_path / "qs"), "--model", tiny, "--scifact-docs", "400",
                         "--eval-length", "4096"])
    assert e.value.code == 2 and "--eval-length 4096: exceeds the model's context; allowed: 8 to 2048" in \
        capsys.readouterr().err
    assert not os.path.exists(tmp_path / "qs" / "literature")  # nothing trained


@pytest.mark.slow
def test_quickstart_synth_runs_end_to_end(tiny, tmp_path):
    from bmretriever_jax.util import paths
    from bmretriever_jax.recipes import quickstart_synth

    out = str(tmp_path / "qs")
    assert quickstart_synth.main(["--out", out, "--passages", "6", "--steps", "2", "--budget", "2", "--model", tiny,
                                  "--llm", tiny]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert 0 <= res["kept"] <= res["synthetic_claims"] == 6
    assert list(res["test"]) == ["untrained", "LoRA SciFact", "LoRA SciFact + synthetic",
                                 "LoRA SciFact + synthetic, searched instruction"]
    assert all(0.0 <= r["ndcg@10"] <= 1.0 for r in res["test"].values())
    assert res["searched_instruction"]
    # the synthetic claims never come from a document judged for a dev or test claim
    judged = set()
    for split in ("dev", "test"):
        with open(paths.shipped_data("scifact", "qrels", f"{split}.tsv")) as f:
            judged |= {line.split("\t")[1] for line in list(f)[1:]}
    corpus = [json.loads(line)["_id"] for line in open(os.path.join(out, "synth", "corpus.jsonl"))]
    assert len(corpus) == 6 and not judged & set(corpus)


def test_quickstart_steps_per_expert():
    from bmretriever_jax.recipes import quickstart

    assert quickstart.parse_steps("40") == {"literature": 40, "consumer": 40}
    assert quickstart.parse_steps("consumer=20") == {"consumer": 20}
    with pytest.raises(ValueError, match="unknown expert 'x'; allowed: literature, consumer"):
        quickstart.parse_steps("x=3")
    for bad in ("0", "-2", "ten", "consumer=0", "consumer="):
        with pytest.raises(ValueError, match="is not a step count; allowed: N or literature=N,consumer=M"):
            quickstart.parse_steps(bad)
    for size in quickstart.PROFILES.values():  # every profile names a step count for every expert
        assert set(size["steps"]) == set(quickstart.EXPERTS) and min(size["steps"].values()) > 0


def test_quickstart_mines_one_bm25_hard_negative_per_pair(tmp_path):
    """--hard-negatives N: each expert's pairs get N BM25 negatives from their own pool of positives."""
    from bmretriever_jax.recipes import quickstart
    from bmretriever_jax.data import builders
    from bmretriever_jax.data.pairs import read_pairs

    out = quickstart.mine_pairs(["scifact"], str(tmp_path / "data" / "literature-hn1.jsonl"), 1)
    pairs, built = read_pairs(out), builders.build("scifact")
    assert [(p.query, p.positive) for p in pairs] == [(p.query, p.positive) for p in built]
    assert all(len(p.negatives) == 1 and p.negatives[0] != p.positive for p in pairs)
    for bad in (["--hard-negatives", "-1"], ["--batch", "0"], ["--steps", "-2"], ["--steps", "x"],
                ["--steps", "medical=3"], ["--steps", "consumer=0"]):
        with pytest.raises(SystemExit):
            quickstart.main(bad)
