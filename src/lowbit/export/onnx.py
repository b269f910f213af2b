"""ONNX export in QDQ form: integer weights and quantized activations that any QDQ runtime reads.

``export_onnx(model, path, example_input)`` writes the integer model (a prepared fake-quant model is
converted first) as an ONNX graph in which

- each quantized weight is an integer initializer feeding ``DequantizeLinear``, with ``axis`` per
  channel and opset 21's ``block_size`` per group (a conv's groups run over ``in · kh · kw``, as in
  lowbit, so its initializer is stored 2-D ``(out, in·kh·kw)`` and reshaped after the dequantize).
  Weights of at most 4 bits are INT4 / UINT4 at opset >= 21 (packed two to a byte), otherwise INT8 /
  UINT8; the values already lie inside the narrower grid. Signed or unsigned as the weight's grid;
- binary weights ({−1, +1}, ``QuantSpec.binary``) are INT4 / INT8 initializers like any other; a binary
  input quantizer is ``Where(x >= 0, 1, −1) · s``, since QDQ has no sign;
- each input quantizer is ``QuantizeLinear -> DequantizeLinear`` with its scale and zero point (per
  tensor, or per channel on axis 1). A grid narrower than 8 bits becomes a clipped 8-bit one: a ``Clip``
  to ``[s·(qmin − z), s·(qmax − z)]`` (``Max`` / ``Min`` per channel) before an int8 / uint8
  ``QuantizeLinear``. That equals the narrow grid because rounding is monotone and both sides round half
  to even: ``round(x/s) + z`` of a clipped ``x`` lands in ``[qmin, qmax]`` and is the narrow grid's
  integer wherever ``x`` lies inside, and ``s·k / s`` rounds back to ``k`` at the ends;
- everything else (BatchNorm, ReLU / ReLU6 / Hardtanh / PReLU, lowbit's ``LearnableBias``, adds, average
  and global average pools, flatten, biases) is float ONNX.

How the graph is made: written from a ``torch.fx`` trace of the integer model through a fixed table of
ops (``MODULES``, ``FUNCTIONS``, ``METHODS``); any other op is a ConfigError that names it. Not with
``torch.onnx.export``: in torch 2.13 its dynamo exporter needs ``onnxscript``, and both it and the
deprecated TorchScript exporter would trace through the quantizer's autograd function and fused kernel,
whose float ops would have to be pattern-matched back into Q/DQ nodes. Writing the graph from the
integer modules' own state needs only ``onnx`` and cannot drift from what ``lowbit.convert`` computes.

Numerics: weights dequantize to exactly the integer model's weights (``(q - z) · s`` in float32 on both
sides); activations quantize alike wherever their float inputs are equal. Those differ by an ulp now
and then (the runtime sums convolutions in another order; it divides by ``s`` where torch multiplies by
``1/s``, which alone changed 3 of 376M activations on Fashion-MNIST), so a value on a rounding boundary
rarely lands one step away: on a trained W4A4 MobileNetV2, 0.24 % of images, 0.01 accuracy points
(``benchmarks/results/onnx.md``). The input's batch dimension is dynamic, the others the example's.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lowbit.api import convert
from lowbit.errors import ConfigError
from lowbit.export.intmodules import IntConv2d, IntLinear
from lowbit.models.birealnet import LearnableBias
from lowbit.quant.modules import QuantConv2d, QuantLinear
from lowbit.quant.quantizer import Quantizer

__all__ = ["export_onnx", "DEFAULT_OPSET", "MIN_OPSET"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 21  # INT4 / UINT4 tensors and block-wise DequantizeLinear
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, IntLinear | IntConv2d) or type(m) in MODULES or super().is_leaf_module(m, qualname)


class _Writer:
    """Nodes and initializers of the ONNX graph, and the ONNX name of each fx value."""

    def __init__(self, onnx: Any, opset: int) -> None:
        self.onnx, self.opset = onnx, opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.env: dict[str, str] = {}
        self._used: set[str] = set()

    def fresh(self, base: str) -> str:
        name = base
        while name in self._used:
            name += "_"
        self._used.add(name)
        return name

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        name = self.fresh(base)
        self.inits.append(self.onnx.numpy_helper.from_array(arr.astype(dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def arg(self, a: Any, base: str) -> str:
        if isinstance(a, fx.Node):
            return self.env[a.name]
        if isinstance(a, int | float) and not isinstance(a, bool):
            return self.const(f"{base}.const", np.float32(a))
        raise ConfigError(f"{base}: argument {a!r} ({type(a).__name__}) is not supported by the ONNX export")


# -- quantized layers ---------------------------------------------------------------------------


def _int_dtype(q: np.ndarray, zero_point: np.ndarray | None, bits: int, signed: bool, opset: int) -> Any:
    """The ONNX type of the weight grid: INT4 / UINT4 up to 4 bits where the opset has them, else 8 bits."""
    import ml_dtypes

    narrow = bits <= 4 and opset >= 21
    t = (ml_dtypes.int4 if signed else ml_dtypes.uint4) if narrow else (np.int8 if signed else np.uint8)
    vals = q if zero_point is None else np.concatenate([q.ravel(), zero_point.ravel()])
    if vals.min() < ml_dtypes.iinfo(t).min or vals.max() > ml_dtypes.iinfo(t).max:
        raise ConfigError(f"weight integers in [{vals.min()}, {vals.max()}] do not fit {np.dtype(t).name}")
    return t


def _weight(w: _Writer, name: str, mod: IntLinear | IntConv2d) -> str:
    """The dequantized weight: ``DequantizeLinear`` of the integer initializer (or the float weight)."""
    qw: Any = mod.qweight
    if not hasattr(qw, "weight_int"):
        return w.const(f"{name}.weight", qw.weight_float)
    if qw.offset16:
        raise ConfigError(f"layer {name!r}: its grid has a float16 offset (s·q + m, quant offset: float16, format "
                          "q4_1), and ONNX's zero points are integers: export it as GGUF, or train offset: integer")
    q = qw.weight_int.to(torch.int32).numpy()
    shape = q.shape
    attrs: dict[str, int] = {}
    if qw.granularity == "group":
        if w.opset < 21:
            raise ConfigError(
                f"layer {name!r}: group-wise weights (group_size={qw.group_size}) need ONNX opset >= 21 "
                f"(DequantizeLinear block_size), got opset={w.opset}: export with opset=21 or newer, or "
                "quantize with granularity='channel'"
            )
        q = q.reshape(shape[0], -1)  # (out, in·kh·kw): lowbit's groups run along this view
        attrs = {"axis": 1, "block_size": int(qw.group_size)}  # scale (out, in·kh·kw // group_size)
    elif qw.granularity == "channel":
        attrs = {"axis": qw.axis % len(shape)}  # scale (C,)
    zp = None if qw.weight_zero_point is None else qw.weight_zero_point.to(torch.int32).numpy()
    signed = bool(getattr(qw, "signed", zp is None))  # grids are signed when symmetric unless set otherwise
    dtype = _int_dtype(q, zp, qw.weight_bits, signed, w.opset)
    inputs = [w.const(f"{name}.weight_int", q, dtype), w.const(f"{name}.weight_scale", qw.weight_scale)]
    if zp is not None:
        inputs.append(w.const(f"{name}.weight_zero_point", zp, dtype))
    out = w.op("DequantizeLinear", inputs, f"{name}.weight_dq", **attrs)
    if q.shape != shape:
        out = w.op("Reshape", [out, w.const(f"{name}.weight_shape", np.array(shape), np.int64)], f"{name}.weight")
    return out


def _quantize_input(w: _Writer, name: str, q: Quantizer, x: str, rank: int) -> str:
    """``x -> [Clip] -> QuantizeLinear -> DequantizeLinear`` with the quantizer's grid."""
    t, passthrough = q.int_transform, getattr(q.int_transform, "passthrough", None)
    if t is not None and not (callable(passthrough) and passthrough()):
        raise ConfigError(
            f"layer {name!r}: its input quantizer has an integer transform ({type(t).__name__}), which QDQ "
            "cannot express: finish or remove the method before exporting to ONNX"
        )
    if q.spec.binary is not None:  # {-s, +s}: s · (x >= 0 ? 1 : -1), which QDQ cannot express
        scale = q.export_qparams()[0]
        bshape = (-1,) + (1,) * (rank - 2) if scale.dim() == 1 else ()
        nonneg = w.op("GreaterOrEqual", [x, w.const(f"{name}.zero", np.float32(0))], f"{name}.nonneg")
        sign = w.op("Where", [nonneg, w.const(f"{name}.plus", np.float32(1)), w.const(f"{name}.minus", np.float32(-1))],
                    f"{name}.sign")  # fmt: skip
        return w.op("Mul", [sign, w.const(f"{name}.input_scale", scale.reshape(bshape))], f"{name}.input_binary")
    qmin, qmax = q.int_grid()
    scale, zero = q.export_qparams()
    zero = torch.zeros_like(scale) if zero is None else zero
    attrs = {"axis": 1} if scale.dim() == 1 else {}  # per channel: channels on dim 1, (N, C, ...)
    dtype = np.int8 if qmin < 0 else np.uint8  # bits <= 8 (QuantSpec), so the grid fits
    info = np.iinfo(dtype)
    if (qmin, qmax) != (info.min, info.max):  # a narrower grid: clip to it, then quantize at 8 bits
        lo = (scale * (qmin - zero)).numpy().astype(np.float32)
        hi = (scale * (qmax - zero)).numpy().astype(np.float32)
        if scale.dim() == 0:
            x = w.op("Clip", [x, w.const(f"{name}.clip_min", lo), w.const(f"{name}.clip_max", hi)], f"{name}.clip")
        else:  # Clip takes scalars only
            bshape = (-1,) + (1,) * (rank - 2)  # (C, 1, 1) against (N, C, H, W)
            x = w.op("Max", [x, w.const(f"{name}.clip_min", lo.reshape(bshape))], f"{name}.clip_lo")
            x = w.op("Min", [x, w.const(f"{name}.clip_max", hi.reshape(bshape))], f"{name}.clip")
    s, z = w.const(f"{name}.input_scale", scale), w.const(f"{name}.input_zero_point", zero, dtype)
    xq = w.op("QuantizeLinear", [x, s, z], f"{name}.input_q", **attrs)
    return w.op("DequantizeLinear", [xq, s, z], f"{name}.input_dq", **attrs)


