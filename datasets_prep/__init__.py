"""Data preparation: corpora to Streaming MDS shards (:mod:`datasets_prep.corpus`) and downstream task files
(:mod:`datasets_prep.eval_tasks`)."""
