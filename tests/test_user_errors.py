"""Bad input to every sub-command ends in one line naming the place, and exit status 2 — never a traceback."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys

import pytest
from trainer_util import REPO, env, make_tiny_model, write_recipe


# Sub-commands that leave no process-wide state behind run in this process: the same main() and error boundary as
# the console script, without a Python start-up and torch import per call (most of this file's time).
IN_PROCESS = {"config", "evaluate", "preprocess"}


def _cli(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    argv = [*map(str, args)]
    if argv[0] in IN_PROCESS and cwd is None:
        return _in_process(argv)
    return subprocess.run([sys.executable, "-m", "squad_ds.cli", *argv], env=env(), cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def _in_process(argv: list[str]) -> subprocess.CompletedProcess:
    from squad_ds.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _one_line(proc, prog: str, *parts: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"squad-ds {prog}: error: "), last
    for part in parts:
        assert part in last, (part, last)
    return last


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"version": "1.1", "data": []}))
    (tmp_path / "preds.json").write_text("{}")
    blob = bytearray(gzip.compress(json.dumps({"version": "1.1", "data": []}).encode() * 200))
    blob[10] = 0x07  # the first deflate block (after the 10-byte header): type 3, which does not exist
    (tmp_path / "bad.json.gz").write_bytes(bytes(blob))
    (tmp_path / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "latin1.json").write_bytes('{"version": "1.1", "data": [], "x": "caf\xe9"}'.encode("latin-1"))
    (tmp_path / "adir").mkdir()
    return tmp_path


def test_evaluate_errors(files):
    d = files
    _one_line(_cli("evaluate", d / "empty.json", d / "preds.json"), "evaluate", "empty.json", "no questions")
    _one_line(_cli("evaluate", d / "bad.json.gz", d / "preds.json"), "evaluate", "bad.json.gz", "not valid JSON")
    _one_line(_cli("evaluate", d / "nested.json", d / "preds.json"), "evaluate", "nested.json", "nested too deeply")
    _one_line(_cli("evaluate", d / "latin1.json", d / "preds.json"), "evaluate", "latin1.json", "utf-8")
    _one_line(_cli("evaluate", d / "adir", d / "preds.json"), "evaluate", "adir", "a directory")
    _one_line(_cli("evaluate", "sample:dev", d / "preds.json", "--out-file", d / "adir"), "evaluate",
              "--out-file", "a directory")


def test_sample_names_work_in_evaluate_and_preprocess(tmp_path):
    from squad_ds.data.squad import load_squad
    from squad_ds.sample_data import SAMPLE_DEV

    preds = {e.id: e.answers[0].text for e in load_squad(SAMPLE_DEV).examples}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    proc = _cli("evaluate", "sample:dev", tmp_path / "p.json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"exact_match": 100.0, "f1": 100.0}, proc.stderr
    proc = _cli("preprocess", "sample:dev", "--tokenizer", "all-MiniLM-L6-v2", "--split", "eval",
                "--max-seq-length", "128", "--doc-stride", "32", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0 and json.loads(proc.stdout)["features"] > 0, proc.stderr[-2000:]


def test_config_and_recipe_errors(tmp_path):
    _one_line(_cli("config", "tiny", "--set", "train.epochs=[1", "--num-features", "10"), "config",
              "train.epochs=[1", "not valid YAML")
    _one_line(_cli("config", "tiny", "--set", "train.epochs=1e400", "--num-features", "10"), "config",
              "train.epochs", "finite")
    _one_line(_cli("config", "tiny", "--set", "data.num_workers=0", "--num-features", "10"), "config",
              "data.num_workers")
    (tmp_path / "latin1.yaml").write_bytes('description: "caf\xe9"\n'.encode("latin-1"))
    _one_line(_cli("config", tmp_path / "latin1.yaml", "--num-features", "10"), "config", "latin1.yaml", "UTF-8")
    for name, ds in [("str_opt", {"optimizer": "adam"}), ("no_type", {"optimizer": {"params": {"lr": 1e-3}}}),
                     ("zero_list", {"zero_optimization": [2]})]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", **ds}))
        _one_line(_cli("config", "tiny", "--deepspeed_config", tmp_path / f"{name}.json", "--num-features", "10"),
                  "config", f"{name}.json")
    (tmp_path / "latin1.json").write_bytes('{"x": "caf\xe9"}'.encode("latin-1"))
    _one_line(_cli("config", "tiny", "--deepspeed_config", tmp_path / "latin1.json", "--num-features", "10"),
              "config", "latin1.json", "UTF-8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")  # 64 positions


def _train(recipe, *args):
    return subprocess.run([sys.executable, "-m", "squad_ds.train", "--recipe", str(recipe),
                           "--deepspeed_config", "cpu_fp32", *args], env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("data,expected", [
    ({"train_file": None}, ("data.train_file", "no file given")),
    ({"max_seq_length": 128, "doc_stride": 64}, ("data.max_seq_length=128", "64 positions")),
    ({"doc_stride": 50}, ("doc_stride=50", "must be smaller")),
])
def test_train_errors_before_training(tmp_path, tiny, data, expected):
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out", data=data)
    last = _one_line(_train(recipe), "train", *expected)
    assert not (tmp_path / "out" / "checkpoints").exists(), last


def test_training_on_misaligned_answers_counts_right(tmp_path, tiny):
    """Every answer off its context and data.max_train_examples set: the error said "0 questions gave no training
    window (3 answers do not match their context)"."""
    rows = tmp_path / "off.jsonl"
    rows.write_text("".join(json.dumps({"id": str(i), "title": "T", "context": "The cat sat on the mat.",
                                        "question": "Who sat?", "answers": {"text": ["dog"], "answer_start": [4]}})
                            + "\n" for i in range(3)))
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out",
                          data={"train_file": str(rows), "max_train_examples": 2})
    last = _one_line(_train(recipe), "train", "off.jsonl", "3 questions gave no training window",
                     "3 answers do not match their context")
    assert "0 questions" not in last


