"""Distributed inference over eval features, gather, post-process and score.

Used by training (periodic and final evaluation) and by `squad-ds predict`. Every rank runs the same number of
forward passes (ZeRO-3 gathers parameters collectively inside each forward), each on its contiguous slice of the
features; the logits are gathered in rank order without padded duplicates and rank 0 post-processes and scores.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from squad_ds import atomic, distributed
from squad_ds.config import EvalConfig
from squad_ds.data.batching import TrimPolicy, is_left_padded, shape_batch, to_batch
from squad_ds.data.packing import PAD_LOGIT, is_packed
from squad_ds.logs import log_main, progress
from squad_ds.modeling import unpadded
from squad_ds.modeling.heads import eval_outputs, forward_keys, model_inputs
from squad_ds.scoring.metrics import score
from squad_ds.scoring.postprocess import postprocess_bert, postprocess_xlnet, write_predictions


def _untrim(family: str, outputs: dict[str, torch.Tensor], full: int, offset: int) -> dict[str, np.ndarray]:
    """Outputs of a trimmed batch in full-length coordinates: per-token logits padded back (padding is never a
    candidate span: its offsets are -1), XLNet's top-k positions shifted back by the columns cut on the left."""
    out = {}
    for name, t in outputs.items():
        a = t.float().cpu().numpy()
        if family == "bert" and a.ndim == 2 and a.shape[1] != full:
            pad = np.full((a.shape[0], full - a.shape[1]), PAD_LOGIT, dtype=a.dtype)
            a = np.concatenate([pad, a] if offset else [a, pad], axis=1)
        elif name.endswith("_index") and offset:
            a = a + offset
        out[name] = a
    return out


@torch.no_grad()
def predict_arrays(model, features, family: str, batch_size: int, device: torch.device,
                   trim: TrimPolicy = TrimPolicy(), show_progress: bool = True) -> dict[str, np.ndarray]:
    """Model outputs for all features, in feature order, on every rank.

    Each rank takes its contiguous slice, runs it longest-first so batches hold similar lengths, trims or packs
    them (as `trim` says), and puts the outputs back in feature order."""
    world, rank = distributed.world_size(), distributed.rank()
    start, stop = distributed.shard_range(len(features), world, rank)
    n_batches = distributed.all_reduce_max(math.ceil((stop - start) / batch_size))
    config = getattr(model, "module", model).config
    keys = forward_keys(family, train=False, config=config)
    left = is_left_padded(features.attention_mask)
    full = features.max_seq_length
    order = start + np.argsort(-features.attention_mask[start:stop].sum(1), kind="stable")
    was_training = model.training
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    bar = progress(n_batches, desc="eval", enabled=show_progress)
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        dummy = len(idx) == 0  # this rank's slice is used up; still join the collective forward
        batch, offset = shape_batch(to_batch(features, np.array([0]) if dummy else idx, keys, torch.device("cpu")),
                                    left, trim)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if is_packed(batch):
            outputs = unpadded.per_sequence_logits(model(**unpadded.model_inputs(batch, config)), batch)
        else:
            outputs = eval_outputs(family, model(**model_inputs(family, batch, train=False, config=config)))
        if not dummy:
            for name, a in _untrim(family, outputs, full, offset).items():
                chunks.setdefault(name, []).append(a)
        bar.update(1)
    bar.close()
    if was_training:
        model.train()
    local = {}
    for name, parts in chunks.items():
        sorted_out = np.concatenate(parts)
        local[name] = np.empty_like(sorted_out)
        local[name][order - start] = sorted_out
    if not local:  # more ranks than features
        local = {k: v[:0] for k, v in _empty_like(model, features, family, keys, config, device).items()}
    return distributed.gather_shards(local)


def _empty_like(model, features, family, keys, config, device):
    out = model(**model_inputs(family, to_batch(features, np.array([0]), keys, device), train=False, config=config))
    return {k: t.float().cpu().numpy() for k, t in eval_outputs(family, out).items()}


def postprocess(examples, features, arrays: dict[str, np.ndarray], family: str, cfg: EvalConfig, version_2: bool,
                model_config=None):
    common = dict(n_best_size=cfg.n_best_size, max_answer_length=cfg.max_answer_length, version_2=version_2,
                  null_score_diff_threshold=cfg.null_score_diff_threshold)
    if family == "xlnet":
        return postprocess_xlnet(examples, features.example_index, features.offsets, arrays["start_top_log_probs"],
                                 arrays["start_top_index"], arrays["end_top_log_probs"], arrays["end_top_index"],
                                 arrays["cls_logits"], start_n_top=model_config.start_n_top,
                                 end_n_top=model_config.end_n_top,
                                 **common)
    return postprocess_bert(examples, features.example_index, features.offsets, arrays["start_logits"],
                            arrays["end_logits"], cls_index=features.cls_index, **common)


def score_predictions(dataset, preds) -> dict[str, Any]:
    """Official metrics; for v2.0 also the best null threshold found from the null odds."""
    result = score(dataset, preds.predictions)
    if dataset.version == "2.0" and preds.null_odds:
        best = score(dataset, preds.predictions, na_probs=preds.null_odds, na_prob_thresh=float("inf"))
        result.update({k: v for k, v in best.items() if k.startswith("best_")})
    return result


def evaluate(model, dataset, features, family: str, cfg: EvalConfig, device: torch.device,
             out_dir: str | Path | None, trim: TrimPolicy = TrimPolicy()) -> dict[str, Any] | None:
    """Predict, post-process and score; every rank returns the same metrics. A file with questions that have no
    gold answers (a test set) gets predictions only, and None."""
    arrays = predict_arrays(model, features, family, cfg.batch_size, device, trim)
    metrics: dict[str, Any] | None = None
    if distributed.is_main():
        preds = postprocess(dataset.examples, features, arrays, family, cfg, dataset.version == "2.0",
                            getattr(model, "module", model).config)
        unlabelled = dataset.unlabelled_ids()
        # Each file is written whole; when a write fails (a full disk), the folders this call created are removed
        # again: the innermost with what it holds (all of it written here), those above it only if empty.
        created = atomic.missing_folders(out_dir) if out_dir is not None else []
        try:
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                write_predictions(preds, out_dir)
            if not unlabelled:
                metrics = score_predictions(dataset, preds)
                if out_dir is not None:
                    atomic.write_text(Path(out_dir) / "eval_results.json", json.dumps(metrics, indent=2) + "\n")
        except OSError:
            if created:
                shutil.rmtree(created[0], ignore_errors=True)
                atomic.remove_folders(created[1:])
            raise
        if not unlabelled:
            log_main("eval: %s", json.dumps(metrics))
        else:
            log_main("%s: %d of %d questions have no gold answers (e.g. %s): predictions written, not scored",
                     dataset.path, len(unlabelled), len(dataset.examples), unlabelled[0])
    return distributed.broadcast_object(metrics)
