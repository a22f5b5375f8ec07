"""Freed activation memory goes back to the kernel (squad_ds/training/allocator.py): each case runs in a fresh
interpreter, since glibc's malloc settings are the process's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A mapped 8 MiB block freed raises glibc's default threshold to 8 MiB, so a 6 MiB tensor then comes from the heap
# (not mapped, kept by the process when freed); with squad-ds's fixed threshold it is mapped, and unmapped when freed.
PROBE = """
import ctypes, json, sys, torch
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI2
said = None
if sys.argv[1] == "set":
    from squad_ds.training.allocator import return_freed_memory
    said = return_freed_memory()
elif sys.argv[1] in ("offload", "in-memory"):
    from squad_ds.training.allocator import configure
    device = "nvme" if sys.argv[1] == "offload" else "none"
    said = configure({"zero_optimization": {"stage": 2 if device == "none" else 3,
                                            "offload_optimizer": {"device": device}}}, False)
x = torch.ones(8 << 20, dtype=torch.uint8)
del x
y = torch.ones(6 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd
keep = torch.ones(1024, dtype=torch.uint8)  # a live block after it on the heap
del y
print(json.dumps({"mapped": mapped, "heap_free": libc.mallinfo2().fordblks, "said": said}))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="glibc's malloc only")


def _probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
                              "PYTHONPATH": str(REPO), **env})
    return json.loads(out.stdout)


@glibc
def test_a_freed_activation_sized_block_is_unmapped_not_kept():
    default, ours = _probe("default"), _probe("set")
    assert default["mapped"] < 6 << 20 and default["heap_free"] >= 6 << 20  # what glibc does unasked: kept
    assert ours["mapped"] >= 6 << 20 and ours["heap_free"] < 6 << 20, ours
    assert "go back to the kernel" in ours["said"]


@glibc
def test_a_users_own_glibc_setting_wins():
    r = _probe("set", MALLOC_MMAP_THRESHOLD_=str(64 << 20))
    assert r["mapped"] < 6 << 20  # 64 MiB, as the user said: the 6 MiB tensor came from the heap
    assert "MALLOC_MMAP_THRESHOLD_=67108864" in r["said"]


@glibc
def test_only_runs_set_up_for_memory_set_it():
    """The threshold costs speed (fresh pages for every large block): a run without ZeRO-3, offload or activation
    checkpointing keeps glibc's defaults."""
    offload, in_memory = _probe("offload"), _probe("in-memory")
    assert offload["mapped"] >= 6 << 20 and "go back to the kernel" in offload["said"]
    assert in_memory["mapped"] < 6 << 20 and in_memory["said"].startswith("glibc's malloc defaults kept")


def test_a_run_sets_it_from_its_deepspeed_config_before_the_model_is_loaded(monkeypatch):
    """build_run (train, tune's trials): once the DeepSpeed config is resolved, before the model is read."""
    from types import SimpleNamespace

    from squad_ds.training import allocator, assemble

    class Stop(Exception):
        pass

    calls, ds = [], {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}

    def model_read(*_):
        calls.append("model")
        raise Stop

    monkeypatch.setattr(assemble, "load_tokenizer_for", lambda recipe: None)
    monkeypatch.setattr(assemble, "load_run_features", lambda recipe, tokenizer, with_eval: ([], [], None))
    monkeypatch.setattr(allocator, "configure", lambda config, checkpointing: calls.append(config) or "")
    monkeypatch.setattr(assemble, "count_parameters", model_read)
    with pytest.raises(Stop):
        recipe = SimpleNamespace(model=SimpleNamespace(name_or_path="m"),
                                 train=SimpleNamespace(activation_checkpointing=False))
        assemble.build_run(SimpleNamespace(recipe=recipe, plan=lambda n: (ds, None)))
    assert calls == [ds, "model"]


@pytest.mark.parametrize("ds, checkpointing, expected", [
    ({"zero_optimization": {"stage": 0}}, False, None),
    ({"zero_optimization": {"stage": 2}}, False, None),
    ({}, False, None),
    ({"zero_optimization": {"stage": 0}}, True, 4 << 20),
    ({"zero_optimization": {"stage": 3}}, False, 4 << 20),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, False, 4 << 20),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}, False, None),
])
def test_which_runs_are_set_up_for_memory(ds, checkpointing, expected):
    from squad_ds.training.allocator import threshold_for

    assert threshold_for(ds, checkpointing) == expected
