"""distributed.py: how a lost rank is reported, the bounded wait for rank 0's store, collective timeouts, and
collectives that every rank must reach in the same order (two real gloo processes)."""
from __future__ import annotations

import socket
import time

import pytest

from squad_ds import distributed
from squad_ds.errors import RankLost

GLOO = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:10126: "
        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")


def _raise(e):
    def fn():
        raise e
    return fn


def test_a_collective_that_lost_its_peer_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RankLost) as e:
        distributed.lost_rank_as_error(_raise(RuntimeError(GLOO)))
    assert str(e.value).startswith("rank 0 of 2: another rank stopped answering in a collective (Read error "
                                   "[127.0.0.1]:10126: Connection reset by peer.")
    with pytest.raises(RuntimeError, match="^boom$"):  # any other error goes on as it is
        distributed.lost_rank_as_error(_raise(RuntimeError("boom")))
    assert distributed.lost_rank_as_error(lambda: 7) == 7


def test_alone_there_is_no_peer_to_lose(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection reset"):
        distributed.lost_rank_as_error(_raise(RuntimeError(GLOO)))


def test_waiting_for_rank_0s_store_keeps_its_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        t0 = time.monotonic()
        assert not distributed._wait_for_port("127.0.0.1", port, t0 + 1.5)
        assert 1.5 <= time.monotonic() - t0 < 10  # not c10d's backoff of up to a minute
        s.listen()
        assert distributed._wait_for_port("127.0.0.1", port, time.monotonic() + 5)


SILENT_PEER = """
import os, sys, time
import torch, torch.distributed as dist
from squad_ds import distributed
distributed.init(cuda=False, timeout_s=3, rendezvous_timeout_s=60)
group = dist.new_group(ranks=[0, 1])  # made after init, as DeepSpeed clones the world group for the gradients
if distributed.rank() == 1:
    time.sleep(60)  # alive, connected, and never joins the collective
    sys.exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1), group=group)
except RuntimeError as e:
    print(f"raised after {time.monotonic() - t0:.1f} s: {str(e).splitlines()[0][:120]}", flush=True)
    os._exit(0)
os._exit(1)
"""


def test_groups_made_after_init_keep_the_runs_collective_timeout(tmp_path):
    """distributed.timeout_s bounds the collectives of groups made later too (DeepSpeed's own, which carry the
    gradients): torch gives new groups its 30-minute default, under which a rank cut off mid-step waited on."""
    import subprocess
    import sys

    from trainer_util import env, free_port

    script = tmp_path / "silent_peer.py"
    script.write_text(SILENT_PEER)
    e = {**env(1), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**e, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=40)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 0 and "raised after" in out, (out, err[-2000:])
    assert float(out.split("raised after ")[1].split(" s")[0]) < 10, out


RESAVE = """
import os, sys, time
from pathlib import Path
from squad_ds import distributed
from squad_ds.training import checkpoint
distributed.init(cuda=False, timeout_s=5, rendezvous_timeout_s=60)
ckpt = Path(sys.argv[1])
old = ckpt / checkpoint.tag_for(8) / "left_by_the_interrupted_save.pt"

class Engine:
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / f"shard_rank{distributed.rank()}.pt").write_text("x")

if distributed.rank() == 1:  # rank 0 is faster: it has removed the old tag before rank 1 looks
    deadline = time.monotonic() + 30
    while old.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
try:
    checkpoint.save(Engine(), ckpt, 8, {}, keep_last=2)
except Exception as e:
    print(f"rank {distributed.rank()}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    os._exit(3)
os._exit(0)
"""


def test_saving_again_under_an_existing_tag_keeps_the_ranks_in_step(tmp_path):
    """A resumed run saves again under a tag its interrupted course began: rank 0 removes the old one. Each rank
    decided by looking for that folder itself, so a rank that looked after rank 0 had removed it skipped the
    collectives around the removal and the two ranks met in different ones (a two-host resume stopped with
    "another rank stopped answering"). Here rank 1 always looks after the removal."""
    import subprocess
    import sys

    from trainer_util import env, free_port

    from squad_ds.training import checkpoint

    ckpt = tmp_path / "checkpoints"
    (ckpt / checkpoint.tag_for(8)).mkdir(parents=True)
    (ckpt / checkpoint.tag_for(8) / "left_by_the_interrupted_save.pt").write_text("old")
    script = tmp_path / "resave.py"
    script.write_text(RESAVE)
    e = {**env(1), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(ckpt)], env={**e, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = []
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], [(o, err[-1500:]) for o, err in outs]
    assert checkpoint.complete_tags(ckpt) == [checkpoint.tag_for(8)]
    saved = sorted(p.name for p in (ckpt / checkpoint.tag_for(8)).iterdir())
    assert "left_by_the_interrupted_save.pt" not in saved
    assert {"shard_rank0.pt", "shard_rank1.pt", "rng_rank0.pt", "rng_rank1.pt"} <= set(saved), saved
