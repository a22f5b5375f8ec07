"""ZeRO-Infinity's NVMe offload as squad-ds runs it: the swap folder (its own, under the user's `nvme_path`), the
checks made before any work (the async_io op and libaio, the path), and the optimizer state DeepSpeed 0.19 leaves
out when it resumes an NVMe-offloaded optimizer.

DeepSpeed swaps tensors itself; squad-ds never does. The one repair here (`restore_optimizer_state`) puts back what
DeepSpeed saved but does not load, with DeepSpeed's own structures: see docs/CHECKPOINTS.md, "NVMe offload".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from squad_ds.logs import log_main


def offloads_optimizer_to_nvme(engine) -> bool:
    return bool(getattr(engine, "zero_nvme_offload_optimizer", lambda: False)())


def restore_optimizer_state(engine, ckpt_dir: Path, tag: str) -> None:
    """After `engine.load_checkpoint` with the optimizer on NVMe: the state DeepSpeed saved in the rank's
    optim_states file but did not load.

    DeepSpeed 0.19.8 (`DeepSpeedEngine.load_checkpoint`) skips `_load_zero_checkpoint` when the optimizer is on NVMe
    and only copies the swap files back (`offloaded_tensors/`). That restores the sub-groups large enough to be
    swapped, but not (1) the optimizer's param-group settings, so the first step after the resume runs at the
    fresh engine's learning rate (0 at the start of warmup: a step lost), (2) the Adam state of the swapped
    sub-groups, since the swapper reads moments only for tensors the optimizer's state lists and a fresh engine
    lists none (moments restart at zero, the step count at 1), nor (3) the fp32 weights and Adam state of
    sub-groups too small to swap, which stay as the fresh engine made them. A resumed run then trains on other
    numbers than the uninterrupted one (tests/test_offload.py).
    """
    opt = engine.optimizer
    inner = opt.optimizer
    saved = engine._get_all_zero_checkpoints(str(ckpt_dir), tag)[_dp_rank(opt)]  # as DeepSpeed's own loader picks
    state = saved["optimizer_state_dict"]["state"]
    fp32_saved = saved["fp32_flat_groups"]
    # The optimizer's state_dict numbers its tensors group by group, as _set_fp32_optimizer_param_groups lists them.
    opt._set_fp32_optimizer_param_groups()
    order = [p for group in inner.param_groups for p in group["params"]]
    opt._clear_fp32_optimizer_param_groups()
    index = {id(p): i for i, p in enumerate(order)}
    for group, saved_group in zip(inner.param_groups, saved["optimizer_state_dict"]["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})  # the lr of the first step, above all
    restored = []
    for sub_group, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
        saved_state = state.get(index[id(fp32)], {})
        live = inner.state[fp32]
        if opt._swappable_optimizer_subgroup(sub_group):
            _register_swapped_state(opt, fp32, saved_state)
            continue
        fp32.data.copy_(fp32_saved[sub_group].to(fp32.dtype))
        for key, value in saved_state.items():
            live[key] = value.to(fp32.dtype).clone() if hasattr(value, "dtype") else value
        restored.append(sub_group)
    opt.reset_swap_buffers()  # every sub-group's fp32 weights into the model's partitions (DeepSpeed's own copy)
    log_main("NVMe optimizer offload: restored the optimizer's settings, Adam state and %d in-memory sub-group(s) "
             "that DeepSpeed's load_checkpoint leaves out", len(restored))


def _register_swapped_state(opt, fp32, saved_state: dict[str, Any]) -> None:
    """A swapped sub-group: its weights and Adam moments came back as swap files, but DeepSpeed's swapper reads
    moments only for tensors in the optimizer's state, which a fresh engine has none of. Put the step count and
    placeholders of the moments there and let the swapper register them (its own paths: the copied files); their
    memory goes at once, and the next swap-in reads the saved moments into them."""
    import torch

    live = opt.optimizer.state[fp32]
    live["step"] = saved_state["step"]
    numel = opt.optimizer_swapper._get_param_swap_info(fp32).numel()
    for key, value in saved_state.items():
        if torch.is_tensor(value):
            live[key] = torch.empty(numel, dtype=fp32.dtype)  # not touched, so not resident
    info = opt.optimizer_swapper._get_param_swap_info(fp32)  # registers the state tensors (has_state_tensors)
    for t in info.tensors[1:]:
        t.release_memory()


def _dp_rank(opt) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=opt.dp_process_group) if dist.is_initialized() else 0


def nvme_paths(ds: dict[str, Any]) -> dict[str, str]:
    """'offload_param' / 'offload_optimizer' → nvme_path, for the sections that offload to NVMe."""
    zero = ds.get("zero_optimization") or {}
    return {k: str(zero[k].get("nvme_path", "")) for k in ("offload_param", "offload_optimizer")
            if isinstance(zero.get(k), dict) and zero[k].get("device") == "nvme"}


# ------------------------------------------------------------------------------------------- before any work
AUTO = "auto"  # nvme_path "auto": the run's output.dir
_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")  # swapping to them moves memory to memory: no gain, the same RAM spent


def _mount_type(path: Path) -> str:
    """The file system type of the mount holding `path` (/proc/mounts, longest prefix)."""
    best, kind = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    resolved = str(path.resolve())
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:
            mount = fields[1].replace("\\040", " ")
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


def async_io_problem() -> str | None:
    """Why DeepSpeed's async_io op (what NVMe offload reads and writes with) cannot be built here, or None."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    try:
        if AsyncIOBuilder().is_compatible(verbose=False):
            return None
    except Exception as e:  # noqa: BLE001 - the op builder's own probe failing is the same answer
        return f"DeepSpeed's async_io op cannot be checked ({type(e).__name__}: {e})"
    return ("DeepSpeed's async_io op, which NVMe offload reads and writes with, needs libaio: install it "
            "(Debian/Ubuntu: apt-get install libaio-dev; RHEL/Fedora: dnf install libaio-devel) and run again")


