"""Typed recipe configuration: dataclasses validated on construction, YAML recipes, `--set` overrides.

The recipe owns SQuAD, model, schedule-length and output settings. DeepSpeed's JSON owns batch sizes, optimizer,
precision, ZeRO, clipping and the scheduler; the few values both know (micro-batch, accumulation, learning rate,
warmup, weight decay) are `None` here unless the recipe sets them, and `ds_config.resolve_ds_config` reconciles the two.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from squad_ds.errors import ConfigError

RECIPE_DIR = Path(__file__).with_name("recipes")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-5` (no dot) as a string; anyone writing it means a number. Quoted stays a string."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              __import__("re").compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_choices(obj: Any, section: str) -> None:
    """Every field of `obj` typed Literal[...] (or Literal[...] | None) holds one of its choices."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        _coerce(getattr(obj, name), tp, f"{section}.{name}")


# Choice fields: the Literal type is the one list of choices (the CLI's and the errors' lists come from it).
AttnImplementation = Literal["sdpa", "eager"]
SdpaBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]  # see modeling/sdpa.py
SquadVersion = Literal["1.1", "2.0"]
Optimizer = Literal["auto", "deepspeed", "torch_fused_adamw", "apex_fused_adam"]
ReportTo = Literal["tensorboard", "csv", "wandb"]  # DeepSpeed's monitors
BestMetric = Literal["f1", "exact_match", "HasAns_f1", "best_f1"]  # the last two: SQuAD v2.0 only
OPTIMIZERS = typing.get_args(Optimizer)


@dataclass
class ModelConfig:
    name_or_path: str = "all-MiniLM-L6-v2"
    tokenizer: str | None = None  # defaults to name_or_path
    attn_implementation: AttnImplementation = "sdpa"
    # SDPA kernel tried first: auto (torch's order) | cudnn | flash | efficient | math (see modeling/sdpa.py)
    sdpa_backend: SdpaBackend = "auto"
    # Dropout (hidden and attention) in training through squad-ds's CPU kernel (modeling/fused_dropout.py): the same
    # keep probability and scaling, drawn from a hash instead of torch's Bernoulli sampler, attention fused per
    # head. null: on on CPU, off on CUDA (whose SDPA kernels draw the mask in-kernel already); true needs a CPU.
    fused_dropout: bool | None = None

    def __post_init__(self):
        _check_choices(self, "model")
        _check(self.sdpa_backend == "auto" or self.attn_implementation == "sdpa", "model.sdpa_backend",
               f"{self.sdpa_backend!r} chooses an SDPA kernel, but model.attn_implementation is "
               f"{self.attn_implementation!r}")


@dataclass
class DataConfig:
    # "sample:train" / "sample:dev" / "sample:dev-v2" name the small real SQuAD samples shipped in the package.
    train_file: str | None = "sample:train"
    eval_file: str | None = "sample:dev"
    version: SquadVersion | None = None  # None: taken from the files (which must agree)
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    cache_dir: str | None = None
    num_workers: int | None = None
    # Batches cut to their longest sequence (train and eval). null: on CPU yes, on CUDA no (measured, see
    # batching.trim_policy); pad_to_multiple_of rounds the trimmed length up, bounding the number of batch shapes.
    trim_padding: bool | None = None
    pad_to_multiple_of: int = 1
    # Packed batches (squad_ds/data/packing.py): only real tokens go through the projections and feed-forward layers;
    # attention re-pads to the batch's longest sequence (rounded up to pad_to_multiple_of). BERT with absolute
    # (transformers', SDPA) or relative (squad-ds's) positions; replaces trim_padding (train and eval).
    unpad: bool = False
    # For flat files and datasets (data/formats.py): the layout's column -> the data's, e.g. {question: query}.
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        _check_choices(self, "data")
        _check(self.max_seq_length > 0, "data.max_seq_length", "must be positive")
        _check(0 < self.doc_stride < self.max_seq_length, "data.doc_stride", "must be in (0, max_seq_length)")
        _check(0 < self.max_query_length < self.max_seq_length, "data.max_query_length",
               "must be in (0, max_seq_length)")
        _check(self.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", "must be a positive integer")
        for k in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, k)
            _check(v is None or v > 0, f"data.{k}", "must be positive or null")
        _check(self.num_workers is None or self.num_workers >= 1, "data.num_workers", "must be >= 1 or null")


@dataclass
class EvalConfig:
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    batch_size: int = 64  # per process (XLNet's beam sizes are the model config's start_n_top/end_n_top)

    def __post_init__(self):
        for k in ("n_best_size", "max_answer_length", "batch_size"):
            _check(getattr(self, k) > 0, f"eval.{k}", "must be positive")


