"""`squad-ds config`: the effective configuration of a run (recipe + resolved DeepSpeed JSON + step plan), assembled
as `squad-ds train` assembles it (assemble.py) but without loading a model. The train features are counted with the
cached featurizer unless told how many there are."""
from __future__ import annotations

import os
from typing import Any

from squad_ds.config import ConfigError
from squad_ds.training.assemble import count_train_features, resolve_run


def effective_config(recipe_name: str | None, overrides: list[str], deepspeed_config: str | None = None, *,
                     world_size: int | None = None, num_features: int | None = None,
                     cuda: bool | None = None, ds_overrides: list[str] | None = None) -> dict[str, Any]:
    """The document a run would write to OUTPUT/effective_config.json. ConfigError on bad input."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size}: must be a positive integer")
    if num_features is not None and num_features < 1:
        raise ConfigError(f"--num-features {num_features}: must be a positive integer")
    spec = resolve_run(recipe_name, overrides, deepspeed_config, world_size=world_size, cuda=cuda,
                       ds_overrides=ds_overrides or ())
    if num_features is None:
        num_features = count_train_features(spec.recipe)
    return spec.effective_document(num_features)
