"""``lowbit.save`` / ``lowbit.load``: integer models as one safetensors file with JSON metadata.

The file (``format_version`` 1) holds, as safetensors tensors:

- per integer layer ``L``: ``L.weight_packed`` (uint8, the integers packed at their bit width by
  ``lowbit.export.pack``), ``L.weight_scale`` (float32, the quantizer's stored shape),
  ``L.weight_zero_point`` (float32, asymmetric only), ``L.bias``, and for a quantized input
  ``L.input_scale`` / ``L.input_zero_point``; a layer whose weight stayed float stores ``L.weight``;
- every other tensor of the model's ``state_dict`` under its own name (batch norm, float layers).

and in the safetensors metadata, under ``"lowbit"``, one JSON object::

    {"format_version": 1, "architecture": {"registry": "mobilenetv2", "args": {...}}
                                        | {"hf_class": "LlamaForCausalLM", "hf_config": {...}} | null,
     "layers": {L: {"kind": "linear" | "conv2d", "shape": [...], "bits": 4, "signed": true,
                    "granularity": "channel", "axis": 0, "group_size": null,
                    "input": {"bits", "signed", "symmetric", "granularity", "axis"} | null}},
     "sha256": digest of the metadata (without this field) and of every tensor's name, dtype, shape, bytes}

``model.json`` beside the file repeats the metadata for people; ``load`` never reads it. ``load``
rebuilds the architecture from the registry (or takes the float skeleton the caller passes), swaps in
integer layers, checks every name, dtype and shape, and verifies the digest, so a truncated, damaged or
tampered file raises ``FormatError`` naming what is wrong instead of loading a silently wrong model.
Writing is atomic (temporary file, fsync, rename). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lowbit.checkpoint import atomic_write_text
from lowbit.config import QuantSpec
from lowbit.errors import ConfigError, FormatError
from lowbit.export.intmodules import INT_LAYERS, IntConv2d, IntLinear, IntWeight, LowRankAdapter
from lowbit.export.pack import pack, unpack
from lowbit.quant.functional import int_dtype, int_range
from lowbit.quant.quantizer import Quantizer

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _digest(meta: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _quantizer_meta(q: Quantizer) -> dict[str, Any]:
    return {
        "bits": int(q.bits), "signed": bool(q.signed), "symmetric": q.symmetric,
        "granularity": q.granularity, "axis": q.axis,
    }


def save(model: nn.Module, path: str | Path, architecture: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a converted integer model, or a prepared one: it is converted) to ``path``.

    ``architecture`` (``{"registry": name, "args": {...}}``) lets ``load`` rebuild the model by itself;
    it defaults to what ``lowbit.models.build_model`` recorded on the model. Returns the path.
    """
    from lowbit.api import convert

    path = Path(path)
    if not any(isinstance(m, INT_LAYERS) for m in model.modules()):
        model = convert(model)
    arch = architecture if architecture is not None else _architecture_of(model)
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    int_prefixes = []
    for name, mod in model.named_modules():
        if not isinstance(mod, INT_LAYERS):
            continue
        int_prefixes.append(name + ".")
        qw = mod.qweight
        entry: dict[str, Any] = {"kind": "linear" if isinstance(mod, IntLinear) else "conv2d"}
        if hasattr(qw, "weight_float"):
            entry.update(shape=list(qw.weight_float.shape), bits=32)
            tensors[f"{name}.weight"] = qw.weight_float.detach().contiguous()
        else:
            entry.update(
                shape=list(qw.weight_int.shape), bits=qw.weight_bits, signed=qw.signed,
                granularity=qw.granularity, axis=qw.axis, group_size=qw.group_size,
            )
            tensors[f"{name}.weight_packed"] = pack(qw.weight_int, qw.weight_bits, qw.signed)
            tensors[f"{name}.weight_scale"] = qw.weight_scale.detach().float().contiguous()
            if qw.weight_zero_point is not None:
                tensors[f"{name}.weight_zero_point"] = qw.weight_zero_point.detach().float().contiguous()
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().contiguous()
        adapter = getattr(mod, "adapter", None)
        if adapter is not None:  # float adapters kept beside the integers (the QLoRA-style baseline)
            entry["adapter"] = {"rank": adapter.rank, "alpha": adapter.alpha}
            tensors[f"{name}.lora_a"] = adapter.lora_a.detach().float().contiguous()
            tensors[f"{name}.lora_b"] = adapter.lora_b.detach().float().contiguous()
        iq = mod.input_quantizer
        entry["input"] = None if iq is None else _quantizer_meta(iq)
        if iq is not None:
            tensors[f"{name}.input_scale"] = iq.scale.detach().float().contiguous()
            if iq.zero_point is not None:
                tensors[f"{name}.input_zero_point"] = iq.zero_point.detach().float().contiguous()
        layers[name] = entry
    aliases: dict[str, str] = {}  # tied tensors (e.g. embeddings and LM head) are stored once
    first: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(p) for p in int_prefixes):
            continue
        key = (v.untyped_storage().data_ptr(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in first and v.is_contiguous():
            aliases[k] = first[key]
            continue
        if key is not None:
            first[key] = k
        tensors[k] = v.detach().contiguous()
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "architecture": arch, "layers": layers}
    if aliases:
        meta["aliases"] = aliases
    meta["sha256"] = _digest(meta, tensors)
    text = json.dumps(meta, separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(_unshare(tensors), str(tmp), metadata={"lowbit": text})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    return path


def _architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """What ``load`` needs to rebuild ``model``: a registry entry, a Hugging Face config, or nothing."""
    arch = getattr(model, "lowbit_architecture", None)
    config = getattr(model, "config", None)
    if arch is None and config is not None and hasattr(config, "to_dict") and hasattr(model, "base_model_prefix"):
        arch = {"hf_class": type(model).__name__, "hf_config": config.to_dict()}
    return arch


def _build(arch: dict[str, Any]) -> nn.Module:
    if "registry" in arch:
        from lowbit.models import build_model

        return build_model(arch["registry"], **arch.get("args", {}))
    if "hf_class" in arch:
        try:
            import transformers
        except ImportError:
            raise ConfigError('this file holds a Hugging Face model: pip install "lowbit[llm]"') from None
        cls = getattr(transformers, str(arch["hf_class"]), None)
        if cls is None or not str(arch["hf_class"]).endswith(("ForCausalLM", "Model")):
            raise FormatError(f"architecture class {arch['hf_class']!r} is not a transformers model class")
        cfg = dict(arch["hf_config"])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return cls(config)
    raise FormatError(f"architecture {sorted(arch)} is neither a registry model nor a Hugging Face config")


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory: copy the later ones."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


# -- loading ---------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not path.is_file():
        raise FormatError(f"model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lowbit")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:
        raise FormatError(f"model file {str(path)!r} is not a readable safetensors file ({e})") from None
    if raw is None:
        raise FormatError(f"model file {str(path)!r} has no lowbit metadata: not saved by lowbit.save")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"model file {str(path)!r} has unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise FormatError(
            f"model file {str(path)!r} has format_version={version!r}; this lowbit reads {FORMAT_VERSION}"
        )
    digest = meta.pop("sha256", None)
    if digest != _digest(meta, tensors):
        raise FormatError(
            f"model file {str(path)!r} fails its sha256 check: it was damaged or altered after saving"
        )
    return meta, tensors


def _take(tensors: dict[str, Tensor], key: str, dtype: torch.dtype | None, shape: tuple[int, ...] | None) -> Tensor:
    if key not in tensors:
        raise FormatError(f"tensor {key!r} is missing")
    t = tensors.pop(key)
    if dtype is not None and t.dtype != dtype:
        raise FormatError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise FormatError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _input_quantizer(name: str, spec: dict[str, Any], tensors: dict[str, Tensor]) -> Quantizer:
    scale = _take(tensors, f"{name}.input_scale", torch.float32, None)
    qspec = QuantSpec(
        bits=spec["bits"], symmetric=spec["symmetric"], granularity=spec["granularity"], axis=spec["axis"],
        signed=spec["signed"], learn_scale=False,
    )
    channels = scale.numel() if spec["granularity"] == "channel" else None
    q = Quantizer(qspec, None, channels=channels)
    if tuple(q.scale.shape) != tuple(scale.shape):
        raise FormatError(
            f"tensor {name}.input_scale has shape {tuple(scale.shape)}, expected {tuple(q.scale.shape)}"
        )
    q.scale.copy_(scale)
    if not spec["symmetric"]:
        q.zero_point.copy_(_take(tensors, f"{name}.input_zero_point", torch.float32, tuple(scale.shape)))
    q.initialized.fill_(True)
    return q.eval()


def _int_layer(name: str, spec: dict[str, Any], float_mod: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    kind = spec["kind"]
    want = nn.Linear if kind == "linear" else nn.Conv2d
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
        w = _take(tensors, f"{name}.weight", float_mod.weight.dtype, shape)
        qweight = IntWeight(None, None, None, 32, True, "tensor", 0, None, iq, w)
    else:
        signed, numel = bool(spec["signed"]), int(torch.Size(shape).numel())
        qmin, qmax = int_range(bits, signed)
        zkey = f"{name}.weight_zero_point"
        probe = Quantizer(  # for the scale's shape, and to validate the spec
            QuantSpec(
                bits=bits, symmetric=zkey not in tensors, granularity=spec["granularity"],
                group_size=spec["group_size"], axis=spec["axis"], signed=signed, learn_scale=False,
            ),
            shape,
        )
        packed = _take(tensors, f"{name}.weight_packed", torch.uint8, None)
        q = unpack(packed, bits, signed, numel).reshape(shape).to(int_dtype(qmin, qmax))
        scale = _take(tensors, f"{name}.weight_scale", torch.float32, tuple(probe.scale.shape))
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise FormatError(f"tensor {name}.weight_scale has non-positive or non-finite values")
        zp = _take(tensors, zkey, torch.float32, tuple(scale.shape)) if zkey in tensors else None
        qweight = IntWeight(q, scale, zp, bits, signed, spec["granularity"], spec["axis"], spec["group_size"], iq)
    bkey = f"{name}.bias"
    bias = None
    if float_mod.bias is not None:
        b = _take(tensors, bkey, float_mod.bias.dtype, tuple(float_mod.bias.shape))
        bias = nn.Parameter(b, requires_grad=False)
    elif bkey in tensors:
        raise FormatError(f"tensor {bkey!r} is in the file but layer {name!r} of the model has no bias")
    if kind == "linear":
        adapter = _adapter(name, spec, shape, tensors)
        return IntLinear(float_mod.in_features, float_mod.out_features, qweight, bias, adapter)
    if "adapter" in spec:
        raise FormatError(f"layer {name!r} is a conv2d with an adapter: only linear layers have adapters")
    return IntConv2d(float_mod, qweight, bias)


def _adapter(
    name: str, spec: dict[str, Any], shape: tuple[int, ...], tensors: dict[str, Tensor]
) -> LowRankAdapter | None:
    a = spec.get("adapter")
    if a is None:
        return None
    if not isinstance(a, dict) or set(a) != {"rank", "alpha"}:
        raise FormatError(f"layer {name!r}: adapter={a!r}; expected {{'rank': int, 'alpha': number}}")
    rank, alpha = a["rank"], a["alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(shape):
        raise FormatError(f"layer {name!r}: adapter rank={rank!r}; allowed an int in 1..{min(shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise FormatError(f"layer {name!r}: adapter alpha={alpha!r}; allowed a number > 0")
    lora_a = _take(tensors, f"{name}.lora_a", torch.float32, (shape[0], rank))
    lora_b = _take(tensors, f"{name}.lora_b", torch.float32, (rank, shape[1]))
    return LowRankAdapter(lora_a, lora_b, float(alpha))


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The integer model saved at ``path``, in eval mode, ready to run.

    Without ``model`` the architecture is rebuilt from the registry name the file records; with it,
    ``model`` (the float architecture, e.g. a freshly built skeleton) is filled in place and returned.
    """
    path = Path(path)
    meta, tensors = _read(path)
    try:
        arch = meta.get("architecture")
        if model is None:
            if not arch:
                raise ConfigError(
                    f"model file {str(path)!r} records no architecture: pass the float model, "
                    "lowbit.load(path, model=skeleton)"
                )
            model = _build(arch)
        layers = meta["layers"]
        if not isinstance(layers, dict):
            raise FormatError("'layers' is not a mapping")
        modules = dict(model.named_modules())
        for name, spec in layers.items():
            if name not in modules:
                raise FormatError(f"layer {name!r} of the file does not exist in the model")
            model.set_submodule(name, _int_layer(name, spec, modules[name], tensors))
        aliases = meta.get("aliases", {})
        if not isinstance(aliases, dict):
            raise FormatError("'aliases' is not a mapping")
        for k, target in aliases.items():
            if target not in tensors:
                raise FormatError(f"alias {k!r} points to {target!r}, which is not in the file")
            tensors[k] = tensors[target]
        missing, unexpected = [], dict(tensors)
        rest = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
        for k in rest:
            if k not in unexpected:
                missing.append(k)
        if missing:
            raise FormatError(f"tensors missing from the file: {missing[:5]}")
        extra = sorted(set(unexpected) - set(rest))
        if extra:
            raise FormatError(f"tensors in the file that the model does not have: {extra[:5]}")
        model.load_state_dict({**model.state_dict(), **unexpected}, strict=True)
    except FormatError as e:
        raise FormatError(f"model file {str(path)!r} does not fit: {e}") from None
    except ConfigError as e:
        if "records no architecture" in str(e):
            raise
        raise FormatError(f"model file {str(path)!r} has invalid settings: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise FormatError(
            f"model file {str(path)!r} has inconsistent metadata or tensors ({type(e).__name__}: {e})"
        ) from None
    return model.eval()
