"""Bit packing against a naive Python packer (loop over values and bits), golden bytes and round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import FormatError
from lowbit.export import pack as P
from lowbit.quant.functional import int_range

GRIDS = [(b, signed) for b in range(1, 9) for signed in (True, False)]


def _ref_pack(values: list[int], bits: int, signed: bool) -> bytes:
    """The format as written in the module docstring: code bit k of value i is stream bit i * bits + k."""
    qmin, _ = int_range(bits, signed)
    out = bytearray((len(values) * bits + 7) // 8)
    for i, v in enumerate(values):
        code = v - qmin
        for k in range(bits):
            if code >> k & 1:
                j = i * bits + k
                out[j // 8] |= 1 << (j % 8)
    return bytes(out)


def _bytes(t: torch.Tensor) -> bytes:
    assert t.dtype == torch.uint8 and t.dim() == 1
    return bytes(t.tolist())


def _random_grid(bits: int, signed: bool, n: int, seed: int = 0) -> torch.Tensor:
    qmin, qmax = int_range(bits, signed)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(qmin, qmax + 1, (n,), generator=g, dtype=torch.int64)


# -- against the reference ------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "signed"), GRIDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_pack_equals_reference(bits: int, signed: bool, data: st.DataObject) -> None:
    qmin, qmax = int_range(bits, signed)
    values = data.draw(st.lists(st.integers(qmin, qmax), min_size=0, max_size=200))
    ref = _ref_pack(values, bits, signed)
    packed = P.pack(torch.tensor(values, dtype=torch.int64), bits, signed)
    assert _bytes(packed) == ref
    assert len(ref) == P.packed_nbytes(len(values), bits)
    data_ref = torch.tensor(list(ref), dtype=torch.uint8)
    assert P.unpack(data_ref, bits, signed, len(values)).tolist() == values


def test_golden_bytes() -> None:
    # 3 bits: c0 in bits 0-2, c1 in bits 3-5, c2 straddles bits 6-7 of byte 0 and bit 0 of byte 1
    assert _bytes(P.pack(torch.tensor([1, 2, 7]), 3, False)) == bytes([0b11_010_001, 0b1])
    assert _bytes(P.pack(torch.tensor([1, 2, 15]), 4, False)) == bytes([0x21, 0x0F])  # low nibble first
    assert _bytes(P.pack(torch.tensor([-1, 0, 1, -2]), 2, True)) == bytes([0b00_11_10_01])  # ternary: code = v + 2
    assert _bytes(P.pack(torch.tensor([-128, 127, 0]), 8, True)) == bytes([0, 255, 128])
    assert _bytes(P.pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1, False)) == bytes([1, 1])


@pytest.mark.parametrize(
    ("numel", "bits", "nbytes"), [(0, 3, 0), (1, 1, 1), (3, 3, 2), (8, 3, 3), (1000, 3, 375), (5, 4, 3), (7, 7, 7)]
)
def test_byte_counts(numel: int, bits: int, nbytes: int) -> None:
    assert P.packed_nbytes(numel, bits) == nbytes
    assert P.pack(torch.zeros(numel, dtype=torch.int8), bits, True).numel() == nbytes


# -- round trips and dtypes -----------------------------------------------------------------------


def _holds(dtype: torch.dtype, bits: int, signed: bool) -> bool:
    qmin, qmax = int_range(bits, signed)
    return torch.iinfo(dtype).min <= qmin and qmax <= torch.iinfo(dtype).max


@pytest.mark.parametrize(
    ("bits", "signed", "dtype"),
    [
        (bits, signed, dtype)
        for bits, signed in GRIDS
        for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
        if _holds(dtype, bits, signed)
    ],
)
def test_round_trip_with_extremes(bits: int, signed: bool, dtype: torch.dtype) -> None:
    qmin, qmax = int_range(bits, signed)
    q = torch.cat([torch.tensor([qmin, qmax, qmax, qmin]), _random_grid(bits, signed, 2 * 3 * 7 - 4)])
    q = q.to(dtype).reshape(2, 3, 7)
    out = P.unpack(P.pack(q, bits, signed), bits, signed, q.numel())
    assert out.dim() == 1
    assert torch.equal(out.to(torch.int64).reshape(q.shape), q.to(torch.int64))


@pytest.mark.parametrize(("bits", "signed"), GRIDS)
def test_empty_and_dtype_rule(bits: int, signed: bool) -> None:
    qmin, qmax = int_range(bits, signed)
    expected = torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16
    assert (expected == torch.int16) == (bits == 8 and not signed)
    empty = P.pack(torch.zeros(0, 4, dtype=torch.int8), bits, signed)
    assert empty.dtype == torch.uint8 and empty.shape == (0,)
    assert P.unpack(empty, bits, signed, 0).dtype == expected
    assert P.unpack(P.pack(torch.tensor([qmax]), bits, signed), bits, signed, 1).dtype == expected


def test_non_contiguous_input_packs_in_row_major_order() -> None:
    q = _random_grid(3, True, 40).reshape(5, 8).t()
    assert torch.equal(P.pack(q, 3, True), P.pack(q.contiguous(), 3, True))


@pytest.mark.parametrize(("bits", "signed"), GRIDS)
def test_chunked_equals_one_shot(bits: int, signed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    q = _random_grid(bits, signed, 1001, seed=bits)
    one_shot = P.pack(q, bits, signed)
    monkeypatch.setattr(P, "CHUNK_VALUES", 16)
    chunked = P.pack(q, bits, signed)
    assert torch.equal(chunked, one_shot)
    assert _bytes(chunked) == _ref_pack(q.tolist(), bits, signed)
    assert torch.equal(P.unpack(chunked, bits, signed, q.numel()).to(torch.int64), q)


# -- errors ---------------------------------------------------------------------------------------


def test_out_of_range_names_grid_and_values() -> None:
    with pytest.raises(ValueError, match=r"\[-4, 3\].*bits=3, signed=True.*min -5, max 3"):
        P.pack(torch.tensor([0, -5, 3]), 3, True)
    with pytest.raises(ValueError, match=r"\[0, 15\].*bits=4, signed=False.*min 0, max 16"):
        P.pack(torch.tensor([16, 0]), 4, False)


@pytest.mark.parametrize("bits", [0, 9, 16, True, 4.0])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="use one of 1, 2, 3, 4, 5, 6, 7, 8"):
        P.pack(torch.zeros(3, dtype=torch.int8), bits, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use one of"):
        P.unpack(torch.zeros(3, dtype=torch.uint8), bits, True, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="integer dtype"):
        P.pack(torch.zeros(3, dtype=dtype), 4, False)


def test_unpack_wrong_length_or_dtype_is_format_error() -> None:
    with pytest.raises(FormatError, match="expected 375 bytes, got 374 bytes"):
        P.unpack(torch.zeros(374, dtype=torch.uint8), 3, True, 1000)
    with pytest.raises(FormatError, match="expected 2 bytes, got 3 bytes"):
        P.unpack(torch.zeros(3, dtype=torch.uint8), 3, True, 3)
    with pytest.raises(FormatError, match="torch.uint8"):
        P.unpack(torch.zeros(2, dtype=torch.int8), 3, True, 3)
    with pytest.raises(FormatError, match="1-D"):
        P.unpack(torch.zeros(1, 2, dtype=torch.uint8), 3, True, 3)


@pytest.mark.parametrize(("numel", "bits"), [(3, 3), (1, 1), (5, 4), (7, 7), (9, 2)])
def test_nonzero_padding_is_format_error(numel: int, bits: int) -> None:
    data = P.pack(torch.zeros(numel, dtype=torch.int8), bits, False).clone()
    data[-1] |= 0x80  # the top bit of the last byte is always padding here
    with pytest.raises(FormatError, match="padding bits"):
        P.unpack(data, bits, False, numel)


# -- binary weights -------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(signs=st.lists(st.sampled_from([-1, 1]), min_size=0, max_size=200))
def test_pack_sign_reference_and_round_trip(signs: list[int]) -> None:
    packed = P.pack_sign(torch.tensor(signs, dtype=torch.int8))
    assert _bytes(packed) == _ref_pack([int(s > 0) for s in signs], 1, False)
    assert torch.equal(P.pack_sign(torch.tensor(signs, dtype=torch.float32)), packed)
    out = P.unpack_sign(packed, len(signs))
    assert out.dtype == torch.int8 and out.tolist() == signs


def test_pack_sign_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.where(_random_grid(1, False, 1001) > 0, 1, -1).reshape(7, 11, 13)
    one_shot = P.pack_sign(q)
    monkeypatch.setattr(P, "CHUNK_VALUES", 24)
    assert torch.equal(P.pack_sign(q), one_shot)
    assert torch.equal(P.unpack_sign(one_shot, q.numel()).reshape(q.shape), q.to(torch.int8))


@pytest.mark.parametrize("bad", [[1, 0, -1], [2, 1], [1.0, 0.5], [1.0, float("nan")]])
def test_pack_sign_rejects_other_values(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="-1 or \\+1"):
        P.pack_sign(torch.tensor(bad))
