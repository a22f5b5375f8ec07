"""Rank/world helpers, environment for launcher-less and SLURM runs, and gathers without padded duplicates."""
from __future__ import annotations

import os
import pickle
import re
import socket
import time
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from squad_ds.errors import RankLost, RendezvousError

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env() -> None:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* so DeepSpeed never falls back to mpi4py discovery.

    Under `deepspeed`/`torchrun` they are set already. Under `srun` they come from SLURM_* (MASTER_ADDR must be
    exported by the batch script). A bare `python -m squad_ds.train` becomes a world of one.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run: export it (the launch scripts do)")
        os.environ["MASTER_PORT"] = str(_free_port())


def init(cuda: bool, timeout_s: float = 1800.0, rendezvous_timeout_s: float = 600.0) -> None:
    """Join the process group: every rank must join within rendezvous_timeout_s (a rank that died before joining
    fails the others then, with a clear error), and collectives then wait up to timeout_s."""
    import deepspeed

    setup_env()
    if cuda:
        torch.cuda.set_device(local_rank())
    backend = "nccl" if cuda else "gloo"
    collective = timedelta(seconds=timeout_s)
    if not dist.is_initialized() and world_size() > 1:
        # torch has no public way to change a group's timeout once it exists: join with the rendezvous bound,
        # then give the group its collective timeout (private API; without it both are timeout_s).
        settable = hasattr(dist.distributed_c10d, "_set_pg_timeout")
        start = time.monotonic()
        deadline = start + rendezvous_timeout_s

        def late(reason: str) -> RendezvousError:
            return RendezvousError(
                f"rank {rank()} of {world_size()}: the other ranks did not all join at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} within distributed.rendezvous_timeout_s={rendezvous_timeout_s:g} s "
                f"(waited {time.monotonic() - start:.0f} s; did one fail to start? see its log) [{reason}]")

        # c10d's own connect retries back off up to a minute between tries and overshoot the bound by as much:
        # the other ranks wait for rank 0's store here, trying each second, and join with what is left.
        if rank() != 0 and not _wait_for_port(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), deadline):
            raise late("nothing listens there: rank 0 has not started its store")
        left = max(1.0, deadline - time.monotonic())
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=left) if settable else collective)
        except (RuntimeError, dist.DistError) as e:
            raise late(str(e).strip().splitlines()[0][:200]) from None
        if settable:
            dist.distributed_c10d._set_pg_timeout(collective)
        # Groups made later (DeepSpeed's clone of the world group, which carries the gradients' all-reduce; ZeRO's)
        # take torch's module default, 30 minutes, not this run's: make timeout_s that default (private API too).
        for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
            if isinstance(getattr(dist.distributed_c10d, name, None), timedelta):
                setattr(dist.distributed_c10d, name, collective)
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=collective)


def _wait_for_port(addr: str, port: int, deadline: float) -> bool:
    """Whether something accepts connections at addr:port before `deadline` (time.monotonic), trying each second."""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(5.0, left))):
                return True
        except OSError:
            if left <= 0:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


# What gloo and NCCL say when a collective fails because another rank is gone (killed, its host down or cut off).
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out",
              "NCCL communicator was aborted", "gloo/transport")


def lost_rank_as_error(fn: Callable[[], T]) -> T:
    """Run `fn`; a collective that fails because another rank is gone ends this rank with one line (RankLost)
    instead of gloo's or NCCL's traceback. Alone, or for any other error, the exception goes on as it is."""
    try:
        return fn()
    except RuntimeError as e:
        text = str(e).strip()
        if world_size() <= 1 or not (isinstance(e, dist.DistError) or any(s in text for s in _PEER_GONE)):
            raise
        first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(e).__name__)
        raise RankLost(f"rank {rank()} of {world_size()}: another rank stopped answering in a collective "
                       f"({first[:200]}): its log says why; the run continues from its last complete checkpoint "
                       "with --resume auto once every rank can run") from None


def hosts_of_ranks() -> list[str]:
    """Each rank's host name, in rank order (a collective: every rank calls it); one name when alone."""
    name = socket.gethostname()
    if world_size() <= 1 or not dist.is_initialized():
        return [name]
    names: list[Any] = [None] * world_size()
    dist.all_gather_object(names, name)
    return names


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def device(cuda: bool):
    """This process's device: its local rank's GPU, or the CPU."""
    return torch.device("cuda", local_rank()) if cuda else torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only; the other ranks wait for it and get None. If it fails, every rank raises its
    exception instead of waiting in a barrier (under srun nothing else would stop them: each task is its own
    process tree, and NCCL waits for a collective until its timeout)."""
    if world_size() == 1:
        return fn()
    error: BaseException | None = None
    result = None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have it
            error = e
    sent = error
    if error is not None:
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
            sent = RuntimeError(f"{type(error).__name__}: {error}")
    sent = broadcast_object(sent)
    if error is not None:
        raise error
    if sent is not None:
        raise sent
    return result


def main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks (which reuse what rank 0 prepared, e.g. a feature cache);
    a failure on rank 0 stops every rank (see on_main)."""
    result = on_main(fn)
    return result if is_main() else fn()


def _comm_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo only CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_max(value: int) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def shard_range(n: int, world: int, r: int) -> tuple[int, int]:
    """Contiguous shard [start, stop) of n items for rank r; shards differ in length by at most one."""
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def gather_shards(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every rank's contiguous shard in rank order on all ranks (no padded duplicates)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}
