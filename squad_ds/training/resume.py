"""What a resumed run may change: the saved run's settings against this run's, before its state is loaded.

A checkpoint's position ("epoch 1, micro-batch 812") and optimizer state mean something only under the settings
that produced them. Those that decide which features a step sees, in what order, or what a step does with them
are fixed for the life of a run; the rest (intervals, evaluation, output, kernels) may change and are logged.
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
          now_layout: dict[str, Any], where: str) -> list[str]:
    """Raise naming every fixed setting that differs (saved and current value); return the harmless changes as
    "key: old → new" lines for the log. Keys unknown to the saved run (an older squad-ds) are not compared."""
    old, new = _flat(saved_recipe or {}), _flat(recipe)
    changed = {k: (old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]}
    refused = [f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(changed.items()) if k in FIXED]
    refused += [f"{'world size' if k == 'world_size' else k}: saved {saved_layout[k]}, now {now_layout[k]}"
                for k in LAYOUT if k in saved_layout and saved_layout[k] != now_layout[k]]
    if refused:
        way_out = ("resume with the settings it was saved with"
                   + (f" and {saved_layout['world_size']} process(es)" if "world_size" in saved_layout else "")
                   + ", or start a new run (--overwrite, or another output.dir)")
        raise CheckpointError(f"cannot resume {where}: " + "; ".join(refused)
                              + f" (they decide what the saved position and optimizer state mean): {way_out}")
    return [f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(changed.items()) if k not in FIXED]
