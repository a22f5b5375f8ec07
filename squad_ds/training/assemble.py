"""The one place a run is assembled: recipe + DeepSpeed config (`resolve_run`), then tokenizer, features, step
plan, model and engine (`build_run`). `squad-ds train`, `squad-ds config`, `squad-ds tune` and its trials use these,
so what `config` prints and what `tune` measures is what `train` runs.

Order matters and is kept here: a recipe that contradicts its DeepSpeed JSON fails before any tokenizing or model
loading (`resolve_run` resolves once with a placeholder feature count); the real plan needs the feature count.
"""
from __future__ import annotations

import atexit
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from squad_ds.config import ConfigError, Recipe, list_recipes, load_recipe
from squad_ds.data.files import resolve_data_path
from squad_ds.data.preprocess import load_features
from squad_ds.errors import WorldSizeError
from squad_ds.logs import log_main
from squad_ds.modeling.factory import (ModelLoadError, check_max_seq_length, count_parameters, load_config,
                                      load_qa_model, load_tokenizer)
from squad_ds.modeling.heads import model_family
from squad_ds.training.ds_config import TrainPlan, default_ds_config, load_ds_config, resolve_ds_config
from squad_ds.training import allocator, memory, nvme
from squad_ds.training.engine import build_engine, fused_dropout_policy, partitioned_construction

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """A run's settings, checked against each other: the recipe, the DeepSpeed JSON as loaded, and where it runs."""
    recipe: Recipe
    ds_name: str
    ds_raw: dict[str, Any]  # with the --ds-set overrides applied
    world_size: int
    cuda: bool
    ds_overrides: tuple[str, ...] = ()
    ds_reason: str = ""  # why this config, when the run named none (the hardware's default, measured on a CPU)

    def plan(self, num_features: int) -> tuple[dict[str, Any], TrainPlan]:
        """The resolved DeepSpeed JSON and the step plan for `num_features` train features."""
        return resolve_ds_config(self.ds_raw, self.recipe, world_size=self.world_size, num_features=num_features,
                                 cuda=self.cuda)

    def effective_document(self, num_features: int) -> dict[str, Any]:
        """What the trainer writes to OUTPUT/effective_config.json and `squad-ds config` prints."""
        ds_cfg, plan = self.plan(num_features)
        return {"recipe": self.recipe.to_dict(), "deepspeed": ds_cfg, "deepspeed_config_file": str(self.ds_name),
                **({"deepspeed_config_chosen": self.ds_reason} if self.ds_reason else {}),
                "deepspeed_overrides": list(self.ds_overrides),
                "plan": {**plan.__dict__, "global_batch": plan.global_batch, "num_features": num_features}}


