"""Data beyond SQuAD's nested JSON: JSON-lines, Parquet and CSV files in the flat Hugging Face layout (`id, title,
context, question, answers{text[], answer_start[]}`), and Hugging Face datasets by name (`hf:rajpurkar/squad`,
`hf:rajpurkar/squad_v2@validation`) or saved with `save_to_disk`.

Rows are regrouped into SQuAD's nested object (articles by title, paragraphs by context) and go through the same
parser as a SQuAD file, so every format gets the same checks and the same typed examples; the feature cache is keyed
by the examples' content, so the same questions in any format share one cache entry. A row with empty answers makes
the data SQuAD v2.0 (an unanswerable question), as in `rajpurkar/squad_v2` — unless no row has an answer: then, as
for rows without an answers column, the questions are unlabelled (predicted, not scored).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import sys
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from squad_ds.errors import ModelLoadError, SquadFormatError

COLUMNS = ("id", "title", "context", "question", "answers")
FLAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".csv", ".csv.gz")
HF_PREFIX = "hf:"


def is_flat(source: str | os.PathLike) -> bool:
    """A source this module reads (anything else is SQuAD JSON)."""
    s = str(source)
    return s.startswith(HF_PREFIX) or s.lower().endswith(FLAT_SUFFIXES) or is_saved_dataset(s)


def is_saved_dataset(source: str) -> bool:
    """A folder written by save_to_disk, named alone or as DIR@SPLIT."""
    def saved(p: Path) -> bool:
        return p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))

    return saved(Path(source)) or ("@" in source and saved(Path(source.rpartition("@")[0])))


def read_flat(source: str | os.PathLike, columns: Mapping[str, str] | None = None, split: str = "train") -> dict:
    """The SQuAD object (`{"version", "data": [...]}`) for a flat source; `columns` maps the layout's names to
    the data's (`{"question": "query"}`); `split` is the default split of a dataset with several."""
    names = {c: (columns or {}).get(c, c) for c in COLUMNS}
    unknown = set(columns or {}) - set(COLUMNS)
    if unknown:
        raise SquadFormatError(f"data.columns: unknown {', '.join(sorted(unknown))} (the layout's columns are "
                               f"{', '.join(COLUMNS)})")
    return to_squad(_rows(str(source), split), str(source), names)


def _rows(source: str, split: str) -> Iterable[Mapping[str, Any]]:
    low = source.lower()
    if source.startswith(HF_PREFIX) or is_saved_dataset(source):
        return _hf_rows(source, split)
    if low.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_rows(Path(source))
    if low.endswith(".parquet"):
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise SquadFormatError(f"{source}: reading Parquet needs pyarrow: pip install \"squad-ds[datasets]\"") \
                from None
        try:
            return pq.read_table(source).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise SquadFormatError(f"{source}: not a readable Parquet file ({type(e).__name__}: "
                                   f"{str(e).strip()[:200]})") from None
    return _csv_rows(Path(source))


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8-sig") if gz else open(path, encoding="utf-8-sig")


def _decoded(path: Path, lines: Iterable) -> Iterable:
    """`lines` of a text file, its decoding and decompression errors as the package's one line naming the file."""
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise SquadFormatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise SquadFormatError(f"{path}: a damaged or truncated gzip file ({type(e).__name__}: {e})") from None


