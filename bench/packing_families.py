"""What packed batches (`data.unpad`) save per encoder family on this machine: BERT, RoBERTa and ELECTRA (the
families that pack), random models of one shape (all-MiniLM-L6-v2's: 6 layers, hidden 384, 12 heads, FFN 1536),
the same windows (the shipped train sample at --seq/--stride, all-MiniLM-L6-v2's tokenizer), the same length-grouped
micro-batches; each batch as it is (full length), trimmed to its longest window, and packed. Reports tokens through
the weights per window and the median milliseconds of a training forward + backward per micro-batch.

    python bench/packing_families.py [--seq 384] [--stride 128] [--query 64] [--micro 16] [--batches 8] [--out r.json]
"""
from __future__ import annotations

import argparse
import os
import statistics

import harness

SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
             max_position_embeddings=514, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--query", type=int, default=64, help="max_query_length")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--out", default=None)
    harness.add_arguments(ap)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoConfig

    from squad_ds.data.batching import TrimPolicy, epoch_order, shape_batch, to_batch
    from squad_ds.data.features import featurize
    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.packing import is_packed
    from squad_ds.data.squad import load_squad
    from squad_ds.modeling import unpadded
    from squad_ds.modeling.factory import load_tokenizer, qa_model_from_config
    from squad_ds.modeling.heads import forward_keys, model_inputs

    tok = load_tokenizer("all-MiniLM-L6-v2")
    examples = load_squad(resolve_data_path("sample:train")).train_examples()
    feats = featurize(examples, tok, max_seq_length=args.seq, doc_stride=args.stride, max_query_length=args.query,
                      split="train", num_workers=1, progress=False)
    order = epoch_order(len(feats), 1, 0, 42, 0, lengths=feats.attention_mask.sum(1), global_batch=args.micro)
    # Spread over the epoch: short and long groups both.
    starts = np.linspace(0, len(order) // args.micro - 1, args.batches).astype(int) * args.micro
    policies = {"full": TrimPolicy(trim=False), "trimmed": TrimPolicy(trim=True),
                "packed": TrimPolicy(trim=False, unpad=True, multiple=1)}
    result = {"seq": args.seq, "stride": args.stride, "micro": args.micro, "batches": args.batches,
              "windows_per_batch": args.micro, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "families": {}}
    for family in ("bert", "roberta", "electra"):
        extra = {"pad_token_id": tok.pad_token_id} if family == "roberta" else {}
        config = AutoConfig.for_model(family, vocab_size=len(tok), type_vocab_size=2, **SHAPE, **extra)
        torch.manual_seed(0)
        model = qa_model_from_config(config, attn_implementation="sdpa").train()
        keys = forward_keys("bert", train=True, config=config)
        row = {}
        for name, policy in policies.items():
            if policy.unpad:
                unpadded.enable(model)
            times, tokens = [], []
            for s in starts:
                batch, _ = shape_batch(to_batch(feats, order[s:s + args.micro], keys, torch.device("cpu")), False,
                                       policy)
                tokens.append(batch["input_ids"].numel() / args.micro)

                def step(batch=batch):
                    if is_packed(batch):
                        loss = unpadded.qa_loss(model(**unpadded.model_inputs(batch, config)), batch)
                    else:
                        loss = model(**model_inputs("bert", batch, train=True, config=config)).loss
                    loss.backward()

                times.append(harness.timed(step)[0])
                model.zero_grad(set_to_none=True)
            row[name] = {"tokens_per_window": round(statistics.mean(tokens), 1),
                         "ms_per_step": round(1000 * harness.stats(times)["median"], 1)}
        row["packed_vs_trimmed"] = round(row["trimmed"]["ms_per_step"] / row["packed"]["ms_per_step"], 2)
        row["packed_vs_full"] = round(row["full"]["ms_per_step"] / row["packed"]["ms_per_step"], 2)
        result["families"][family] = row
    harness.report(result, args.out)
    harness.save(harness.record("packing_families", {"families": result["families"]},
                                key=f"seq {args.seq}, micro {args.micro}",
                                config={"model": "random models of all-MiniLM-L6-v2's shape (6 layers, hidden 384)",
                                        "seq": args.seq, "stride": args.stride, "micro": args.micro,
                                        "batches": args.batches}), args.results)

if __name__ == "__main__":
    main()
