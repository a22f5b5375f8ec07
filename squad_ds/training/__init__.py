"""A training run around DeepSpeed: its assembly (assemble), the DeepSpeed config (ds_config) and engine (engine),
inference on every rank (inference), checkpoints (checkpoint), resume rules (resume), the output directory (run_dir)
and FLOPs accounting (flops). The loop itself is squad_ds/train.py."""
