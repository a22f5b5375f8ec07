"""Shared fixtures. Full-SQuAD tests read $SQUAD_DIR (CI: SQUAD_DIR=../shared/squad) and skip only when it is absent."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A run that names no DeepSpeed config measures fp32 against bf16 at start-up (training/cpu_precision.py) and may
# take bf16 where the CPU does it faster. The suite's results must not depend on the CPU it runs on: fp32, unless
# the caller asks otherwise (SQUAD_DS_CPU_PRECISION=bf16 pytest ...). tests/test_cpu_precision.py tests the choice.
os.environ.setdefault("SQUAD_DS_CPU_PRECISION", "fp32")


@pytest.fixture(scope="session")
def squad_dir() -> Path:
    """The folder with the full SQuAD files (dev-v1.1.json, predictions/, …); skips when it is not there."""
    value = os.environ.get("SQUAD_DIR")
    if not value:
        pytest.skip("SQUAD_DIR is not set: full-SQuAD tests need it (e.g. SQUAD_DIR=../shared/squad)")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.is_dir():
        path = REPO_ROOT / path  # relative to the checkout when not relative to the working directory
    if not (path / "dev-v1.1.json").is_file():
        pytest.skip(f"SQUAD_DIR={value}: no dev-v1.1.json there (SQuAD data absent)")
    return path.resolve()


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def write_json(tmp_path):
    """write_json(name, obj) -> Path of a JSON file under tmp_path."""
    return lambda name, obj: _write_json(tmp_path / name, obj)


def _squad_json(*qas_per_paragraph, version="1.1", title="T", context="The cat sat on the mat.") -> dict:
    doc = {"data": [{"title": title, "paragraphs": [{"context": context, "qas": list(qas)}
                                                    for qas in qas_per_paragraph]}]}
    if version is not None:
        doc["version"] = version
    return doc


@pytest.fixture
def make_squad():
    """make_squad([qa, …], [qa, …], version="1.1"|"v2.0"|None, …) -> a minimal SQuAD dict, one paragraph per list."""
    return _squad_json


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA exists (the GPU check script runs them with `-m gpu`)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Short windows for asking tiny models: a SQuAD context spans several of them (tests/test_ask.py, test_serve.py).
ASK_WINDOWS = ["data.max_seq_length=64", "data.doc_stride=32", "data.max_query_length=16"]


@pytest.fixture(scope="session")
def ask_model(tmp_path_factory):
    """A tiny random BERT with the real uncased vocabulary, saved once for the ask and serve tests."""
    from trainer_util import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ask") / "model")


@pytest.fixture(scope="session")
def ask_qa(ask_model):
    from squad_ds.ask import QuestionAnswerer

    return QuestionAnswerer(ask_model, overrides=ASK_WINDOWS)


@pytest.fixture(scope="session")
def multihost_model(tmp_path_factory):
    """The tiny BERT the multi-host tests train (tests/test_multihost*.py)."""
    from trainer_util import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory, multihost_model):
    """One process, micro-batch 12, exported: what every two-host run (2 ranks x 6) must reproduce."""
    from trainer_util import run_train, write_recipe

    d = tmp_path_factory.mktemp("one_process")
    run_train(write_recipe(d / "r.yaml", multihost_model, d / "out", train={"micro_batch_size": 12},
                           output={"export": True}))
    return d / "out"


@pytest.fixture
def mount(tmp_path):
    """mount(dir, *options): a tmpfs or read-only bind mount at dir for the test (root only, as in CI)."""
    import subprocess

    mounted = []

    def do(target, *args):
        target.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount here (needs root): {proc.stderr.strip()}")
        mounted.append(target)
        return target

    yield do
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
