"""The DeepSpeed config: loading the JSON (shipped name or path), the hardware's default, and resolution against the
recipe: "auto" values filled from it, contradictions refused naming both values, and the step plan. Nothing here
imports DeepSpeed (but nvme.resolve, for an NVMe offload's async_io op); engine.py builds the engine from what this
returns.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squad_ds.config import ConfigError, Recipe, parse_override
from squad_ds.errors import WorldSizeError
from squad_ds.training import cpu_precision, nvme

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"

# Used when neither the recipe nor the JSON gives a value.
DEFAULT_MICRO_BATCH = 16
DEFAULT_ACCUMULATION = 1
DEFAULT_LR = 5e-5
DEFAULT_WARMUP = 0.1
DEFAULT_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class TrainPlan:
    """Step arithmetic for one run, derived once from the data size and the resolved batch sizes."""
    micro_batch: int
    accumulation: int
    world_size: int
    micro_batches_per_epoch: int  # per rank
    total_steps: int  # optimizer steps
    warmup_steps: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size


def ds_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (DS_CONFIG_DIR / name_or_path, DS_CONFIG_DIR / f"{name_or_path}.json"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(q.stem for q in DS_CONFIG_DIR.glob("*.json")))
    raise ConfigError(f"deepspeed_config: {name_or_path!r} is neither a file nor a shipped config (shipped: {known})")


def load_ds_config(name_or_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The DeepSpeed JSON with `--ds-set KEY.PATH=VALUE` overrides applied, checked for the shape squad-ds reads.
    Values are checked against the recipe later (`resolve_ds_config`), alike whether they came from the file or a
    flag."""
    path = ds_config_path(name_or_path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for text in overrides:
        _set_path(cfg, text, path)
    where = f"{path} with --ds-set" if overrides else str(path)
    for section in _OBJECT_SECTIONS:
        if section in cfg and not isinstance(cfg[section], dict):
            raise ConfigError(f"{where}: \"{section}\" must be a JSON object, got {json.dumps(cfg[section])}")
    for section in ("optimizer", "scheduler"):
        if section in cfg and not isinstance(cfg[section].get("type"), str):
            raise ConfigError(f"{where}: \"{section}\" needs a \"type\" (e.g. \"AdamW\", \"WarmupDecayLR\")")
        if section in cfg and not isinstance(cfg[section].get("params", {}), dict):
            raise ConfigError(f"{where}: \"{section}.params\" must be a JSON object")
    _check_keys_and_values(cfg, where)
    return cfg


# DeepSpeed's top-level keys (its config documentation, 0.19): an unknown key close to one of these is a misspelling
# that DeepSpeed would ignore in silence (`zero_optimisation` trained at ZeRO-0); other unknown keys pass through.
_TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "zero_optimization", "gradient_clipping", "steps_per_print", "wall_clock_breakdown",
    "dump_state", "activation_checkpointing", "flops_profiler", "tensorboard", "csv_monitor", "wandb", "comet",
    "comms_logger", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "communication_data_type", "memory_breakdown", "elasticity",
    "checkpoint", "data_types", "aio", "autotuning", "compression_training", "data_efficiency",
    "curriculum_learning", "pipeline", "torch_autocast", "compile", "timers", "dataloader_drop_last",
    "disable_allgather", "gradient_allreduce_op", "seq_parallel_communication_data_type", "hybrid_engine",
    "use_data_before_expert_parallelism", "weight_quantization", "nebula", "log_level")