def _jsonl_rows(path: Path) -> Iterable[Mapping[str, Any]]:
    with _open_text(path) as f:
        for n, line in enumerate(_decoded(path, f), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SquadFormatError(f"{path}, line {n}: not valid JSON: {e}") from None
                if not isinstance(row, dict):
                    raise SquadFormatError(f"{path}, line {n}: a row must be a JSON object with the columns "
                                           f"{', '.join(COLUMNS)}, got {type(row).__name__}")
                yield row


def _csv_rows(path: Path) -> Iterable[Mapping[str, Any]]:
    """CSV cannot nest: `answers` holds the JSON object ({"text": [...], "answer_start": [...]}) as text."""
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # contexts may be longer than csv's 131,072 characters
    with _open_text(path) as f:
        reader = csv.DictReader(_decoded(path, f))
        try:
            for row in reader:
                yield {**row, "_line": reader.line_num}
        except csv.Error as e:
            raise SquadFormatError(f"{path}, line {reader.line_num}: not valid CSV: {e}") from None


def _hf_rows(source: str, default_split: str) -> Iterable[Mapping[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise SquadFormatError(f"{source}: Hugging Face datasets need the datasets extra: "
                               "pip install \"squad-ds[datasets]\"") from None
    name, _, split = source.removeprefix(HF_PREFIX).rpartition("@") if "@" in source else (source.removeprefix(
        HF_PREFIX), "", "")
    try:
        if source.startswith(HF_PREFIX) and not Path(name).is_dir():
            ds = datasets.load_dataset(name, split=split or default_split)
        else:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                split = split or default_split
                if split not in ds:
                    raise SquadFormatError(f"{source}: no split {split!r} (it has {', '.join(ds)}); name one as "
                                           f"{name}@SPLIT")
                ds = ds[split]
            elif split and str(ds.split or "") != split:
                raise SquadFormatError(f"{source}: a dataset saved without splits: no split {split!r} (name the "
                                       f"folder alone, {name})")
    except SquadFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - the datasets library's errors differ by cause and release
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "")
        hint = " (offline: only datasets already in the Hugging Face cache can be read)" if offline else ""
        raise ModelLoadError(f"{source}: could not load the dataset: {type(e).__name__}: {first[:300]}{hint}") \
            from None
    return iter(ds)


def _answers(row: Mapping[str, Any], col: str, where: str) -> tuple[list[str], list[int]]:
    answers = row.get(col)
    if isinstance(answers, str):  # CSV (or a string column): the JSON object as text
        try:
            answers = json.loads(answers) if answers.strip() else {"text": [], "answer_start": []}
        except json.JSONDecodeError as e:
            raise SquadFormatError(f"{where}: column {col!r} is not the JSON of an answers object: {e}") from None
    if not isinstance(answers, Mapping):
        raise SquadFormatError(f"{where}: column {col!r} must be an object {{text: [...], answer_start: [...]}}, "
                               f"got {type(answers).__name__}")
    texts, starts = answers.get("text"), answers.get("answer_start")
    if isinstance(texts, str) and isinstance(starts, (int, float)) and not isinstance(starts, bool):
        texts, starts = [texts], [starts]  # one answer given as one object
    if texts is not None and not isinstance(texts, (list, tuple)):
        raise SquadFormatError(f"{where}: answers.text must be a list of strings, got {type(texts).__name__}")
    texts = list(texts or [])
    if texts and starts is None:
        raise SquadFormatError(f"{where}: answers have text but no answer_start (the character offsets in the "
                               "context are needed to train on them)")
    if starts is not None and not isinstance(starts, (list, tuple)):
        raise SquadFormatError(f"{where}: answer_start must be a list of integers, got {type(starts).__name__}")
    starts = list(starts or [])
    if len(texts) != len(starts):
        raise SquadFormatError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start offsets")
    if not all(isinstance(t, str) for t in texts) or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and float(v).is_integer() for v in starts):
        raise SquadFormatError(f"{where}: answer_start must hold integers and text strings, got {starts!r} and "
                               f"{texts!r}"[:400])
    return texts, [int(v) for v in starts]


def to_squad(rows: Iterable[Mapping[str, Any]], source: str, names: Mapping[str, str]) -> dict:
    articles: dict[str, dict[str, list]] = {}
    any_unanswerable = any_answered = False
    n = 0
    for n, row in enumerate(rows, 1):
        line = row.get("_line")
        where = f"{source}, {'line ' + str(line) if line else 'row ' + str(n)}"
        missing = [c for c in ("id", "context", "question") if row.get(names[c]) in (None, "")]
        if missing:
            raise SquadFormatError(f"{where}: no {', '.join(repr(names[c]) for c in missing)} (columns: "
                                   f"{', '.join(str(k) for k in row if k != '_line')}; map others with data.columns)")
        where = f"{where} (id {row[names['id']]!r})"
        for c in ("context", "question"):
            if not isinstance(row[names[c]], str):
                raise SquadFormatError(f"{where}: {names[c]!r} must be text, got {type(row[names[c]]).__name__}")
        qa: dict[str, Any] = {"id": str(row[names["id"]]), "question": row[names["question"]]}
        if row.get(names["answers"]) is not None:  # no answers column: a question to predict, not to score
            texts, starts = _answers(row, names["answers"], where)
            qa["answers"] = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
            any_answered = any_answered or bool(texts)
            if not texts:
                qa["is_impossible"] = True
                any_unanswerable = True
        title = str(row.get(names["title"]) or "")
        articles.setdefault(title, {}).setdefault(row[names["context"]], []).append(qa)
    if n == 0:
        raise SquadFormatError(f"{source}: no rows")
    if any_unanswerable and not any_answered:  # every answers list empty: questions without labels, as no column
        for paras in articles.values():
            for qas in paras.values():
                for qa in qas:
                    qa.pop("is_impossible", None)
                    qa.pop("answers", None)
        any_unanswerable = False
    data = [{"title": t, "paragraphs": [{"context": c, "qas": qas} for c, qas in paras.items()]}
            for t, paras in articles.items()]
    return {"version": "v2.0" if any_unanswerable else "1.1", "data": data}
