"""The record a squad-ds export leaves in its model directory (squad_ds.json: the recipe, step and scores), and
the settings a model directory is run with by `predict`, `ask` and `serve`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from squad_ds.config import Recipe, apply_overrides, load_recipe, recipe_from_dict
from squad_ds.errors import ConfigError

MODEL_RECORD = "squad_ds.json"  # written into every model directory squad-ds exports (training/export.py)


def model_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The squad_ds.json of a model directory squad-ds exported (recipe, step, scores), or None for any other
    model; one that is there but unreadable is a ConfigError."""
    path = Path(model_dir) / MODEL_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record["recipe"], dict):
            raise TypeError("no recipe object in it")
    except (ValueError, KeyError, TypeError) as e:  # not JSON, not UTF-8, or no recipe in it
        raise ConfigError(f"{path}: not a squad-ds model record with its recipe ({type(e).__name__}: {e}); "
                          "give --recipe, or remove the file to use the default settings") from None
    return record


def recipe_for_model(model_dir: str | Path, recipe_name: str | None, overrides: list[str]) -> Recipe:
    """The settings to run a model directory with: a recipe given by name, else the one it was exported with
    (its squad_ds.json), else the default recipe; `--set` overrides on top."""
    if recipe_name:
        return load_recipe(recipe_name, overrides)
    record = model_record(model_dir)
    if record is not None:
        return recipe_from_dict(apply_overrides(record["recipe"], overrides), str(Path(model_dir) / MODEL_RECORD))
    return load_recipe(None, overrides)
