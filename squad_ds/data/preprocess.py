"""Cached features for a SQuAD file: the entry point training, evaluation, prediction and `squad-ds preprocess` use.

features.py turns examples into windows; cache.py stores arrays atomically under a content key; this module joins
them: read the file, key it, load or build, summarise.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from squad_ds import distributed
from squad_ds.config import DataConfig
from squad_ds.data import cache
from squad_ds.data.features import Features, featurize, make_spec
from squad_ds.data.squad import SquadDataset, load_squad
from squad_ds.errors import ConfigError, SquadFormatError, disk_error, file_in_the_way
from squad_ds.logs import log_main

log = logging.getLogger(__name__)


def load_or_build_features(data_path: str | os.PathLike, tokenizer: Any, *, max_seq_length: int,
                           doc_stride: int, max_query_length: int, split: str,
                           cache_dir: str | os.PathLike | None = None, num_workers: int | None = None,
                           progress: bool = True, columns: dict[str, str] | None = None
                           ) -> tuple[Features, SquadDataset, dict[str, Any]]:
    """Features for a SQuAD file from the content-keyed cache, built and stored on a miss.

    `example_index` indexes the examples featurized: `dataset.train_examples()` for split="train" (misaligned
    answers dropped: see data.py), `dataset.examples` for split="eval".
    Ranks sharing a cache directory may all build on a cold cache; the atomic write keeps that safe.
    """
    t0 = time.perf_counter()
    cache_error = None
    make_spec(tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride, max_query_length=max_query_length,
              split=split)  # bad parameters fail before any reading
    # Eval features need no answers, so eval files may be unlabelled (a test set for `squad-ds predict`).
    dataset = load_squad(data_path, labelled=split == "train", columns=columns,
                         split="train" if split == "train" else "validation")
    params = dict(max_seq_length=max_seq_length, doc_stride=doc_stride, max_query_length=max_query_length)
    key = cache.cache_key({"data_sha256": dataset.content_sha256(), "squad_version": dataset.version,
                           "split": split, **params, **cache.tokenizer_fingerprint(tokenizer)})
    path = cache.entry_path(cache_dir, key, prefix=split)
    hit = cache.load(path, key)
    written = hit is not None
    if hit is not None:
        features = Features.from_arrays(hit[0])
    else:
        examples = dataset.train_examples() if split == "train" else dataset.examples
        features = featurize(examples, tokenizer, split=split, num_workers=num_workers, progress=progress, **params)
        try:
            cache.save(path, key, features.arrays(), {"data": os.fspath(data_path), "split": split,
                                                       "squad_version": dataset.version, **params})
            written = True
        except OSError as e:  # a read-only or full cache directory costs the cache, not the run
            disk = disk_error(e, path.parent)
            cache_error = file_in_the_way(path.parent) or (str(disk) if disk else e.strerror or str(e))
            log.warning("feature cache not written (%s: %s): continuing without it", path.parent, cache_error)
    n_examples = len(dataset.examples) - (len(dataset.misaligned_ids) if split == "train" else 0)
    info: dict[str, Any] = {"examples": n_examples, "features": len(features), "in_span": None, "at_cls": None,
                            "seconds": round(time.perf_counter() - t0, 3), "cached": hit is not None,
                            "cache_file": str(path) if written else None, "key": key,
                            "squad_version": dataset.version, "split": split}
    if cache_error:
        info["cache_error"] = cache_error
    if features.is_impossible is not None:
        info["at_cls"] = int(features.is_impossible.sum())
        info["in_span"] = len(features) - info["at_cls"]
    return features, dataset, info


def preprocess_command(data: str, tokenizer: Any, *, max_seq_length: int, doc_stride: int, max_query_length: int,
                       split: str, cache_dir: str | None = None, num_workers: int | None = None) -> dict[str, Any]:
    """`squad-ds preprocess`: build (or find) the cached features and summarise them. The windowing settings have
    no defaults here: the recipe's DataConfig owns them (the CLI's defaults come from it)."""
    _, _, info = load_or_build_features(data, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                                        max_query_length=max_query_length, split=split, cache_dir=cache_dir,
                                        num_workers=num_workers)
    if info.get("cache_error"):  # the cache is what this command makes: without it, it failed
        where = cache_dir or cache.default_cache_dir()
        raise ConfigError(f"--cache-dir {where}: the features could not be written there ({info['cache_error']})")
    keys = ("examples", "features", "in_span", "at_cls", "seconds", "cached", "cache_file")
    return {k: info[k] for k in keys}


def load_features(path: str, tokenizer: Any, data: DataConfig, split: str,
                  limit: int | None) -> tuple[Features, SquadDataset]:
    """A run's features for one file under its recipe's `data` settings: the cache built once (by rank 0 under a
    launcher), the first `limit` examples kept, checked against `data.version`."""
    d = data
    kwargs = dict(max_seq_length=d.max_seq_length, doc_stride=d.doc_stride, max_query_length=d.max_query_length,
                  split=split, cache_dir=d.cache_dir, num_workers=d.num_workers, columns=d.columns)
    # Rank 0 builds the cache; the others then read it instead of tokenizing the same data again (and fail with
    # rank 0's error if it could not).
    features, dataset, info = distributed.main_first(lambda: load_or_build_features(path, tokenizer, **kwargs))
    if not dataset.examples:
        what = "train on" if split == "train" else "predict"
        raise SquadFormatError(f"{path}: holds no questions: nothing to {what}")
    questions = len(dataset.examples)  # of the file, for the message below
    if limit is not None:
        features, dataset = _first_examples(features, dataset, split, limit)
    if d.version and dataset.version != d.version:
        raise ConfigError(f"data.version={d.version} but {path} is SQuAD v{dataset.version}")
    if split == "train" and len(features) == 0:
        raise ConfigError(f"data.train_file {path}: nothing to train on: {questions} questions gave no "
                          f"training window ({len(dataset.misaligned_ids)} answers do not match their context)")
    log_main("%s features: %s", split, json.dumps(info))
    return features, dataset


def _first_examples(features, dataset, split: str, limit: int):
    """The first `limit` examples and their features (the cache always holds the whole file)."""
    examples = dataset.train_examples() if split == "train" else dataset.examples
    kept = features.select(features.example_index < limit)
    return kept, SquadDataset(dataset.path, dataset.version, examples[:limit], dataset.misaligned_ids)