@dataclass
class TrainConfig:
    epochs: float = 2.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    seed: int = 42
    # Shared with the DeepSpeed JSON (None: not set by the recipe; see ds_config.resolve_ds_config).
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    train_batch_size: int | None = None
    lr: float | None = None
    warmup_proportion: float | None = None
    weight_decay: float | None = None
    activation_checkpointing: bool = False
    group_by_length: bool = True  # similar lengths share an optimizer step, so trimmed batches carry less padding
    # auto | deepspeed (as the JSON says: DeepSpeed's FusedAdam on CUDA) | torch_fused_adamw (torch.optim.AdamW with
    # fused=True, through DeepSpeed's torch_adam switch) | apex_fused_adam (NVIDIA apex, when importable)
    optimizer: Optimizer = "auto"
    compile: bool = False  # torch.compile the model through engine.compile() (DeepSpeed's supported route)
    eval_steps: int = 0  # evaluate every N optimizer steps (0: only at the end)
    save_steps: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    keep_last: int = 2
    # The best evaluation by metric_for_best: keep_best keeps its checkpoint besides keep_last's (never pruned by
    # it), output.export=best exports it, and early_stopping_patience ends the run after that many evaluations
    # without a better score. Each evaluation then also saves a checkpoint, so that the best one exists.
    metric_for_best: BestMetric = "f1"
    keep_best: bool = False
    early_stopping_patience: int = 0  # 0: never stop early
    log_steps: int = 10
    # DeepSpeed monitors switched on from here (the DeepSpeed JSON needs no copy): loss, lr, samples/s, TFLOP/s and
    # the dev scores, written under OUTPUT/monitor (tensorboard, csv) or to Weights & Biases (WANDB_MODE=offline
    # keeps it local).
    report_to: list[ReportTo] = field(default_factory=list)
    peak_tflops: float | None = None  # for MFU; None: detected for known GPUs

    def __post_init__(self):
        _check(self.epochs > 0, "train.epochs", "must be positive")
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps", "must be positive or null")
        for k in ("micro_batch_size", "gradient_accumulation_steps", "train_batch_size"):
            v = getattr(self, k)
            _check(v is None or v > 0, f"train.{k}", "must be a positive integer or null")
        _check(self.lr is None or self.lr > 0, "train.lr", "must be positive")
        _check(self.weight_decay is None or self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.warmup_proportion is None or 0 <= self.warmup_proportion < 1, "train.warmup_proportion",
               "must be in [0, 1)")
        _check_choices(self, "train")
        for k in ("eval_steps", "save_steps", "log_steps"):
            _check(getattr(self, k) >= 0, f"train.{k}", "must be >= 0")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")


@dataclass
class DistributedConfig:
    # Seconds a collective may wait for the other ranks before the run fails (torch's default for gloo: 1800).
    timeout_s: float = 1800.0
    # Seconds to wait for every rank to join at start-up: a rank that died before joining fails the others after
    # this, not after timeout_s.
    rendezvous_timeout_s: float = 600.0

    def __post_init__(self):
        for k in ("timeout_s", "rendezvous_timeout_s"):
            _check(getattr(self, k) > 0, f"distributed.{k}", "must be positive")


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    # The HF model directory written at the end (OUTPUT/model): true or "last" (the last step), "best" (the best
    # evaluation's checkpoint, train.metric_for_best), false (none).
    export: bool | Literal["last", "best"] = True

    @property
    def export_from(self) -> str | None:
        return {True: "last", False: None}.get(self.export, self.export)  # type: ignore[arg-type]


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    deepspeed_config: str | None = None  # path or name in ds_configs/; None: chosen for the hardware
    description: str = ""
    expected: dict[str, float] = field(default_factory=dict)  # published dev scores, for the record
    # Processes (GPUs) the batch settings were published or written for; None: any. Informational (`squad-ds
    # recipes`, and the way out when a global batch does not divide over another count); never sets the world size.
    published_world_size: int | None = None

    def __post_init__(self):
        _check(self.published_world_size is None or self.published_world_size > 0, "published_world_size",
               "must be a positive integer or null")
        tr = self.train
        if tr.metric_for_best in ("HasAns_f1", "best_f1"):
            _check(self.data.version != "1.1", "train.metric_for_best",
                   f"{tr.metric_for_best} exists for SQuAD v2.0 only (data.version is {self.data.version})")
        if self.tracks_best:
            wants = ("train.keep_best" if tr.keep_best else "output.export=best" if self.output.export == "best"
                     else "train.early_stopping_patience")
            _check(self.data.eval_file is not None, wants, "needs evaluations: set data.eval_file")
        if tr.early_stopping_patience:
            _check(tr.eval_steps > 0, "train.early_stopping_patience",
                   "counts evaluations during the run: set train.eval_steps too")

    @property
    def tracks_best(self) -> bool:
        return self.train.keep_best or self.output.export == "best" or self.train.early_stopping_patience > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = typing.get_type_hints(Recipe)
_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig, "train": TrainConfig,
                    "output": OutputConfig, "distributed": DistributedConfig}


def _is_mapping_key(keys: list[str]) -> bool:
    cls = _SECTION_CLASSES.get(keys[0])
    return cls is not None and typing.get_origin(typing.get_type_hints(cls).get(keys[1])) is dict


