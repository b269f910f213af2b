"""Integer modules: ``IntLinear`` and ``IntConv2d``, produced by ``lowbit.convert``.

They hold the integer weights (``weight_int``, int8 or int16 for unsigned 8-bit), the positive scale and
the integer zero point exactly as the weight quantizer produced them, and a frozen copy of the input
quantizer. The reference forward dequantizes the weight once (``s * (q - z)``, computed the same way as
in training) and caches it, so the outputs equal the fake-quant model's eval outputs.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lowbit.quant import functional as F
from lowbit.quant.functional import dequantize_weight, int_dtype, int_range
from lowbit.quant.quantizer import Quantizer

__all__ = ["IntLinear", "IntConv2d", "IntEmbedding", "IntTiedHead", "IntWeight", "LowRankAdapter", "frozen_copy",
           "use_int_matmul", "INT_LAYERS"]


class IntWeight(nn.Module):
    """Integer weight state shared by the integer layers (composition, not inheritance).

    Either ``weight_int`` (+ ``weight_scale``, ``weight_zero_point``) for a quantized weight, or
    ``weight_float`` for a layer whose weight stayed float (``weight_bits == 32``).
    """

    def __init__(
        self,
        weight_int: Tensor | None,
        weight_scale: Tensor | None,
        weight_zero_point: Tensor | None,
        bits: int,
        signed: bool,
        granularity: str,
        axis: int,
        group_size: int | None,
        input_quantizer: Quantizer | None,
        weight_float: Tensor | None = None,
        binary: bool = False,
        offset16: bool = False,
    ) -> None:
        super().__init__()
        self.input_quantizer = input_quantizer
        self.weight_bits, self.signed, self.binary = bits, signed, binary  # binary: integers in {-1, +1}
        self.offset16 = offset16 and weight_zero_point is not None  # s·q + float16(−s·z) (QuantSpec.offset)
        self.granularity, self.axis, self.group_size = granularity, axis, group_size
        if weight_int is None:  # weight not quantized: keep float
            assert weight_float is not None
            self.register_buffer("weight_float", weight_float)
            return
        self.register_buffer("weight_int", weight_int)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", weight_zero_point)

    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: nn.Module) -> IntWeight:
        """The integers, scale and zero point of a quantized layer (``QuantLinear``, ``QuantConv2d``)."""
        wq = layer.weight_quantizer
        iq = frozen_copy(layer.input_quantizer)
        if wq is None:
            return cls(None, None, None, 32, True, "tensor", 0, None, iq, layer.weight.detach().clone())
        qint, scale, bits = odd_if_stretched(wq, layer.weight_int().round(), wq.export_qparams()[0])
        qmin, qmax = int_range(bits, bool(wq.signed))
        zero_point = wq.export_qparams()[1]
        return cls(
            qint.to(int_dtype(qmin, qmax)), scale, zero_point, bits, bool(wq.signed),
            wq.granularity, wq.axis, wq.group_size, iq, binary=wq.spec.binary is not None,
            offset16=wq.spec.offset == "float16",
        )

    def dequantized(self) -> Tensor:
        if hasattr(self, "weight_float"):
            return self.weight_float
        return dequantize_weight(self.weight_int, self.weight_scale, self.weight_zero_point, self.granularity,
                                 self.axis, self.group_size, self.offset16)  # fmt: skip


def odd_if_stretched(q: Quantizer, ints: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(ints, scale, bits)`` to export: a stretched grid's ``(k + ½)·s`` becomes the odd integers ``2k + 1``
    at scale ``s/2`` on the ``b+1``-bit signed grid (the same values: halving a scale is exact)."""
    if not q.stretched:
        return ints, scale, q.nbits
    return 2 * ints + 1, scale / 2, q.nbits + 1


def frozen_copy(q: Quantizer | None) -> Quantizer | None:
    if q is None:
        return None
    c = copy.deepcopy(q)
    for p in c.parameters():
        p.requires_grad_(False)
    return c.eval()


def _bias(quant: nn.Module) -> nn.Parameter | None:
    return None if quant.bias is None else nn.Parameter(quant.bias.detach().clone(), requires_grad=False)


