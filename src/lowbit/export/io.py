"""``lowbit.save`` / ``lowbit.load``: integer models as one safetensors file with JSON metadata.

The file (``format_version`` 3; version 1 and 2 files, which hold neither binary grids (1) nor embeddings
(1, 2), load unchanged) holds,
as safetensors tensors:

- per integer layer ``L``: ``L.weight_packed`` (uint8, the integers packed at their bit width by
  ``lowbit.export.pack``; binary weights {−1, +1} by ``pack_sign``, 1 bit each), ``L.weight_scale``
  (float32, or float16 when every scale is a float16 number, as ``scale_dtype: float16`` trains them; the
  quantizer's stored shape), ``L.weight_zero_point`` (float32, asymmetric only), ``L.bias``,
  and for a quantized input ``L.input_scale`` / ``L.input_zero_point``; a layer whose weight stayed
  float stores ``L.weight``;
- every other tensor of the model's ``state_dict`` under its own name (batch norm, float layers).

and in the safetensors metadata, under ``"lowbit"``, one JSON object::

    {"format_version": 1, "architecture": {"registry": "mobilenetv2", "args": {...}}
                                        | {"hf_class": "LlamaForCausalLM", "hf_config": {...}} | null,
     "layers": {L: {"kind": "linear" | "conv2d" | "embedding", "shape": [...], "bits": 4, "signed": true,
                    "granularity": "channel", "axis": 0, "group_size": null,
                    "grid": "binary" (weights in {−s, +s}, bits 1; absent: the integer grid), optional,
                    "offset": "float16" (s·q + float16(−s·z), GGUF Q4_1's arithmetic; absent: s·(q − z)), optional,
                    "input": {"bits", "signed", "symmetric", "granularity", "axis", "grid" (optional)} | null,
                    "adapter": {"rank", "alpha"} (QLoRA-style float adapters: L.lora_a, L.lora_b), optional}
                | {"kind": "tied_head", "embedding": E, "bias": bool} (a head multiplying by embedding layer E's
                  dequantized table; only L.bias, if any, of its own)},
     "aliases": {name: name of the tensor it shares storage with (tied embeddings)}, optional,
     "sha256": digest of the metadata (without this field) and of every tensor's name, dtype, shape, bytes}

``model.json`` beside the file repeats the metadata for people; ``load`` never reads it. Writing is
atomic (temporary file, fsync, rename). No pickle anywhere.

``load`` takes the file for input from anyone (``lowbit.export.checks`` holds the limits): it parses the
metadata within limits and checks every field, verifies the digest, builds the declared architecture
(a registry model, or one of a few Hugging Face classes with a config that cannot make transformers
import code or reach the network) on the meta device, checks its size against the file's and every
name, dtype and shape against the file's tensors, and only then gives it memory: the file's own
tensors, and the buffers a model computes (rotary frequencies) from a second build whose parameters stay
on the meta device. Scales must be positive, zero points integers on the grid. A truncated, damaged,
tampered or hostile file raises ``FormatError`` naming the file and the field, never a silently wrong
model, and a 14 KB file cannot make it allocate gigabytes. The caller's own skeleton (``model=``) is
trusted as an architecture, and the file is checked against it the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lowbit.checkpoint import atomic_write_text, digest
from lowbit.errors import ConfigError, FormatError
from lowbit.export.checks import (
    MAX_ENTRIES,
    check_hf_config,
    check_memory,
    check_metadata,
    parameters_on_meta,
    parse_metadata,
    registration_limit,
)
from lowbit.export.intmodules import (
    INT_LAYERS,
    IntTiedHead,
)
from lowbit.export.layer_io import KIND, int_layer, tied_head
from lowbit.export.pack import pack, pack_sign
from lowbit.quant.quantizer import Quantizer
from lowbit.validate import is_int

__all__ = ["save", "load", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: the binary grid ("grid": "binary"); 3: embeddings and tied heads
READS = (1, 2, 3)


def _quantizer_meta(q: Quantizer) -> dict[str, Any]:
    meta = {
        "bits": int(q.bits), "signed": bool(q.signed), "symmetric": q.symmetric,
        "granularity": q.granularity, "axis": q.axis,
    }
    if q.spec.binary is not None:
        meta["grid"] = "binary"
    return meta


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
        if isinstance(mod, IntTiedHead):
            int_prefixes.append(name + ".")
            layers[name] = {"kind": "tied_head", "embedding": mod.embedding_name, "bias": mod.bias is not None}
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().contiguous()
            continue
        if not isinstance(mod, INT_LAYERS):
            continue
        int_prefixes.append(name + ".")
        qw = mod.qweight
        entry: dict[str, Any] = {"kind": KIND[type(mod)]}
        if hasattr(qw, "weight_float"):
            entry.update(shape=list(qw.weight_float.shape), bits=32)
            tensors[f"{name}.weight"] = qw.weight_float.detach().contiguous()
        else:
            entry.update(
                shape=list(qw.weight_int.shape), bits=qw.weight_bits, signed=qw.signed,
                granularity=qw.granularity, axis=qw.axis, group_size=qw.group_size,
            )
            if qw.offset16:
                entry["offset"] = "float16"
            if qw.binary:
                entry["grid"] = "binary"
                tensors[f"{name}.weight_packed"] = pack_sign(qw.weight_int)
            else:
                tensors[f"{name}.weight_packed"] = pack(qw.weight_int, qw.weight_bits, qw.signed)
            scale = qw.weight_scale.detach().float()
            half = scale.half()  # float16 where that is exact (scale_dtype: float16, GGUF formats): half the bytes
            tensors[f"{name}.weight_scale"] = (half if torch.equal(half.float(), scale) else scale).contiguous()
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
        if iq is not None:  # the scale and zero point in use: |s| >= eps, round(clamp(z)), as in the weights'
            scale, zero_point = iq.export_qparams()
            tensors[f"{name}.input_scale"] = scale.float().contiguous()
            if zero_point is not None:
                tensors[f"{name}.input_zero_point"] = zero_point.float().contiguous()
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
    meta["sha256"] = digest(meta, tensors)
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
            names = list(f.keys())  # noqa: SIM118 - safe_open has no __iter__
            tensors = {k: f.get_tensor(k) for k in names} if len(names) <= MAX_ENTRIES else {}
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:
        raise FormatError(f"model file {str(path)!r} is not a readable safetensors file ({e})") from None
    if len(names) > MAX_ENTRIES:
        raise FormatError(f"model file {str(path)!r} holds {len(names):_} tensors: at most {MAX_ENTRIES:_} are allowed")
    if raw is None:
        raise FormatError(f"model file {str(path)!r} has no lowbit metadata: not saved by lowbit.save")
    try:
        meta = parse_metadata(raw)
    except FormatError as e:
        raise FormatError(f"model file {str(path)!r} has unreadable metadata: {e}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not is_int(version) or version not in READS:  # 1.0 and true equal 1 in Python
        raise FormatError(
            f"model file {str(path)!r} has format_version={version!r}; this lowbit reads versions {list(READS)}"
        )
    claimed = meta.pop("sha256", None)
    try:
        intact = claimed == digest(meta, tensors)
    except (RuntimeError, TypeError, ValueError) as e:  # a dtype without a byte view, say
        raise FormatError(f"model file {str(path)!r} holds tensors lowbit cannot read ({e})") from None
    if not intact:
        raise FormatError(
            f"model file {str(path)!r} fails its sha256 check: it was damaged or altered after saving"
        )
    try:
        check_metadata(meta, len(tensors))
    except FormatError as e:
        raise FormatError(f"model file {str(path)!r} has invalid metadata: {e}") from None
    return meta, tensors


def _inside(key: str, names: dict[str, Any]) -> bool:
    """Whether the state_dict key ``key`` belongs to one of the modules ``names``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def _fill(model: nn.Module, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Swap the file's integer layers into ``model`` and load every other tensor, each checked.

    A skeleton on the meta device takes the file's tensors themselves (``assign``; tied parameters stay
    one parameter); a materialized one has them copied in.
    """
    layers, aliases = meta["layers"], meta.get("aliases", {})
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        if name not in modules:
            raise FormatError(f"layer {name!r} of the file does not exist in the model")
        if spec["kind"] != "tied_head":
            model.set_submodule(name, int_layer(name, spec, modules[name], tensors))
    for name, spec in layers.items():  # after the embeddings they read
        if spec["kind"] == "tied_head":
            if not isinstance(modules[name], nn.Linear):
                raise FormatError(f"layer {name!r} is a tied_head in the file but a {type(modules[name]).__name__} "
                                  "in the model")  # fmt: skip
            model.set_submodule(name, tied_head(name, spec, modules[name], model, tensors))
    for k, target in aliases.items():
        if k in tensors or target not in tensors:
            raise FormatError(f"alias {k!r} -> {target!r}: aliases name tensors the file holds under another name")
        tensors[k] = tensors[target]
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not _inside(k, layers)}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise FormatError(f"tensors missing from the file: {missing[:5]}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise FormatError(f"tensors in the file that the model does not have: {extra[:5]}")
    assign = any(t.is_meta for t in chain(model.parameters(), model.buffers()))
    state: dict[str, Tensor] = {}
    converted: dict[int, Tensor] = {}  # by id of the file's tensor: aliases stay one tensor
    for k, ref in expected.items():
        t = tensors[k]
        if t.shape != ref.shape:
            raise FormatError(f"tensor {k!r} has shape {tuple(t.shape)} in the file, {tuple(ref.shape)} in the model")
        if t.dtype != ref.dtype and not (t.dtype.is_floating_point and ref.dtype.is_floating_point):
            raise FormatError(f"tensor {k!r} has dtype {t.dtype} in the file, {ref.dtype} in the model")
        if id(t) not in converted:  # a float tensor takes the model's float dtype, as a copy into it would
            cast = t.to(ref.dtype)
            param = assign and isinstance(ref, nn.Parameter)
            converted[id(t)] = nn.Parameter(cast, requires_grad=ref.requires_grad) if param else cast
        state[k] = converted[id(t)]
    model.load_state_dict(state, strict=False, assign=assign)


def _on_meta(model: nn.Module) -> list[str]:
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return [k for k, t in named if t.is_meta]


@contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` meanwhile. A second line of defence only: huggingface_hub reads it once, when
    first imported; what keeps transformers off the network is ``check_hf_config``."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _constructor(arch: dict[str, Any], entries: int) -> Callable[[], nn.Module]:
    """What builds the architecture ``arch`` (checked by ``check_metadata``) declares; builds nothing yet."""
    if "registry" in arch:
        from lowbit.models import build_model

        return partial(build_model, arch["registry"], **arch.get("args", {}))
    with _offline():
        try:
            import transformers
        except ImportError:
            raise ConfigError('this file holds a Hugging Face model: pip install "lowbit[llm]"') from None
        cls = getattr(transformers, arch["hf_class"])  # one of HF_CLASSES
    fields = set(cls.config_class().to_dict())
    kwargs, unknown = check_hf_config(arch["hf_class"], arch["hf_config"], fields, entries)
    if unknown:
        log.info("ignored: keys a %s config of transformers %s does not define: %s",
                 arch["hf_class"], transformers.__version__, unknown)  # fmt: skip
    return lambda: cls(cls.config_class(**kwargs))


def _build(construct: Callable[[], nn.Module], entries: int, *, meta: bool) -> nn.Module:
    """The declared model: entirely on the meta device (``meta``), or with only its parameters there."""
    try:
        with _offline(), torch.device("meta") if meta else parameters_on_meta(), registration_limit(entries):
            return construct()
    except FormatError:
        raise
    except Exception as e:  # the constructor of whatever a file declares may raise anything
        raise FormatError(f"architecture cannot be built ({type(e).__name__}: {e})") from None


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The integer model saved at ``path``, in eval mode, ready to run.

    Without ``model`` the architecture the file records is built on the meta device, checked against the
    file (every shape, and its size against the file's) and only then given memory: the file's tensors,
    and the buffers the model computes. With ``model`` (the float architecture, e.g. a freshly built
    skeleton, possibly on the meta device) the file is checked against it and fills it in place.
    """
    path = Path(path)
    meta, tensors = _read(path)
    arch = meta["architecture"]
    if model is None and arch is None:
        raise ConfigError(
            f"model file {str(path)!r} records no architecture: pass the float model, lowbit.load(path, model=skeleton)"
        )
    try:
        entries = len(tensors) + len(meta.get("aliases", {}))
        if model is None:
            construct = _constructor(arch, entries)
            model = _build(construct, entries, meta=True)
            check_memory(model, path.stat().st_size)
            _fill(model, meta, tensors)
            computed = _on_meta(model)  # non-persistent buffers (rotary frequencies): from a second build
            if computed:
                donor = _build(construct, entries, meta=False)
                for k in computed:
                    owner, _, attr = k.rpartition(".")
                    setattr(model.get_submodule(owner), attr, donor.get_buffer(k))
        else:
            _fill(model, meta, tensors)
    except FormatError as e:
        raise FormatError(f"model file {str(path)!r}: {e}") from None
    except ConfigError as e:
        raise FormatError(f"model file {str(path)!r} has invalid settings: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, ArithmeticError, ImportError,
            OSError) as e:  # fmt: skip
        raise FormatError(
            f"model file {str(path)!r} has inconsistent metadata or tensors ({type(e).__name__}: {e})"
        ) from None
    left = _on_meta(model)
    if left:
        raise ConfigError(f"the model's tensors {left[:5]} are on the meta device and not in {str(path)!r}")
    return model.eval()