def test_columns_for_a_squad_json_file_are_refused():
    """data.columns renames flat files' columns; given for a SQuAD JSON file it was silently ignored."""
    from squad_ds.data.squad import load_squad
    from squad_ds.errors import SquadFormatError
    from squad_ds.sample_data import SAMPLE_DEV

    with pytest.raises(SquadFormatError, match="data.columns renames the columns of flat files"):
        load_squad(SAMPLE_DEV, columns={"question": "query"})


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
def test_predict_errors(tmp_path, tiny):
    import shutil

    (tmp_path / "empty.json").write_text(json.dumps({"version": "1.1", "data": []}))
    windows = ["--set", "data.max_seq_length=64", "--set", "data.doc_stride=32", "--set", "data.max_query_length=16"]
    _one_line(_cli("predict", tmp_path / "empty.json", "--model", tiny, "--out-dir", tmp_path / "p", *windows),
              "predict", "empty.json", "no questions")
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "squad_ds.json").write_text("{not json")
    _one_line(_cli("predict", "sample:dev", "--model", bad), "predict", "squad_ds.json", "--recipe")
    (bad / "squad_ds.json").write_text(json.dumps({"step": 3}))
    _one_line(_cli("predict", "sample:dev", "--model", bad), "predict", "squad_ds.json", "KeyError")
    (bad / "squad_ds.json").unlink()
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line(_cli("predict", "sample:dev", "--model", bad, *windows), "predict", "cannot load the model")


# ------------------------------------------------------------------------------------------ output paths

def test_export_to_a_file_system_root_is_refused():
    """`squad-ds export RUN --out /` ended in a ValueError traceback (the root has no name to stage beside)."""
    from squad_ds.errors import ConfigError
    from squad_ds.training.export import check_target

    with pytest.raises(ConfigError, match="--out /: a file-system root"):
        check_target("/")


def _fake_run(root):
    """What makes a folder a training run's, as far as the output checks look."""
    root.mkdir()
    (root / "checkpoints").mkdir()
    (root / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 4.0 - s / 10}) + "\n"
                                                  for s in range(1, 4)))
    (root / "eval_results.json").write_text(json.dumps({"exact_match": 50.0, "f1": 60.0}))
    return root