# Schedulers whose parameters squad-ds plans (warmup and total steps, warmup_max_lr from the recipe's lr).
PLANNED_SCHEDULERS = ("WarmupLR", "WarmupDecayLR")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys_and_values(cfg: dict[str, Any], where: str) -> None:
    """The keys and values squad-ds or DeepSpeed reads, checked for type and range before any work (DeepSpeed would
    fail on them with a traceback, minutes into start-up, or not at all)."""
    for key in cfg:
        if key not in _TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, _TOP_LEVEL_KEYS, n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"{where}: unknown key {key!r} (did you mean {close[0]!r}?); DeepSpeed would "
                                  "ignore it")

    def bad(path: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{where}: {path}={value!r}: {expected}")

    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        v = cfg.get(key, "auto")
        if v != "auto" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise bad(key, v, "a positive integer or \"auto\"")
    if "gradient_clipping" in cfg and not (_is_number(cfg["gradient_clipping"]) and cfg["gradient_clipping"] >= 0):
        raise bad("gradient_clipping", cfg["gradient_clipping"], "a number >= 0 (0: no clipping)")
    for section in ("bf16", "fp16"):
        v = (cfg.get(section) or {}).get("enabled", False)
        if v not in (True, False, "auto"):
            raise bad(f"{section}.enabled", v, "true or false")
    autocast = cfg.get("torch_autocast") or {}
    if autocast.get("enabled", False) not in (True, False):
        raise bad("torch_autocast.enabled", autocast["enabled"], "true or false")
    if autocast.get("dtype", "bfloat16") not in _AUTOCAST_DTYPES:
        raise bad("torch_autocast.dtype", autocast["dtype"], f"one of {', '.join(_AUTOCAST_DTYPES)}")
    if "lower_precision_safe_modules" in autocast:
        _check_module_classes(autocast["lower_precision_safe_modules"], bad)
    opt = cfg.get("optimizer")
    if opt:
        name, params = opt["type"], opt.get("params", {})
        if name.lower() not in _DEEPSPEED_OPTIMIZERS and not _is_torch_optimizer(name):
            raise bad("optimizer.type", name, "not an optimizer DeepSpeed knows (its own: "
                      f"{', '.join(_DEEPSPEED_OPTIMIZERS)}, any case; or a torch.optim class name such as SGD)")
        for key, low, text in (("lr", 0.0, "a number > 0"), ("weight_decay", None, "a number >= 0"),
                               ("eps", 0.0, "a number > 0")):
            v = params.get(key, "auto")
            if v != "auto" and not (_is_number(v) and (v > low if low is not None else v >= 0)):
                raise bad(f"optimizer.params.{key}", v, f"{text} or \"auto\"")
        betas = params.get("betas")
        if betas is not None and not (isinstance(betas, list) and len(betas) == 2
                                      and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise bad("optimizer.params.betas", betas, "two numbers in [0, 1) expected, e.g. [0.9, 0.999]")
    sched = cfg.get("scheduler")
    if sched:
        if sched["type"] not in PLANNED_SCHEDULERS:
            raise ConfigError(f"{where}: scheduler.type={sched['type']!r}: squad-ds plans the schedule of "
                              f"{' and '.join(PLANNED_SCHEDULERS)} (warmup from train.warmup_proportion, decay to the "
                              "planned last step); use one of them, or no scheduler for a constant lr")
        params = sched.get("params", {})
        for key in ("warmup_min_lr", "warmup_max_lr"):
            v = params.get(key, "auto")
            if v != "auto" and not (_is_number(v) and v >= 0):
                raise bad(f"scheduler.params.{key}", v, "a number >= 0 or \"auto\"")
        if params.get("warmup_type", "linear") not in ("linear", "log"):
            raise bad("scheduler.params.warmup_type", params["warmup_type"], "\"linear\" or \"log\"")


def _check_module_classes(names: Any, bad) -> None:
    """torch_autocast.lower_precision_safe_modules: "package.Class" names DeepSpeed imports at initialize."""
    key = "torch_autocast.lower_precision_safe_modules"
    if not (isinstance(names, list) and all(isinstance(n, str) and "." in n for n in names)):
        raise bad(key, names, 'a list of "package.Class" names, e.g. ["torch.nn.Linear"]')
    for name in names:
        module, _, cls = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), cls, None)
        except ImportError:
            found = None
        if not isinstance(found, type):
            raise bad(key, names, f"{name!r} is not a class that can be imported")


# The half-precision names DeepSpeed's DtypeEnum accepts for torch_autocast.dtype (0.19).
_AUTOCAST_DTYPES = ("bfloat16", "bf16", "torch.bfloat16", "float16", "fp16", "half", "torch.float16")
# DeepSpeed's own optimizers (deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS, 0.19); any other name DeepSpeed looks up
# in torch.optim.
_DEEPSPEED_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")


def _is_torch_optimizer(name: str) -> bool:
    import torch.optim

    cls = getattr(torch.optim, name, None)
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def _set_path(cfg: dict[str, Any], text: str, path: Path) -> None:
    """One `--ds-set a.b.c=value` into `cfg`, creating the objects on the way."""
    keys, value = parse_override(text, "--ds-set")
    if not all(keys):
        raise ConfigError(f"--ds-set {text!r}: an empty key in the key path")
    node = cfg
    for i, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--ds-set {text!r}: {'.'.join(keys[:i + 1])} is {json.dumps(node)} in {path}, not a "
                              "JSON object")
    node[keys[-1]] = value


