"""model.sdpa_backend: which kernel torch's scaled_dot_product_attention tries first, and that torch obeys it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from squad_ds.config import ConfigError, load_recipe
from squad_ds.modeling.sdpa import SDPA_BACKENDS, backend_order, current_order, sdpa_preference


@pytest.mark.parametrize("name,first", [("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"),
                                        ("efficient", "EFFICIENT_ATTENTION"), ("math", "MATH")])
def test_preference_goes_first_and_is_restored(name, first):
    before = current_order()
    with sdpa_preference(name):
        inside = current_order()
    assert inside[0] == first
    if name == "math":
        assert inside == ["MATH"]  # the reference kernel alone
    else:
        assert sorted(inside) == sorted(["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"])
        if name != "cudnn":
            assert inside[-1] == "CUDNN_ATTENTION"  # chosen to avoid cuDNN's per-shape graph builds
    assert current_order() == before


def test_auto_changes_nothing():
    before = current_order()
    assert backend_order("auto") == []
    with sdpa_preference("auto"):
        assert current_order() == before


def _kernels(pref: str) -> list[str]:
    q = torch.randn(2, 2, 16, 8)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    mask[1, ..., 10:] = False  # a padded row, as BERT's batches have
    with sdpa_preference(pref), torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    return [e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")]


def test_torch_dispatch_follows_the_preference():
    # On CPU torch has a fused (flash) kernel and math; the preference must move the call between them.
    assert _kernels("auto") == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert _kernels("math") == ["aten::_scaled_dot_product_attention_math"]
    assert _kernels("flash") == ["aten::_scaled_dot_product_flash_attention_for_cpu"]


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="model.sdpa_backend"):
        load_recipe(None, ["model.sdpa_backend=flash2"])
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        backend_order("xformers")
    assert load_recipe(None, ["model.sdpa_backend=efficient"]).model.sdpa_backend == "efficient"
    with pytest.raises(ConfigError, match="model.sdpa_backend: 'efficient' chooses an SDPA kernel"):
        load_recipe(None, ["model.sdpa_backend=efficient", "model.attn_implementation=eager"])
    assert "auto" in SDPA_BACKENDS and load_recipe(None).model.sdpa_backend == "auto"
