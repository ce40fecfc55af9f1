"""`bmr plot RUN_DIR` draws the loss curve (and dev NDCG@10) of a run's metrics.jsonl to PNG."""
import json

import pytest

from bmretriever_jax.cli import main as bmr
from bmretriever_jax.studies.plot import plot_run


def test_plot(tmp_path):
    rows = [{"step": s, "loss": 3.0 / s} for s in range(1, 11)] + [{"step": 10, "dev_ndcg@10": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = plot_run(str(tmp_path))
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert bmr(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists()


def test_plot_errors(tmp_path):
    assert bmr(["plot", str(tmp_path)]) == 2  # no metrics.jsonl: a clear error, exit code 2
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "dev_ndcg@10": 0.3}) + "\n")
    with pytest.raises(ValueError, match="no loss records"):
        plot_run(str(tmp_path))
