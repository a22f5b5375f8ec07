"""Ask a model a question: extractive question answering on (question, context) pairs, for any local
question-answering checkpoint (a squad-ds export, another `AutoModelForQuestionAnswering` directory,
relative-position BERT, XLNet's beam heads).

    from squad_ds import QuestionAnswerer
    qa = QuestionAnswerer("runs/demo/model")
    qa("Who wrote it?", "It was written by Ann.")            # -> Answer(text="Ann", start=18, end=21, score=…)
    qa(["Who?", "When?"], [context1, context2], top_k=3)     # -> [[Answer, …], [Answer, …]]

The windows, the model pass and the post-processing are evaluation's own (data/features.py,
training/inference.py, scoring/postprocess.py): an answer is what `squad-ds predict` gives for the same question in
a SQuAD file, under the same settings (the recipe the model was exported with, else the default recipe).
"""
from __future__ import annotations

import json
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from squad_ds.model_record import model_record, recipe_for_model
from squad_ds.errors import ConfigError, QuestionError, json_problem
from squad_ds.scoring.postprocess import is_placeholder

# Bounds on one question and one context, in characters: a question is a sentence, a context a document (SQuAD's
# longest context is about 25,000 characters); longer input is refused rather than windowed for minutes.
MAX_QUESTION_CHARS = 1_000
MAX_CONTEXT_CHARS = 200_000


@dataclass(frozen=True)
class Answer:
    """One answer span: its text and [start, end) character offsets in the context, and its probability among the
    n-best. SQuAD v2.0 models may abstain: text "", start and end None, `abstained` True; `null_odds` is the
    no-answer score minus the best span's (abstains above eval.null_score_diff_threshold)."""
    text: str
    start: int | None
    end: int | None
    score: float
    abstained: bool | None = None  # None: a SQuAD v1.1 model, which always answers
    null_odds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("start", "end")}


def _version_2(version: str | None, recipe, record: dict | None) -> bool:
    """SQuAD v2.0 (the model may abstain): as given; else the recipe's data.version; else whether the model's
    record was scored on v2.0 (its scores hold HasAns_*); else v1.1."""
    chosen = version or recipe.data.version
    if chosen is None and record:
        chosen = "2.0" if any(k.startswith("HasAns_") for k in record.get("metrics") or {}) else None
    if chosen not in (None, "1.1", "2.0"):
        raise ConfigError(f"version {chosen!r}: SQuAD versions are 1.1 and 2.0")
    return chosen == "2.0"


# Unicode categories that carry nothing a tokenizer keeps: separators (spaces, line and paragraph separators),
# control and format characters (NUL, zero-width spaces, the BOM) and combining marks with nothing to combine with.
# Text made only of these is empty in effect (BERT's tokenizer drops every one: zero tokens). Private-use and
# unassigned code points count as content: a newer emoji than this Python's Unicode tables is still text.
_NOT_CONTENT = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Mc", "Me"})
MAX_ID_CHARS = 1_000


def _not_unicode(value: str) -> str | None:
    """Why `value` is not Unicode text (a lone surrogate: JSON's "\\ud800", or a byte that was not UTF-8, which
    Python's surrogateescape turns into one), else None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not Unicode text (a lone surrogate U+{ord(value[e.start]):04X} at character {e.start})"
    return None


def checked_text(name: str, value: Any, limit: int, i: int | None) -> str:
    """`value` if it is usable text for `name` (question or context), else a QuestionError naming it. The one check
    of a question and a context for the Python API, `ask` and `serve`: text (a str), at most `limit` characters,
    Unicode (no lone surrogate), and not empty in effect (something besides spaces, control, format and
    combining characters)."""
    where = name if i is None else f"{name} {i}"
    _check_string(value, limit, where, "text")
    if all(unicodedata.category(ch) in _NOT_CONTENT for ch in value):
        raise QuestionError(f"{where}: empty" + (" in effect (only spaces, control, format or combining characters)"
                                                 if value else ""))
    return value


def checked_id(value: Any) -> Any:
    """An id to echo with an answer: absent (None), a whole number, or Unicode text of at most MAX_ID_CHARS."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    _check_string(value, MAX_ID_CHARS, "id", "text or a whole number")
    return value


def _check_string(value: Any, limit: int, where: str, expected: str) -> None:
    """A str of at most `limit` characters with no lone surrogate, else a QuestionError naming `where`."""
    if not isinstance(value, str):
        raise QuestionError(f"{where}: expected {expected}, got {type(value).__name__}")
    if len(value) > limit:
        raise QuestionError(f"{where}: {len(value):,} characters, more than the {limit:,} allowed")
    problem = _not_unicode(value)
    if problem:
        raise QuestionError(f"{where}: {problem}")