# Sections squad-ds reads or fills in: anything but an object there is an error before DeepSpeed sees it.
_OBJECT_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "torch_autocast",
                    "activation_checkpointing", "tensorboard", "csv_monitor", "wandb", "comms_logger", "flops_profiler")


def default_ds_config(cuda: bool, world_size: int = 1) -> tuple[str, str]:
    """(shipped config, why) for a run that names none. bf16 on CUDA: ZeRO-2 across several GPUs; ZeRO-0 on one,
    where ZeRO-2 partitions nothing and measured no faster with more memory (docs/RESULTS.md: BERT-large on an
    H100). On a CPU, fp32 or bf16 mixed precision as measured here (cpu_precision)."""
    if not cuda:
        choice = cpu_precision.choose(world_size)
        return choice.name, choice.reason
    if world_size == 1:
        return "zero0_bf16", "one GPU: bf16, ZeRO-0"
    return "zero2_bf16", f"{world_size} GPUs: bf16, ZeRO-2"


def _merge(json_value: Any, recipe_value: Any, default: Any, json_key: str, recipe_key: str) -> Any:
    """One value known to both: "auto"/absent in JSON takes the recipe's; two different concrete values clash."""
    if json_value in (None, "auto"):
        return default if recipe_value is None else recipe_value
    if recipe_value is not None and not math.isclose(float(json_value), float(recipe_value), rel_tol=1e-12):
        raise ConfigError(f"DeepSpeed config {json_key}={json_value!r} contradicts recipe {recipe_key}={recipe_value!r}"
                          " (set one of them, or make them equal)")
    return json_value


