"""SQuAD examples -> fixed-length model features: windows, labels, offsets; and the cached entry point.

Semantics are those of HF transformers `run_qa.py` (`prepare_train_features` / `prepare_validation_features`),
with the question pre-truncated to `max_query_length` tokens as in the original BERT `run_squad.py`. The way there
differs: every question and every *unique* context is tokenized once, without special tokens (SQuAD has ~5
questions per paragraph), and the windows, special tokens, padding, labels and offsets are assembled with numpy,
instead of re-tokenizing each context once per question through the pair-encoding path. The window arithmetic is
the Rust `tokenizers` truncation with stride (`Encoding::truncate`), the layout is read off the tokenizer's own
post-processor, and tests/test_features.py checks both agree token for token with a transcription of run_qa.py.

One deliberate deviation: run_qa.py's start-label walk can run past the window's last context token into [SEP] and
padding (its own comment: "we could go after the last offset if the answer is the last word"), yielding a start
label that points at padding; here the walk stops at the window's last context token.

This module needs no torch.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from squad_ds.data.squad import Example
from squad_ds.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

CHUNK_EXAMPLES = 4096  # examples per tokenizer call / worker task: big enough for the Rust thread pool


@dataclass
class Features:
    """Model inputs for N windows of length L, all numpy; row i came from `examples[example_index[i]]`."""
    input_ids: np.ndarray                 # int32 [N, L]
    attention_mask: np.ndarray            # int8  [N, L]
    token_type_ids: np.ndarray | None     # int8  [N, L]; None when the tokenizer has no token types (RoBERTa)
    cls_index: np.ndarray                 # int64 [N]: 0 for BERT, the last position for XLNet (left padding)
    p_mask: np.ndarray                    # int8  [N, L]: 1 = cannot be in the answer (all but context and CLS)
    example_index: np.ndarray             # int32 [N]
    start_positions: np.ndarray | None = None  # int64 [N], train split only
    end_positions: np.ndarray | None = None    # int64 [N], train split only
    is_impossible: np.ndarray | None = None    # int8  [N], train split only: 1 when labelled at CLS
    offsets: np.ndarray | None = None          # int32 [N, L, 2], eval only: context char span, -1 elsewhere

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The non-None fields by name (what the cache stores)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Features":
        return cls(**{f.name: arrays.get(f.name) for f in fields(cls)})

    def select(self, indices: Any) -> "Features":
        """Rows `indices` (an index array, slice or boolean mask) as a new Features."""
        return Features.from_arrays({k: v[indices] for k, v in self.arrays().items()})


# ---------------------------------------------------------------------------------------------------------------
# Parameters and the tokenizer's layout, validated once in the parent and shipped to workers.

@dataclass(frozen=True)
class _Spec:
    max_seq_length: int
    doc_stride: int
    max_query_length: int
    split: str
    # Pair layout in order, from the post-processor: (kind, token id, type id); kind is "special", "question" or
    # "context". Which sequence comes first follows run_qa.py: question first unless the tokenizer pads left.
    segments: tuple[tuple[str, int, int], ...]
    cls_segment: int | None      # segment holding CLS (or BOS); None: run_qa.py's fallback, position 0
    single_strip: tuple[int, int]  # special tokens the single-sequence template puts before / after a sequence
    pad_left: bool
    pad_id: int
    pad_type_id: int
    with_token_type_ids: bool

    @property
    def n_special(self) -> int:
        return sum(kind == "special" for kind, _, _ in self.segments)


def _backend_copy(tokenizer: Any) -> Any:
    """The Rust tokenizer without the truncation/padding that tokenizer.json may carry (HF sets them per call)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def _runs(seq_ids: Sequence[int | None]) -> list[tuple[int | None, int, int]]:
    """Contiguous runs of equal sequence id: (sequence id, start, stop)."""
    out, start = [], 0
    for i in range(1, len(seq_ids) + 1):
        if i == len(seq_ids) or seq_ids[i] != seq_ids[start] or seq_ids[start] is None:
            out.append((seq_ids[start], start, i))
            start = i
    return out