def _layer(w: _Writer, name: str, mod: IntLinear | IntConv2d, x: str, rank: int) -> str:
    if mod.input_quantizer is not None:
        x = _quantize_input(w, name, mod.input_quantizer, x, rank)
    ins = [x, _weight(w, name, mod)]
    bias = [w.const(f"{name}.bias", mod.bias)] if mod.bias is not None else []
    if isinstance(mod, IntLinear):
        if rank == 2:
            return w.op("Gemm", ins + bias, name, transB=1)
        y = w.op("MatMul", [x, w.op("Transpose", ins[1:], f"{name}.weight_t", perm=[1, 0])], f"{name}.matmul")
        return w.op("Add", [y, *bias], name) if bias else y
    if mod.padding_mode != "zeros":
        raise ConfigError(f"layer {name!r}: padding_mode={mod.padding_mode!r}; the ONNX export allows 'zeros'")
    if isinstance(mod.padding, str):
        raise ConfigError(f"layer {name!r}: padding={mod.padding!r}; the ONNX export allows integer padding")
    attrs = {"strides": list(mod.stride), "pads": list(mod.padding) * 2, "dilations": list(mod.dilation)}
    return w.op("Conv", ins + bias, name, kernel_shape=list(mod.kernel_size), group=mod.groups, **attrs)


