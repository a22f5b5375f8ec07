"""ds_config.resolve_ds_config: "auto" filled from the recipe, contradictions refused before any work starts, the step
plan, optimizer choice on CPU; weight_decay_groups on a tiny BERT."""
from __future__ import annotations

import math

import pytest
from test_ds_configs import build_scheduler

from squad_ds.config import ConfigError, recipe_from_dict
from squad_ds.training.ds_config import (
    DEFAULT_LR,
    DEFAULT_MICRO_BATCH,
    DEFAULT_WEIGHT_DECAY,
    load_ds_config,
    resolve_ds_config,
)
from squad_ds.training.engine import arch_list_for_deepspeed, weight_decay_groups


def recipe(**train):
    return recipe_from_dict({"train": train})


def ds_auto(**extra):
    """A minimal DeepSpeed config with every shared value "auto" (the shipped configs' shape)."""
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
           "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                              "warmup_max_lr": "auto"}},
           "zero_optimization": {"stage": 0}}
    cfg.update(extra)
    return cfg


def resolve(ds, rec, world=1, n=1000, cuda=True):
    return resolve_ds_config(ds, rec, world_size=world, num_features=n, cuda=cuda)


# ---------------------------------------------------------------- "auto" filled from the recipe

def test_auto_values_come_from_the_recipe():
    rec = recipe(micro_batch_size=8, gradient_accumulation_steps=2, lr=3.0e-5, weight_decay=0.0,
                 warmup_proportion=0.0, epochs=2)
    ds = ds_auto()
    out, plan = resolve(ds, rec, world=4, n=1000)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == \
        (8, 2, 64)
    assert out["optimizer"]["params"]["lr"] == 3e-5 and out["optimizer"]["params"]["weight_decay"] == 0.0
    sp = out["scheduler"]["params"]
    assert sp["warmup_max_lr"] == 3e-5 and sp["total_num_steps"] == plan.total_steps
    assert sp["warmup_min_lr"] == 0.0 and sp["warmup_type"] == "linear"
    assert ds == ds_auto(), "the input config is not modified"
    build_scheduler(out)


def test_zero_values_in_the_recipe_are_not_mistaken_for_unset():
    out, _ = resolve(ds_auto(), recipe(weight_decay=0.0, warmup_proportion=0.0))
    assert out["optimizer"]["params"]["weight_decay"] == 0.0


def test_defaults_when_neither_side_sets_a_value():
    out, plan = resolve(ds_auto(), recipe(), world=2)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == \
        (DEFAULT_MICRO_BATCH, 1, 2 * DEFAULT_MICRO_BATCH)
    assert out["optimizer"]["params"]["lr"] == DEFAULT_LR
    assert out["optimizer"]["params"]["weight_decay"] == DEFAULT_WEIGHT_DECAY


def test_concrete_json_values_are_kept_when_the_recipe_is_silent():
    ds = ds_auto(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=3)
    ds["optimizer"]["params"].update(lr=2e-5, weight_decay=0.1)
    out, plan = resolve(ds, recipe(), world=2)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == \
        (4, 3, 24)
    assert out["optimizer"]["params"] == {"lr": 2e-5, "weight_decay": 0.1}
    assert out["scheduler"]["params"]["warmup_max_lr"] == 2e-5


def test_equal_values_on_both_sides_are_fine():
    ds = ds_auto(train_micro_batch_size_per_gpu=8)
    ds["optimizer"]["params"]["lr"] = 3e-5
    out, _ = resolve(ds, recipe(micro_batch_size=8, lr=3.0e-5))
    assert out["train_micro_batch_size_per_gpu"] == 8 and out["optimizer"]["params"]["lr"] == 3e-5


# ---------------------------------------------------------------- contradictions name both values

@pytest.mark.parametrize("json_key, json_value, recipe_key, recipe_value", [
    ("train_micro_batch_size_per_gpu", 8, "micro_batch_size", 16),
    ("gradient_accumulation_steps", 2, "gradient_accumulation_steps", 4),
    ("train_batch_size", 32, "train_batch_size", 64),
    ("optimizer.params.lr", 5e-5, "lr", 3e-5),
    ("optimizer.params.weight_decay", 0.01, "weight_decay", 0.0),
])
def test_recipe_vs_json_contradiction_names_both(json_key, json_value, recipe_key, recipe_value):
    ds = ds_auto()
    if json_key.startswith("optimizer."):
        ds["optimizer"]["params"][json_key.rsplit(".", 1)[1]] = json_value
    else:
        ds[json_key] = json_value
    with pytest.raises(ConfigError) as e:
        resolve(ds, recipe(**{recipe_key: recipe_value}))
    msg = str(e.value)
    assert f"{json_key}={json_value!r}" in msg and f"train.{recipe_key}={recipe_value!r}" in msg


