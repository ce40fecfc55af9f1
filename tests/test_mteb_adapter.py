"""The MTEB adapter: mteb.evaluate on a local task gives the same NDCG@10 as our own evaluation."""
import json
import os

import pytest

import mteb  # noqa: E402,F401  (the test extra installs it: missing is a failure)

from bmretriever_jax.embed import Encoder  # noqa: E402
from bmretriever_jax.eval.evaluate import evaluate_retrieval  # noqa: E402
from hf_tiny import WORDS, tiny_model_dir  # noqa: E402


def _tiny_beir(d, n_docs=40, n_queries=12):
    import random

    rng = random.Random(0)
    os.makedirs(os.path.join(d, "qrels"), exist_ok=True)
    docs = {f"d{i}": {"title": rng.choice(WORDS), "text": " ".join(rng.sample(WORDS, 6))} for i in range(n_docs)}
    with open(os.path.join(d, "corpus.jsonl"), "w") as f:
        for k, v in docs.items():
            f.write(json.dumps({"_id": k, **v}) + "\n")
    with open(os.path.join(d, "queries.jsonl"), "w") as f, open(os.path.join(d, "qrels", "test.tsv"), "w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for i in range(n_queries):
            target = f"d{rng.randrange(n_docs)}"
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(docs[target]["text"].split()[:3])}) + "\n")
            q.write(f"q{i}\t{target}\t1\n")
            q.write(f"q{i}\td{rng.randrange(n_docs)}\t2\n")
    return d


def test_mteb_equals_bmr_eval(tmp_path):
    import mteb

    from bmretriever_jax.eval.mteb_adapter import MTEBModel, local_retrieval_task, ndcg_at_10

    enc = Encoder.load(tiny_model_dir(str(tmp_path / "m")), max_length=16, dtype="float32")
    data = _tiny_beir(str(tmp_path / "beir"))
    ours = evaluate_retrieval(enc, data, "test", "scifact")["ndcg@10"]
    task = local_retrieval_task(data, "test", task="scifact", name="LocalTiny")
    res = mteb.evaluate(MTEBModel(enc), [task], cache=None, show_progress_bar=False)
    theirs = ndcg_at_10(res, "LocalTiny")
    assert 0.0 < ours < 1.0
    assert abs(ours - theirs) <= 1e-4, (ours, theirs)  # MTEB rounds its scores to 5 decimals
