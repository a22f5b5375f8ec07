"""`squad-ds evaluate`: stdout JSON, --out-file, v2.0 options, and one-line errors with exit status 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from squad_ds.cli import main
from squad_ds.data.squad import load_squad
from squad_ds.sample_data import SAMPLE_DEV, SAMPLE_DEV_V2
from squad_ds.scoring.metrics import evaluate_files

REPO_ROOT = Path(__file__).resolve().parents[1]


def _gold_predictions(path) -> dict[str, str]:
    return {e.id: e.answers[0].text if e.answers else "" for e in load_squad(path).examples}


def _run_cli(launcher: list[str], *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([*launcher, "evaluate", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)


LAUNCHERS = {
    "python -m squad_ds.cli": [sys.executable, "-m", "squad_ds.cli"],
    "squad-ds": [shutil.which("squad-ds") or "squad-ds"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("prefix, data_name", [("1.1_", "dev-v1.1.json"), ("v2.0_", "dev-v2.0.reconstructed.json")])
def test_cli_subprocess_on_leaderboard_file(squad_dir, launcher, prefix, data_name):
    if launcher == "squad-ds" and not shutil.which("squad-ds"):
        pytest.skip("the squad-ds console script is not installed (pip install -e .)")
    data = squad_dir / data_name
    pred_path = sorted((squad_dir / "predictions").glob(prefix + "*.json"))[0]
    proc = _run_cli(LAUNCHERS[launcher], data, pred_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == evaluate_files(data, pred_path)
    assert proc.stdout.strip() == json.dumps(out)  # official key order
    assert list(out)[:2] == (["exact_match", "f1"] if prefix == "1.1_" else ["exact", "f1"])


def test_cli_warning_lines_go_to_stderr(tmp_path):
    preds = _gold_predictions(SAMPLE_DEV)
    n = len(preds)
    missing = next(iter(preds))
    del preds[missing]
    preds["not-a-real-id"] = "x"
    pred_path = tmp_path / "p.json"
    pred_path.write_text(json.dumps(preds))
    proc = _run_cli(LAUNCHERS["python -m squad_ds.cli"], SAMPLE_DEV, pred_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 predicted id(s) not in" in proc.stderr and "not-a-real-id" in proc.stderr
    assert f"1 unanswered question(s) will receive score 0 (first: {missing})" in proc.stderr
    assert json.loads(proc.stdout)["exact_match"] == pytest.approx(100.0 * (n - 1) / n)


def test_cli_gold_predictions_score_100_and_out_file(tmp_path, capsys):
    pred_path = tmp_path / "p.json"
    pred_path.write_text(json.dumps(_gold_predictions(SAMPLE_DEV)))
    out_file = tmp_path / "result.json"
    assert main(["evaluate", str(SAMPLE_DEV), str(pred_path), "-o", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"exact_match": 100.0, "f1": 100.0}
    assert out_file.read_text() == printed


def test_cli_v2_options(tmp_path, capsys):
    preds = _gold_predictions(SAMPLE_DEV_V2)
    pred_path, na_path = tmp_path / "p.json", tmp_path / "na.json"
    pred_path.write_text(json.dumps(preds))
    na_path.write_text(json.dumps({k: 0.9 if v else 0.1 for k, v in preds.items()}))  # backwards on purpose
    assert main(["evaluate", str(SAMPLE_DEV_V2), str(pred_path), "--na-prob-file", str(na_path),
                 "--na-prob-thresh", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["HasAns_exact"] == 0.0 and out["NoAns_exact"] == 100.0
    assert out["best_exact"] == 100.0 and out["best_exact_thresh"] == 0.9
    assert list(out)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]


def test_cli_v2_missing_predictions(tmp_path, capsys):
    preds = _gold_predictions(SAMPLE_DEV_V2)
    partial = dict(list(preds.items())[:100])
    pred_path = tmp_path / "p.json"
    pred_path.write_text(json.dumps(partial))
    assert main(["evaluate", str(SAMPLE_DEV_V2), str(pred_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"squad-ds evaluate: error: {len(preds) - 100} of {len(preds)} questions have no prediction")
    assert "--allow-missing" in err
    assert main(["evaluate", str(SAMPLE_DEV_V2), str(pred_path), "--allow-missing"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 100 and out["exact"] == 100.0


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "expected a JSON object"),
    ('{"x": 1}', "first bad entry: 'x': 1"),
    ("{oops", "not valid JSON"),
])
def test_cli_bad_prediction_file(tmp_path, capsys, content, match):
    pred_path = tmp_path / "p.json"
    pred_path.write_text(content)
    assert main(["evaluate", str(SAMPLE_DEV), str(pred_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("squad-ds evaluate: error: ") and str(pred_path) in err and match in err
    assert err.count("\n") == 1


def test_cli_missing_file(tmp_path, capsys):
    assert main(["evaluate", str(SAMPLE_DEV), str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["predictions", "data", "na_prob_file"])
def test_out_file_that_is_an_input_is_refused_and_the_input_kept(tmp_path, capsys, which):
    """`-o` naming a file the command reads overwrote it with the scores (the predictions were lost). Refused,
    naming it, with the input untouched."""
    data = tmp_path / "dev.json"
    shutil.copy(SAMPLE_DEV_V2, data)
    gold = {e.id: (e.answers[0].text if e.answers else "") for e in load_squad(data).examples}
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(gold))
    na = tmp_path / "na.json"
    na.write_text(json.dumps({k: 0.0 for k in gold}))
    target = {"predictions": preds, "data": data, "na_prob_file": na}[which]
    before = target.read_bytes()
    rc = main(["evaluate", str(data), str(preds), "--na-prob-file", str(na), "-o", str(target)])
    assert rc == 2
    assert "--out-file" in capsys.readouterr().err and target.read_bytes() == before
