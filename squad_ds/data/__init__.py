"""SQuAD in, model inputs out: reading and validating SQuAD files (squad), data-file names and shipped samples
(files), tokenization into windows (features), the content-keyed cache (cache), a run's features for a file
(preprocess), epoch order and micro-batches (batching), packed batches (packing)."""