def _listing(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["file", "run", "model"])
def test_predict_refuses_an_out_dir_that_holds_something_else(tmp_path, tiny, where):
    """--out-dir naming a file was a FileExistsError traceback; naming a run folder or the model folder silently
    replaced the run's own eval_results.json and predictions.json. Refused before the model loads, left intact."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    target = {"file": tmp_path / "notes.txt", "run": tmp_path / "run", "model": model}[where]
    if where == "file":
        target.write_text("mine")
    elif where == "run":
        _fake_run(target)
    before = _listing(tmp_path)
    windows = ["--set", "data.max_seq_length=64", "--set", "data.doc_stride=32", "--set", "data.max_query_length=16"]
    _one_line(_cli("predict", "sample:dev", "--model", model, "--out-dir", target, *windows), "predict",
              "--out-dir", str(target))
    assert _listing(tmp_path) == before


def test_predict_into_the_current_folder_writes_there_and_keeps_what_is_there(tmp_path, tiny):
    """--out-dir . (the output path a user types most): the predictions land in the current folder, beside the
    user's files, which stay as they were."""
    (tmp_path / "notes.txt").write_text("mine")
    windows = ["--set", "data.max_seq_length=64", "--set", "data.doc_stride=32", "--set", "data.max_query_length=16"]
    proc = _cli("predict", "sample:dev", "--model", tiny, "--out-dir", ".", *windows, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "predictions.json").is_file() and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("out", ["training.txt", "train_log.jsonl"])
def test_plot_refuses_an_out_that_is_not_a_png(tmp_path, out):
    """A --out without the .png suffix was matplotlib's ValueError traceback (and, for a supported suffix, would
    have overwritten whatever file was named)."""
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    before = _listing(run)
    _one_line(_cli("plot", run, "--out", run / out), "plot", "--out", ".png")
    assert _listing(run) == before


def test_ask_with_a_run_folder_as_the_model_says_so(tmp_path):
    """--model RUN_DIR (no config.json there) was transformers' ValueError traceback."""
    run = _fake_run(tmp_path / "run")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "context": "c"}) + "\n")
    _one_line(_cli("ask", "--model", run, "--input", tmp_path / "q.jsonl"), "ask", str(run), "squad-ds export")


def test_tune_refuses_an_out_dir_that_is_a_file(tmp_path, tiny):
    """--out-dir naming a file was a FileExistsError traceback (after the features were built)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out")
    (tmp_path / "notes.txt").write_text("mine")
    _one_line(_cli("tune", recipe, "--deepspeed_config", "cpu_fp32", "--out-dir", tmp_path / "notes.txt"), "tune",
              "--out-dir", "notes.txt", "not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _full_disk(tmp_path, mount):
    disk = mount(tmp_path / "disk", "-t", "tmpfs", "-o", "size=1m", "tmpfs")
    with open(disk / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * (2 << 20))
    return disk


def test_predict_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny, mount):
    """The error named no file ("cannot write : no space left on the device") and left the empty folder behind."""
    disk = _full_disk(tmp_path, mount)
    windows = ["--set", "data.max_seq_length=64", "--set", "data.doc_stride=32", "--set", "data.max_query_length=16"]
    last = _one_line(_cli("predict", "sample:dev", "--model", tiny, "--out-dir", disk / "p", *windows), "predict",
                     str(disk / "p" / "predictions.json"), "no space left")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"], last


def test_preprocess_onto_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, tiny, mount):
    """The cache is what preprocess makes: a full disk was a warning, exit 0, and an empty folder left behind."""
    disk = _full_disk(tmp_path, mount)
    windows = ["--max-seq-length", "64", "--doc-stride", "32", "--max-query-length", "16"]
    last = _one_line(_cli("preprocess", "sample:dev", "--tokenizer", tiny, "--cache-dir", disk / "c" / "d", *windows),
                     "preprocess", "--cache-dir", "no space left")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"], last


def test_preprocess_with_a_file_as_cache_dir_is_one_line(tmp_path, tiny):
    (tmp_path / "notes.txt").write_text("mine")
    windows = ["--max-seq-length", "64", "--doc-stride", "32", "--max-query-length", "16"]
    for where in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):
        _one_line(_cli("preprocess", "sample:dev", "--tokenizer", tiny, "--cache-dir", where, *windows),
                  "preprocess", "--cache-dir", "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_plot_onto_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, mount):
    """The error named no file ("cannot write : no space left on the device") and left an empty x.png behind."""
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    disk = _full_disk(tmp_path, mount)
    last = _one_line(_cli("plot", run, "--out", disk / "x.png"), "plot", str(disk / "x.png"), "no space left")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"], last


def test_tune_onto_a_full_disk_names_the_file(tmp_path, tiny, mount):
    """The error named no file: "cannot write : no space left on the device"."""
    disk = _full_disk(tmp_path, mount)
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out")
    _one_line(_cli("tune", recipe, "--deepspeed_config", "cpu_fp32", "--stages", "0", "--max-micro", "1",
                   "--variants", "none", "--out-dir", disk / "t"), "tune", f"{disk / 't'}/", "no space left")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_result_onto_a_full_stdout_is_one_line_naming_it(tmp_path):
    """`squad-ds plot RUN > /dev/full` (and ask, predict…): the error said "cannot write : no space left"."""
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "plot", str(run)], env=env(), cwd=REPO,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=180)
    _one_line(proc, "plot", "cannot write the standard output", "no space left")


def test_export_under_a_file_is_refused(tmp_path):
    """`export --out FILE/model` was a NotADirectoryError traceback, after the model had loaded."""
    from squad_ds.errors import ConfigError
    from squad_ds.training.export import check_target

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt is a file, not a folder"):
        check_target(tmp_path / "notes.txt" / "model")


@pytest.mark.parametrize("command", ["predict", "plot", "tune"])
def test_an_output_path_under_a_file_is_one_line(tmp_path, tiny, command):
    """A folder on the output path that is a file: NotADirectoryError / FileExistsError tracebacks."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    windows = ["--set", "data.max_seq_length=64", "--set", "data.doc_stride=32", "--set", "data.max_query_length=16"]
    if command == "plot":
        pytest.importorskip("matplotlib")
        args = ["plot", _fake_run(tmp_path / "run"), "--out", notes / "x.png"]
    elif command == "predict":
        args = ["predict", "sample:dev", "--model", tiny, "--out-dir", notes / "p", *windows]
    else:
        args = ["tune", write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out"), "--deepspeed_config", "cpu_fp32",
                "--out-dir", notes / "t"]
    _one_line(_cli(*args), command, f"{notes} is a file, not a folder")
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("where", ["run", "model"])
def test_tune_refuses_an_out_dir_that_holds_something_else(tmp_path, tiny, where):
    """--out-dir naming a training run's folder or a model folder: tune wrote trials.json, trials.md and trials/
    among the run's or the model's own files. Refused, left intact (a budget that launches nothing keeps the
    test short either way)."""
    import shutil

    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out")
    if where == "run":
        target = _fake_run(tmp_path / "run")
    else:
        target = tmp_path / "model"
        shutil.copytree(tiny, target)
        (target / "squad_ds.json").write_text("{}")
    before = _listing(tmp_path)
    _one_line(_cli("tune", recipe, "--deepspeed_config", "cpu_fp32", "--budget-s", "1e-9", "--variants", "none",
                   "--out-dir", target), "tune", "--out-dir", str(target))
    assert _listing(tmp_path) == before and not (target / "trials").exists()