# -- float ops ----------------------------------------------------------------------------------


def _batchnorm(w: _Writer, name: str, m: Any, x: str, rank: int) -> str:
    if m.running_mean is None:
        raise ConfigError(f"layer {name!r}: BatchNorm without running statistics cannot be exported")
    ones, zeros = torch.ones(m.num_features), torch.zeros(m.num_features)
    stats = {"weight": m.weight if m.affine else ones, "bias": m.bias if m.affine else zeros}
    stats |= {"mean": m.running_mean, "var": m.running_var}
    ins = [x] + [w.const(f"{name}.{k}", v) for k, v in stats.items()]
    return w.op("BatchNormalization", ins, name, epsilon=float(m.eps))


def _global_pool(w: _Writer, name: str, m: Any, x: str, rank: int) -> str:
    if m.output_size not in (1, (1, 1)):
        raise ConfigError(f"layer {name!r}: AdaptiveAvgPool2d(output_size={m.output_size}); the export allows 1")
    return w.op("GlobalAveragePool", [x], name)


def _channel_shape(values: Tensor, rank: int) -> Tensor:
    """Per-channel values shaped to broadcast against (N, C, ...) of ``rank`` dimensions."""
    return values.detach().reshape(-1, *([1] * (rank - 2))) if rank > 2 else values.detach()