def _check_key(keys: list[str], flag_text: str) -> None:
    """An override's key exists: the error blames the flag that gave it, not the recipe file."""
    section = _SECTION_CLASSES.get(keys[0])
    if keys[0] not in _SECTIONS:
        raise ConfigError(f"{flag_text}: unknown key {keys[0]!r} (known: {', '.join(_SECTIONS)})")
    if section is not None and len(keys) >= 2 and keys[1] not in typing.get_type_hints(section):
        raise ConfigError(f"{flag_text}: unknown key {'.'.join(keys)} (known: "
                          f"{', '.join(typing.get_type_hints(section))})")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return ", ".join(map(repr, typing.get_args(tp)))
    return {bool: "true/false", type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against a (resolved) dataclass field type, allowing int→float; raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        hint = " (a number: quote it)" if isinstance(value, (int, float)) and str(value) in choices else ""
        _check(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # X | None: X's own message
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
    if origin is list:
        item = typing.get_args(tp)[0]
        _check(isinstance(value, list), key, f"expected a list of {_describe(item)}, e.g. [a, b], got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return {str(k): _coerce(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        _check(math.isfinite(value), key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    _check(isinstance(raw, dict), source, "a recipe must be a mapping of sections")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown key {name!r} (known: {', '.join(_SECTIONS)})")
        section_cls = _SECTION_CLASSES.get(name)
        if section_cls is None:
            kwargs[name] = _coerce(value, _SECTIONS[name], name)
            continue
        value = value or {}
        _check(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
        fields = typing.get_type_hints(section_cls)
        section_kwargs = {}
        for k, v in value.items():
            if k not in fields:
                raise ConfigError(f"{source}: unknown key {name}.{k} (known: {', '.join(fields)})")
            section_kwargs[k] = _coerce(v, fields[k], f"{name}.{k}")
        kwargs[name] = section_cls(**section_kwargs)
    return Recipe(**kwargs)


def add_recipe_arguments(p: Any, *, positional: bool = False, recipe_help: str | None = None) -> None:
    """The recipe and `--set` options every sub-command that reads a recipe shares (one declaration)."""
    help_ = recipe_help or "named recipe or YAML file (default: the embedded demo)"
    if positional:
        p.add_argument("recipe", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--recipe", default=None, help=help_)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable)")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"recipe: {p}: no such file")
        return p
    named = RECIPE_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        raise ConfigError(f"recipe: {name_or_path!r} is neither a YAML file nor a named recipe "
                          f"(named: {', '.join(list_recipes())})")
    return named


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """`section.key=value` (`flag`'s argument), the value parsed as YAML (so 3e-5, true, null and lists work)."""
    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}: expected {'KEY.PATH' if flag != '--set' else 'section.key'}=value")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), _yaml_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag} {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        _check_key(path, f"--set {text}")
        if len(path) == 1:
            out[path[0]] = value
        elif len(path) == 2:
            section = out.setdefault(path[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {text!r}: {path[0]} is not a section")
            section[path[1]] = value
        elif len(path) == 3 and _is_mapping_key(path):  # one entry of a mapping, e.g. data.columns.question=query
            section = out.setdefault(path[0], {})
            section[path[1]] = {**(section.get(path[1]) or {}), path[2]: value}
        else:
            raise ConfigError(f"--set {text!r}: keys are section.key (or section.mapping.key for a mapping)")
    return out


DEFAULT_RECIPE = "demo"


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a named or YAML recipe (None: the embedded demo) and apply `--set` overrides."""
    path = recipe_path(name_or_path or DEFAULT_RECIPE)
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    if not overrides:
        return recipe_from_dict(raw, str(path))
    recipe_from_dict(raw, str(path))  # the file's own mistakes are blamed on the file ...
    return recipe_from_dict(apply_overrides(raw, overrides), f"{path} with --set")  # ... and the flags' on them


def recipe_keys() -> dict[str, dict[str, dict[str, Any]]]:
    """Every recipe key: section -> key -> {type, default} (`squad-ds config --keys`)."""
    def describe(tp: Any, default: Any) -> dict[str, Any]:
        return {"type": str(tp).replace("typing.", "").replace("<class '", "").replace("'>", ""), "default": default}

    out: dict[str, Any] = {}
    for name, tp in _SECTIONS.items():
        cls = _SECTION_CLASSES.get(name)
        if cls is None:
            out[name] = describe(tp, dataclasses.asdict(Recipe())[name])
            continue
        defaults = dataclasses.asdict(cls())
        out[name] = {k: describe(t, defaults[k]) for k, t in typing.get_type_hints(cls).items()}
    return out


def recipe_table() -> list[dict[str, Any]]:
    """One row per named recipe: model, SQuAD version, published F1/EM, the processes it was written for."""
    rows = []
    for name in list_recipes():
        r = load_recipe(name)
        rows.append({"name": name, "model": r.model.name_or_path, "squad": r.data.version,
                     "f1": r.expected.get("f1"), "exact_match": r.expected.get("exact_match"),
                     "world_size": r.published_world_size, "description": r.description})
    return rows


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
