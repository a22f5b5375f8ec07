"""DeepSpeed engine construction: the model prepared for the recipe (packed-batch attention, activation
checkpointing), the weight-decay groups, the optimizer implementation, and `deepspeed.initialize`. The config it
gets is resolved by ds_config.py.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

from squad_ds.config import ConfigError, Recipe
from squad_ds.logs import log_main
from squad_ds.modeling import ext_locks, fused_dropout, unpadded
from squad_ds.modeling.heads import supports_activation_checkpointing
from squad_ds.training.ds_config import DEFAULT_WEIGHT_DECAY, apex_fused_adam_class


def weight_decay_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Biases and LayerNorm weights get no decay (BERT's AdamWeightDecay convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # under ZeRO-3 p itself is an empty stub
        if len(shape) < 2 or name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _apex_fused_adam(groups, ds: dict[str, Any]):
    FusedAdam = apex_fused_adam_class()
    opt_cfg = ds.pop("optimizer", None) or {}
    params = {k: v for k, v in opt_cfg.get("params", {}).items() if k in ("lr", "betas", "eps", "weight_decay")}
    return FusedAdam(groups, adam_w_mode=True, **params)


def arch_list_for_deepspeed(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed 0.19's JIT op builder can parse it: arch-specific suffixes dropped
    ("9.0a" → "9.0"; it does int("0a") and fails). The H100 image this project ran on sets "9.0a"; the
    DeepSpeed ops squad-ds builds (FusedAdam, CPUAdam) need no arch-specific ("a") features."""
    out = []
    for tok in value.replace(";", " ").split():
        base, plus, ptx = tok.partition("+")
        major, dot, minor = base.partition(".")
        minor = minor.rstrip("abcdefghijklmnopqrstuvwxyz") if minor[:1].isdigit() else minor
        new = f"{major}{dot}{minor}{plus}{ptx}"
        if new not in out:
            out.append(new)
    return ";".join(out)


def _sanitize_arch_list() -> None:
    import logging
    import os

    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value and arch_list_for_deepspeed(value) != value.replace(" ", ";"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list_for_deepspeed(value)
        logging.getLogger("squad_ds").warning("TORCH_CUDA_ARCH_LIST=%r → %r for DeepSpeed's JIT op builds", value,
                                              os.environ["TORCH_CUDA_ARCH_LIST"])


def fused_dropout_policy(recipe: Recipe, cuda: bool) -> bool:
    """`model.fused_dropout` for this device: null is on for CPU training, off on CUDA; true on CUDA is an error."""
    if recipe.model.fused_dropout and cuda:
        raise ConfigError("model.fused_dropout=true: the fused dropout kernel is for CPUs (CUDA's SDPA kernels draw "
                          "the attention mask in-kernel); leave it null or false on a GPU")
    return (not cuda) if recipe.model.fused_dropout is None else recipe.model.fused_dropout


def prepare_model(model, recipe: Recipe, *, train: bool, cuda: bool = False) -> None:
    """The model as the recipe runs it: packed-batch attention for `data.unpad` (training and inference), for
    training the fused CPU dropout (`model.fused_dropout`) and activation checkpointing."""
    if recipe.data.unpad:
        unpadded.enable(model)
    if train and fused_dropout_policy(recipe, cuda):
        fused_dropout.enable(model)
        log_main("dropout: squad-ds's fused CPU kernel (model.fused_dropout; attention %s)",
                 model.config._attn_implementation)
    if train and recipe.train.activation_checkpointing:
        if not supports_activation_checkpointing(model):
            raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def partitioned_construction(ds: dict[str, Any]):
    """Under ZeRO-3, the model is built and its weights loaded partitioned (and offloaded, where the config says),
    so it never exists whole on a rank: transformers' own DeepSpeed route (HfDeepSpeedConfig makes from_pretrained
    construct under deepspeed.zero.Init). Only for the load: transformers' later model loading (export) stays
    ordinary. A bare zero.Init around the constructor fails in transformers 5 (modeling_utils IndexError) and, with
    NVMe parameter offload on the CPU accelerator, swaps fp32 weights as bf16 (Init._set_dtype)."""
    if (ds.get("zero_optimization") or {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    held = HfDeepSpeedConfig(ds)  # transformers keeps only a weak reference: alive for the load, gone after it
    try:
        yield
    finally:
        del held


def build_engine(model, ds: dict[str, Any], recipe: Recipe, *, cuda: bool):
    """`deepspeed.initialize` with the resolved config; returns (engine, optimizer, scheduler)."""
    import deepspeed

    _sanitize_arch_list()
    # DeepSpeed 0.19's ZeRO-3 calls torch's deprecated reduce_scatter_tensor, and the FutureWarning came once per
    # micro-batch (hundreds of lines a step on bert-large): it is DeepSpeed's to change, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
                            category=FutureWarning)
    prepare_model(model, recipe, train=True, cuda=cuda)
    ds = copy.deepcopy(ds)
    wd = (ds.get("optimizer") or {}).get("params", {}).get("weight_decay", DEFAULT_WEIGHT_DECAY)
    groups = weight_decay_groups(model, wd)
    optimizer = None
    if recipe.train.optimizer == "apex_fused_adam":
        optimizer = _apex_fused_adam(groups, ds)
    elif "optimizer" not in ds:
        raise ConfigError("the DeepSpeed config has no \"optimizer\" section")
    with ext_locks.watch():  # DeepSpeed loads (and the first time builds) its C++ ops here
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=groups if optimizer is None else None, optimizer=optimizer, config=ds)
    if recipe.train.compile:
        engine.compile()  # nn.Module.compile in place: parameter names (checkpoints, export) stay as they are
    if engine.world_size == 1 and engine.zero_optimization_stage() == 0:
        # A world of one: DeepSpeed would still flatten, all-reduce and unflatten every gradient each step
        # for no effect, at a measurable cost per step on CPU (+3 to +7 % a step of a tiny
        # BERT against a plain PyTorch loop, 2-core CPU, 2026-11-26).
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def scheduler_rate(scheduler: dict[str, Any] | None, step: int) -> float | None:
    """The learning rate that DeepSpeed's scheduler, as a resolved config's "scheduler" section describes it, gives
    after `step` optimizer steps (its own class computes it: the same numbers as in training)."""
    import torch
    from deepspeed.runtime import lr_schedules

    if not scheduler:
        return None
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    sched = getattr(lr_schedules, scheduler["type"])(opt, **scheduler.get("params", {}), last_batch_iteration=step)
    return float(sched.get_lr()[0])
