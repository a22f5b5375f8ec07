"""Reading and validating SQuAD v1.1 / v2.0 (SQuAD JSON, or the flat layouts formats.py reads) into typed examples.

Every structural problem is reported as a :class:`SquadFormatError` naming the file and the place
(article index and title, question id); nothing escapes as a bare KeyError/IndexError.
"""
from __future__ import annotations

import gc
import gzip
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, NamedTuple

from squad_ds.data import formats
from squad_ds.errors import SquadFormatError, json_problem

log = logging.getLogger(__name__)


# NamedTuples, not frozen dataclasses: a frozen dataclass's __init__ (object.__setattr__ per field) took
# more time than json.load when building the 88k train examples.
class Answer(NamedTuple):
    text: str
    start: int  # character offset into the context


class Example(NamedTuple):
    id: str
    title: str
    context: str
    question: str
    answers: tuple[Answer, ...]
    is_impossible: bool = False


@dataclass
class SquadDataset:
    path: str
    version: str  # "1.1" or "2.0"
    examples: list[Example]
    # ids of examples whose first answer's answer_start does not locate its text: usable for evaluation,
    # dropped from training.
    misaligned_ids: frozenset[str] = field(default_factory=frozenset)
    _warned_misaligned: bool = field(default=False, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.examples)

    def train_examples(self) -> list[Example]:
        """Examples usable as training targets (misaligned answers dropped, with one summary warning)."""
        if self.misaligned_ids and not self._warned_misaligned:
            # Warn here rather than on load: an eval-only load keeps every example and has nothing to report.
            self._warned_misaligned = True
            log.warning("%s: dropping %d of %d examples from training: answer_start does not locate the answer "
                        "text (first: %s)", self.path, len(self.misaligned_ids), len(self.examples),
                        ", ".join(sorted(self.misaligned_ids)[:5]))
        return [e for e in self.examples if e.id not in self.misaligned_ids]

    def content_sha256(self) -> str:
        """A key of the questions themselves, whatever file format they came in (the feature cache's)."""
        h = hashlib.sha256(self.version.encode())
        for e in self.examples:
            parts = [e.id, e.title, e.context, e.question, str(e.is_impossible)]
            parts += [f"{a.start}:{a.text}" for a in e.answers]
            h.update(("\x1e" + "\x1f".join(parts)).encode())
        return h.hexdigest()

    def by_id(self) -> dict[str, Example]:
        return {e.id: e for e in self.examples}

    def unlabelled_ids(self) -> list[str]:
        """Questions with no gold answer to score against: answerable (not is_impossible) and without answers.
        Only a file read with `labelled=False` can have them."""
        return [e.id for e in self.examples if not e.answers and not e.is_impossible]


