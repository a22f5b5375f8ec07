"""Logits out to scores: n-best spans and predictions (postprocess) and the official EM/F1 (metrics). numpy only:
nothing here imports torch."""
