"""squad-ds: DeepSpeed-optimised fine-tuning of BERT-family encoders for extractive QA (SQuAD v1.1/v2.0)."""

__version__ = "0.1.0"

__all__ = ["QuestionAnswerer", "__version__"]


def __getattr__(name: str):
    # `from squad_ds import QuestionAnswerer` without importing torch for every `import squad_ds` (the CLI's --help)
    if name == "QuestionAnswerer":
        from squad_ds.ask import QuestionAnswerer

        return QuestionAnswerer
    raise AttributeError(f"module 'squad_ds' has no attribute {name!r}")
