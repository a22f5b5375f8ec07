"""SIGUSR1 / SIGTERM set a flag that the training loop reads at optimizer-step boundaries: it then checkpoints on
every rank and exits with status 75 for a requeue. Standard library only, so that entry points install it before
their heavy imports: a signal during the seconds of start-up is then a requeue, not a kill without a checkpoint."""
from __future__ import annotations

import signal


class Flag:
    requested = False


_flag: Flag | None = None


def install() -> Flag:
    """The process's flag, with the handlers installed on first use."""
    global _flag
    if _flag is None:
        flag = Flag()

        def handle(signum, frame):
            flag.requested = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handle)
        _flag = flag
    return _flag
