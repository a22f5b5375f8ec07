"""Relative-position BERT: equations vs an independent float64 reference, strict loading, export, checkpointing,
DeepSpeed (ZeRO 0 and 3) on CPU."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import relative_bert_state_dict, save_state_dict_checkpoint, save_tiny_checkpoint, tiny_bert_config

from squad_ds.modeling.factory import ModelLoadError, load_qa_model, qa_model_class, qa_model_from_config
from squad_ds.modeling.relative_bert import RelativeBertForQuestionAnswering

TYPES = ("relative_key", "relative_key_query")


def reference_logits(sd: dict, config, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT QA forward in float64, straight from the equations (Shaw et al. 2018; Huang et al. 2020, method 4):
    s_lr = (q_l·k_r + q_l·a_lr [+ k_r·a_lr]) / √d, a_lr = E[l - r + M - 1]; no absolute position embedding."""
    w = {k: v.double() for k, v in sd.items()}
    eps, heads, m = config.layer_norm_eps, config.num_attention_heads, config.max_position_embeddings
    b, n = input_ids.shape
    d = config.hidden_size // heads

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    x = w["bert.embeddings.word_embeddings.weight"][input_ids] + \
        w["bert.embeddings.token_type_embeddings.weight"][token_type_ids]
    x = ln(x, "bert.embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{t}").view(b, n, heads, d).transpose(1, 2)
                   for t in ("query", "key", "value"))
        table = w[p + "attention.self.distance_embedding.weight"]
        a = torch.stack([torch.stack([table[l - r + m - 1] for r in range(n)]) for l in range(n)])  # [n, n, d]
        s = torch.zeros(b, heads, n, n, dtype=torch.float64)
        for l in range(n):
            for r in range(n):
                s[:, :, l, r] = (q[:, :, l] * k[:, :, r]).sum(-1) + (q[:, :, l] * a[l, r]).sum(-1)
                if config.position_embedding_type == "relative_key_query":
                    s[:, :, l, r] += (k[:, :, r] * a[l, r]).sum(-1)
        s = s / math.sqrt(d)
        s = s.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        ctx = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, heads * d)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = ln(lin(h, p + "output.dense") + x, p + "output.LayerNorm")
    logits = lin(x, "qa_outputs")
    return logits[..., 0], logits[..., 1]