def test_tune_onto_a_full_disk_leaves_nothing_it_created(tmp_path, tiny, mount):
    """A tune that failed on a full disk left its --out-dir a/b with an empty trials/00-z0-m1/ folder behind."""
    disk = _full_disk(tmp_path, mount)
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out")
    _one_line(_cli("tune", recipe, "--deepspeed_config", "cpu_fp32", "--stages", "0", "--max-micro", "1",
                   "--variants", "none", "--out-dir", disk / "a" / "t"), "tune", "no space left")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_predict_onto_a_full_disk_removes_every_folder_it_created(tmp_path, tiny, mount):
    """--out-dir a/b/c with a and b new: a failed predict removed c and left a/b behind."""
    disk = _full_disk(tmp_path, mount)
    (disk / "kept").mkdir()
    windows = ["--set", "data.max_seq_length=64", "--set", "data.doc_stride=32", "--set", "data.max_query_length=16"]
    for out in (disk / "a" / "b" / "c", disk / "kept" / "b" / "c"):
        _one_line(_cli("predict", "sample:dev", "--model", tiny, "--out-dir", out, *windows), "predict",
                  "no space left")
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "kept"]
        assert not any((disk / "kept").iterdir())  # a folder that was there stays, emptied of nothing


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_onnx_export_onto_a_full_or_read_only_disk_names_the_file_and_leaves_nothing(tmp_path, tiny, mount, disk):
    """On a full disk the ONNX writer's OSError named no file ("cannot write : no space left") and a half-written
    model.onnx stayed behind."""
    pytest.importorskip("onnx")
    from squad_ds.errors import disk_error
    from squad_ds.training.export import export_onnx

    if disk == "full":
        target = _full_disk(tmp_path, mount)
    else:
        target = mount(tmp_path / "ro", "--bind", str(tmp_path / "ro"))
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(OSError) as e:
        export_onnx(tiny, target / "model.onnx")
    assert e.value.filename == str(target / "model.onnx")
    assert disk_error(e.value, target / "model.onnx") is not None
    assert sorted(p.name for p in target.iterdir()) == before
