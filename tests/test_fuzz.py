"""Property-based fuzzing of every reader of user input: any input either works or raises one of the package's user
errors (errors.USER_ERRORS: one line, exit 2), never another exception. Readers: the data files of every flat
format and SQuAD JSON, recipes and `--set`, the DeepSpeed JSON and `--ds-set`, `plot`'s log reader and the
checkpoint marker.

Bounded: each property runs FUZZ_EXAMPLES examples (default 60; FUZZ_EXAMPLES=1000 for a longer hunt), no deadline.
Hypothesis prints the failing input and a `@reproduce_failure` blob to replay it; the seed of a run is printed by
pytest's hypothesis plugin with `--hypothesis-show-statistics`, and `--hypothesis-seed=N` replays a whole run.
"""
from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from squad_ds.errors import USER_ERRORS  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True) | st.text(
    max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=5), max_leaves=12)
# Rows that look like the flat layout, with any value in any column: the interesting near-misses.
COLUMNS = ("id", "title", "context", "question", "answers")
answers_like = st.fixed_dictionaries({}, optional={"text": json_values | st.lists(st.text(max_size=8), max_size=3),
                                                   "answer_start": json_values | st.lists(st.integers(-5, 50),
                                                                                          max_size=3)})
rows = st.dictionaries(st.sampled_from(COLUMNS), json_values | st.text(max_size=30) | answers_like, max_size=5)


def works_or_user_error(call):
    try:
        call()
    except USER_ERRORS:
        pass


def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="squad-ds-fuzz-"))


@FUZZ
@given(lines=st.lists(rows | json_values, min_size=0, max_size=6), suffix=st.sampled_from([".jsonl", ".jsonl.gz"]))
def test_json_lines_files(lines, suffix):
    import gzip

    from squad_ds.data.squad import load_squad

    path = _workdir() / f"data{suffix}"
    text = "".join(json.dumps(r) + "\n" for r in lines).encode()
    path.write_bytes(gzip.compress(text) if suffix.endswith(".gz") else text)
    works_or_user_error(lambda: load_squad(str(path)))


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".csv", ".csv.gz", ".json",
                                                             ".json.gz", ".parquet"]))
def test_arbitrary_bytes_in_every_format(data, suffix):
    from squad_ds.data.squad import load_squad

    path = _workdir() / f"data{suffix}"
    path.write_bytes(data)
    works_or_user_error(lambda: load_squad(str(path)))


@FUZZ
@given(header=st.lists(st.sampled_from(COLUMNS) | st.text(string.ascii_letters, max_size=6), max_size=6),
       body=st.lists(st.lists(st.text(max_size=20) | json_values.map(json.dumps), max_size=6), max_size=4))
def test_csv_files(header, body):
    import csv

    from squad_ds.data.squad import load_squad

    path = _workdir() / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    works_or_user_error(lambda: load_squad(str(path)))


squad_like = st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries({}, optional={
    "title": json_values, "paragraphs": st.lists(st.fixed_dictionaries({}, optional={
        "context": json_values | st.text(max_size=30), "qas": st.lists(st.fixed_dictionaries({}, optional={
            "id": json_values, "question": json_values | st.text(max_size=10), "is_impossible": json_values,
            "answers": json_values | st.lists(answers_like, max_size=2)}), max_size=3) | json_values}),
        max_size=3) | json_values}), max_size=3) | json_values}, optional={"version": json_values})


@FUZZ
@given(doc=squad_like | json_values)
def test_squad_json_files(doc):
    from squad_ds.data.squad import load_squad

    path = _workdir() / "data.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    works_or_user_error(lambda: load_squad(str(path)))


keys = st.sampled_from(["train.lr", "train.max_steps", "data.max_seq_length", "data.columns.question", "model.name",
                        "train.report_to", "train.seed", "output.dir", "eval.n_best_size", "data", "train",
                        "model.fused_dropout", "train.optimizer", "bogus.key"]) | st.text(max_size=15)
values = st.text(max_size=15) | json_values.map(json.dumps)


@FUZZ
@given(overrides=st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=20),
                          max_size=3))
