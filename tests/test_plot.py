"""`bmr plot DIR` draws the loss curve (and dev NDCG@10) of a run's metrics.jsonl to PNG, or of every run in a
folder of runs (`runs/quickstart` holds the experts `literature/` and `consumer/`) in one figure."""
import json

import pytest

from bmretriever_jax.cli import main as bmr
from bmretriever_jax.studies.plot import draw, find_runs, plot_run, read_metrics, run_curves
from bmretriever_jax.util.errors import DataFormatError, UserError

PNG = b"\x89PNG\r\n\x1a\n"


def _run(folder, scale=3.0, steps=10, dev=None):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": scale / s} for s in range(1, steps + 1)]
    rows += [{"step": s, "dev_ndcg@10": v} for s, v in (dev or [])]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_plot(tmp_path):
    _run(tmp_path, dev=[(10, 0.4)])
    out = plot_run(str(tmp_path))
    data = open(out, "rb").read()
    assert data[:8] == PNG and len(data) > 5000
    assert bmr(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists()


def test_plot_a_folder_of_runs_draws_a_line_per_run(tmp_path, capsys):
    """The quickstart's layout: two expert runs beside folders that are no runs (data, the merged model)."""
    qs = tmp_path / "runs" / "quickstart"
    _run(qs / "literature", 3.0, dev=[(5, 0.3), (10, 0.45)])
    _run(qs / "consumer", 2.0, steps=4)
    (qs / "merged").mkdir()
    (qs / "merged" / "config.json").write_text("{}")
    (qs / "data" / "scifact-800").mkdir(parents=True)
    _run(qs / "literature" / "checkpoints" / "10")  # inside a run: not a run of its own
    assert find_runs(str(qs)) == [str(qs / "consumer"), str(qs / "literature")]

    single, curves, empty = run_curves(str(qs))
    assert not single and not empty and list(curves) == ["consumer", "literature"]
    assert [r["step"] for r in curves["consumer"][0]] == [1, 2, 3, 4] and curves["consumer"][1] == []
    assert [r["dev_ndcg@10"] for r in curves["literature"][1]] == [0.3, 0.45]
    fig = draw(curves, "quickstart", single)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["consumer: train loss", "literature: train loss", "literature: dev NDCG@10"]
    assert fig.axes[1].get_ylabel() == "dev NDCG@10"  # the second axis
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["literature: dev NDCG@10"].get_ydata()) == [0.3, 0.45]
    assert lines["consumer: train loss"].get_color() != lines["literature: train loss"].get_color()

    assert bmr(["plot", str(qs)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(qs / "loss.png")
    data = (qs / "loss.png").read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    # one level up, the runs are named by their path under the folder given
    assert list(run_curves(str(tmp_path / "runs"))[1]) == ["quickstart/consumer", "quickstart/literature"]
    # a run given directly is plotted alone, as before
    single, curves, _ = run_curves(str(qs / "literature"))
    assert single and list(curves) == ["literature"]


def test_a_run_without_steps_yet_is_left_out_with_a_note(tmp_path, capsys):
    _run(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("")  # just started
    assert bmr(["plot", str(tmp_path)]) == 0
    assert f"{tmp_path / 'b'}: no loss records yet, left out" in capsys.readouterr().err
    assert list(run_curves(str(tmp_path))[1]) == ["a"]


def test_plot_errors(tmp_path, capsys):
    assert bmr(["plot", str(tmp_path)]) == 2  # an empty folder: a clear error, exit code 2
    err = capsys.readouterr().err
    assert err == f"bmr plot: error: {tmp_path}: no training run here (no metrics.jsonl in it or in its subfolders)\n"
    (tmp_path / "data").mkdir()  # a folder with subfolders but no run in any
    with pytest.raises(UserError, match="no training run here"):
        plot_run(str(tmp_path))
    assert bmr(["plot", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"bmr plot: error: {tmp_path / 'nope'}: no such folder\n"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "dev_ndcg@10": 0.3}) + "\n")
    with pytest.raises(ValueError, match="no loss records"):
        plot_run(str(tmp_path))
    for d in ("x", "y"):
        (tmp_path / "runs" / d).mkdir(parents=True)
        (tmp_path / "runs" / d / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match="none of the 2 runs under .* has no loss records"):
        plot_run(str(tmp_path / "runs"))


def test_metrics_lines_are_checked_but_a_cut_last_line_is_not_an_error(tmp_path):
    good = json.dumps({"step": 1, "loss": 2.0})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n{{\"step\": 2, \"lo")  # killed mid-write
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(DataFormatError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(str(tmp_path))
    assert bmr(["plot", str(tmp_path)]) == 2


def test_a_run_that_holds_runs_is_plotted_with_them(tmp_path):
    """`bmr train configs/quickstart.yaml` writes to runs/quickstart, where `make quickstart` put its experts."""
    qs = tmp_path / "quickstart"
    _run(qs / "literature")
    _run(qs, 1.0, dev=[(10, 0.5)])
    single, curves, _ = run_curves(str(qs))
    assert not single and sorted(curves) == ["literature", "quickstart"]
    assert plot_run(str(qs)) == str(qs / "loss.png")
