"""What a resumed run may change: the saved run's settings against this run's, before its state is loaded.

A checkpoint's position ("epoch 1, micro-batch 812") and optimizer state mean something only under the settings
that produced them. Those that decide which features a step sees, in what order, or what a step does with them
are fixed for the life of a run; the rest (intervals, evaluation, output, kernels) may change and are logged.
The resolved DeepSpeed config is held to the same rule: its optimizer, scheduler, ZeRO stage, precision and
clipping are fixed, except the scheduler's step counts, which a changed train.max_steps or train.epochs re-plans
(allowed, and said with what it does to the learning rate).
"""
from __future__ import annotations

from typing import Any

from squad_ds.errors import CheckpointError

FIXED = ("model.name_or_path", "model.tokenizer", "data.train_file", "data.version", "data.max_seq_length",
         "data.doc_stride", "data.max_query_length", "data.max_train_examples", "data.trim_padding",
         "data.pad_to_multiple_of", "data.unpad", "train.seed", "train.micro_batch_size",
         "train.gradient_accumulation_steps", "train.train_batch_size", "train.group_by_length", "train.lr",
         "train.warmup_proportion", "train.weight_decay", "train.optimizer")
# The resolved layout (after the DeepSpeed JSON filled in what the recipe left open) and the data it planned over.
LAYOUT = ("micro_batch", "accumulation", "world_size", "num_features")
# Of the DeepSpeed settings a checkpoint records (deepspeed_settings), those a resume may change: the scheduler's step
# counts (planned from train.max_steps / train.epochs) and how Adam is computed (the same update either way).
REPLANNED = ("scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps")
FREE_DS = REPLANNED + ("optimizer.params.torch_adam", "optimizer.params.fused")


# The shipped CPU config of each precision deepspeed_settings records (for the way out of a refused resume).
_CPU_CONFIG_OF = {"fp32": "cpu_fp32", "fp32 weights, bfloat16 autocast": "cpu_bf16_autocast"}


def deepspeed_settings(ds: dict[str, Any]) -> dict[str, Any]:
    """What of a resolved DeepSpeed config a checkpoint records: what its optimizer state means and what a step
    does with it (ZeRO-0 and ZeRO-1 save different files; bf16's optimizer keeps fp32 master weights apart)."""
    autocast = ds.get("torch_autocast") or {}
    precision = ("bf16" if (ds.get("bf16") or {}).get("enabled") is True else
                 "fp16" if (ds.get("fp16") or {}).get("enabled") is True else
                 f"fp32 weights, {autocast.get('dtype', 'bfloat16')} autocast" if autocast.get("enabled") is True
                 else "fp32")
    return {"optimizer": ds.get("optimizer"), "scheduler": ds.get("scheduler"),
            "zero_optimization.stage": (ds.get("zero_optimization") or {}).get("stage", 0),
            "precision": precision, "gradient_clipping": ds.get("gradient_clipping", 0.0)}


def layout(plan, num_features: int) -> dict[str, int]:
    return {"micro_batch": plan.micro_batch, "accumulation": plan.accumulation, "world_size": plan.world_size,
            "num_features": num_features}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "expected":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check(saved_recipe: dict[str, Any] | None, saved_layout: dict[str, Any], recipe: dict[str, Any],
          now_layout: dict[str, Any], where: str, saved_ds: dict[str, Any] | None = None,
          now_ds: dict[str, Any] | None = None) -> list[str]:
    """Raise naming every fixed setting that differs (saved and current value); return the harmless changes as
    "key: old → new" lines for the log. Keys unknown to the saved run (an older squad-ds) are not compared; the
    DeepSpeed settings (deepspeed_settings) appear as "deepspeed.KEY"."""
    old, new = _flat(saved_recipe or {}), _flat(recipe)
    if saved_ds is not None and now_ds is not None:
        old.update(_flat(saved_ds, "deepspeed.")), new.update(_flat(now_ds, "deepspeed."))
    changed = {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys()
               if k.startswith("deepspeed.") or k in old.keys() & new.keys()}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}

    def fixed(k: str) -> bool:
        return k in FIXED or (k.startswith("deepspeed.") and k.removeprefix("deepspeed.") not in FREE_DS)

    refused = [f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(changed.items()) if fixed(k)]
    refused += [f"{'world size' if k == 'world_size' else k}: saved {saved_layout[k]}, now {now_layout[k]}"
                for k in LAYOUT if k in saved_layout and saved_layout[k] != now_layout[k]]
    if refused:
        way_out = ("resume with the settings it was saved with"
                   + (f" and {saved_layout['world_size']} process(es)" if "world_size" in saved_layout else "")
                   + ", or start a new run (--overwrite, or another output.dir)")
        if "deepspeed.precision" in changed:
            way_out += (f"; the precision is the DeepSpeed config's: name the one saved with it "
                        f"(--deepspeed-config {_CPU_CONFIG_OF.get(changed['deepspeed.precision'][0], '...')} on a "
                        "CPU), as a run that named none took this machine's default")
        raise CheckpointError(f"cannot resume {where}: " + "; ".join(refused)
                              + f" (they decide what the saved position and optimizer state mean): {way_out}")
    return [f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(changed.items()) if not fixed(k)]


def replanned(saved_ds: dict[str, Any] | None, now_ds: dict[str, Any]) -> bool:
    """Whether the scheduler's step counts differ from the saved run's (check() allowed it)."""
    if not saved_ds or not saved_ds.get("scheduler") or not now_ds.get("scheduler"):
        return False
    old, new = _flat(saved_ds), _flat(now_ds)
    return any(old.get(k) != new.get(k) for k in REPLANNED)