def _batch(vocab=128, b=3, n=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    types = torch.zeros(b, n, dtype=torch.long)
    types[:, 5:] = 1
    return ids, mask, types


def _published_checkpoint(tmp_path, ptype, **kw):
    config = tiny_bert_config(ptype)
    sd = relative_bert_state_dict(config, **kw)
    return save_state_dict_checkpoint(tmp_path / ptype, config, sd), config, sd


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ptype", TYPES)
def test_matches_float64_reference_with_padding(tmp_path, ptype, attn):
    path, config, sd = _published_checkpoint(tmp_path, ptype)
    model = load_qa_model(str(path), attn_implementation=attn)
    assert isinstance(model, RelativeBertForQuestionAnswering)
    assert model.config._attn_implementation == attn
    ids, mask, types = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ref_start, ref_end = reference_logits(sd, config, ids, mask, types)
    torch.testing.assert_close(out.start_logits.double(), ref_start, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.end_logits.double(), ref_end, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ptype", TYPES)
def test_eager_and_sdpa_agree_in_training_mode(ptype):
    torch.manual_seed(0)
    eager = qa_model_from_config(tiny_bert_config(ptype), attn_implementation="eager")
    sdpa = qa_model_from_config(tiny_bert_config(ptype), attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    ids, mask, types = _batch()
    labels = dict(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 6, 3]))
    grads = []
    for model in (eager, sdpa):
        model.train()  # dropout is 0 in tiny configs, so train mode is deterministic
        loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_absolute_configs_stay_on_transformers(tmp_path):
    from transformers import BertForQuestionAnswering

    config = tiny_bert_config("absolute")
    assert qa_model_class(config) is BertForQuestionAnswering
    assert type(qa_model_from_config(config)) is BertForQuestionAnswering
    path = save_tiny_checkpoint(tmp_path / "abs", config)
    assert type(load_qa_model(str(path))) is BertForQuestionAnswering


def test_published_layout_loads_every_weight(tmp_path, caplog):
    path, config, sd = _published_checkpoint(tmp_path, "relative_key_query")
    with caplog.at_level(logging.INFO, logger="squad_ds.modeling.relative_bert"):
        model = load_qa_model(str(path))
    state = model.state_dict()
    ignored = {"bert.embeddings.position_embeddings.weight"}
    assert set(state) == set(sd) - ignored
    for k in state:
        assert torch.equal(state[k], sd[k]), k
    lines = [r.getMessage() for r in caplog.records if "position_embeddings" in r.getMessage()]
    assert len(lines) == 1 and "ignored" in lines[0]


def test_pretrained_only_encoder_gets_fresh_head(tmp_path):
    config = tiny_bert_config("relative_key")
    sd = relative_bert_state_dict(config, with_qa_head=False)
    sd["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    sd["bert.pooler.dense.bias"] = torch.zeros(32)
    sd["cls.predictions.bias"] = torch.zeros(config.vocab_size)
    sd["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    model = load_qa_model(str(save_state_dict_checkpoint(tmp_path / "pre", config, sd)))
    assert torch.equal(model.state_dict()["bert.encoder.layer.1.attention.self.distance_embedding.weight"],
                       sd["bert.encoder.layer.1.attention.self.distance_embedding.weight"])
    assert model.qa_outputs.weight.abs().sum() > 0


def test_headless_encoder_keys_without_prefix_load(tmp_path):
    """A BertModel checkpoint (keys without "bert.") loads into the QA model, as in transformers."""
    config = tiny_bert_config("relative_key")
    sd = relative_bert_state_dict(config, with_qa_head=False)
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    model = load_qa_model(str(save_state_dict_checkpoint(tmp_path / "headless", config, sd)))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])


def test_unknown_weight_is_an_error(tmp_path):
    config = tiny_bert_config("relative_key")
    sd = relative_bert_state_dict(config)
    sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(4)
    with pytest.raises(ModelLoadError, match=r"unexpected weights \['bert\.encoder\.layer\.0\.attention\.self\.rotary"):
        load_qa_model(str(save_state_dict_checkpoint(tmp_path / "extra", config, sd)))


def test_missing_distance_embedding_is_an_error(tmp_path):
    config = tiny_bert_config("relative_key_query")
    sd = relative_bert_state_dict(config)
    del sd["bert.encoder.layer.1.attention.self.distance_embedding.weight"]
    with pytest.raises(ModelLoadError, match=r"missing weights \['bert\.encoder\.layer\.1\.attention\.self\.distance"):
        load_qa_model(str(save_state_dict_checkpoint(tmp_path / "missing", config, sd)))


def test_missing_encoder_weight_with_missing_head_is_an_error(tmp_path):
    config = tiny_bert_config("relative_key")
    sd = relative_bert_state_dict(config, with_qa_head=False)
    del sd["bert.encoder.layer.0.output.dense.bias"]
    with pytest.raises(ModelLoadError, match="output.dense.bias"):
        load_qa_model(str(save_state_dict_checkpoint(tmp_path / "m", config, sd)))


@pytest.mark.parametrize("ptype", TYPES)
def test_export_round_trip(tmp_path, ptype):
    path, _, sd = _published_checkpoint(tmp_path, ptype)
    model = load_qa_model(str(path))
    model.save_pretrained(tmp_path / "export")
    saved = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(saved) == set(sd) - {"bert.embeddings.position_embeddings.weight"}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["position_embedding_type"] == ptype
    again = load_qa_model(str(tmp_path / "export"))
    assert again.config.position_embedding_type == ptype
    ids, mask, types = _batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = again(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert torch.equal(a.start_logits, b.start_logits) and torch.equal(a.end_logits, b.end_logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = qa_model_from_config(tiny_bert_config("relative_key_query"))
    ckpt = qa_model_from_config(tiny_bert_config("relative_key_query"))
    ckpt.load_state_dict(plain.state_dict())
    from squad_ds.config import load_recipe
    from squad_ds.training.engine import prepare_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # not through the deprecated gradient_checkpointing_enable
        prepare_model(ckpt, load_recipe("tiny", ["train.activation_checkpointing=true", "data.unpad=false"]),
                      train=True)
    assert all(layer.gradient_checkpointing for layer in ckpt.bert.encoder.layer)
    ids, mask, types = _batch()
    labels = dict(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 6, 3]))
    for model in (plain, ckpt):
        model.train()
        model(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_sequence_longer_than_distance_table_is_an_error():
    model = qa_model_from_config(tiny_bert_config("relative_key", max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.ones(1, 9, dtype=torch.long))


def test_caller_config_is_not_mutated():
    config = tiny_bert_config("relative_key")
    qa_model_from_config(config, attn_implementation="eager")
    assert getattr(config, "_attn_implementation_internal", None) is None


_DS_SCRIPT = r"""
import json, os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import torch, deepspeed
from tiny_models import tiny_bert_config
from squad_ds.modeling.factory import qa_model_from_config
deepspeed.init_distributed(dist_backend="gloo")
result = {}
for stage in (0, 3):
    torch.manual_seed(0)
    model = qa_model_from_config(tiny_bert_config("relative_key_query"))
    model.gradient_checkpointing_enable()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 1000}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long); mask[1, 9:] = 0
    labels = dict(start_positions=torch.tensor([3, 4]), end_positions=torch.tensor([5, 6]))
    losses = []
    for _ in range(6):
        loss = engine(input_ids=ids, attention_mask=mask, **labels).loss
        engine.backward(loss); engine.step(); losses.append(loss.item())
    engine.eval()
    with torch.no_grad():
        shape = list(engine(input_ids=ids, attention_mask=mask).start_logits.shape)
    result[stage] = {"losses": losses, "shape": shape}
print("RESULT " + json.dumps(result))
"""


def test_trains_under_deepspeed_zero0_and_zero3(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")]),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"))
    proc = subprocess.run([sys.executable, "-c", _DS_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for stage in ("0", "3"):
        losses = result[stage]["losses"]
        assert losses[-1] < losses[0], (stage, losses)
        assert result[stage]["shape"] == [2, 12]
    # ZeRO-3 partitions every parameter (the distance tables included) yet computes the same steps.
    assert result["3"]["losses"] == pytest.approx(result["0"]["losses"], rel=1e-4)
