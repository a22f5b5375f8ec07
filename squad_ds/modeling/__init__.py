"""Model construction: HF models, relative-position BERT, XLNet QA glue."""
