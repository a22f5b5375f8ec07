"""GPU-only checks (run by bench/gpu.sh with `-m gpu`): FusedAdam, bf16 and fp16 (dynamic loss scale) under
ZeRO-2/3 and offload train a tiny model to losses close to the fp32 run's."""
from __future__ import annotations

import math

import pytest

from trainer_util import losses, make_tiny_model, run_train, write_recipe

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    model = make_tiny_model(d / "model")
    recipe = write_recipe(d / "ref.yaml", model, d / "ref", train={"max_steps": 20, "micro_batch_size": 8})
    run_train(recipe, ds_config="cpu_fp32")  # on CUDA: fp32, ZeRO-0, FusedAdam
    return model, losses(d / "ref")


@pytest.mark.parametrize("ds_config", ["zero2_bf16", "zero3_bf16", "zero2_fp16", "zero3_fp16",
                                       "zero2_offload_bf16", "zero3_offload_bf16"])
def test_mixed_precision_tracks_fp32(tmp_path, setup, ds_config):
    model, ref = setup
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out",
                          train={"max_steps": 20, "micro_batch_size": 8})
    run_train(recipe, ds_config=ds_config)
    got = losses(tmp_path / "out")
    assert sorted(got) == sorted(ref)
    assert all(math.isfinite(v) for v in got.values())
    # fp16 may skip its first steps while the loss scale settles; compare where both trained.
    assert got[20] < got[1]
    assert abs(got[20] - ref[20]) < 0.1 * abs(ref[20]) + 0.05
