"""Every encoder family people fine-tune for QA, kept proven (issue 26): a tiny random model of each, with a small
tokenizer of its real kind (tokenizers_util.build_family_tokenizer), trains through the real trainer under ZeRO-0
and ZeRO-3, evaluates, exports, reloads strictly with AutoModelForQuestionAnswering, and `squad-ds predict` from the
export gives training's predictions byte for byte; `squad-ds export --onnx` gives a graph equal to the PyTorch model
(every family here exports).
BERT, relative-position BERT and XLNet have their own tests (test_train.py, test_train_models.py)."""
from __future__ import annotations

import json
import subprocess

import pytest
from trainer_util import REPO, env, final_json, run_train, write_recipe

pytestmark = pytest.mark.slow  # about 15 s per run on 2 cores: CI runs them with -m slow

FAMILIES = ["roberta", "electra", "albert", "distilbert", "deberta-v2", "modernbert"]


def family_checkpoint(directory, family: str, **config):
    from tiny_models import save_tiny_checkpoint, tiny_config
    from tokenizers_util import build_family_tokenizer, squad_sentences

    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.squad import load_squad

    tok = build_family_tokenizer(family, squad_sentences(load_squad(resolve_data_path("sample:train")), 3000),
                                 vocab_size=1500)
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("pad", "cls", "sep", "bos", "eos")}
    extra = {f"{k}_token_id": v for k, v in ids.items() if v is not None}
    return save_tiny_checkpoint(directory, tiny_config(family, tokenizer=tok, **extra, **config), tok)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return request.param, family_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)


def _predict(tmp_path, model_dir, data="sample:dev"):
    proc = subprocess.run(["python", "-m", "squad_ds.cli", "predict", data, "--model", str(model_dir),
                           "--out-dir", str(tmp_path / "pred")], env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (tmp_path / "pred" / "predictions.json").read_text()


@pytest.mark.parametrize("stage, ds_config", [(0, "cpu_fp32"), (3, "cpu_fp32_zero3")])
def test_family_trains_exports_and_predicts_as_it_evaluated(tmp_path, checkpoint, stage, ds_config):
    family, ckpt = checkpoint
    recipe = write_recipe(tmp_path / "r.yaml", ckpt, tmp_path / "out", output={"export": True},
                          train={"max_steps": 3})
    proc = run_train(recipe, ds_config=ds_config)
    result = final_json(proc)
    assert "f1" in result and result["global_step"] == 3
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    model_dir = tmp_path / "out" / "model"
    model, info = AutoModelForQuestionAnswering.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info.values()), info  # strict: no weight missing, unexpected or mismatched
    assert AutoConfig.from_pretrained(model_dir).model_type == family
    assert _predict(tmp_path, model_dir) == (tmp_path / "out" / "predictions.json").read_text()


def test_family_exports_to_onnx(tmp_path, checkpoint):
    pytest.importorskip("onnxruntime", reason="export --onnx needs the onnx extra")
    family, ckpt = checkpoint
    recipe = write_recipe(tmp_path / "r.yaml", ckpt, tmp_path / "out", train={"max_steps": 1})
    run_train(recipe)
    proc = subprocess.run(["python", "-m", "squad_ds.cli", "export", str(tmp_path / "out"), "--out",
                           str(tmp_path / "m"), "--onnx"], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["onnx"] == str(tmp_path / "m" / "model.onnx")
    # The ONNX graph computes what the PyTorch model does, on a real question and context, at another batch and
    # length than the export traced.
    import numpy as np
    import onnxruntime
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    enc = tok(["Who sat?", "Where is the mat?"], ["The cat sat on the mat.", "The mat is in the hall, by the door."],
              padding=True, return_token_type_ids=True, return_tensors="np")
    session = onnxruntime.InferenceSession(str(tmp_path / "m" / "model.onnx"))
    wanted = [i.name for i in session.get_inputs()]
    start, end = session.run(None, {k: enc[k].astype(np.int64) for k in wanted})
    model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(enc[k]) for k in wanted})
    np.testing.assert_allclose(start, out.start_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(end, out.end_logits.numpy(), atol=1e-4)


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_packed_batches_train_like_the_windows_one_by_one(tmp_path, family):
    """data.unpad for RoBERTa (positions after the padding index) and ELECTRA, which share BERT's attention: a
    packed micro-batch of 12 trains exactly like 12 accumulated micro-batches of one window (no padding at all)."""
    from trainer_util import losses

    # Dropout 0: packed and one-by-one batches draw their dropout masks in other shapes.
    ckpt = family_checkpoint(tmp_path / "ckpt", family, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    alone = write_recipe(tmp_path / "alone.yaml", ckpt, tmp_path / "alone", data={"trim_padding": True},
                         train={"max_steps": 4, "micro_batch_size": 1, "gradient_accumulation_steps": 12,
                                "group_by_length": False})
    ref = final_json(run_train(alone))
    packed = write_recipe(tmp_path / "packed.yaml", ckpt, tmp_path / "packed",
                          data={"unpad": True, "pad_to_multiple_of": 16},
                          train={"max_steps": 4, "micro_batch_size": 12, "group_by_length": False})
    got = final_json(run_train(packed))
    a, b = losses(tmp_path / "alone"), losses(tmp_path / "packed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a), (a, b)
    assert got["f1"] == pytest.approx(ref["f1"], abs=1e-6) and got["exact_match"] == pytest.approx(ref["exact_match"],
                                                                                                   abs=1e-6)
