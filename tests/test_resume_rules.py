"""What a resumed run may change (training/resume.py), without training: the DeepSpeed settings a checkpoint records
and how they are compared."""
from __future__ import annotations

import copy

import pytest

from squad_ds.errors import CheckpointError
from squad_ds.training import resume
from squad_ds.training.engine import scheduler_rate

DS = {"train_batch_size": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "torch_adam": True}},
      "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 60, "warmup_num_steps": 6,
                                                         "warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                         "warmup_type": "linear"}},
      "zero_optimization": {"stage": 1}}
LAYOUT = {"micro_batch": 4, "accumulation": 1, "world_size": 1, "num_features": 100}


def _check(saved_ds, now_ds):
    return resume.check({"train": {"max_steps": 60}}, LAYOUT, {"train": {"max_steps": 60}}, LAYOUT, "ckpt",
                        resume.deepspeed_settings(saved_ds) if saved_ds else None, resume.deepspeed_settings(now_ds))


def test_deepspeed_settings_record_precision_and_stage():
    got = resume.deepspeed_settings(DS)
    assert got["precision"] == "bf16" and got["zero_optimization.stage"] == 1 and got["gradient_clipping"] == 1.0
    assert resume.deepspeed_settings({})["precision"] == "fp32"
    assert resume.deepspeed_settings({"fp16": {"enabled": True}})["zero_optimization.stage"] == 0


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["optimizer"].update(type="Adam"), "deepspeed.optimizer.type: saved 'AdamW', now 'Adam'"),
    (lambda d: d["optimizer"]["params"].update(eps=1e-8), "deepspeed.optimizer.params.eps: saved None, now 1e-08"),
    (lambda d: d.pop("bf16"), "deepspeed.precision: saved 'bf16', now 'fp32'"),
    (lambda d: d.pop("scheduler"), "deepspeed.scheduler.type: saved 'WarmupDecayLR', now None"),
    (lambda d: d["zero_optimization"].update(stage=3), "deepspeed.zero_optimization.stage: saved 1, now 3"),
])
def test_a_changed_optimizer_scheduler_precision_or_stage_is_refused_by_name(edit, named):
    now = copy.deepcopy(DS)
    edit(now)
    with pytest.raises(CheckpointError) as e:
        _check(DS, now)
    assert named in str(e.value)


def test_replanned_step_counts_and_the_adam_implementation_are_allowed_and_logged():
    now = copy.deepcopy(DS)
    now["scheduler"]["params"].update(total_num_steps=200, warmup_num_steps=20)
    now["optimizer"]["params"]["torch_adam"] = False
    now["optimizer"]["params"]["fused"] = True  # a run saved before fused AdamW was the CPU default resumes fused
    lines = _check(DS, now)
    assert "deepspeed.scheduler.params.total_num_steps: 60 → 200" in lines
    assert "deepspeed.optimizer.params.torch_adam: True → False" in lines
    assert "deepspeed.optimizer.params.fused: None → True" in lines
    assert resume.replanned(resume.deepspeed_settings(DS), resume.deepspeed_settings(now))
    assert not resume.replanned(resume.deepspeed_settings(DS), resume.deepspeed_settings(DS))


def test_a_checkpoint_from_before_the_deepspeed_record_is_not_compared():
    now = copy.deepcopy(DS)
    now["optimizer"]["type"] = "Adam"
    assert _check(None, now) == []


def test_scheduler_rate_is_deepspeeds_own():
    """At iteration 30 of 60 with warmup 6, linear decay: 1e-3 × 30 / 54; during warmup, linear from 0."""
    assert scheduler_rate(DS["scheduler"], 30) == pytest.approx(1e-3 * 30 / 54)
    assert scheduler_rate(DS["scheduler"], 3) == pytest.approx(1e-3 * 3 / 6)
    assert scheduler_rate({"type": "WarmupLR", "params": {"warmup_num_steps": 6, "warmup_max_lr": 1e-3,
                                                          "warmup_type": "linear"}}, 100) == pytest.approx(1e-3)
    assert scheduler_rate(None, 5) is None


def test_a_monitor_csv_is_cut_back_to_the_resumed_samples_with_one_header(tmp_path):
    from squad_ds.training.run_logs import tidy_monitor_dir

    d = tmp_path / "monitor"
    d.mkdir()
    (d / "Train_Samples_lr.csv").write_text("step,lr\n4,0.1\n8,0.2\n12,0.3\nstep,lr\n12,0.3\n16,0.4\n20,0.")
    (d / "mine.csv").write_text("name,score\nx,1\n")  # not a monitor file: left as it is
    (d / "Eval_f1.csv").write_bytes(b"\xff\xfe")
    assert tidy_monitor_dir(d, upto=8) == ["Train_Samples_lr"]
    assert (d / "Train_Samples_lr.csv").read_text() == "samples,lr\n4,0.1\n8,0.2\n"
    assert (d / "mine.csv").read_text() == "name,score\nx,1\n"
    assert (d / "Eval_f1.csv").read_bytes() == b"\xff\xfe"
    (d / "Train_Samples_lr.csv").write_text("samples,lr\n4,0.1\n8,0.2\nstep,lr\n12,0.3\n")
    tidy_monitor_dir(d)
    assert (d / "Train_Samples_lr.csv").read_text() == "samples,lr\n4,0.1\n8,0.2\n12,0.3\n"
