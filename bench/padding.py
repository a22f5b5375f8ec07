"""Padding waste and batch-shape count of each batching policy, on real SQuAD features (device-independent).

    python bench/padding.py [--seq 384] [--stride 128] [--micro 32,64] [--epochs 2] [--out padding.json]

For every policy it iterates the trainer's own BatchLoader over the trainer's epoch order (`batching.epoch_order`,
length-grouped where the policy groups) and reports the mean length a sequence is computed at (tokens per
sequence, against the full --seq), and how many distinct batch shapes (rows x length) the run would feed the
model (for packed batches: rows x attention length; their token count changes every batch). Tokens bound the
speed-up of cutting padding; shapes are what a per-new-shape cost (kernel plans, compilation) multiplies.
Train file: $SQUAD_DIR's train-v1.1, else the shipped sample.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402

# name: (trim, group by length, pad_to_multiple_of, unpad)
POLICIES = {
    "full": (False, False, 1, False),
    "trim, random order": (True, False, 1, False),
    "trim, grouped": (True, True, 1, False),
    "trim32, grouped": (True, True, 32, False),
    "trim64, grouped": (True, True, 64, False),
    "unpad64, grouped": (False, True, 64, True),
}


def measure(feats, micro: int, epochs: int, trim: bool, group: bool, multiple: int, unpad: bool = False,
            seed: int = 42) -> dict:
    """tokens_per_sequence: what the projections and feed-forward layers process per sequence; attention_length:
    the length attention runs at (the same unless packed); distinct_shapes: distinct (rows, attention length)."""
    from squad_ds.data.batching import BatchLoader, TrimPolicy, epoch_order

    lengths = feats.attention_mask.sum(1) if group else None
    tokens, attended, sequences, shapes = 0, 0, 0, set()
    for epoch in range(epochs):
        order = epoch_order(len(feats), 1, 0, seed, epoch, lengths=lengths, global_batch=micro if group else None)
        for batch in BatchLoader(feats, order, micro, ("input_ids", "attention_mask"),
                                 trim=TrimPolicy(trim, multiple, unpad)):
            rows, length = (batch["packed_mask"] if unpad else batch["input_ids"]).shape
            tokens += batch["input_ids"].numel()
            attended += rows * length
            sequences += rows
            shapes.add((rows, length))
    return {"micro": micro, "tokens_per_sequence": tokens / sequences, "attention_length": attended / sequences,
            "distinct_shapes": len(shapes), "batches": -(-len(feats) // micro) * epochs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--micro", default="32,64", help="comma-separated micro-batch sizes (one process)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-file", default=None)
    p.add_argument("--cache-dir", default=str(common.DEFAULT_CACHE))
    p.add_argument("--out", default=None)
    harness.add_arguments(p)
    args = p.parse_args(argv)
    feats, info = common.load_features(common.load_tokenizer(), args.seq, args.stride, path=args.train_file,
                                       cache_dir=args.cache_dir)
    real = float(feats.attention_mask.sum(1).mean())
    print(f"{len(feats)} features at {args.seq}/{args.stride}; mean real length {real:.1f}")
    print(f"{'micro':>5} {'policy':<20} {'tokens/seq':>10} {'vs full':>8} {'attn len':>8} {'shapes':>7}")
    rows = []
    for micro in (int(m) for m in args.micro.split(",")):
        for name, (trim, group, multiple, unpad) in POLICIES.items():
            r = {"policy": name, **measure(feats, micro, args.epochs, trim, group, multiple, unpad)}
            r["vs_full"] = r["tokens_per_sequence"] / args.seq
            rows.append(r)
            print(f"{micro:>5} {name:<20} {r['tokens_per_sequence']:>10.1f} {r['vs_full']:>8.3f} "
                  f"{r['attention_length']:>8.1f} {r['distinct_shapes']:>7}", flush=True)
    harness.write_json(args.out, {"bench": "padding", "args": vars(args), "features": len(feats),
                                  "mean_real_length": real, "rows": rows})
    data = f"{Path(common.train_file(args.train_file)).name}: {len(feats):,} windows at {args.seq}/{args.stride}"
    name = harness.data_name(common.train_file(args.train_file))
    harness.save(harness.record("padding", {"rows": rows}, key=f"{name}, {args.seq}/{args.stride}",
                                config={"data": f"{data} (mean real length {real:.1f} tokens)", "seq": args.seq,
                                        "epochs": args.epochs}), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