def run_spec(recipe: Recipe, deepspeed_config: str | None, *, world_size: int, cuda: bool,
             ds_overrides: Sequence[str] = ()) -> RunSpec:
    """`recipe` with its DeepSpeed JSON (`deepspeed_config`, else the recipe's, else the hardware's: measured on a
    CPU) and that JSON's `--ds-set` overrides, checked now: contradictions between them fail before any data or
    model work."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be a positive integer")
    ds_name, reason = deepspeed_config or recipe.deepspeed_config, ""
    if not ds_name:
        ds_name, reason = default_ds_config(cuda, world_size)
    spec = RunSpec(recipe, str(ds_name), load_ds_config(ds_name, ds_overrides), world_size, cuda, tuple(ds_overrides),
                   reason)
    spec.plan(1)
    fused_dropout_policy(recipe, cuda)
    return spec


def resolve_run(recipe_name: str | None, overrides: list[str], deepspeed_config: str | None, *, world_size: int,
                cuda: bool, ds_overrides: Sequence[str] = ()) -> RunSpec:
    """A named recipe (or YAML file) with its `--set` overrides, and its DeepSpeed JSON: see `run_spec`."""
    recipe = load_recipe(recipe_name, overrides)
    try:
        return run_spec(recipe, deepspeed_config, world_size=world_size, cuda=cuda, ds_overrides=ds_overrides)
    except WorldSizeError as e:
        variant = f"{recipe_name}_large_batch"
        if world_size == 1 and variant in list_recipes():
            raise ConfigError(f"{e}; or use the recipe {variant} (the same global batch on one GPU)") from None
        raise


@dataclass
class Run:
    """Everything a training process builds from its RunSpec."""
    spec: RunSpec
    tokenizer: Any
    train_features: Any
    eval_features: Any | None
    eval_set: Any | None
    ds_config: dict[str, Any]
    plan: TrainPlan
    model: Any
    family: str
    engine: Any

    def effective_document(self) -> dict[str, Any]:
        return self.spec.effective_document(len(self.train_features))


def load_tokenizer_for(recipe: Recipe):
    check_max_seq_length(recipe.model.name_or_path, recipe.data.max_seq_length)
    return load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path)


def load_run_features(recipe: Recipe, tokenizer, with_eval: bool = True):
    """(train features, eval features, eval dataset); the eval pair is (None, None) without an eval file."""
    d = recipe.data
    train, _ = load_features(resolve_data_path(d.train_file, "data.train_file"), tokenizer, d, "train",
                             d.max_train_examples)
    if not (with_eval and d.eval_file):
        return train, None, None
    eval_features, eval_set = load_features(resolve_data_path(d.eval_file, "data.eval_file"), tokenizer, d, "eval",
                                            d.max_eval_examples)
    return train, eval_features, eval_set


def build_run(spec: RunSpec, *, with_eval: bool = True) -> Run:
    """Tokenizer, features, plan, model and DeepSpeed engine, in that order. The caller has initialised the process
    group and seeded the RNGs (the QA head's initialisation draws from them)."""
    recipe = spec.recipe
    tokenizer = load_tokenizer_for(recipe)
    train, eval_features, eval_set = load_run_features(recipe, tokenizer, with_eval)
    ds_config, plan = spec.plan(len(train))
    _log.debug("%s", allocator.configure(ds_config, recipe.train.activation_checkpointing))  # before the model
    params, largest = count_parameters(recipe.model.name_or_path)
    shape = memory.Shape.of(load_config(recipe.model.name_or_path), params)
    nvme.size_buffers(ds_config, largest)
    warning = memory.preflight(shape, ds_config, ranks=spec.world_size, seq=recipe.data.max_seq_length,
                               micro=plan.micro_batch, checkpointing=recipe.train.activation_checkpointing,
                               cuda=spec.cuda)
    if warning:
        log_main("%s", warning)
    engine_ds = copy.deepcopy(ds_config)  # NVMe paths become this process's own swap folders (nvme.py)
    swap = nvme.make_swap_folders(engine_ds, shape.params)
    atexit.register(nvme.remove_swap_folders, swap)
    with partitioned_construction(engine_ds):
        model = load_qa_model(recipe.model.name_or_path, attn_implementation=recipe.model.attn_implementation)
    engine, _, _ = build_engine(model, engine_ds, recipe, cuda=spec.cuda)
    return Run(spec, tokenizer, train, eval_features, eval_set, ds_config, plan, model, model_family(model.config),
               engine)


def count_train_features(recipe: Recipe) -> int:
    """Train features as a run would have them (cached featurizer, `data.max_train_examples` applied)."""
    if not recipe.data.train_file:
        raise ConfigError("data.train_file: not set, so the step plan has no data to count (pass --num-features N)")
    try:
        tokenizer = load_tokenizer_for(recipe)
    except ModelLoadError as e:  # a usage error like any other bad recipe value: exit 2 with the message
        raise ConfigError(f"model.{'tokenizer' if recipe.model.tokenizer else 'name_or_path'}: {e}") from e
    return len(load_run_features(recipe, tokenizer, with_eval=False)[0])