def make_spec(tokenizer: Any, *, max_seq_length: int, doc_stride: int, max_query_length: int, split: str) -> _Spec:
    """Validate the parameters against the tokenizer and read its pair layout; raises ConfigError (parameters) or
    ModelLoadError (a tokenizer it cannot use) with the reason."""
    if not (getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer")):
        raise ModelLoadError(f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer: features need "
                         "offset mappings; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    for name, value, low in (("max_seq_length", max_seq_length, 8), ("max_query_length", max_query_length, 1),
                             ("doc_stride", doc_stride, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_seq_length > tokenizer.model_max_length:
        raise ConfigError(f"max_seq_length={max_seq_length} exceeds the tokenizer's model_max_length="
                         f"{tokenizer.model_max_length}")
    if getattr(tokenizer, "truncation_side", "right") != "right":
        raise ModelLoadError("tokenizers with truncation_side='left' are not supported")
    if tokenizer.padding_side not in ("left", "right"):
        raise ModelLoadError(f"unknown padding_side {tokenizer.padding_side!r}")
    pad_left = tokenizer.padding_side == "left"
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"{type(tokenizer).__name__} has no pad token; padding to max_seq_length needs one")

    backend = _backend_copy(tokenizer)
    pair = backend.encode("hello", "world", add_special_tokens=True)
    first, second = ("context", "question") if pad_left else ("question", "context")
    segments, cls_segment = [], None
    cls_ids = [t for t in (tokenizer.cls_token_id, tokenizer.bos_token_id) if t is not None]
    for seq, start, stop in _runs(pair.sequence_ids):
        if seq is None:
            if cls_segment is None and pair.ids[start] in cls_ids[:1]:
                cls_segment = len(segments)
            segments.append(("special", pair.ids[start], pair.type_ids[start]))
        else:
            if len(set(pair.type_ids[start:stop])) != 1:
                raise ModelLoadError("unsupported post-processor: mixed token types inside one sequence")
            segments.append((first if seq == 0 else second, -1, pair.type_ids[start]))
    if [k for k, _, _ in segments if k != "special"] != [first, second]:
        raise ModelLoadError(f"unsupported post-processor layout {segments}: expected each sequence once, in order")
    if cls_segment is None and len(cls_ids) > 1:
        cls_segment = next((i for i, (k, t, _) in enumerate(segments) if k == "special" and t == cls_ids[1]), None)
    single = backend.encode("hello", add_special_tokens=True).sequence_ids
    content = [i for i, s in enumerate(single) if s is not None]
    single_strip = (content[0], len(single) - content[-1] - 1)

    n_special = sum(k == "special" for k, _, _ in segments)
    budget = max_seq_length - n_special - max_query_length
    if doc_stride >= budget:
        raise ConfigError(f"doc_stride={doc_stride} must be smaller than max_seq_length - max_query_length - "
                         f"{n_special} special tokens = {budget}, or a window with a full-length question could not "
                         "advance through its context")
    return _Spec(max_seq_length, doc_stride, max_query_length, split, tuple(segments), cls_segment, single_strip,
                 pad_left, int(tokenizer.pad_token_id), int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
                 # XLNet's tokenizer omits token_type_ids from model_input_names, yet its model embeds segments
                 "token_type_ids" in tokenizer.model_input_names or len({t for _, _, t in segments}) > 1)


# ---------------------------------------------------------------------------------------------------------------
# One chunk of examples -> feature arrays. Runs in the parent (num_workers=1) or in pool workers.

def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + n) for s, n in zip(starts, lengths)) without a Python loop."""
    keep = lengths > 0
    starts, lengths = starts[keep].astype(np.int64), lengths[keep].astype(np.int64)
    if lengths.size == 0:
        return np.zeros(0, np.int64)
    steps = np.ones(int(lengths.sum()), np.int64)
    steps[0] = starts[0]
    bounds = np.cumsum(lengths)[:-1]
    steps[bounds] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps)


def _encode(backend: Any, texts: list[str], strip: tuple[int, int], offsets: bool):
    """Token ids (flat), per-text lengths and, if asked, char offsets (flat [T, 2]) without special tokens.

    Encoding *with* the post-processor and stripping its tokens keeps whatever it does to offsets (RoBERTa trims them).
    """
    if offsets or not hasattr(backend, "encode_batch_fast"):
        encs = backend.encode_batch(texts, add_special_tokens=True)
    else:
        encs = backend.encode_batch_fast(texts, add_special_tokens=True)
    full_len = np.fromiter((len(e.ids) for e in encs), np.int64, len(encs))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), np.int32, int(full_len.sum()))
    pos = np.arange(ids.size) - np.repeat(np.cumsum(full_len) - full_len, full_len)
    keep = (pos >= strip[0]) & (pos < np.repeat(full_len - strip[1], full_len))
    offs = None
    if offsets:
        offs = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encs)),
                           np.int32, 2 * ids.size).reshape(-1, 2)[keep]
    return ids[keep], full_len - strip[0] - strip[1], offs


def _featurize_chunk(backend: Any, spec: _Spec, questions: list[str], contexts: list[str], ctx_of: np.ndarray,
                     ans_start: np.ndarray, ans_end: np.ndarray, answerable: np.ndarray) -> dict[str, np.ndarray]:
    L, n_ex = spec.max_seq_length, len(questions)
    q_ids, q_len, _ = _encode(backend, questions, spec.single_strip, offsets=False)
    c_ids, c_len, c_offs = _encode(backend, contexts, spec.single_strip, offsets=True)
    q_start, c_start = np.cumsum(q_len) - q_len, np.cumsum(c_len) - c_len
    q_len = np.minimum(q_len, spec.max_query_length)

    # Windows: Rust `Encoding::truncate` with stride over the context; `budget` context tokens fit beside the question.
    n_sp = spec.n_special
    budget = L - n_sp - q_len
    step = budget - spec.doc_stride
    C = c_len[ctx_of]
    n_win = np.where(C > budget, 1 + -(-(C - budget) // step), 1)
    ex = np.repeat(np.arange(n_ex), n_win)
    N = ex.size
    ws = (np.arange(N) - np.repeat(np.cumsum(n_win) - n_win, n_win)) * step[ex]
    wlen = np.minimum(ws + budget[ex], C[ex]) - ws

    # Every token comes from one pool: [special ids | question tokens | context tokens | pad].
    seg_kind = [k for k, _, _ in spec.segments]
    special_ids = np.array([t for k, t, _ in spec.segments if k == "special"], np.int32)
    pool = np.concatenate([special_ids, q_ids, c_ids])
    ctx_base = n_sp + q_ids.size
    lengths = np.empty((N, len(seg_kind)), np.int64)
    src = np.empty((N, len(seg_kind)), np.int64)
    j = 0
    for s, kind in enumerate(seg_kind):
        if kind == "special":
            lengths[:, s], src[:, s] = 1, j
            j += 1
        elif kind == "question":
            lengths[:, s], src[:, s] = q_len[ex], n_sp + q_start[ex]
        else:
            lengths[:, s], src[:, s] = wlen, ctx_base + c_start[ctx_of[ex]] + ws
    total = lengths.sum(1)
    lead = (L - total) if spec.pad_left else np.zeros(N, np.int64)
    seg_pos = lead[:, None] + np.cumsum(lengths, 1) - lengths
    flat_len = lengths.ravel()
    src_tok = _concat_ranges(src.ravel(), flat_len)
    dest = _concat_ranges(np.arange(N) * L + lead, total)
    is_ctx = np.repeat(np.tile(np.array(seg_kind) == "context", N), flat_len)

    out: dict[str, np.ndarray] = {}
    input_ids = np.full(N * L, spec.pad_id, np.int32)
    input_ids[dest] = pool[src_tok]
    out["input_ids"] = input_ids.reshape(N, L)
    attention = np.zeros(N * L, np.int8)
    attention[dest] = 1
    out["attention_mask"] = attention.reshape(N, L)
    if spec.with_token_type_ids:
        types = np.full(N * L, spec.pad_type_id, np.int8)
        types[dest] = np.repeat(np.tile(np.array([t for _, _, t in spec.segments], np.int8), N), flat_len)
        out["token_type_ids"] = types.reshape(N, L)
    cls_index = seg_pos[:, spec.cls_segment] if spec.cls_segment is not None else np.zeros(N, np.int64)
    out["cls_index"] = cls_index.astype(np.int64)
    p_mask = np.ones(N * L, np.int8)
    p_mask[dest[is_ctx]] = 0
    p_mask[np.arange(N) * L + cls_index] = 0
    out["p_mask"] = p_mask.reshape(N, L)
    out["example_index"] = ex.astype(np.int32)

    if spec.split == "eval":
        offsets = np.full((N * L, 2), -1, np.int32)
        offsets[dest[is_ctx]] = c_offs[src_tok[is_ctx] - ctx_base]
        out["offsets"] = offsets.reshape(N, L, 2)
        return out

    # Labels: run_qa.py's walks, as binary searches over each context's (monotone) token offsets.
    ctx_col = seg_kind.index("context")
    g0 = c_start[ctx_of[ex]] + ws                      # first / last context token of the window in c_offs
    g1 = g0 + np.maximum(wlen, 1) - 1
    s_char, e_char = ans_start[ex], ans_end[ex]
    if c_offs.shape[0] == 0:  # no context produced a token
        c_offs = np.zeros((1, 2), np.int32)
    safe = np.minimum(g1, c_offs.shape[0] - 1)
    in_span = (answerable[ex] & (wlen > 0) & (c_offs[np.minimum(g0, safe), 0] <= s_char)
               & (c_offs[safe, 1] >= e_char))
    start = np.full(N, -1, np.int64)
    end = np.full(N, -1, np.int64)
    tok_ctx = np.repeat(np.arange(len(contexts), dtype=np.int64), c_len) << 32
    key_s, key_e = tok_ctx + c_offs[:, 0], tok_ctx + c_offs[:, 1]
    feat_ctx = ctx_of[ex].astype(np.int64) << 32
    if _monotone(key_s) and _monotone(key_e):
        k = np.minimum(np.searchsorted(key_s, feat_ctx + s_char, "right"), g1 + 1)
        start = k - 1
        end = np.maximum(np.searchsorted(key_e, feat_ctx + e_char, "left"), g0)
    else:  # a tokenizer with non-monotone offsets: walk like run_qa.py
        for i in np.flatnonzero(in_span):
            k = g0[i]
            while k <= g1[i] and c_offs[k, 0] <= s_char[i]:
                k += 1
            start[i] = k - 1
            k = g1[i]
            while k >= g0[i] and c_offs[k, 1] >= e_char[i]:
                k -= 1
            end[i] = k + 1
    base = seg_pos[:, ctx_col] - g0
    out["start_positions"] = np.where(in_span, base + start, cls_index).astype(np.int64)
    out["end_positions"] = np.where(in_span, base + end, cls_index).astype(np.int64)
    out["is_impossible"] = (~in_span).astype(np.int8)
    return out


def _monotone(a: np.ndarray) -> bool:
    return bool(np.all(a[1:] >= a[:-1]))


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_json: str, spec: _Spec) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker process: the pool is the parallelism
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    _WORKER.update(backend=backend, spec=spec)


def _worker_run(task: tuple) -> dict[str, np.ndarray]:
    return _featurize_chunk(_WORKER["backend"], _WORKER["spec"], *task)


def _tasks(examples: Sequence[Example], chunk: int):
    """Chunk payloads: lstripped questions, the chunk's unique contexts, and answer char spans."""
    for lo in range(0, len(examples), chunk):
        part = examples[lo:lo + chunk]
        uniq: dict[str, int] = {}
        ctx_of = np.fromiter((uniq.setdefault(e.context, len(uniq)) for e in part), np.int64, len(part))
        answerable = np.array([bool(e.answers) and not e.is_impossible for e in part], bool)
        ans_start = np.array([e.answers[0].start if e.answers else 0 for e in part], np.int64)
        ans_end = ans_start + np.array([len(e.answers[0].text) if e.answers else 0 for e in part], np.int64)
        yield lo, len(part), ([e.question.lstrip() for e in part], list(uniq), ctx_of, ans_start, ans_end, answerable)


