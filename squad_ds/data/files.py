"""Where a recipe's data file names point: `sample:NAME` for the shipped samples, `hf:NAME[@SPLIT]` for Hugging Face
datasets, paths with `$VARS` expanded (SQuAD JSON, or a flat file / saved dataset: formats.py)."""
from __future__ import annotations

import os
from pathlib import Path

from squad_ds.data import formats
from squad_ds.errors import ConfigError
from squad_ds.sample_data import SAMPLE_DEV, SAMPLE_DEV_V2, SAMPLE_TRAIN

SAMPLES = {"train": SAMPLE_TRAIN, "dev": SAMPLE_DEV, "dev-v2": SAMPLE_DEV_V2}


def resolve_data_path(name: str | None, key: str = "data file") -> str:
    if not name:
        raise ConfigError(f"{key}: no file given (a path, or sample:{'|'.join(SAMPLES)})")
    if name.startswith("sample:"):
        key = name.split(":", 1)[1]
        if key not in SAMPLES:
            raise ConfigError(f"data file {name!r}: shipped samples are {', '.join('sample:' + k for k in SAMPLES)}")
        return str(SAMPLES[key])
    if name.startswith(formats.HF_PREFIX):
        if not name.removeprefix(formats.HF_PREFIX).partition("@")[0]:
            raise ConfigError(f"data file {name!r}: name a dataset, e.g. hf:rajpurkar/squad@validation")
        return name
    expanded = os.path.expandvars(os.path.expanduser(name))
    if "$" in expanded:
        raise ConfigError(f"data file {name!r}: an environment variable in it is not set (e.g. SQUAD_DIR)")
    if Path(expanded).is_dir() or (not Path(expanded).exists() and formats.is_saved_dataset(expanded)):  # DIR@SPLIT
        if not formats.is_flat(expanded):
            raise ConfigError(f"data file {expanded}: a directory, but not a dataset saved with save_to_disk")
        return expanded
    if not Path(expanded).is_file():
        raise FileNotFoundError(f"data file {expanded}: no such file")
    return expanded
