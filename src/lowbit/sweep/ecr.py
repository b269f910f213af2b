"""Effective compression ratio (Sung, Shin, Hwang 2015; METHODS.md §3.6).

Effective compression ratio (``effective_compression_ratio``): the memory of the float network that
reaches the same error as a quantized one, found on the float networks' error-versus-size curve
(interpolated linearly in error against log size, on the curve's running minimum: the best float error
at or below each size), divided by the quantized network's memory. Sizes are in bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["effective_compression_ratio", "matching_float_size"]


def matching_float_size(
    float_sizes: Sequence[float],
    float_errors: Sequence[float],
    errors: Sequence[float] | np.ndarray | float,
    log_size: bool = True,
) -> np.ndarray:
    """The float size at which the float curve reaches each error in ``errors`` (NaN outside the curve).

    The curve is the running minimum of the error over sizes (the best float network at or below each
    size), interpolated linearly in error against log size (``log_size=False``: against size). An error
    above the smallest network's, or below the best network's, has no match: NaN.
    """
    s = np.asarray(float_sizes, dtype=np.float64)
    e = np.asarray(float_errors, dtype=np.float64)
    if s.ndim != 1 or s.shape != e.shape or s.size == 0:
        raise ValueError(
            f"float_sizes and float_errors: expected two 1-D sequences of one length, got {s.shape} and {e.shape}"
        )
    if not (np.all(np.isfinite(s)) and np.all(s > 0) and np.all(np.isfinite(e))):
        raise ValueError("float_sizes must be finite and > 0, float_errors finite")
    order = np.argsort(s, kind="stable")
    s, env = s[order], np.minimum.accumulate(e[order])
    x = np.log(s) if log_size else s
    q = np.atleast_1d(np.asarray(errors, dtype=np.float64))
    out = np.full(q.shape, np.nan)
    for i, err in enumerate(q):
        if not np.isfinite(err) or err > env[0] or err < env[-1]:
            continue
        j = int(np.argmax(env <= err))  # the first size whose best error reaches err
        if j == 0:
            out[i] = s[0]
            continue
        t = (env[j - 1] - err) / (env[j - 1] - env[j])  # env[j-1] > err >= env[j]
        xi = x[j - 1] + t * (x[j] - x[j - 1])
        out[i] = math.exp(xi) if log_size else xi
    return out


def effective_compression_ratio(
    float_sizes: Sequence[float],
    float_errors: Sequence[float],
    quant_sizes: Sequence[float] | float,
    quant_errors: Sequence[float] | float,
    log_size: bool = True,
) -> np.ndarray:
    """ECR = (size of the float network reaching the quantized network's error) / (quantized size).

    Sizes in bits (float: #parameters × 32, or the measured payload; quantized: #weights × bits plus
    whatever stays float). NaN where the quantized error lies outside the float curve.
    """
    qs = np.atleast_1d(np.asarray(quant_sizes, dtype=np.float64))
    qe = np.atleast_1d(np.asarray(quant_errors, dtype=np.float64))
    if qs.shape != qe.shape:
        raise ValueError(f"quant_sizes {qs.shape} and quant_errors {qe.shape} differ in shape")
    if not np.all(qs > 0):
        raise ValueError("quant_sizes must be > 0")
    return matching_float_size(float_sizes, float_errors, qe, log_size) / qs
