"""distributed.py without a process group: how a lost rank is reported, and the bounded wait for rank 0's store."""
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
