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


def test_every_run_sets_it_before_anything_is_loaded(monkeypatch):
    """build_run (train, tune's trials) calls it first: before the tokenizer, the features and the model."""
    from squad_ds.training import allocator, assemble

    class Called(Exception):
        pass

    def called():
        raise Called

    monkeypatch.setattr(allocator, "return_freed_memory", called)
    with pytest.raises(Called):
        assemble.build_run(None)
