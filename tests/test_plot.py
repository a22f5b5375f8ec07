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


def test_unreadable_parts_are_skipped_counted_and_the_rest_drawn(run_dir, capsys):
    """A truncated, garbage or incomplete log line, a non-numeric eval-* directory, a corrupt eval_results.json and a
    final result without a readable plan were tracebacks; now each is skipped, counted, and the rest is drawn."""
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e '.[plot]'")
    with open(run_dir / "train_log.jsonl", "ab") as f:
        f.write(b'{"step": 7, "loss": 1.0}\n{"step": 8, "lo\n\xff\xfe garbage\n{"step": 9}\n[1, 2]\n')
    (run_dir / "eval-latest").mkdir()
    (run_dir / "eval-latest" / "eval_results.json").write_text("{}")
    (run_dir / "eval-6").mkdir()
    (run_dir / "eval-6" / "eval_results.json").write_text('{"f1": 5')
    (run_dir / "effective_config.json").write_text("{not json")
    assert main(["plot", str(run_dir)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result == {"png": str(run_dir / "training.png"), "steps": 7, "evaluations": 1, "skipped": 7}
    assert "skipped 7 unreadable" in captured.err and "train_log.jsonl line 9" in captured.err
    assert (run_dir / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_out_naming_a_directory_is_refused(run_dir, tmp_path, capsys):
    """`--out EXISTING_DIR` wrote DIR.png and reported DIR."""
    assert main(["plot", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "a directory" in capsys.readouterr().err
    assert not (tmp_path.parent / f"{tmp_path.name}.png").exists()