def test_scheduler_warmup_max_lr_contradicting_the_recipe_lr_is_refused():
    """BUG (ds_config.resolve_ds_config): a concrete scheduler.params.warmup_max_lr is kept without comparing it with
    the lr. DeepSpeed's WarmupLR/WarmupDecayLR drive the optimizer's lr to warmup_max_lr, so recipe train.lr=3e-5
    with a JSON warmup_max_lr=1e-4 silently trains at 1e-4 -- the recipe's lr is ignored. DESIGN: "A value given
    in both places is an error unless equal"."""
    ds = ds_auto()
    ds["scheduler"]["params"]["warmup_max_lr"] = 1e-4
    with pytest.raises(ConfigError, match="warmup_max_lr"):
        resolve(ds, recipe(lr=3.0e-5))


def test_scheduler_steps_contradicting_the_plan_are_refused():
    ds = ds_auto()
    ds["scheduler"]["params"]["total_num_steps"] = 5
    with pytest.raises(ConfigError, match="total_num_steps=5"):
        resolve(ds, recipe(max_steps=7))
    ds = ds_auto()
    ds["scheduler"]["params"]["total_num_steps"] = 7  # equal to the plan: fine
    assert resolve(ds, recipe(max_steps=7))[1].total_steps == 7
    ds = ds_auto()
    ds["scheduler"]["params"]["warmup_num_steps"] = 5
    with pytest.raises(ConfigError, match="warmup_num_steps=5") as e:
        resolve(ds, recipe(max_steps=100, warmup_proportion=0.2))  # the recipe wants 20
    assert "train.warmup_proportion=0.2" in str(e.value)
    # The recipe silent: the JSON's warmup is the plan's.
    out, plan = resolve(ds, recipe(max_steps=100))
    assert plan.warmup_steps == 5 == out["scheduler"]["params"]["warmup_num_steps"]


# ---------------------------------------------------------------- batch arithmetic

def test_micro_times_accumulation_times_world_must_equal_train_batch_size():
    with pytest.raises(ConfigError, match=r"4 × gradient_accumulation_steps 2 × world size 2 = 16, not the "
                                          r"train_batch_size 24"):
        resolve(ds_auto(), recipe(micro_batch_size=4, gradient_accumulation_steps=2, train_batch_size=24), world=2)


