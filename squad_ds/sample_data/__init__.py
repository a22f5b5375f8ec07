"""Small SQuAD samples shipped with the package (CC BY-SA 4.0, see README.md); regenerate with `build.py`."""
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent
SAMPLE_TRAIN = SAMPLE_DIR / "train-v1.1-sample.json.gz"  # ~1,500 questions, SQuAD v1.1 train (reconstructed)
SAMPLE_DEV = SAMPLE_DIR / "dev-v1.1-sample.json.gz"  # ~400 questions, official SQuAD v1.1 dev, official ids
SAMPLE_DEV_V2 = SAMPLE_DIR / "dev-v2.0-sample.json.gz"  # ~300 questions, SQuAD v2.0 dev incl. unanswerable

__all__ = ["SAMPLE_DIR", "SAMPLE_TRAIN", "SAMPLE_DEV", "SAMPLE_DEV_V2"]