def _prelu(w: _Writer, name: str, m: nn.PReLU, x: str, rank: int) -> str:
    return w.op("PRelu", [x, w.const(f"{name}.slope", _channel_shape(m.weight, rank))], name)


def _avg_pool(w: _Writer, name: str, m: nn.AvgPool2d, x: str, rank: int) -> str:
    if m.divisor_override is not None:
        raise ConfigError(f"layer {name!r}: AvgPool2d(divisor_override={m.divisor_override}); the export allows None")
    def pair(v: Any) -> list[int]:
        return [int(i) for i in v] if isinstance(v, tuple | list) else [int(v)] * 2

    kernel, stride, pad = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
    return w.op("AveragePool", [x], name, kernel_shape=kernel, strides=stride, pads=pad * 2,
                ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))  # fmt: skip


def _flatten(w: _Writer, name: str, x: str, rank: int, start: int = 1, end: int = -1) -> str:
    if end % rank != rank - 1 or start % rank == 0:
        raise ConfigError(f"{name}: flatten(start_dim={start}, end_dim={end}); the export allows start >= 1, end -1")
    return w.op("Flatten", [x], name, axis=start % rank)


_Emit = Callable[[_Writer, str, Any, str, int], str]
MODULES: dict[type[nn.Module], _Emit] = {
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.ReLU: lambda w, n, m, x, r: w.op("Relu", [x], n),
    nn.ReLU6: lambda w, n, m, x, r: w.op("Clip", [x, w.const(f"{n}.min", 0.0), w.const(f"{n}.max", 6.0)], n),
    nn.Hardtanh: lambda w, n, m, x, r: w.op(
        "Clip", [x, w.const(f"{n}.min", m.min_val), w.const(f"{n}.max", m.max_val)], n),
    nn.Identity: lambda w, n, m, x, r: x,
    nn.Dropout: lambda w, n, m, x, r: x,  # eval mode
    nn.AdaptiveAvgPool2d: _global_pool,
    nn.AvgPool2d: _avg_pool,
    nn.PReLU: _prelu,
    LearnableBias: lambda w, n, m, x, r: w.op("Add", [x, w.const(f"{n}.bias", _channel_shape(m.bias, r))], n),
    nn.Flatten: lambda w, n, m, x, r: _flatten(w, n, x, r, m.start_dim, m.end_dim),
}
BINARY = {operator.add: "Add", torch.add: "Add", operator.sub: "Sub", torch.sub: "Sub", operator.mul: "Mul",
          torch.mul: "Mul", operator.iadd: "Add", operator.imul: "Mul"}
FUNCTIONS = {**BINARY, torch.relu: "Relu", nn.functional.relu: "Relu", torch.flatten: "Flatten"}
METHODS = {"add": "Add", "sub": "Sub", "mul": "Mul", "relu": "Relu", "flatten": "Flatten"}


