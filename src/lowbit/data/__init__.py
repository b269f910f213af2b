"""In-memory datasets and the batch iterator the training loop uses.

``load_dataset(name, split_seed)`` returns a ``VisionData`` (normalised float32 tensors plus the
mean/std used); ``iterate_batches`` walks it in an order fixed by (seed, epoch). The registry of
dataset names is ``DATASETS`` in ``lowbit.data.vision``.
"""

from __future__ import annotations

from lowbit.data.text import (
    CORPORA,
    iterate_token_batches,
    load_corpus,
    sliding_window_perplexity,
    split_tokens,
    token_blocks,
    tokenize_corpus,
)
from lowbit.data.vision import (
    DATASETS,
    VisionData,
    epoch_generator,
    iterate_batches,
    load_dataset,
    num_batches,
    read_idx,
)

__all__ = [
    "CORPORA",
    "DATASETS",
    "VisionData",
    "epoch_generator",
    "iterate_batches",
    "iterate_token_batches",
    "load_corpus",
    "load_dataset",
    "num_batches",
    "read_idx",
    "sliding_window_perplexity",
    "split_tokens",
    "token_blocks",
    "tokenize_corpus",
]
