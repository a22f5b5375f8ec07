"""Every model family through the real trainer: a checkpoint directory placed on disk trains, evaluates and
exports with no weight left unused, and the export reloads (strictly) to the same predictions."""
from __future__ import annotations

import json
import subprocess

import pytest
from trainer_util import REPO, env, final_json, run_train, write_recipe


def _predict_matches_training(tmp_path, out_dir, data="sample:dev"):
    model_dir = out_dir / "model"
    proc = subprocess.run(["python", "-m", "squad_ds.cli", "predict", data, "--model", str(model_dir),
                           "--out-dir", str(tmp_path / "pred")], env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((out_dir / "predictions.json").read_text())
    exported = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert trained == exported


@pytest.mark.parametrize("kind,unpad", [("relative_key", False), ("relative_key_query", True)])
@pytest.mark.slow
def test_relative_bert_checkpoint_trains_under_zero3_and_exports(tmp_path, kind, unpad):
    """Both relative types; relative_key_query on packed batches (data.unpad), which the exported model's
    predictions (packed again, from the saved recipe) must reproduce."""
    from tiny_models import relative_bert_state_dict, save_state_dict_checkpoint, tiny_bert_config

    from squad_ds.modeling.factory import load_qa_model, load_tokenizer

    tok = load_tokenizer("all-MiniLM-L6-v2")
    cfg = tiny_bert_config(kind, tokenizer=tok, max_position_embeddings=64)
    # The published layout: absolute position table present (ignored), no QA head (pretrained encoder only).
    ckpt = save_state_dict_checkpoint(tmp_path / "ckpt", cfg, relative_bert_state_dict(cfg, with_qa_head=False))
    tok.save_pretrained(ckpt)
    recipe = write_recipe(tmp_path / "r.yaml", ckpt, tmp_path / "out", output={"export": True},
                          train={"max_steps": 3, "activation_checkpointing": True}, data={"unpad": unpad})
    proc = run_train(recipe, ds_config="cpu_fp32_zero3")
    assert "f1" in final_json(proc)
    model = load_qa_model(str(tmp_path / "out" / "model"))  # strict: unused/missing weights would raise
    assert type(model).__name__ == "RelativeBertForQuestionAnswering"
    assert model.config.position_embedding_type == kind
    _predict_matches_training(tmp_path, tmp_path / "out")


@pytest.fixture(scope="module")
def xlnet_checkpoint(tmp_path_factory):
    from tiny_models import save_tiny_checkpoint, tiny_xlnet_config
    from tokenizers_util import build_xlnet_tokenizer, squad_sentences

    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.squad import load_squad

    texts = squad_sentences(load_squad(resolve_data_path("sample:train")), limit=3000)
    tok = build_xlnet_tokenizer(texts, vocab_size=2000)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("xlnet") / "ckpt", tiny_xlnet_config(tokenizer=tok), tok)


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_xlnet_trains_evaluates_and_exports(tmp_path, xlnet_checkpoint, version):
    data = {} if version == "1.1" else {"train_file": "sample:dev-v2", "eval_file": "sample:dev-v2"}
    recipe = write_recipe(tmp_path / "r.yaml", xlnet_checkpoint, tmp_path / "out", output={"export": True},
                          train={"max_steps": 3}, data=data)
    proc = run_train(recipe)
    metrics = final_json(proc)
    assert "f1" in metrics
    if version == "2.0":
        assert "HasAns_f1" in metrics or "NoAns_f1" in metrics
        assert (tmp_path / "out" / "null_odds.json").is_file()
    _predict_matches_training(tmp_path, tmp_path / "out", data.get("eval_file", "sample:dev"))