def _resolve_batch(ds: dict, recipe: Recipe, world_size: int) -> tuple[int, int, int]:
    tr = recipe.train
    micro = _merge(ds.get("train_micro_batch_size_per_gpu"), tr.micro_batch_size, None,
                   "train_micro_batch_size_per_gpu", "train.micro_batch_size")
    accum = _merge(ds.get("gradient_accumulation_steps"), tr.gradient_accumulation_steps, None,
                   "gradient_accumulation_steps", "train.gradient_accumulation_steps")
    total = _merge(ds.get("train_batch_size"), tr.train_batch_size, None, "train_batch_size",
                   "train.train_batch_size")
    if total is not None:
        if micro is None and accum is None:
            accum = DEFAULT_ACCUMULATION
        if micro is None:
            micro, rem = divmod(total, accum * world_size)
            if rem or micro == 0:
                raise ConfigError(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum}"
                                  f" × world size {world_size}")
        elif accum is None:
            accum, rem = divmod(total, micro * world_size)
            if rem or accum == 0:
                raise ConfigError(f"train_batch_size {total} is not divisible by micro-batch {micro}"
                                  f" × world size {world_size}")
    micro = DEFAULT_MICRO_BATCH if micro is None else micro
    accum = DEFAULT_ACCUMULATION if accum is None else accum
    if total is not None and micro * accum * world_size != total:
        way_out = _way_out(recipe, world_size, micro, total)
        raise (WorldSizeError if way_out else ConfigError)(
            f"micro-batch {micro} × gradient_accumulation_steps {accum} × world size {world_size} = "
            f"{micro * accum * world_size}, not the train_batch_size {total}{way_out}")
    for name, v in (("micro-batch", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return int(micro), int(accum), int(micro * accum * world_size)


def _way_out(recipe: Recipe, world_size: int, micro: int, total: int) -> str:
    """What to do when a recipe written for N processes runs on another number of them."""
    written = recipe.published_world_size
    if written is None or written == world_size:
        return ""
    accum, rem = divmod(total, micro * world_size)
    derived = (f"--set train.gradient_accumulation_steps=null keeps the global batch {total} as {micro} × {accum} "
               "accumulation steps" if not rem and accum else
               f"--set train.micro_batch_size=… train.gradient_accumulation_steps=null keeps the global batch {total}")
    return f". The recipe was written for {written} processes (GPUs), this run has {world_size}: {derived}"


def plan_training(recipe: Recipe, micro: int, accum: int, world_size: int, num_features: int,
                  warmup_proportion: float) -> TrainPlan:
    per_rank = math.ceil(num_features / world_size)
    micro_per_epoch = math.ceil(per_rank / micro)
    if recipe.train.max_steps is not None:
        total = recipe.train.max_steps
    else:
        total = max(1, math.ceil(recipe.train.epochs * micro_per_epoch / accum))
    # DeepSpeed's WarmupDecayLR needs at least one warmup step (step 0 then runs at warmup_min_lr).
    return TrainPlan(micro, accum, world_size, micro_per_epoch, total, max(1, int(warmup_proportion * total)))


def resolve_ds_config(ds: dict[str, Any], recipe: Recipe, *, world_size: int, num_features: int,
                      cuda: bool) -> tuple[dict[str, Any], TrainPlan]:
    """The effective DeepSpeed config (no "auto" left that squad-ds owns) and the step plan.

    Raises ConfigError for contradictions, impossible precision/ZeRO settings and batch arithmetic that does not
    add up — before any model is built. One function per concern: batch, precision and ZeRO, optimizer, schedule,
    monitors.
    """
    ds = copy.deepcopy(ds)
    micro, accum, total = _resolve_batch(ds, recipe, world_size)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = micro, accum
    ds["train_batch_size"] = total
    _check_precision_and_zero(ds, cuda)
    nvme.resolve(ds, recipe.output.dir)
    lr = _resolve_optimizer(ds, recipe, cuda)
    warmup = DEFAULT_WARMUP if recipe.train.warmup_proportion is None else recipe.train.warmup_proportion
    plan = _resolve_schedule(ds, recipe, lr, plan_training(recipe, micro, accum, world_size, num_features, warmup))
    _resolve_monitors(ds, recipe)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"DeepSpeed config: no value for \"auto\" at {', '.join(leftover)} (squad-ds fills only "
                          "batch sizes, optimizer lr/weight_decay and scheduler steps/lr)")
    return ds, plan


def _check_precision_and_zero(ds: dict[str, Any], cuda: bool) -> None:
    stage = (ds.get("zero_optimization", {}) or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r}: ZeRO stages are 0, 1, 2 and 3")
    fp16 = (ds.get("fp16", {}) or {}).get("enabled") is True
    if not cuda and fp16:
        raise ConfigError("fp16.enabled=true needs a CUDA GPU (DeepSpeed has no fp16 on CPU): use bf16 or the "
                          "cpu_fp32 config")
    if fp16 and (ds.get("bf16", {}) or {}).get("enabled") is True:
        raise ConfigError("fp16.enabled and bf16.enabled are both true: choose one")
    autocast = ds.get("torch_autocast") or {}
    if autocast.get("enabled") is True:
        if fp16 or (ds.get("bf16", {}) or {}).get("enabled") is True:
            raise ConfigError("torch_autocast.enabled with bf16.enabled or fp16.enabled: autocast keeps fp32 weights "
                              "and the others make them half precision; choose one")
        if not cuda and autocast.get("dtype", "bfloat16") not in ("bfloat16", "bf16", "torch.bfloat16"):
            raise ConfigError(f"torch_autocast.dtype={autocast['dtype']!r}: CPU autocast here is bfloat16 only "
                              "(fp16 needs a CUDA GPU)")


def _resolve_optimizer(ds: dict[str, Any], recipe: Recipe, cuda: bool) -> float:
    """lr and weight decay merged with the recipe's; the implementation switch (train.optimizer). Returns the lr."""
    if recipe.train.optimizer == "apex_fused_adam":
        apex_fused_adam_class()  # a missing apex is a configuration error, found before any work
    opt = ds.get("optimizer")
    if opt:
        opt.setdefault("params", {})
    lr = _merge(opt["params"].get("lr") if opt else None, recipe.train.lr, DEFAULT_LR, "optimizer.params.lr",
                "train.lr")
    wd = _merge(opt["params"].get("weight_decay") if opt else None, recipe.train.weight_decay, DEFAULT_WEIGHT_DECAY,
                "optimizer.params.weight_decay", "train.weight_decay")
    if not opt:
        return lr
    opt["params"]["lr"], opt["params"]["weight_decay"] = lr, wd
    offloaded = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    adam = opt["type"].lower() in ("adam", "adamw")
    if recipe.train.optimizer == "torch_fused_adamw":
        if not adam or offloaded:
            raise ConfigError("train.optimizer=torch_fused_adamw needs an Adam/AdamW optimizer in the DeepSpeed "
                              f"config and no optimizer offload (got type {opt['type']!r}"
                              f"{', offloaded' if offloaded else ''})")
        # DeepSpeed's torch_adam switch builds torch.optim.AdamW and passes the other params through.
        opt["params"]["torch_adam"], opt["params"]["fused"] = True, True
    elif not cuda and not offloaded and adam:
        # FusedAdam is a CUDA kernel; on CPU torch's AdamW avoids a JIT build, with its fused CPU kernel (the
        # Trainer's default too): its for-loop form took 8x as long a step on all-MiniLM-L6-v2.
        opt["params"].setdefault("torch_adam", True)
        if opt["params"]["torch_adam"]:
            opt["params"].setdefault("fused", True)
    return lr


def _resolve_schedule(ds: dict[str, Any], recipe: Recipe, lr: float, plan: TrainPlan) -> TrainPlan:
    """Total and warmup steps from the plan into the scheduler (or checked against concrete values there)."""
    sched = ds.get("scheduler")
    if not sched:
        if (recipe.train.warmup_proportion or 0) > 0:
            raise ConfigError(f"recipe train.warmup_proportion={recipe.train.warmup_proportion} but the DeepSpeed "
                              "config has no \"scheduler\" to warm up with")
        return plan
    p = sched.setdefault("params", {})
    warmup_json = p.get("warmup_num_steps")
    if p.get("total_num_steps", "auto") not in ("auto", plan.total_steps):
        raise ConfigError(f"DeepSpeed config scheduler.params.total_num_steps={p['total_num_steps']} contradicts "
                          f"the planned {plan.total_steps} steps (set it to \"auto\")")
    if "total_num_steps" in p or sched.get("type") == "WarmupDecayLR":
        p["total_num_steps"] = plan.total_steps
    if warmup_json not in (None, "auto"):
        if not isinstance(warmup_json, int) or warmup_json < 1:
            raise ConfigError(f"DeepSpeed config scheduler.params.warmup_num_steps={warmup_json!r}: DeepSpeed "
                              "needs a positive integer (use \"auto\" to derive it from train.warmup_proportion)")
        if recipe.train.warmup_proportion is not None and warmup_json != plan.warmup_steps:
            raise ConfigError(f"DeepSpeed config scheduler.params.warmup_num_steps={warmup_json} contradicts "
                              f"recipe train.warmup_proportion={recipe.train.warmup_proportion} "
                              f"({plan.warmup_steps} steps)")
        plan = TrainPlan(**{**plan.__dict__, "warmup_steps": int(warmup_json)})
    p["warmup_num_steps"] = plan.warmup_steps
    p["warmup_max_lr"] = _merge(p.get("warmup_max_lr"), lr, lr, "scheduler.params.warmup_max_lr",
                                "train.lr / optimizer.params.lr")
    p.setdefault("warmup_min_lr", 0.0)
    p.setdefault("warmup_type", "linear")
    return plan


_MONITOR_SECTIONS = {"tensorboard": "tensorboard", "csv": "csv_monitor", "wandb": "wandb"}
_MONITOR_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _resolve_monitors(ds: dict[str, Any], recipe: Recipe) -> None:
    """train.report_to switches DeepSpeed's monitors on; the JSON's own monitor settings stay, and a JSON that
    switches one off explicitly contradicts the recipe."""
    import importlib.util

    for name in recipe.train.report_to:
        section = ds.setdefault(_MONITOR_SECTIONS[name], {})
        if section.get("enabled") is False:
            raise ConfigError(f"recipe train.report_to lists {name} but the DeepSpeed config sets "
                              f"{_MONITOR_SECTIONS[name]}.enabled=false (drop one of them)")
        package = _MONITOR_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to: {name} needs the {package} package: pip install "
                              f"\"squad-ds[{package}]\"")
        section["enabled"] = True
        if name == "wandb":
            section.setdefault("project", "squad-ds")
            section.setdefault("group", Path(recipe.output.dir).name)
        else:
            section.setdefault("job_name", "squad-ds")
    for monitor in ("tensorboard", "csv_monitor"):
        m = ds.get(monitor)
        if isinstance(m, dict) and m.get("enabled") and m.get("output_path", "") in ("", "auto"):
            # DeepSpeed's own default is the launch directory; the run directory is where a user looks.
            m["output_path"] = str(Path(recipe.output.dir) / "monitor")


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def apex_fused_adam_class():
    try:
        from apex.optimizers import FusedAdam  # NVIDIA apex, never PyPI's unrelated "apex"
    except ImportError as e:
        raise ConfigError("train.optimizer=apex_fused_adam but NVIDIA apex is not importable: build it from "
                          "github.com/NVIDIA/apex, or use the DeepSpeed optimizer (train.optimizer=auto)") from e
    return FusedAdam
