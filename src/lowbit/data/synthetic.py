"""A synthetic 10-class image dataset, generated in memory: for tests and smoke runs, no download.

``load_synthetic`` returns a ``VisionData`` shaped and normalised like Fashion-MNIST (float32
(N, 1, 28, 28), int64 labels, 10 classes, one scalar mean/std taken over the training pixels), so
every vision code path can run on a machine where no dataset package is installed. It is not a
benchmark: numbers measured on it say nothing about real images.

Each class c is a fixed prototype P_c: four or five smooth pen strokes (segments with a Gaussian
profile) and one soft blob, drawn from a constant seed, so the task is the same for every
``split_seed``. One image of class c is

    p = clip(a · shift(P_c, dy, dx) + m · shift(P_o, dy, dx) + σ · ε, 0, 1),   x = round(255 · p)

with a contrast a ∈ [0.6, 1], a shift (dy, dx) ∈ {-2..2}², a copy of another class's prototype P_o
at weight m ∈ [0, 0.8] (a distractor, sometimes brighter than the true pattern) and Gaussian pixel
noise ε (σ = 0.2). The shifts, the distractor and the noise make it learnable but not trivial: the
small MLP of ``recipes/tiny.yaml`` reaches about 77 % after one epoch of 2,000 images and levels
off near 90 % (chance is 10 %), so quantization losses show.

``split_seed`` seeds the per-image draws (labels, contrasts, shifts, distractors, noise) through a
local ``numpy.random.SeedSequence``; the global RNGs are never touched. Classes are balanced
exactly: each split holds every class equally often, in shuffled order.
"""

from __future__ import annotations

import numpy as np

from lowbit.data.vision import VisionData, _check_count, _labels, _normalise

SYNTHETIC_TRAIN = 6000
SYNTHETIC_TEST = 1000

_SIZE = 28  # as lowbit.data.vision.IMAGE_SIZE
_CLASSES = 10  # as lowbit.data.vision.NUM_CLASSES
_PROTOTYPE_SEED = 20240611  # fixes the ten class patterns for every split_seed
_MAX_SHIFT = 2
_STROKE_WIDTH = (1.5, 2.2)  # Gaussian profile σ of a stroke, pixels
_BLOB_SIGMA = (2.5, 4.5)
_STROKES = (4, 6)  # 4 or 5 strokes per class pattern
_MARGIN = 3.0
_NOISE = 0.2
_MAX_DISTRACTOR = 0.8


def _stroke(yy: np.ndarray, xx: np.ndarray, a: np.ndarray, b: np.ndarray, width: float) -> np.ndarray:
    """Intensity of a pen stroke from a to b: exp(-d² / 2w²), d the distance to the segment."""
    ab = b - a
    t = np.clip(((yy - a[0]) * ab[0] + (xx - a[1]) * ab[1]) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    d2 = (yy - a[0] - t * ab[0]) ** 2 + (xx - a[1] - t * ab[1]) ** 2
    return np.exp(-d2 / (2 * width**2))


def prototypes() -> np.ndarray:
    """The ten class patterns, float64 (10, 28, 28) in [0, 1] with maximum 1; fixed for all seeds."""
    rng = np.random.default_rng(np.random.SeedSequence(_PROTOTYPE_SEED))
    yy, xx = np.meshgrid(np.arange(_SIZE, dtype=np.float64), np.arange(_SIZE, dtype=np.float64), indexing="ij")
    out = np.zeros((_CLASSES, _SIZE, _SIZE))
    lo, hi = _MARGIN, _SIZE - 1.0 - _MARGIN  # keep the strokes inside the frame after a shift
    for c in range(_CLASSES):
        img = np.zeros((_SIZE, _SIZE))
        for _ in range(int(rng.integers(*_STROKES))):
            a, b = rng.uniform(lo, hi, 2), rng.uniform(lo, hi, 2)
            img = np.maximum(img, _stroke(yy, xx, a, b, rng.uniform(*_STROKE_WIDTH)))
        centre, sigma = rng.uniform(lo, hi, 2), rng.uniform(*_BLOB_SIGMA)
        blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))
        out[c] = np.maximum(img, 0.8 * blob)
    return out / out.max(axis=(1, 2), keepdims=True)


def _images(protos: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 (n, 28, 28) images and their uint8 labels: every class n // 10 or n // 10 + 1 times."""
    labels = rng.permutation(np.arange(n) % _CLASSES).astype(np.uint8)
    other = (labels + rng.integers(1, _CLASSES, n)) % _CLASSES  # never the image's own class
    contrast = rng.uniform(0.6, 1.0, (n, 1, 1)).astype(np.float32)
    mix = rng.uniform(0.0, _MAX_DISTRACTOR, (n, 1, 1)).astype(np.float32)
    dy, dx = rng.integers(0, 2 * _MAX_SHIFT + 1, (2, n))
    # every shifted copy of every prototype: a (10, 5, 5, 28, 28) view of the zero-padded patterns
    padded = np.pad(protos.astype(np.float32), ((0, 0), (_MAX_SHIFT, _MAX_SHIFT), (_MAX_SHIFT, _MAX_SHIFT)))
    shifted = np.lib.stride_tricks.sliding_window_view(padded, (_SIZE, _SIZE), axis=(1, 2))
    p = rng.standard_normal((n, _SIZE, _SIZE), dtype=np.float32)
    p *= _NOISE
    p += contrast * shifted[labels, dy, dx]
    p += mix * shifted[other, dy, dx]
    np.clip(p, 0.0, 1.0, out=p)
    p *= 255.0
    return np.rint(p, out=p).astype(np.uint8), labels


def load_synthetic(split_seed: int = 0) -> VisionData:
    """6,000 train / 1,000 test synthetic images; ``split_seed`` seeds the per-image draws."""

    _check_count("split_seed", split_seed, minimum=0)
    protos = prototypes()
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([split_seed]).spawn(2))
    train_u8, train_y = _images(protos, SYNTHETIC_TRAIN, train_rng)
    test_u8, test_y = _images(protos, SYNTHETIC_TEST, test_rng)
    train_x, test_x, mean, std = _normalise(train_u8, test_u8)
    return VisionData(
        name="synthetic",
        train_x=train_x,
        train_y=_labels(train_y, "synthetic"),
        test_x=test_x,
        test_y=_labels(test_y, "synthetic"),
        num_classes=_CLASSES,
        mean=mean,
        std=std,
    )
