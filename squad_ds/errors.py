"""The errors that mean "your input is wrong" (as opposed to a bug): one clear line and exit status 2."""
from __future__ import annotations

import sys
from typing import Callable

from squad_ds.config import ConfigError
from squad_ds.data import SquadFormatError
from squad_ds.modeling.factory import ModelLoadError



class CheckpointError(Exception):
    """A checkpoint that cannot be used as it is: damaged, unsafe, or from a run that differs in what it means."""


USER_ERRORS = (ConfigError, SquadFormatError, ModelLoadError, FileNotFoundError, CheckpointError)


def run_main(prog: str, run: Callable[[], int]) -> int:
    try:
        status = run()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        status = 2
    # A clean end or an input error: leave the process group explicitly. Left to the interpreter's exit, gloo's
    # threads can be torn down under a peer that already left (seen: SIGABRT after the error message). A bug's
    # traceback skips this and exits as Python does.
    _leave_process_group()
    return status


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
