"""Content-keyed, atomically written store for feature arrays.

The key hashes everything the features depend on: the data file's bytes, the tokenizer (class, its Rust
serialization without per-call truncation/padding, special ids, padding side), the window parameters, the SQuAD
version, the split and FORMAT_VERSION (bump it whenever features.py changes what it produces). One entry is one
uncompressed `.npz` (loads at disk/page-cache speed) that also carries its own metadata, so a single `os.replace`
commits it; a readable `.json` copy of the metadata sits beside it for people. Loading checks the key, the format,
every array's name, shape and dtype, and the zip CRC-32 of every member; anything wrong is a warning and a miss.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from squad_ds import atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: token_type_ids for tokenizers whose pair template uses segments (XLNet)
_META = "__meta__"


def default_cache_dir() -> Path:
    """$SQUAD_DS_CACHE, else ~/.cache/squad_ds/features."""
    env = os.environ.get("SQUAD_DS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "squad_ds" / "features"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a fast tokenizer's output: class, vocab/pipeline hash, special ids, padding side."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # transformers sets truncation/padding on the backend at every call: they are not part of its identity.
    spec.pop("truncation", None)
    spec.pop("padding", None)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_sha256": hashlib.sha256(blob).hexdigest(),
        "padding_side": tokenizer.padding_side,
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "special_ids": [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                        tokenizer.bos_token_id, getattr(tokenizer, "pad_token_type_id", 0)],
        "model_input_names": list(tokenizer.model_input_names),
        "model_max_length": int(min(tokenizer.model_max_length, 2**62)),
    }


def cache_key(components: dict[str, Any]) -> str:
    payload = json.dumps({**components, "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_path(cache_dir: str | os.PathLike | None, key: str, prefix: str = "features") -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / f"{prefix}-{key[:40]}.npz"


def save(path: str | os.PathLike, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write arrays + meta atomically: a crash at any point leaves either the old entry or none, never a torn one."""
    path = Path(path)
    meta = {**meta, "key": key, "format_version": FORMAT_VERSION,
            "arrays": {k: [list(v.shape), v.dtype.str] for k, v in arrays.items()}}
    text = json.dumps(meta, sort_keys=True)
    made, wrote = atomic.missing_folders(path.parent), False
    try:
        atomic.write(path, lambda f: np.savez(f, **arrays, **{_META: np.array(text)}))
        wrote = True
        atomic.write_text(path.with_suffix(".json"), text + "\n")
    except OSError:
        if wrote:  # the arrays this call wrote, without their JSON half, are no entry
            path.unlink(missing_ok=True)
        atomic.remove_folders(made)  # the folders this call made, left empty
        raise
    return path


class _Invalid(Exception):
    pass


def _discard(path: Path, why: str) -> None:
    log.warning("feature cache %s is unusable (%s): rebuilding it", path, why)
    for p in (path, path.with_suffix(".json")):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def load(path: str | os.PathLike, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The entry's (arrays, meta), or None when missing; a damaged or mismatched entry is logged, deleted, None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if _META not in names:
                raise _Invalid("no metadata")
            meta = json.loads(str(z[_META][()]))
            if meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION:
                raise _Invalid("key or format version differs")
            expected = meta.get("arrays", {})
            if set(expected) != names - {_META}:
                raise _Invalid(f"arrays {sorted(names - {_META})} != {sorted(expected)}")
            arrays = {}
            for name, (shape, dtype) in expected.items():
                a = z[name]  # reading a member to its end checks its CRC-32
                if list(a.shape) != shape or a.dtype.str != dtype:
                    raise _Invalid(f"{name}: {a.shape} {a.dtype.str}, expected {tuple(shape)} {dtype}")
                arrays[name] = a
    except _Invalid as e:
        _discard(path, str(e))
        return None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        _discard(path, f"{type(e).__name__}: {e}")
        return None
    return arrays, meta
