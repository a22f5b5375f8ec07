"""The errors that mean "your input is wrong" (as opposed to a bug): one clear line and exit status 2."""
from __future__ import annotations

import sys
from typing import Callable

from squad_ds.config import ConfigError
from squad_ds.data import SquadFormatError
from squad_ds.modeling.factory import ModelLoadError

USER_ERRORS = (ConfigError, SquadFormatError, ModelLoadError, FileNotFoundError)


def run_main(prog: str, run: Callable[[], int]) -> int:
    try:
        return run()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
