"""Reading one layer of a lowbit file (``lowbit.export.io``): the integer module a checked layer entry
describes, from the file's tensors, checked against the model's float module (kind, shape, dtype, bias)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.config import BinarySpec, QuantSpec
from lowbit.errors import FormatError
from lowbit.export.checks import check_qparams
from lowbit.export.intmodules import IntConv2d, IntEmbedding, IntLinear, IntTiedHead, IntWeight, LowRankAdapter
from lowbit.export.pack import unpack, unpack_sign
from lowbit.quant.functional import int_dtype, int_range
from lowbit.quant.quantizer import Quantizer

__all__ = ["KIND", "int_layer", "tied_head", "take"]


def take(tensors: dict[str, Tensor], key: str, dtype: torch.dtype | None, shape: tuple[int, ...] | None) -> Tensor:
    if key not in tensors:
        raise FormatError(f"tensor {key!r} is missing")
    t = tensors.pop(key)
    if dtype is not None and t.dtype != dtype:
        raise FormatError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise FormatError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _input_quantizer(name: str, spec: dict[str, Any], tensors: dict[str, Tensor]) -> Quantizer:
    scale = take(tensors, f"{name}.input_scale", torch.float32, None)
    binary = BinarySpec(scale="one") if spec.get("grid") == "binary" else None  # a fixed scale: the file's
    qspec = QuantSpec(
        bits=spec["bits"], symmetric=spec["symmetric"], granularity=spec["granularity"], axis=spec["axis"],
        signed=spec["signed"], learn_scale=False, binary=binary,
    )
    channels = scale.numel() if spec["granularity"] == "channel" else None
    q = Quantizer(qspec, None, channels=channels)
    if tuple(q.scale.shape) != tuple(scale.shape):
        raise FormatError(
            f"tensor {name}.input_scale has shape {tuple(scale.shape)}, expected {tuple(q.scale.shape)}"
        )
    zp = None if spec["symmetric"] else take(tensors, f"{name}.input_zero_point", torch.float32, tuple(scale.shape))
    check_qparams(f"{name}.input", scale, zp, *(q.int_grid() if binary else int_range(spec["bits"], spec["signed"])))
    q.scale.copy_(scale)
    if zp is not None:
        q.zero_point.copy_(zp)
    q.initialized.fill_(True)
    return q.eval()


KIND = {IntLinear: "linear", IntConv2d: "conv2d", IntEmbedding: "embedding"}
_FLOAT_KIND = {"linear": nn.Linear, "conv2d": nn.Conv2d, "embedding": nn.Embedding}


def _bias_of(name: str, float_mod: nn.Module, tensors: dict[str, Tensor]) -> nn.Parameter | None:
    bkey = f"{name}.bias"
    if getattr(float_mod, "bias", None) is not None:
        b = take(tensors, bkey, float_mod.bias.dtype, tuple(float_mod.bias.shape))
        return nn.Parameter(b, requires_grad=False)
    if bkey in tensors:
        raise FormatError(f"tensor {bkey!r} is in the file but layer {name!r} of the model has no bias")
    return None


def tied_head(name: str, spec: dict[str, Any], float_mod: nn.Module, model: nn.Module,
               tensors: dict[str, Tensor]) -> IntTiedHead:  # fmt: skip
    """The head ``spec`` ties to an embedding of the file, swapped in already."""
    emb = model.get_submodule(spec["embedding"])
    assert isinstance(emb, IntEmbedding)  # check_metadata: the target is an embedding layer of the file
    shape = (emb.num_embeddings, emb.embedding_dim)
    if tuple(float_mod.weight.shape) != shape:
        raise FormatError(f"layer {name!r} (tied to {spec['embedding']!r}, {shape}) has weight shape "
                          f"{tuple(float_mod.weight.shape)} in the model")  # fmt: skip
    if spec["bias"] != (float_mod.bias is not None):
        raise FormatError(f"layer {name!r}: bias {spec['bias']} in the file, {float_mod.bias is not None} in the model")
    return IntTiedHead(emb, _bias_of(name, float_mod, tensors), spec["embedding"])


def int_layer(name: str, spec: dict[str, Any], float_mod: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """The integer layer ``spec`` (checked by ``check_metadata``) describes, from the file's tensors."""
    kind = spec["kind"]
    want = _FLOAT_KIND[kind]
    if not isinstance(float_mod, want):
        raise FormatError(f"layer {name!r} is a {kind} in the file but a {type(float_mod).__name__} in the model")
    shape = tuple(spec["shape"])
    if tuple(float_mod.weight.shape) != shape:
        raise FormatError(
            f"layer {name!r} has weight shape {shape} in the file, {tuple(float_mod.weight.shape)} in the model"
        )
    iq = _input_quantizer(name, spec["input"], tensors) if spec["input"] is not None else None
    bits = spec["bits"]
    if bits == 32:
        w = take(tensors, f"{name}.weight", float_mod.weight.dtype, shape)
        qweight = IntWeight(None, None, None, 32, True, "tensor", 0, None, iq, w)
    else:
        signed, numel = spec["signed"], math.prod(shape)
        binary = spec.get("grid") == "binary"
        qmin, qmax = (-1, 1) if binary else int_range(bits, signed)
        zkey = f"{name}.weight_zero_point"
        probe = Quantizer(  # for the scale's shape
            QuantSpec(
                bits=bits, symmetric=zkey not in tensors, granularity=spec["granularity"],
                group_size=spec["group_size"], axis=spec["axis"], signed=signed, learn_scale=False,
                binary=BinarySpec(scale="one") if binary else None,
            ),
            shape,
        )
        packed = take(tensors, f"{name}.weight_packed", torch.uint8, None)
        ints = unpack_sign(packed, numel) if binary else unpack(packed, bits, signed, numel)
        q = ints.reshape(shape).to(int_dtype(qmin, qmax))
        scale = take(tensors, f"{name}.weight_scale", None, tuple(probe.scale.shape))
        if scale.dtype not in (torch.float32, torch.float16):
            raise FormatError(f"tensor {name + '.weight_scale'!r} has dtype {scale.dtype}, expected float32 or float16")
        scale = scale.float()
        zp = take(tensors, zkey, torch.float32, tuple(scale.shape)) if zkey in tensors else None
        check_qparams(f"{name}.weight", scale, zp, qmin, qmax)
        if "offset" in spec and zp is None:
            raise FormatError(f"layer {name!r}: offset {spec['offset']!r} needs a zero point, and the file has none")
        qweight = IntWeight(q, scale, zp, bits, signed, spec["granularity"], spec["axis"], spec["group_size"], iq,
                            binary=binary, offset16="offset" in spec)
    if kind == "embedding":
        if tensors.get(f"{name}.bias") is not None:
            raise FormatError(f"tensor {name + '.bias'!r} is in the file but an embedding has no bias")
        return IntEmbedding(float_mod.num_embeddings, float_mod.embedding_dim, qweight, float_mod.padding_idx)
    bias = _bias_of(name, float_mod, tensors)
    if kind == "conv2d":
        return IntConv2d(float_mod, qweight, bias)
    adapter = None
    if "adapter" in spec:  # float adapters beside the integers (the QLoRA-style baseline)
        rank = spec["adapter"]["rank"]
        lora_a = take(tensors, f"{name}.lora_a", torch.float32, (shape[0], rank))
        lora_b = take(tensors, f"{name}.lora_b", torch.float32, (rank, shape[1]))
        adapter = LowRankAdapter(lora_a, lora_b, float(spec["adapter"]["alpha"]))
    return IntLinear(float_mod.in_features, float_mod.out_features, qweight, bias, adapter)