def test_recipe_set_overrides(overrides):
    from squad_ds.config import load_recipe

    works_or_user_error(lambda: load_recipe("demo", overrides))


@FUZZ
@given(recipe=st.dictionaries(st.sampled_from(["model", "data", "train", "eval", "output", "bogus"]),
                              json_values, max_size=4) | json_values)
def test_recipe_files(recipe):
    from squad_ds.config import load_recipe

    path = _workdir() / "r.yaml"
    path.write_text(json.dumps(recipe), encoding="utf-8")  # JSON is YAML
    works_or_user_error(lambda: load_recipe(str(path), []))


ds_keys = st.sampled_from(["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                           "gradient_clipping", "optimizer.type", "optimizer.params.lr", "optimizer.params.betas",
                           "optimizer.params.eps", "optimizer.params.weight_decay", "scheduler.type",
                           "scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps",
                           "scheduler.params.warmup_type", "zero_optimization.stage", "bf16.enabled",
                           "fp16.enabled", "zero_optimization.offload_optimizer.device", "optimizer",
                           "zero_optimisation.stage"]) | st.text(max_size=12)


@FUZZ
@given(overrides=st.lists(st.tuples(ds_keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=3),
       doc=st.none() | st.dictionaries(ds_keys, json_values, max_size=4) | json_values)
def test_deepspeed_json_and_ds_set(overrides, doc):
    from squad_ds.training.assemble import resolve_run

    ds = "cpu_fp32"
    if doc is not None:
        path = _workdir() / "ds.json"
        path.write_text(json.dumps(doc), encoding="utf-8")
        ds = str(path)
    works_or_user_error(lambda: resolve_run("demo", [], ds, world_size=1, cuda=False, ds_overrides=overrides)
                        .plan(1000))


@FUZZ
@given(log=st.binary(max_size=200) | st.lists(json_values, max_size=5).map(
    lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode()),
       evals=st.dictionaries(st.text(string.ascii_letters + string.digits, min_size=1, max_size=4),
                             st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()), max_size=3),
       config=st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()))
def test_plot_readers(log, evals, config):
    from squad_ds import plot

    run = _workdir()
    (run / "train_log.jsonl").write_bytes(log)
    for name, body in evals.items():
        (run / f"eval-{name}").mkdir()
        (run / f"eval-{name}" / "eval_results.json").write_bytes(body)
    (run / "eval_results.json").write_bytes(b'{"f1": 1.0}')
    (run / "effective_config.json").write_bytes(config)
    works_or_user_error(lambda: (plot.read_losses(run, []), plot.read_evals(run, [])))


@FUZZ
@given(body=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()) | st.dictionaries(
    st.sampled_from(["sha256", "best", "step"]), json_values | st.dictionaries(
        st.sampled_from(["model.pt", "../outside", "/etc/hostname", "x"]), json_values), max_size=3).map(
    lambda d: json.dumps(d).encode()))
def test_checkpoint_marker(body):
    from squad_ds.training import checkpoint, export

    ckpt = _workdir() / "checkpoints"
    tag = ckpt / checkpoint.tag_for(2)
    tag.mkdir(parents=True)
    (tag / checkpoint.MARKER).write_bytes(body)
    problem = checkpoint.check(tag)
    assert problem is None or isinstance(problem, str)
    works_or_user_error(lambda: checkpoint.find_resume("auto", ckpt))
    works_or_user_error(lambda: export.locate(str(ckpt.parent), best=True))


@FUZZ
@given(lines=st.lists(st.fixed_dictionaries({}, optional={"question": json_values | st.text(max_size=20),
                                                          "context": json_values | st.text(max_size=40),
                                                          "id": json_values}) | json_values, max_size=5),
       tail=st.binary(max_size=20))
def test_ask_input_lines(lines, tail):
    """`squad-ds ask --input`: every row either reads as a question with its context or is a one-line error."""
    from squad_ds.ask import read_rows

    path = _workdir() / "in.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in lines).encode() + tail)
    works_or_user_error(lambda: list(read_rows(str(path))))
