"""squad-ds: DeepSpeed-optimised fine-tuning of BERT-family encoders for extractive QA (SQuAD v1.1/v2.0)."""

__version__ = "0.1.0"
