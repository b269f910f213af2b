"""In-memory datasets and the batch iterator the training loop uses.

``load_dataset(name, split_seed)`` returns a ``VisionData`` (normalised float32 tensors plus the
mean/std used); ``iterate_batches`` walks it in an order fixed by (seed, epoch). ``DATASETS`` (here)
is the registry of dataset names: the real ones of ``lowbit.data.vision`` and the generated
``synthetic`` one (``lowbit.data.synthetic``) for tests and smoke runs.
"""

from __future__ import annotations

from collections.abc import Callable

from lowbit.data.synthetic import load_synthetic
from lowbit.data.text import (
    CORPORA,
    load_corpus,
    sliding_window_perplexity,
    split_tokens,
    token_blocks,
    tokenize_corpus,
)
from lowbit.data.vision import (
    VisionData,
    _check_count,
    epoch_generator,
    iterate_batches,
    load_fashion_mnist,
    load_mnist10k,
    num_batches,
    read_idx,
)
from lowbit.errors import ConfigError

__all__ = [
    "CORPORA",
    "DATASETS",
    "VisionData",
    "epoch_generator",
    "iterate_batches",
    "load_corpus",
    "load_dataset",
    "num_batches",
    "read_idx",
    "sliding_window_perplexity",
    "split_tokens",
    "token_blocks",
    "tokenize_corpus",
]


DATASETS: dict[str, Callable[..., VisionData]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist10k": load_mnist10k,
    "synthetic": load_synthetic,
}


def load_dataset(name: str, split_seed: int = 0) -> VisionData:
    """Load a registered dataset into memory.

    Raises ``ConfigError`` for an unknown name and ``DatasetMissingError`` (a ``ConfigError``) with
    the install command when the data is absent.
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset={name!r}: allowed {sorted(DATASETS)}")
    _check_count("split_seed", split_seed, minimum=0)
    return DATASETS[name](split_seed=split_seed)
