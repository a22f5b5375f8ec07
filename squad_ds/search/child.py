"""`python -m squad_ds.search.child CMD…`: run CMD so that it is told to stop (SIGTERM, which `squad-ds train`
takes as a preemption) when the search process that started it dies, even by SIGKILL: Linux's parent-death signal
survives the exec. Then the killed search's trial is not left training on, unseen, beside its rerun."""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1

if __name__ == "__main__":
    parent = int(os.environ.pop("SQUAD_DS_SEARCH_PID", "0"))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the trial outlives a killed search (the rerun gets its own folder)
        pass
    if parent and os.getppid() != parent:  # the search died before the signal was armed
        sys.exit(75)
    os.execvp(sys.argv[1], sys.argv[1:])
