"""The one effective configuration of a run: recipe + resolved DeepSpeed JSON + step plan.

`effective_document` is what the trainer writes to OUTPUT/effective_config.json at start and what
`squad-ds config` prints without training; `effective_config` resolves it the way `train.run` does, counting the
train features with the cached featurizer unless told how many there are.
"""
from __future__ import annotations

import os
from typing import Any

from squad_ds.config import ConfigError, Recipe, load_recipe
from squad_ds.engine import (
    TrainPlan,
    default_ds_config_name,
    load_ds_config,
    resolve_ds_config,
)


def effective_document(recipe: Recipe, ds_cfg: dict[str, Any], ds_name: str, plan: TrainPlan,
                       num_features: int) -> dict[str, Any]:
    return {"recipe": recipe.to_dict(), "deepspeed": ds_cfg, "deepspeed_config_file": str(ds_name),
            "plan": {**plan.__dict__, "global_batch": plan.global_batch, "num_features": num_features}}


def count_train_features(recipe: Recipe) -> int:
    """Train features as `train.run` would have them (cached featurizer, `data.max_train_examples` applied)."""
    from squad_ds.data_files import resolve_data_path
    from squad_ds.modeling.factory import ModelLoadError, load_tokenizer
    from squad_ds.preprocess import load_features

    if not recipe.data.train_file:
        raise ConfigError("data.train_file: not set, so the step plan has no data to count (pass --num-features N)")
    name = recipe.model.tokenizer or recipe.model.name_or_path
    try:
        tokenizer = load_tokenizer(name)
    except ModelLoadError as e:  # a usage error like any other bad recipe value: exit 2 with the message
        raise ConfigError(f"model.{'tokenizer' if recipe.model.tokenizer else 'name_or_path'}: {e}") from e
    feats, _ = load_features(resolve_data_path(recipe.data.train_file), tokenizer, recipe.data, "train",
                             recipe.data.max_train_examples)
    return len(feats)


def effective_config(recipe_name: str | None, overrides: list[str], deepspeed_config: str | None = None, *,
                     world_size: int | None = None, num_features: int | None = None,
                     cuda: bool | None = None) -> dict[str, Any]:
    """`squad-ds config`: the document a run would write, without loading a model. ConfigError on bad input."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size}: must be a positive integer")
    if num_features is not None and num_features < 1:
        raise ConfigError(f"--num-features {num_features}: must be a positive integer")
    recipe = load_recipe(recipe_name, overrides)
    ds_name = deepspeed_config or recipe.deepspeed_config or default_ds_config_name(cuda, world_size)
    ds_raw = load_ds_config(ds_name)
    # Contradictions fail before any tokenizing, as in train.run.
    resolve_ds_config(ds_raw, recipe, world_size=world_size, num_features=1, cuda=cuda)
    if num_features is None:
        num_features = count_train_features(recipe)
    ds_cfg, plan = resolve_ds_config(ds_raw, recipe, world_size=world_size, num_features=num_features, cuda=cuda)
    return effective_document(recipe, ds_cfg, ds_name, plan, num_features)