def resolve(ds: dict[str, Any], out_dir: str) -> None:
    """nvme_path "auto" → output.dir; then the NVMe offload settings that would fail minutes into a run, or swap to
    memory: one line each, now."""
    from squad_ds.errors import ConfigError

    paths = nvme_paths(ds)
    if not paths:
        return
    for section, raw in paths.items():
        where = f"zero_optimization.{section}.nvme_path"
        if not raw or raw == "None":
            raise ConfigError(f"{where}: not set; give a folder on a fast local disk (or \"auto\": output.dir)")
        if raw == AUTO:
            ds["zero_optimization"][section]["nvme_path"] = raw = str(out_dir)
        path = Path(raw)
        probe = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{where}={raw}: not a folder")
        if not path.exists() and path.absolute() != Path(out_dir).absolute():
            raise ConfigError(f"{where}={raw}: no such folder; create it on a fast local disk, or use \"auto\" "
                              "(output.dir)")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}={raw}: this user cannot write in {probe}")
        kind = _mount_type(probe)
        if kind in _MEMORY_FILESYSTEMS:
            raise ConfigError(f"{where}={raw}: on {kind}, which is memory: offloading there saves no RAM; give a "
                              "folder on a disk")
    problem = async_io_problem()
    if problem:
        raise ConfigError(problem)


def swap_bytes(ds: dict[str, Any], num_params: int) -> int:
    """What DeepSpeed writes to NVMe for `num_params` parameters: fp32 weights and two Adam moments for the
    optimizer, the weights in the training dtype for the parameters."""
    zero = ds.get("zero_optimization") or {}
    half = (ds.get("bf16") or {}).get("enabled") or (ds.get("fp16") or {}).get("enabled")
    total = 0
    if (zero.get("offload_optimizer") or {}).get("device") == "nvme":
        total += 12 * num_params
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        total += (2 if half else 4) * num_params
    return total


# DeepSpeed's NVMe defaults suit a GPU host with RAM to spare: parameters up to max_in_cpu (1e9 elements) stay in
# RAM anyway, 5 pinned parameter buffers of 1e8 elements (2 GB in fp32), optimizer sub-groups of 1e9 elements
# (swapped through pinned buffers of that size) and reduce buckets of 5e8. For bert-base in fp32 on a CPU that made
# ZeRO-3 + NVMe peak at 7.1 GiB against 2.7 GiB in memory (bench/memory_fit.jsonl). Sized to the model instead:
SUB_GROUP = 10_000_000  # elements per optimizer sub-group (what one swap moves)
BUCKET = 10_000_000  # ZeRO-3's gradient reduce bucket, elements


