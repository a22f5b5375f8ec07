"""Run the trainer and kill -9 it at a chosen moment: `python fault_inject.py PHASE N TRAIN_ARGS...`.

PHASE N: the N-th (1-based) occurrence of
  train   a training micro-batch, after its backward and before its optimizer step
  save    a checkpoint, once every file is written and before its completion marker (rank 0, which writes it)
  shard   a checkpoint on this rank, once DeepSpeed has written its files and before the ranks meet to mark it
  eval    a mid-run evaluation, after predictions.json and before the rest of its files
  export  the export, once the weights are written and before squad_ds.json
The trainer runs unchanged otherwise (the patches only count and kill). With FAULT_ACTION=enospc the N-th
occurrence raises "No space left on device" instead of killing (a disk that fills at that moment); with
FAULT_ACTION=hang it creates the file FAULT_FLAG and waits there for ever (a process caught mid-save, for the test to
take its host away).
"""
import errno
import os
import signal
import sys
import time

from squad_ds import atomic, train
from squad_ds.scoring import postprocess
from squad_ds.training import checkpoint

phase, target = sys.argv[1], int(sys.argv[2])
seen = {"n": 0}


def hit() -> None:
    seen["n"] += 1
    if seen["n"] == target:
        if os.environ.get("FAULT_ACTION") == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if os.environ.get("FAULT_ACTION") == "hang":
            open(os.environ["FAULT_FLAG"], "w").close()
            while True:
                time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)


if phase == "train":
    real_backward = None
    real_step = train.train_step

    def train_step(engine, batch, family, config):
        global real_backward
        if real_backward is None:
            real_backward = engine.backward

            def backward(loss, *a, **k):
                out = real_backward(loss, *a, **k)
                hit()
                return out

            engine.backward = backward
        return real_step(engine, batch, family, config)

    train.train_step = train_step
elif phase == "save":
    real_digests = checkpoint.file_digests

    def file_digests(tag_dir):
        hit()
        return real_digests(tag_dir)

    checkpoint.file_digests = file_digests
elif phase == "shard":
    real_rng_state = checkpoint.rng_state

    def rng_state():
        hit()
        return real_rng_state()

    checkpoint.rng_state = rng_state
elif phase == "eval":
    real_write_json = atomic.write_json

    def write_json(path, obj, indent=2):
        out = real_write_json(path, obj, indent)
        if os.path.basename(os.path.dirname(path)).startswith("eval-") and os.path.basename(path) == "predictions.json":
            hit()
        return out

    postprocess.atomic.write_json = write_json
elif phase == "export":
    real_write_json = atomic.write_json

    def write_json(path, obj, indent=2):
        if os.path.basename(path) == "squad_ds.json":
            hit()
        return real_write_json(path, obj, indent)

    checkpoint.atomic.write_json = write_json
else:
    sys.exit(f"unknown phase {phase!r}")

sys.exit(train.main(sys.argv[3:]))