def _emit(w: _Writer, gm: fx.GraphModule, node: fx.Node) -> str:
    """The ONNX value of one fx node of a ``call_*`` kind."""
    name, args = node.name, node.args
    table: dict[Any, str] = FUNCTIONS if node.op == "call_function" else METHODS  # type: ignore[assignment]
    meta = args[0].meta.get("tensor_meta") if args and isinstance(args[0], fx.Node) else None
    rank = len(meta.shape) if meta is not None else 0
    if node.op == "call_module":
        mod, target = gm.get_submodule(str(node.target)), str(node.target)
        if isinstance(mod, IntLinear | IntConv2d):
            return _layer(w, target, mod, w.arg(args[0], name), rank)
        if type(mod) not in MODULES:
            raise ConfigError(
                f"module {target!r} ({type(mod).__name__}) is not supported by the ONNX export: supported are "
                f"IntLinear, IntConv2d, {', '.join(t.__name__ for t in MODULES)}"
            )
        return MODULES[type(mod)](w, target, mod, w.arg(args[0], name), rank)
    op_type = table.get(node.target)
    if op_type is None or node.kwargs.get("alpha", 1) != 1:
        supported = sorted({getattr(f, "__name__", str(f)) for f in FUNCTIONS} | set(METHODS))
        raise ConfigError(
            f"{node.op} {getattr(node.target, '__name__', node.target)!r} (node {name!r}) is not supported by "
            f"the ONNX export: supported are {', '.join(supported)}"
        )
    if op_type == "Flatten":
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(w, name, w.arg(args[0], name), rank, int(start), int(end))  # type: ignore[arg-type]
    n_in = 2 if op_type in ("Add", "Sub", "Mul") else 1
    return w.op(op_type, [w.arg(a, name) for a in args[:n_in]], name)


def export_onnx(model: nn.Module, path: str | Path, example_input: Tensor, opset: int | None = None) -> Path:
    """Write ``model`` (prepared or converted) to ``path`` as an ONNX QDQ graph; returns the path.

    ``example_input`` fixes every input dimension but the first (the batch, dynamic in the file).
    """
    try:
        import onnx
    except ImportError:
        raise ConfigError('export_onnx needs the onnx package: pip install "lowbit[export]"') from None
    opset = DEFAULT_OPSET if opset is None else opset
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"opset={opset!r}; allowed an integer from {MIN_OPSET} to {newest} (the installed onnx)")
    if any(isinstance(m, QuantLinear | QuantConv2d) for m in model.modules()):
        model = convert(model)
    was_training = model.training
    model.eval()
    w = _Writer(onnx, opset)
    inputs: list[Any] = []
    outputs: list[Any] = []

    def value_info(name: str, node: fx.Node) -> Any:  # float, batch dimension dynamic
        shape = ["batch", *node.meta["tensor_meta"].shape[1:]]
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)

    try:
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model))
        except Exception as e:  # fx reports data-dependent control flow and the like as various errors
            raise ConfigError(f"{type(model).__name__} cannot be traced by torch.fx for ONNX export: {e}") from e
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if inputs:
                    raise ConfigError(f"the ONNX export takes models of one input; {node.name!r} is a second")
                w.env[node.name] = w.fresh("input")
                inputs.append(value_info(w.env[node.name], node))
            elif node.op == "get_attr":
                w.env[node.name] = w.const(str(node.target), getattr(gm, str(node.target)))
            elif node.op == "output":
                res = node.args[0] if isinstance(node.args[0], tuple | list) else (node.args[0],)
                for i, r in enumerate(res):
                    out = w.op("Identity", [w.arg(r, "output")], "output" if len(res) == 1 else f"output_{i}")
                    outputs.append(value_info(out, r))
            else:
                w.env[node.name] = _emit(w, gm, node)
    finally:
        model.train(was_training)
    opsets = [onnx.helper.make_opsetid("", opset)]
    graph = onnx.helper.make_graph(w.nodes, type(model).__name__, inputs, outputs, initializer=w.inits)
    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="lowbit")
    proto.ir_version = onnx.helper.find_min_ir_version_for(opsets)  # the oldest runtimes that can read it
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    counts = {k: sum(n.op_type == k for n in w.nodes) for k in ("QuantizeLinear", "DequantizeLinear")}
    log.info("wrote %s (opset %d, %d nodes, %s, %d bytes)", path, opset, len(w.nodes), counts, path.stat().st_size)
    return path
