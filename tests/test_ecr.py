"""Effective compression ratio (Sung et al. 2015) on synthetic error-versus-size curves, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbit.sweep.ecr import effective_compression_ratio, matching_float_size

# float networks of 1,000 ... 8,000 bits whose error falls 2 points per doubling of size
SIZES = [1000.0, 2000.0, 4000.0, 8000.0]
ERRORS = [8.0, 6.0, 4.0, 2.0]


def test_on_a_measured_point_the_match_is_that_network() -> None:
    assert effective_compression_ratio(SIZES, ERRORS, 500.0, 4.0)[0] == pytest.approx(4000 / 500)
    assert effective_compression_ratio(SIZES, ERRORS, 500.0, 8.0)[0] == pytest.approx(1000 / 500)
    assert effective_compression_ratio(SIZES, ERRORS, 250.0, 2.0)[0] == pytest.approx(8000 / 250)


def test_between_points_interpolates_in_log_size_or_in_size() -> None:
    # error 5 is halfway from (2000, 6) to (4000, 4): log-midpoint 2000·√2 = 2828.43, linear midpoint 3000
    assert matching_float_size(SIZES, ERRORS, 5.0)[0] == pytest.approx(2000 * math.sqrt(2))
    assert effective_compression_ratio(SIZES, ERRORS, 500.0, 5.0)[0] == pytest.approx(2000 * math.sqrt(2) / 500)
    assert effective_compression_ratio(SIZES, ERRORS, 500.0, 5.0, log_size=False)[0] == pytest.approx(6.0)
    # error 7.5: a quarter of the way from (1000, 8) to (2000, 6): 1000·2^0.25 = 1189.21 (linear: 1250)
    assert matching_float_size(SIZES, ERRORS, 7.5)[0] == pytest.approx(1189.2071150)
    assert matching_float_size(SIZES, ERRORS, 7.5, log_size=False)[0] == pytest.approx(1250.0)


def test_unsorted_input_and_many_quantized_networks_at_once() -> None:
    order = [2, 0, 3, 1]
    ecr = effective_compression_ratio(
        [SIZES[i] for i in order], [ERRORS[i] for i in order], [100.0, 200.0, 400.0], [6.0, 3.0, 9.0]
    )
    assert ecr[0] == pytest.approx(20.0)
    assert ecr[1] == pytest.approx(4000 * math.sqrt(2) / 200)  # halfway between (4000, 4) and (8000, 2)
    assert math.isnan(ecr[2])  # worse than the smallest float network: below the measured curve


def test_outside_the_float_curve_is_nan() -> None:
    assert math.isnan(effective_compression_ratio(SIZES, ERRORS, 100.0, 1.5)[0])  # better than every float net
    assert math.isnan(effective_compression_ratio(SIZES, ERRORS, 100.0, 8.01)[0])
    assert math.isnan(effective_compression_ratio(SIZES, ERRORS, 100.0, float("nan"))[0])


def test_a_non_monotone_float_curve_uses_the_best_network_at_or_below_each_size() -> None:
    # the 2000-bit network is worse than the 1000-bit one: the curve is 5, 5, 3 -> error 4 lies halfway
    # between (2000, 5) and (4000, 3); error 5 is first reached by the 1000-bit network, 4.5 a quarter of
    # the way from 2000 to 4000 bits (in log size), 5.5 by none
    sizes, errors = [1000.0, 2000.0, 4000.0], [5.0, 6.0, 3.0]
    assert matching_float_size(sizes, errors, 4.0)[0] == pytest.approx(2000 * math.sqrt(2))
    assert matching_float_size(sizes, errors, 5.0)[0] == pytest.approx(1000.0)
    assert matching_float_size(sizes, errors, 4.5)[0] == pytest.approx(2000 * 2**0.25)
    assert math.isnan(matching_float_size(sizes, errors, 5.5)[0])


def test_lossless_quantization_of_a_network_on_the_curve_gives_32_over_bits() -> None:
    rng = np.random.default_rng(0)
    params = np.sort(rng.uniform(1e3, 1e6, 8))
    errors = np.sort(rng.uniform(1, 20, 8))[::-1]  # bigger is better
    for bits in (2, 3, 8):
        ecr = effective_compression_ratio(32 * params, errors, bits * params, errors)
        assert np.allclose(ecr, 32 / bits)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="one length"):
        effective_compression_ratio([1.0, 2.0], [1.0], 1.0, 1.0)
    with pytest.raises(ValueError, match="finite and > 0"):
        effective_compression_ratio([0.0, 2.0], [1.0, 2.0], 1.0, 1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        effective_compression_ratio(SIZES, ERRORS, [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="quant_sizes must be > 0"):
        effective_compression_ratio(SIZES, ERRORS, 0.0, 4.0)
