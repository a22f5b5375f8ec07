"""`squad-ds tune`'s options and output folder, checked before any work: one line naming the option."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from squad_ds.config import ConfigError

# What marks a folder as a training run's or a model's (as for predict's --out-dir): not a place for trials.
NOT_TUNE_DIR = ("train_log.jsonl", "checkpoints", "effective_config.json", "config.json", "squad_ds.json")


def check_options(args: argparse.Namespace) -> None:
    if args.nproc < 1 or args.trial_steps < 1:
        raise ConfigError("--trial-steps and --nproc must be positive")
    if not args.stages:
        raise ConfigError("--stages: no ZeRO stage given (e.g. --stages 0,2)")
    bad = [s for s in args.stages if s not in (0, 1, 2, 3)]
    if bad:
        raise ConfigError(f"--stages: ZeRO stages are 0, 1, 2 and 3, got {bad}")
    # NaN compares false with everything: a NaN budget or timeout never ran out, a NaN cap crashed.
    for name, value, finite in (("--budget-s", args.budget_s, False), ("--trial-timeout-s", args.trial_timeout_s,
                                False), ("--max-mem-gb", args.max_mem_gb, True)):
        if value is not None and not (value > 0 and (not finite or math.isfinite(value))):
            raise ConfigError(f"{name} {value}: must be a positive number{' of GB' if finite else ' of seconds'}")


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out}: exists and is not a directory (choose another path)")
    mark = next((n for n in NOT_TUNE_DIR if (out / n).exists()), None)
    if mark is not None:
        raise ConfigError(f"--out-dir {out}: holds {mark}, so it is a training run's or a model's folder: the "
                          "trials would mix into its files (choose another path, e.g. a new folder inside it)")