def read_json(path: str | Path) -> Any:
    """Load JSON, gzip-compressed or not (recognised by its magic bytes, not its name); a failure names the file."""
    path = Path(path)
    if path.is_dir():
        raise SquadFormatError(f"{path}: a directory, not a SQuAD JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    try:
        # utf-8-sig: tolerate a byte-order mark, which json.load rejects.
        with opener(path, "rt", encoding="utf-8-sig") as f:
            return json.load(f)
    except (ValueError, OSError, EOFError, zlib.error) as e:  # ValueError: JSON's, UTF-8's and long numbers'
        raise SquadFormatError(f"{path}: not valid JSON{' (gzip)' if is_gzip else ''}: "
                               f"{json_problem(e) if isinstance(e, ValueError) else e}") from e
    except RecursionError:
        raise SquadFormatError(f"{path}: not SQuAD JSON: nested too deeply to read") from None


def _expect(cond: bool, path: Path, where: str, what: str) -> None:
    if not cond:
        raise SquadFormatError(f"{path}: {where}: {what}")


def _detect_version(raw: dict, path: Path) -> str:
    declared = str(raw.get("version", ""))
    if declared.startswith("v2") or declared.startswith("2"):
        return "2.0"
    if declared.startswith("1") or declared.startswith("v1"):
        return "1.1"
    # Undeclared: v2.0 is recognised by its is_impossible flags. Shapes are checked later, by parse_squad.
    def items(obj: Any, key: str) -> list:
        value = obj.get(key) if isinstance(obj, dict) else None
        return value if isinstance(value, list) else []

    for article in raw["data"]:
        for para in items(article, "paragraphs"):
            for qa in items(para, "qas"):
                if isinstance(qa, dict) and "is_impossible" in qa:
                    return "2.0"
    return "1.1"


def _valid_answer(a: Any) -> bool:
    return (isinstance(a, dict) and isinstance(a.get("text"), str) and isinstance(a.get("answer_start"), int)
            and not isinstance(a["answer_start"], bool))


def _parse_answers(qa: dict, context: str, path: Path, where: Any) -> tuple[tuple[Answer, ...], bool]:
    answers = qa.get("answers", [])
    _expect(isinstance(answers, list), path, where, "'answers' must be a list")
    for j, a in enumerate(answers):
        if not _valid_answer(a):  # the detailed checks run only for the answer that is wrong
            _expect(isinstance(a, dict), path, where, f"answer {j} must be an object")
            _expect("text" in a and isinstance(a["text"], str), path, where,
                    f"answer {j}: 'text' missing or not a string")
            _expect(False, path, where, f"answer {j}: 'answer_start' missing or not an integer")
    parsed = [Answer(a["text"], a["answer_start"]) for a in answers]
    # A negative start would slice from the end of the context and could match by accident; an empty text
    # matches anywhere and gives no span to train on.
    aligned = all(a.text != "" and 0 <= a.start and context[a.start:a.start + len(a.text)] == a.text
                  for a in parsed[:1])
    return tuple(parsed), aligned


def _fast_question(qa: Any, context: str, title: str, version: str, labelled: bool) -> tuple[Example, bool] | None:
    """The common, well-formed question without per-check overhead (88k of them in train); None when anything
    is irregular, so `_checked_question` can name the problem."""
    try:
        qid, question = qa["id"], qa["question"]
        impossible = qa.get("is_impossible", False)
        raw_answers = qa.get("answers", [])
        if (type(qid) is not str or not qid or type(question) is not str or not question.strip()
                or type(impossible) is not bool or type(raw_answers) is not list
                or (impossible and (version == "1.1" or raw_answers))
                or (labelled and not impossible and not raw_answers)):
            return None
        answers = tuple(Answer(a["text"], a["answer_start"]) for a in raw_answers)
        if not all(type(a.text) is str and type(a.start) is int for a in answers):
            return None
    except (TypeError, KeyError, AttributeError):
        return None
    first = answers[0] if answers else None
    aligned = first is None or (first.text != "" and first.start >= 0
                                and context[first.start:first.start + len(first.text)] == first.text)
    return Example(qid, title, context, question, answers, impossible), aligned


def _checked_question(qa: Any, qi: int, where_p: str, context: str, title: str, version: str, seen: set[str],
                      path: Path, labelled: bool) -> tuple[Example, bool]:
    _expect(isinstance(qa, dict), path, f"{where_p}, question {qi}", "must be an object")
    qid = qa.get("id")
    _expect(isinstance(qid, str) and qid != "", path, f"{where_p}, question {qi}", "missing 'id' string")
    where_q = f"{where_p}, question id {qid!r}"
    _expect(qid not in seen, path, where_q, "duplicate question id")
    question = qa.get("question")
    _expect(isinstance(question, str), path, where_q, "missing 'question' string")
    _expect(question.strip() != "", path, where_q, "empty question")
    impossible = qa.get("is_impossible", False)
    _expect(isinstance(impossible, bool), path, where_q, "'is_impossible' must be true or false")
    _expect(not (impossible and version == "1.1"), path, where_q,
            "unanswerable question (is_impossible) in a SQuAD v1.1 file")
    answers, aligned = _parse_answers(qa, context, path, where_q)
    if impossible:
        # The official v2.0 metric decides answerability by bool(answers): both flags must agree.
        _expect(not answers, path, where_q, "is_impossible question with non-empty 'answers'")
        aligned = True
    elif labelled:
        _expect(len(answers) > 0, path, where_q,
                "answerable question with no answers (set is_impossible for SQuAD v2.0; `squad-ds predict` reads "
                "unlabelled files)")
    return Example(qid, title, context, question, answers, impossible), aligned


def parse_squad(raw: Any, path: str | Path = "<memory>", labelled: bool = True) -> SquadDataset:
    """Validate a decoded SQuAD object and turn it into a :class:`SquadDataset`.

    `labelled=False` accepts questions without answers (a test file to predict on); every other check stays."""
    path = Path(path)
    _expect(isinstance(raw, dict), path, "top level", "expected a JSON object with a 'data' list")
    _expect(isinstance(raw.get("data"), list), path, "top level", "missing 'data' list")
    version = _detect_version(raw, path)
    examples: list[Example] = []
    misaligned: set[str] = set()
    seen: set[str] = set()
    for ai, article in enumerate(raw["data"]):
        where_a = f"article {ai}"
        _expect(isinstance(article, dict), path, where_a, "must be an object")
        title = article.get("title", "")
        _expect(isinstance(title, str), path, where_a, "'title' must be a string")
        where_a = f"article {ai} ({title!r})" if title else where_a
        paragraphs = article.get("paragraphs")
        _expect(isinstance(paragraphs, list), path, where_a, "missing 'paragraphs' list")
        for pi, para in enumerate(paragraphs):
            where_p = f"{where_a}, paragraph {pi}"
            _expect(isinstance(para, dict), path, where_p, "must be an object")
            context = para.get("context")
            _expect(isinstance(context, str), path, where_p, "missing 'context' string")
            _expect(context.strip() != "", path, where_p, "empty context")
            qas = para.get("qas")
            _expect(isinstance(qas, list), path, where_p, "missing 'qas' list")
            for qi, qa in enumerate(qas):
                parsed = _fast_question(qa, context, title, version, labelled)
                if parsed is None or parsed[0].id in seen:  # something is off: find it and say where
                    parsed = _checked_question(qa, qi, where_p, context, title, version, seen, path, labelled)
                example, aligned = parsed
                seen.add(example.id)
                if not aligned:
                    misaligned.add(example.id)
                examples.append(example)
    return SquadDataset(str(path), version, examples, frozenset(misaligned))


def load_squad(path: str | Path, labelled: bool = True, columns: Mapping[str, str] | None = None,
               split: str = "train") -> SquadDataset:
    """Read SQuAD v1.1 or v2.0: a SQuAD file (`.json` or `.json.gz`), or a flat layout that formats.py reads
    (JSON lines, Parquet, CSV, a Hugging Face dataset; `columns` renames its columns, `split` is the default split
    of a dataset with several). `labelled=False` also reads questions without answers (see parse_squad)."""
    # Hundreds of thousands of small acyclic objects: the cyclic collector would rescan them over and over (most
    # of the parse time on train-v1.1: 1.1 s, 0.34 s without it, 2-core CPU, 2026-11-26). Nothing here creates cycles.
    if columns and not formats.is_flat(path):
        raise SquadFormatError(f"{path}: data.columns renames the columns of flat files (JSON lines, CSV, Parquet, "
                               "Hugging Face datasets); a SQuAD JSON file has fixed keys: remove data.columns")
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        raw = formats.read_flat(path, columns, split) if formats.is_flat(path) else read_json(path)
        return parse_squad(raw, path, labelled)
    finally:
        if was_enabled:
            gc.enable()
