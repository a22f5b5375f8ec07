"""A run's own logs made one clean series after a resume: train_log.jsonl and DeepSpeed's CSV monitor files are
cut back to the checkpoint a run resumes from (what a killed run logged after it is trained and logged again), and
the CSV files' first column is named for what it holds (DeepSpeed writes the sample count under "step")."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from squad_ds import atomic

# DeepSpeed's monitors place an event at the number of samples trained (engine.global_samples).
X_COLUMN = "samples"


def cut_train_log(log_file: Path, step: int) -> None:
    """Keep train_log.jsonl's lines up to `step` (the resumed checkpoint's); drop later ones and unreadable ones
    (a line half-written when the run was killed)."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic.write_text(log_file, "".join(line + "\n" for line in kept))


def _is_header(row: list[str]) -> bool:
    return len(row) == 2 and row[0] in ("step", X_COLUMN)


def tidy_monitor_csv(path: Path, upto: int | None = None) -> bool:
    """One monitor CSV as one series: the header once, first, its first column named "samples"; rows past `upto`
    samples (logged after the checkpoint a run resumes from), repeated headers (each process wrote its own) and
    half-written rows dropped. A file that does not start as DeepSpeed's CSV monitor writes is not touched: False."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not _is_header(rows[0]):
        return False
    kept = [[X_COLUMN, rows[0][1]]]
    for row in rows[1:]:
        if len(row) != 2 or _is_header(row):
            continue
        try:
            x, _ = int(row[0]), float(row[1])
        except ValueError:
            continue
        if upto is None or x <= upto:
            kept.append(row)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    if out.getvalue() != text:
        atomic.write_text(path, out.getvalue())
    return True


def tidy_monitor_dir(log_dir: Path, upto: int | None = None) -> list[str]:
    """tidy_monitor_csv on each *.csv of DeepSpeed's CSV monitor directory; the stems of the files it holds (its
    monitor writes their header once per process: a resumed run tells it these have one)."""
    return [p.stem for p in sorted(Path(log_dir).glob("*.csv")) if tidy_monitor_csv(p, upto)]
