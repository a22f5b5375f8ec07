"""Model FLOPs per trained sequence (forward + backward), for TFLOP/s and MFU in logs and benchmarks."""
from __future__ import annotations

# Dense bf16 matmul peaks (TFLOP/s) of known cards, matched against torch.cuda.get_device_name().
# MFU is only as good as this number: the benchmarks also report the peak they measured.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                     "V100": 125.0}


def non_embedding_params(config) -> int:
    """Matmul weights of the encoder layers plus the QA head (embeddings do no matmul work)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inner = getattr(config, "intermediate_size", None) or getattr(config, "d_inner", 4 * h)
    per_layer = 4 * h * h + 2 * h * inner  # Q, K, V, output projections; the two feed-forward matrices
    return layers * per_layer + 2 * h


def attention_flops(config, seq_len: int) -> float:
    """Forward + backward FLOPs of one sequence's attention products at `seq_len`: 12·L·S²·H for QKᵀ and A·V,
    plus 6·L·S²·H per relative-position product (one for relative_key: q·r; two for relative_key_query: q·r, k·r).
    """
    extra_terms = {"relative_key": 1, "relative_key_query": 2}.get(getattr(config, "position_embedding_type", ""), 0)
    return (12.0 + 6.0 * extra_terms) * config.num_hidden_layers * seq_len * seq_len * config.hidden_size


def flops_per_sequence(config, seq_len: int) -> float:
    """6·N·S for the weights (2 forward, 4 backward) plus attention_flops."""
    return 6.0 * non_embedding_params(config) * seq_len + attention_flops(config, seq_len)


def batch_flops(config, batch: dict) -> tuple[int, float]:
    """(sequences, FLOPs) of a training micro-batch, from shapes alone (no device sync): a padded batch costs
    flops_per_sequence at its (trimmed) length per sequence; a packed one (squad_ds/data/packing.py) costs the
    weights' 6·N per real token plus attention at the length it was padded to."""
    if "packed_index" in batch:
        n_seq, attn_len = batch["packed_mask"].shape
        tokens = batch["packed_index"].shape[0]
        return n_seq, 6.0 * non_embedding_params(config) * tokens + n_seq * attention_flops(config, attn_len)
    n_seq, seq_len = batch["input_ids"].shape
    return n_seq, n_seq * flops_per_sequence(config, seq_len)


def detect_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None
