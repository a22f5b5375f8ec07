"""`squad-ds plot` reads a run directory as the trainer writes it (a resumed run's later loss lines win)."""
from __future__ import annotations

import json

import pytest

from squad_ds import plot as plot_run
from squad_ds.cli import main


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    (d / "eval-4").mkdir(parents=True)
    lines = [{"step": s, "loss": 5.0 - s / 4} for s in range(1, 7)] + [{"step": 5, "loss": 0.5}]  # resumed at 5
    (d / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "eval-4" / "eval_results.json").write_text(json.dumps({"exact_match": 10.0, "f1": 20.0}))
    (d / "eval_results.json").write_text(json.dumps({"exact_match": 30.0, "f1": 40.0}))
    (d / "effective_config.json").write_text(json.dumps({"plan": {"total_steps": 8}}))
    return d


def test_reads_losses_and_evaluations(run_dir):
    losses = plot_run.read_losses(run_dir)
    assert list(losses) == [1, 2, 3, 4, 5, 6] and losses[5] == 0.5
    assert plot_run.read_evals(run_dir) == {4: {"exact_match": 10.0, "f1": 20.0}, 8: {"exact_match": 30.0, "f1": 40.0}}
    assert plot_run.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_writes_a_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e '.[plot]'")
    out = plot_run.plot(run_dir, tmp_path / "plot.png", smooth=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command(run_dir, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e '.[plot]'")
    assert main(["plot", str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"png": str(run_dir / "training.png"), "steps": 6, "evaluations": 2}
    assert (run_dir / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_command_on_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no train_log.jsonl" in capsys.readouterr().err