@pytest.mark.parametrize("world, accum", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_train_batch_size_with_micro_derives_accumulation(world, accum):
    out, plan = resolve(ds_auto(), recipe(micro_batch_size=6, train_batch_size=48), world=world)
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (6, accum, 48)
    assert out["gradient_accumulation_steps"] == accum


def test_train_batch_size_with_accumulation_derives_micro():
    _, plan = resolve(ds_auto(), recipe(gradient_accumulation_steps=3, train_batch_size=48), world=8)
    assert (plan.micro_batch, plan.accumulation) == (2, 3)
    _, plan = resolve(ds_auto(), recipe(train_batch_size=48), world=8)  # neither: no accumulation
    assert (plan.micro_batch, plan.accumulation) == (6, 1)


def test_indivisible_train_batch_size_is_refused():
    with pytest.raises(ConfigError, match="not divisible"):
        resolve(ds_auto(), recipe(micro_batch_size=5, train_batch_size=48), world=2)
    with pytest.raises(ConfigError, match="not divisible"):
        resolve(ds_auto(), recipe(gradient_accumulation_steps=5, train_batch_size=48), world=2)
    with pytest.raises(ConfigError, match="not divisible"):
        resolve(ds_auto(), recipe(micro_batch_size=64, train_batch_size=48), world=1)  # accumulation would be 0


def test_json_train_batch_size_with_recipe_micro():
    _, plan = resolve(ds_auto(train_batch_size=32), recipe(micro_batch_size=8), world=2)
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (8, 2, 32)


# ---------------------------------------------------------------- precision and ZeRO

def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        resolve(ds_auto(fp16={"enabled": True}), recipe(), cuda=False)
    resolve(ds_auto(fp16={"enabled": True}), recipe(), cuda=True)
    resolve(ds_auto(fp16={"enabled": False}), recipe(), cuda=False)
    resolve(ds_auto(bf16={"enabled": True}), recipe(), cuda=False)  # bf16 runs on CPU


@pytest.mark.parametrize("stage", [4, -1, "2", None])
def test_bad_zero_stage_is_refused(stage):
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        resolve(ds_auto(zero_optimization={"stage": stage}), recipe())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages(stage):
    out, _ = resolve(ds_auto(zero_optimization={"stage": stage}), recipe())
    assert out["zero_optimization"]["stage"] == stage


def test_fp16_and_bf16_together_are_refused():
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled"):
        resolve(ds_auto(fp16={"enabled": True}, bf16={"enabled": True}), recipe(), cuda=True)


def test_leftover_auto_is_named():
    with pytest.raises(ConfigError, match="gradient_clipping"):
        resolve(ds_auto(gradient_clipping="auto"), recipe())


# ---------------------------------------------------------------- the step plan

def test_scheduler_steps_planned_from_features_epochs_world_and_accumulation():
    rec = recipe(micro_batch_size=8, gradient_accumulation_steps=4, epochs=2, warmup_proportion=0.1)
    out, plan = resolve(ds_auto(), rec, world=2, n=1000)
    # 1000 features over 2 ranks = 500 each; ceil(500 / 8) = 63 micro-batches per epoch; 2 epochs / 4 = 31.5 -> 32.
    assert plan.micro_batches_per_epoch == 63
    assert plan.total_steps == math.ceil(2 * 63 / 4) == 32
    assert plan.warmup_steps == int(0.1 * 32) == 3
    sp = out["scheduler"]["params"]
    assert (sp["total_num_steps"], sp["warmup_num_steps"]) == (32, 3)
    # An uneven split: ceil(1001 / 2) = 501 per rank (DistributedSampler-style padding).
    _, plan = resolve(ds_auto(), rec, world=2, n=1001)
    assert plan.micro_batches_per_epoch == math.ceil(501 / 8)


def test_fractional_epochs_and_one_rank():
    _, plan = resolve(ds_auto(), recipe(micro_batch_size=10, epochs=0.5, warmup_proportion=0.2), world=1, n=1000)
    assert (plan.micro_batches_per_epoch, plan.total_steps, plan.warmup_steps) == (100, 50, 10)


def test_max_steps_overrides_epochs():
    out, plan = resolve(ds_auto(), recipe(micro_batch_size=8, epochs=3, max_steps=7, warmup_proportion=0.5),
                        world=4, n=10**6)
    assert plan.total_steps == 7 == out["scheduler"]["params"]["total_num_steps"]
    assert plan.warmup_steps == 3


def test_no_warmup_still_builds_deepspeeds_scheduler():
    """run_squad.py rows use no warmup; DeepSpeed's WarmupDecayLR refuses warmup_num_steps=0, so the resolved
    config must hold a value DeepSpeed accepts (it then warms up over its minimum of 2 steps)."""
    out, plan = resolve(ds_auto(), recipe(warmup_proportion=0.0, max_steps=100))
    assert out["scheduler"]["params"]["warmup_num_steps"] >= 1
    build_scheduler(out)


def test_no_scheduler_section_is_left_alone():
    ds = ds_auto()
    del ds["scheduler"]
    out, plan = resolve(ds, recipe(max_steps=10))
    assert "scheduler" not in out and plan.total_steps == 10


# ---------------------------------------------------------------- optimizer choice

def test_torch_adam_on_cpu_unless_offloaded():
    out, _ = resolve(ds_auto(), recipe(), cuda=False)
    assert out["optimizer"]["params"]["torch_adam"] is True
    # torch's fused CPU kernel (the Trainer's default, adamw_torch_fused): its for-loop AdamW took 112 ms a step on
    # all-MiniLM-L6-v2 against 14 ms fused (one thread, a 2-core AMD EPYC, 2026-12-07)
    assert out["optimizer"]["params"]["fused"] is True
    out, _ = resolve(ds_auto(), recipe(), cuda=True)
    assert "torch_adam" not in out["optimizer"]["params"]
    offload = ds_auto(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    out, _ = resolve(offload, recipe(), cuda=False)
    assert "torch_adam" not in out["optimizer"]["params"]  # DeepSpeedCPUAdam runs the offloaded step
    ds = ds_auto()
    ds["optimizer"]["params"]["torch_adam"] = False  # an explicit choice is kept
    out, _ = resolve(ds, recipe(), cuda=False)
    assert out["optimizer"]["params"]["torch_adam"] is False
    assert "fused" not in out["optimizer"]["params"]  # DeepSpeed's own optimizer takes no such parameter
    ds = ds_auto()
    ds["optimizer"]["params"]["fused"] = False  # an explicit choice is kept
    out, _ = resolve(ds, recipe(), cuda=False)
    assert out["optimizer"]["params"]["fused"] is False
    out, _ = resolve(ds_auto(), recipe(), cuda=True)
    assert "fused" not in out["optimizer"]["params"]


@pytest.mark.parametrize("cuda", [True, False])
def test_torch_fused_adamw_is_torch_adamw_with_fused_kernels(cuda):
    out, _ = resolve(ds_auto(), recipe(optimizer="torch_fused_adamw"), cuda=cuda)
    assert out["optimizer"]["params"]["torch_adam"] is True
    assert out["optimizer"]["params"]["fused"] is True


def test_torch_fused_adamw_refuses_offload_and_non_adam():
    offload = ds_auto(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="no optimizer offload"):
        resolve(offload, recipe(optimizer="torch_fused_adamw"))
    lamb = ds_auto()
    lamb["optimizer"]["type"] = "Lamb"
    with pytest.raises(ConfigError, match="torch_fused_adamw needs an Adam/AdamW"):
        resolve(lamb, recipe(optimizer="torch_fused_adamw"))


def test_unknown_optimizer_choice_names_the_choices():
    with pytest.raises(ConfigError, match="torch_fused_adamw"):
        recipe(optimizer="sgd")


def test_optimizer_without_params_gets_the_recipe_values():
    """BUG (ds_config.resolve_ds_config): `opt["params"].get("lr")` runs before `opt.setdefault("params", {})`, so a
    DeepSpeed config whose optimizer has no "params" (DeepSpeed's own examples allow {"type": "AdamW"}) crashes
    with KeyError: 'params' instead of taking lr / weight_decay from the recipe."""
    out, _ = resolve(ds_auto(optimizer={"type": "AdamW"}), recipe(lr=3.0e-5, weight_decay=0.0))
    assert out["optimizer"]["params"]["lr"] == 3e-5 and out["optimizer"]["params"]["weight_decay"] == 0.0


def test_shipped_config_round_trip_with_a_published_recipe():
    from squad_ds.config import load_recipe

    rec = load_recipe("bert_large_wwm_rkq_squad1_512")
    out, plan = resolve_ds_config(load_ds_config(rec.deepspeed_config), rec, world_size=8, num_features=88641,
                                  cuda=True)
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (2, 3, 48)
    # 88641 / 8 = 11081 per rank; / 2 = 5541 micro-batches per epoch; x 2 epochs / 3 = 3694 optimizer steps.
    assert plan.total_steps == math.ceil(2 * math.ceil(math.ceil(88641 / 8) / 2) / 3) == 3694
    assert out["optimizer"]["params"]["lr"] == 3e-5 and out["optimizer"]["params"]["weight_decay"] == 0.0


# ---------------------------------------------------------------- weight decay groups

def test_weight_decay_groups_exclude_biases_and_layernorm():
    from tiny_models import tiny_bert_config

    from squad_ds.modeling.factory import qa_model_from_config

    model = qa_model_from_config(tiny_bert_config(), attn_implementation="eager")
    groups = weight_decay_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names.values())
    for n in no_decay:
        assert n.endswith(".bias") or "LayerNorm" in n, n
    for n in decay:
        assert not n.endswith(".bias") and "LayerNorm" not in n, n
        assert n.endswith(".weight")
    # What BERT decays and what it does not, by name.
    assert any("word_embeddings.weight" in n for n in decay)
    assert any("attention.self.query.weight" in n for n in decay)
    assert any("qa_outputs.weight" in n for n in decay)
    assert any(n.endswith("LayerNorm.weight") for n in no_decay)
    assert any(n.endswith("LayerNorm.bias") for n in no_decay)
    assert any("qa_outputs.bias" in n for n in no_decay)


def test_weight_decay_groups_skip_frozen_parameters():
    from tiny_models import tiny_bert_config

    from squad_ds.modeling.factory import qa_model_from_config

    model = qa_model_from_config(tiny_bert_config(), attn_implementation="eager")
    frozen = next(p for n, p in model.named_parameters() if "word_embeddings" in n)
    frozen.requires_grad_(False)
    groups = weight_decay_groups(model, 0.1)
    assert all(p is not frozen for g in groups for p in g["params"])


@pytest.mark.parametrize("given,expected", [
    ("9.0a", "9.0"),                      # the H100 image's value: DeepSpeed 0.19 fails on int("0a")
    ("8.0;9.0a;10.0a+PTX", "8.0;9.0;10.0+PTX"),
    ("7.5 8.6 9.0+PTX", "7.5;8.6;9.0+PTX"),  # spaces are DeepSpeed's other separator
    ("9.0;9.0a", "9.0"),
])
def test_arch_list_for_deepspeed(given, expected):
    assert arch_list_for_deepspeed(given) == expected
    major_minor = [t.split("+")[0].split(".") for t in expected.split(";")]
    assert all(int(a) >= 0 and int(b) >= 0 for a, b in major_minor)  # what DeepSpeed's builder does with them