def check_top_k(top_k: Any, n_best: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_best:
        raise QuestionError(f"top_k={top_k!r}: a whole number from 1 to eval.n_best_size ({n_best})")
    return top_k


class QuestionAnswerer:
    """A question-answering model loaded once (CPU, or the GPU when there is one), answering (question, context)
    pairs with evaluation's windows and post-processing. Thread-safe: one call at a time runs the model."""

    def __init__(self, model: str | Path, *, recipe: str | None = None, overrides: Sequence[str] = (),
                 version: str | None = None, device: str | None = None):
        import torch

        from squad_ds.data.batching import trim_policy
        from squad_ds.modeling.factory import check_max_seq_length, load_qa_model, load_tokenizer
        from squad_ds.modeling.heads import model_family
        from squad_ds.training.engine import prepare_model

        self.model_dir = str(model)
        self.recipe = recipe_for_model(self.model_dir, recipe, list(overrides))
        self.version_2 = _version_2(version, self.recipe, model_record(self.model_dir))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_max_seq_length(self.model_dir, self.recipe.data.max_seq_length)
        self.tokenizer = load_tokenizer(self.model_dir)
        torch.manual_seed(self.recipe.train.seed)  # a checkpoint without a QA head gets predict's random one
        self.model = load_qa_model(self.model_dir, attn_implementation=self.recipe.model.attn_implementation)
        self.model.to(self.device).eval()
        prepare_model(self.model, self.recipe, train=False)
        self.family = model_family(self.model.config)
        self._trim = trim_policy(self.recipe.data, self.device.type == "cuda")
        self._lock = threading.Lock()

    def __call__(self, question: str | Sequence[str], context: str | Sequence[str], *, top_k: int = 1):
        """One question: an Answer (top_k=1) or its top_k Answers, best first. Lists of questions and contexts
        (pairwise, or one context for every question): a list of those, in order."""
        single = isinstance(question, str)
        if not single and not isinstance(question, (list, tuple)):
            raise QuestionError(f"question: expected text or a list of texts, got {type(question).__name__}")
        questions = [question] if single else list(question)
        if isinstance(context, str):
            contexts = [context] * len(questions)
        elif isinstance(context, (list, tuple)) and not single:
            contexts = list(context)
        else:
            raise QuestionError(f"context: expected text{'' if single else ' or a list of texts'}, got "
                                f"{type(context).__name__}")
        if len(contexts) != len(questions):
            raise QuestionError(f"{len(questions)} questions and {len(contexts)} contexts: give one context for "
                                "each question, or one for all")
        answers = self.answer_many(questions, contexts, top_k=top_k)
        out = [a[0] if top_k == 1 else a for a in answers]
        return out[0] if single else out

    def answer_many(self, questions: Sequence[str], contexts: Sequence[str], *, top_k: int = 1) -> list[list[Answer]]:
        """The top_k Answers of each (question, context) pair, best first, in one batched pass."""
        from squad_ds.data.features import featurize
        from squad_ds.data.squad import Example
        from squad_ds.modeling.sdpa import sdpa_preference
        from squad_ds.training.inference import postprocess, predict_arrays

        check_top_k(top_k, self.recipe.eval.n_best_size)
        one = len(questions) == 1
        examples = [Example(str(i), "", checked_text("context", c, MAX_CONTEXT_CHARS, None if one else i),
                            checked_text("question", q, MAX_QUESTION_CHARS, None if one else i), ())
                    for i, (q, c) in enumerate(zip(questions, contexts))]
        if not examples:
            return []
        d, ev = self.recipe.data, self.recipe.eval
        with self._lock:
            feats = featurize(examples, self.tokenizer, max_seq_length=d.max_seq_length, doc_stride=d.doc_stride,
                              max_query_length=d.max_query_length, split="eval", num_workers=1, progress=False)
            with sdpa_preference(self.recipe.model.sdpa_backend):
                arrays = predict_arrays(self.model, feats, self.family, ev.batch_size, self.device, self._trim,
                                        show_progress=False)
        preds = postprocess(examples, feats, arrays, self.family, ev, self.version_2, self.model.config)
        return [self._answers(e.id, preds, top_k) for e in examples]

    def _answers(self, qid: str, preds, top_k: int) -> list[Answer]:
        odds = preds.null_odds.get(qid) if self.version_2 and preds.null_odds else None
        predicted = preds.predictions[qid]
        abstained = (predicted == "") if self.version_2 else None
        ranked = []
        for entry in preds.nbest[qid]:
            if is_placeholder(entry):
                continue
            null = self.version_2 and entry["text"] == "" and list(entry["offsets"]) == [0, 0]
            ranked.append(Answer(text=entry["text"], start=None if null else int(entry["offsets"][0]),
                                 end=None if null else int(entry["offsets"][1]),
                                 score=float(entry["probability"]), abstained=null if self.version_2 else None,
                                 null_odds=odds))
        # The prediction first (on v2.0 the threshold may choose a span over a likelier null, or the reverse).
        chosen = next((a for a in ranked if a.text == predicted and (a.abstained or not abstained)), None)
        if chosen is None:  # no valid span at all: evaluation predicts ""
            chosen = Answer("", None, None, 0.0, abstained, odds)
        rest = [a for a in ranked if a is not chosen]
        return [chosen, *rest][:top_k]


def result_document(question: str, answers: list[Answer], qid: Any = None) -> dict[str, Any]:
    """One question's answers as `ask` and `serve` print them: the best one's fields, then the alternatives."""
    out = {"id": qid} if qid is not None else {}
    out.update(question=question, **answers[0].to_dict())
    if len(answers) > 1:
        out["alternatives"] = [a.to_dict() for a in answers[1:]]
    return out


def read_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, {question, context[, id]}) from a JSON-lines file, or stdin for "-"; a line that is not such
    an object, or whose question or context is not usable text, is a QuestionError naming the line."""
    import sys

    try:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as e:
        raise QuestionError(f"--input {path}: {e.strerror or e}") from None
    try:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.removeprefix("\ufeff") if n == 1 else line)  # stdin's byte-order mark
            except ValueError as e:
                raise QuestionError(f"{path}, line {n}: not JSON ({json_problem(e)})") from None
            except RecursionError:
                raise QuestionError(f"{path}, line {n}: not JSON (nested too deeply)") from None
            if not isinstance(row, dict) or "question" not in row or "context" not in row:
                raise QuestionError(f"{path}, line {n}: expected an object with \"question\" and \"context\"")
            try:
                checked_text("question", row["question"], MAX_QUESTION_CHARS, None)
                checked_text("context", row["context"], MAX_CONTEXT_CHARS, None)
                checked_id(row.get("id"))
            except QuestionError as e:
                raise QuestionError(f"{path}, line {n}: {e}") from None
            yield n, row
    except UnicodeDecodeError as e:
        raise QuestionError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    finally:
        if f is not sys.stdin:
            f.close()


def ask_command(model: str, *, question: str | None, context: str | None, context_file: str | None,
                input_path: str | None, top_k: int, version: str | None, recipe: str | None,
                overrides: list[str], emit: Callable[[dict], None], chunk: int = 64) -> int:
    """`squad-ds ask`: one question (--question with --context or --context-file), or JSON lines of
    {question, context[, id]} (--input FILE, or - for stdin); one JSON document per question through `emit`."""
    if (question is None) == (input_path is None):
        raise ConfigError("give --question (with --context or --context-file), or --input FILE with JSON lines of "
                          "{\"question\", \"context\"}")
    if question is not None and (context is None) == (context_file is None):
        raise ConfigError("--question needs one of --context TEXT and --context-file FILE")
    if input_path is not None and (context is not None or context_file is not None):
        raise ConfigError("--input rows carry their own contexts: drop --context / --context-file")
    if context_file is not None:
        try:
            context = Path(context_file).read_text(encoding="utf-8")
        except OSError as e:
            raise QuestionError(f"--context-file {context_file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise QuestionError(f"--context-file {context_file}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                                f"{e.start})") from None
    if question is not None:  # before the model loads: a bad argument answers at once
        checked_text("--question", question, MAX_QUESTION_CHARS, None)
        checked_text("--context-file" if context_file else "--context", context, MAX_CONTEXT_CHARS, None)
    qa = QuestionAnswerer(model, recipe=recipe, overrides=overrides, version=version)
    if question is not None:
        emit(result_document(question, qa.answer_many([question], [context], top_k=top_k)[0]))
        return 0
    rows: list[tuple[int, dict]] = []

    def flush() -> None:
        answers = qa.answer_many([r["question"] for _, r in rows], [r["context"] for _, r in rows], top_k=top_k)
        for (_, row), a in zip(rows, answers):
            emit(result_document(row["question"], a, row.get("id")))
        rows.clear()

    for n, row in read_rows(input_path):
        rows.append((n, row))
        if len(rows) >= chunk:
            flush()
    if rows:
        flush()
    return 0