def default_num_workers() -> int:
    """Measured on 2 cores: one process whose Rust tokenizer uses every core beats a process pool (see bench/README)."""
    return 1


def featurize(examples: Sequence[Example], tokenizer: Any, *, max_seq_length: int, doc_stride: int,
              max_query_length: int, split: str, num_workers: int | None = None,
              progress: bool = True) -> Features:
    """Tokenize `examples` into windows; `example_index` indexes `examples`.

    num_workers=1 (the default) runs in-process with the Rust tokenizer's own threads; N > 1 uses a spawn pool of N
    processes (callers running a script need the usual `if __name__ == "__main__":` guard).
    """
    from tqdm.auto import tqdm

    spec = make_spec(tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                     max_query_length=max_query_length, split=split)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    chunk = CHUNK_EXAMPLES if workers == 1 else max(256, min(CHUNK_EXAMPLES, -(-len(examples) // (4 * workers))))
    tasks = list(_tasks(examples, chunk))
    parts: list[dict[str, np.ndarray]] = []
    with tqdm(total=len(examples), unit="ex", desc=f"featurize {split}", disable=not progress) as bar:
        if workers == 1 or len(tasks) <= 1:
            backend = _backend_copy(tokenizer)
            for lo, n, task in tasks:
                parts.append(_featurize_chunk(backend, spec, *task))
                parts[-1]["example_index"] += lo
                bar.update(n)
        else:
            # spawn, not fork: the parent may hold torch/Rust thread pools that do not survive a fork.
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, _worker_init, (_backend_copy(tokenizer).to_str(), spec)) as pool:
                for (lo, n, _), part in zip(tasks, pool.imap(_worker_run, [t for _, _, t in tasks])):
                    part["example_index"] += lo
                    parts.append(part)
                    bar.update(n)
    if not parts:
        return _empty(spec)
    return Features.from_arrays({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def _empty(spec: _Spec) -> Features:
    L = spec.max_seq_length
    z = lambda shape, dt: np.zeros(shape, dt)  # noqa: E731
    train = spec.split == "train"
    return Features(z((0, L), np.int32), z((0, L), np.int8), z((0, L), np.int8) if spec.with_token_type_ids else None,
                    z(0, np.int64), z((0, L), np.int8), z(0, np.int32),
                    z(0, np.int64) if train else None, z(0, np.int64) if train else None,
                    z(0, np.int8) if train else None, None if train else z((0, L, 2), np.int32))


# ---------------------------------------------------------------------------------------------------------------
# Entry points: tokenizer loading, the cached path used by train / evaluate / predict, and `squad-ds preprocess`.