class LowRankAdapter(nn.Module):
    """Frozen float adapters beside an integer layer: ``(α/r)·A·(B·x)`` (the QLoRA-style baseline's)."""

    def __init__(self, lora_a: Tensor, lora_b: Tensor, alpha: float) -> None:
        super().__init__()
        self.rank, self.alpha = int(lora_b.shape[0]), float(alpha)
        self.register_buffer("lora_a", lora_a)  # (out, rank)
        self.register_buffer("lora_b", lora_b)  # (rank, in)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.linear(nn.functional.linear(x, self.lora_b.to(x.dtype)), self.lora_a.to(x.dtype))
        return (self.alpha / self.rank) * h

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class IntLinear(nn.Module):
    """Linear layer with integer weights.

    ``forward`` is the dequantize-once reference path (equal to the fake-quant model's eval output).
    After ``use_int_matmul(model)``, eligible layers (symmetric weights of at most 8 bits, per tensor
    or per output channel; a per-tensor input quantizer of at most 8 bits) compute instead

        y = s_x · s_w · ((x_int − o) @ w_intᵀ + (o − z_x) · Σ_k w_int) + b

    with an int8 × int8 → int32 matmul (``torch._int_mm``); ``o`` = 128 shifts an unsigned 8-bit
    input into int8. The accumulator is exact; the result differs from the reference path only by
    float rounding of the final scaling.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qweight: IntWeight,
        bias: nn.Parameter | None,
        adapter: LowRankAdapter | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = qweight
        self.bias = bias
        self.adapter = adapter
        self.register_buffer("weight", self.qweight.dequantized(), persistent=False)  # the cache
        self.int_matmul = False

    @classmethod
    def from_quant(cls, quant: nn.Module) -> IntLinear:
        """The converter of ``QuantLinear``."""
        return cls(quant.in_features, quant.out_features, IntWeight.from_layer(quant), _bias(quant))

    @property
    def input_quantizer(self) -> Quantizer | None:
        return self.qweight.input_quantizer

    def int_matmul_eligible(self) -> bool:
        qw, iq = self.qweight, self.input_quantizer
        if self.adapter is not None or not hasattr(qw, "weight_int") or qw.weight_zero_point is not None or iq is None:
            return False
        if qw.granularity not in ("tensor", "channel") or (qw.granularity == "channel" and qw.axis not in (0, -2)):
            return False
        qmin, qmax = iq.int_grid()
        return iq.granularity == "tensor" and qmax - qmin <= 255 and qw.weight_int.dtype == torch.int8

    def enable_int_matmul(self) -> bool:
        """Switch to the integer matmul path if this layer is eligible; returns whether it is on."""
        self.int_matmul = self.int_matmul_eligible()
        if self.int_matmul:
            w = self.qweight.weight_int
            self.register_buffer("weight_int_t", w.t().contiguous(), persistent=False)  # (in, out) int8
            self.register_buffer("weight_int_sum", w.to(torch.int32).sum(1), persistent=False)  # (out,)
        return self.int_matmul

    def _forward_int(self, x: Tensor) -> Tensor:
        iq = self.input_quantizer
        assert iq is not None
        qmin, qmax = iq.int_grid()
        offset = 128 if qmax > 127 else 0
        x_int = iq.to_int(x)
        zx = 0 if iq.zero_point is None else int(iq.export_qparams()[1])
        x8 = (x_int - offset).to(torch.int8).reshape(-1, self.in_features)
        acc = torch._int_mm(x8, self.weight_int_t)  # (batch, out) int32, exact
        if offset != zx:
            acc = acc + (offset - zx) * self.weight_int_sum
        s = F.positive_scale(iq.scale, F.SCALE_EPS) * self.qweight.weight_scale  # () or (out,)
        y = acc.to(torch.float32) * s
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.int_matmul:
            return self._forward_int(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = nn.functional.linear(x, self.weight, self.bias)
        return y if self.adapter is None else y + self.adapter(x)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weight_bits={self.qweight.weight_bits}"


class IntConv2d(nn.Module):
    """Conv2d with integer weights; ``forward`` is the dequantize-once reference path."""

    def __init__(self, conv: nn.Conv2d, qweight: IntWeight, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._pad = conv._reversed_padding_repeated_twice  # for non-zero padding modes, as nn.Conv2d
        self.qweight = qweight
        self.bias = bias
        self.register_buffer("weight", self.qweight.dequantized(), persistent=False)

    @classmethod
    def from_quant(cls, quant: nn.Conv2d) -> IntConv2d:
        """The converter of ``QuantConv2d``."""
        return cls(quant, IntWeight.from_layer(quant), _bias(quant))

    @property
    def input_quantizer(self) -> Quantizer | None:
        return self.qweight.input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.padding_mode != "zeros":
            x = nn.functional.pad(x, self._pad, mode=self.padding_mode)
            return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, weight_bits={self.qweight.weight_bits}"
        )


def use_int_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Turn the integer matmul path of every eligible ``IntLinear`` on (or off); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, IntLinear):
            n += m.enable_int_matmul() if enabled else 0
            if not enabled:
                m.int_matmul = False
    return n


class IntEmbedding(nn.Module):
    """An embedding table of integers (``IntWeight``); lookups gather rows of the dequantized table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qweight: IntWeight, padding_idx: int | None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.qweight = qweight
        self.bias = None
        self.register_buffer("weight", self.qweight.dequantized(), persistent=False)

    @classmethod
    def from_quant(cls, quant: nn.Embedding) -> IntEmbedding:
        """The converter of ``QuantEmbedding``."""
        return cls(quant.num_embeddings, quant.embedding_dim, IntWeight.from_layer(quant), quant.padding_idx)

    @property
    def input_quantizer(self) -> None:
        return None

    def forward(self, ids: Tensor) -> Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight_bits={self.qweight.weight_bits}"


class IntTiedHead(nn.Module):
    """An output head tied to an ``IntEmbedding``: ``y = x · Eᵀ (+ b)`` with the embedding's dequantized table."""

    def __init__(self, embedding: IntEmbedding, bias: nn.Parameter | None, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: its integers are stored once
        self.embedding_name = name
        self.bias = bias
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.embedding.weight.to(x.dtype), b)

    def extra_repr(self) -> str:
        return f"tied to {self.embedding_name!r}, {self.in_features} -> {self.out_features}"


INT_LAYERS = (IntLinear, IntConv2d, IntEmbedding)