def size_buffers(ds: dict[str, Any], largest_param: int) -> dict[str, Any]:
    """Fill the NVMe buffer settings the DeepSpeed JSON leaves out (a value it sets is kept): parameter buffers of
    the largest parameter's size (the least that works), none kept in RAM beyond them, small optimizer sub-groups
    and buckets. Returns what was filled."""
    paths = nvme_paths(ds)
    if not paths:
        return {}
    zero = ds["zero_optimization"]
    filled: dict[str, Any] = {}

    def fill(section: dict[str, Any], key: str, value: int, name: str) -> None:
        if key not in section:
            section[key] = value
            filled[name] = value

    if "offload_param" in paths:
        param = zero["offload_param"]
        fill(param, "buffer_size", -(-largest_param // 2**20) * 2**20, "offload_param.buffer_size")
        fill(param, "buffer_count", 4, "offload_param.buffer_count")
        fill(param, "max_in_cpu", 0, "offload_param.max_in_cpu")
    if "offload_optimizer" in paths:
        fill(zero, "sub_group_size", SUB_GROUP, "sub_group_size")
    fill(zero, "reduce_bucket_size", BUCKET, "reduce_bucket_size")
    if filled:
        log_main("NVMe offload: buffers sized for this model (the DeepSpeed JSON left them out): %s",
                 ", ".join(f"{k}={v}" for k, v in filled.items()))
    return filled


# ------------------------------------------------------------------------------------------- the swap folder
SWAP_PREFIX = "squad_ds_swap-"
SWAP_MARKER = ".squad_ds_swap.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_swap_folders(ds: dict[str, Any], num_params: int) -> list[Path]:
    """Each NVMe nvme_path becomes a folder of this process's own under it (marked; removed at the end), with room
    for what DeepSpeed will write checked first. Folders of earlier squad-ds processes on this host that are gone
    (killed) are removed: their markers prove whose they were. Changes `ds` in place; returns the folders made."""
    import shutil
    import socket

    from squad_ds.errors import ConfigError

    paths = nvme_paths(ds)
    if not paths:
        return []
    host = socket.gethostname()
    need = swap_bytes(ds, num_params)
    made: dict[Path, Path] = {}
    for section, raw in paths.items():
        base = Path(raw).absolute()
        if base not in made:
            base.mkdir(parents=True, exist_ok=True)
            _remove_stale(base, host)
            free = shutil.disk_usage(base).free
            if free < need:
                raise ConfigError(f"zero_optimization.{section}.nvme_path={raw}: {free / 2**30:.1f} GiB free, and "
                                  f"NVMe offload of {num_params / 1e6:.0f} M parameters writes about "
                                  f"{need / 2**30:.1f} GiB there; free space or choose another folder")
            folder = base / f"{SWAP_PREFIX}{host}-{os.getpid()}"
            folder.mkdir(exist_ok=True)
            (folder / SWAP_MARKER).write_text(json.dumps({"host": host, "pid": os.getpid()}) + "\n")
            made[base] = folder
        ds["zero_optimization"][section]["nvme_path"] = str(made[base])
    log_main("NVMe offload: swapping to %s (about %.1f GiB; removed at the end of the run)",
             ", ".join(str(f) for f in made.values()), need / 2**30)
    return list(made.values())


def _remove_stale(base: Path, host: str) -> None:
    import shutil

    for folder in base.glob(f"{SWAP_PREFIX}*"):
        try:
            mark = json.loads((folder / SWAP_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not provably squad-ds's
        if (isinstance(mark, dict) and mark.get("host") == host and isinstance(mark.get("pid"), int)
                and not _alive(mark["pid"]) and not folder.is_symlink()):
            shutil.rmtree(folder, ignore_errors=True)
            log_main("NVMe offload: removed %s, left by an earlier run that ended without its clean-up", folder)


def remove_swap_folders(folders: list[Path]) -> None:
    import shutil

    for folder in folders:
        if (folder / SWAP_MARKER).is_file() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------- reading a saved checkpoint
def subgroup_file(rank: int) -> str:
    return f"nvme_subgroups_rank{rank}.json"


def write_subgroup_map(engine, tag_dir: Path, rank: int) -> None:
    """Which optimizer sub-groups this rank's checkpoint keeps as swap files (offloaded_tensors/rankNN/ID.tensor.swp)
    and their sizes: what reading the weights back without an engine needs (DeepSpeed records it nowhere)."""
    opt = engine.optimizer
    groups = [{"swapped": bool(opt._swappable_optimizer_subgroup(i)), "id": str(getattr(fp32, "ds_id", "")),
               "numel": int(opt.fp16_partitioned_groups_flat_numel[i])}
              for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat)]
    (tag_dir / subgroup_file(rank)).write_text(json.dumps({"subgroups": groups}) + "\n")


def state_dict_from_offloaded(ckpt_dir: Path, tag: str):
    """The fp32 weights of a ZeRO-3 checkpoint whose optimizer was on NVMe. DeepSpeed's zero_to_fp32 reads only the
    in-memory sub-groups of such a checkpoint ("consumed N numels out of M"); the swapped ones are raw fp32 files
    under offloaded_tensors/. Their tensors fill the gaps, then zero_to_fp32's own merge runs."""
    import numpy as np
    import torch
    from deepspeed.utils import zero_to_fp32 as z

    from squad_ds.errors import CheckpointError

    tag_dir = Path(ckpt_dir) / tag
    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    stage, world_size, fp32_flat_groups, _ = z.parse_optim_states(z.get_optim_files(str(tag_dir)), str(tag_dir))
    for rank, groups in enumerate(fp32_flat_groups):
        try:
            recorded = json.loads((tag_dir / subgroup_file(rank)).read_text())["subgroups"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{tag_dir}: an NVMe-offloaded checkpoint without squad-ds's {subgroup_file(rank)} "
                                  "(saved by another program, or damaged): its weights cannot be read") from None
        rank_dir = tag_dir / "offloaded_tensors" / f"rank{rank:02d}"
        for i, sub in enumerate(recorded):
            if not sub.get("swapped"):
                continue
            path = rank_dir / f"{Path(str(sub['id'])).name}.tensor.swp"
            numel = int(sub["numel"])
            if not path.is_file() or path.stat().st_size < 4 * numel:
                raise CheckpointError(f"{path}: missing or short ({numel} fp32 values expected)")
            groups[i] = torch.from_numpy(np.fromfile(path, dtype=np.float32, count=numel))
    if stage != 3:
        raise CheckpointError(f"{tag_dir}: NVMe offload is ZeRO-3's; this checkpoint says stage {stage}")
    return z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(world_size, fp32_flat_groups, model_states,
                                                                          False))
