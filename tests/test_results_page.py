"""docs/RESULTS.md and README.md's results section are exactly what `python bench/report.py` writes from the
committed records (bench/results.jsonl, bench/memory_fit.jsonl), so a page and its data cannot drift apart; every
record says when, on what, with which software and by which command it was measured. The plots are checked for
existence only: a PNG's bytes depend on the matplotlib that drew it."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import report  # noqa: E402

WORK_ITEMS = re.compile(r"\bsessions?\b|\bissues? ?#?\d|(?<![\w/])#\d+\b", re.I)
FIELDS = {"bench", "key", "date", "machine", "versions", "command", "config", "figures", "note"}


@pytest.fixture(scope="module")
def records():
    return report.load(report.RESULTS), report.load(report.MEMORY)


def test_the_results_page_is_what_the_generator_writes(records, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(report.page(*records), encoding="utf-8")
    assert out.read_text(encoding="utf-8") == report.PAGE.read_text(encoding="utf-8"), (
        "docs/RESULTS.md differs from the records: run `python bench/report.py` (never edit the page by hand)")


def test_readme_results_are_what_the_generator_writes(records):
    text = report.README.read_text(encoding="utf-8")
    assert report.readme(text, *records) == text, "README.md's results differ: run `python bench/report.py`"


def test_a_hand_edit_is_caught(records, tmp_path, monkeypatch):
    page = tmp_path / "RESULTS.md"
    page.write_text(report.page(*records).replace("2.31×", "2.41×"), encoding="utf-8")
    assert report.main(["--check", "--out", str(page)]) == 1


def test_every_record_says_when_where_what_ran_and_how(records):
    results, memory = records
    assert results and memory
    for r in results:
        assert set(r) == FIELDS, r.get("key")
        assert len(r["date"]) == 10 and r["date"][4] == "-", r["key"]
        assert r["machine"]["cpu"] and "load" in r["machine"], r["key"]
        assert {"python", "torch", "deepspeed", "transformers"} <= set(r["versions"]), r["key"]
        assert r["command"], r["key"]  # "not recorded" where the measurement did not keep it
    for r in memory:
        assert {"date", "machine", "peak_rss_bytes", "rc", "ds_config", "params"} <= set(r)


def test_the_plots_the_page_shows_exist():
    text = report.PAGE.read_text(encoding="utf-8")
    shown = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.strip().startswith("![")]
    assert shown and report.MEMORY_PLOT.name in " ".join(shown)
    for rel in shown:
        assert (report.PAGE.parent / rel).is_file(), rel


def test_the_newest_record_of_a_comparison_on_a_machine_is_shown():
    m = {"cpu": "AMD EPYC", "cores": 2, "flags": ["avx512_bf16"], "load": "quiet"}
    old = {"bench": "b", "key": "k", "date": "2026-01-01", "machine": m}
    new = {**old, "date": "2026-02-01"}
    other = {**old, "machine": {**m, "flags": ["amx_bf16"]}}
    assert report.current([old, new, other]) == [new, other]
    assert report.machine_label(m) == "2-core AMD EPYC (avx512_bf16, no AMX)"
    assert report.machine_label(other["machine"]) == "2-core AMD EPYC with AMX"
    assert report.num(59.785) == "59.79" and report.num(1234.5, 0) == "1,235"


def test_no_page_names_working_periods_or_work_items():
    """User-facing text speaks of the product: dates, machines, commands, commits; never sessions or issues."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").glob("*.md")),
             REPO / "launch" / "README.md"]
    bad = []
    for page in pages:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if WORK_ITEMS.search(line):
                bad.append(f"{page.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)
