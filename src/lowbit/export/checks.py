"""What a lowbit file may declare, checked before ``lowbit.load`` builds or allocates anything.

A model file is input from anyone, so ``load`` (``lowbit.export.io``)

1. parses the metadata within limits: at most ``MAX_METADATA_CHARS`` characters, ``MAX_DEPTH`` levels
   of nesting, integers of at most 64 bits, no NaN or infinity, no repeated key (``parse_metadata``);
2. checks every field's type and range before using it (``check_metadata``): bits 1..8 (32 for a float
   layer, never ``true``), a known granularity, an axis inside the tensor, a group size that divides
   the row, at most ``MAX_ENTRIES`` tensors, and no more layers than tensors;
3. builds the declared architecture on the ``meta`` device, where tensors have shapes and no memory,
   registering at most ``REGISTRATIONS_PER_ENTRY`` modules, parameters and buffers per tensor of the
   file (``registration_limit``), and refuses a skeleton whose tensors need more bytes than the file
   can fill (``check_memory``): a weight packed at 1 bit takes 1/8 byte in the file and 4 bytes (fp32)
   in the skeleton, hence at most ``BYTES_PER_FILE_BYTE`` = 32 bytes per byte of file, plus
   ``SLACK_BYTES`` for buffers a model computes instead of storing (rotary frequencies);
4. checks every scale and zero point it loads (``check_qparams``): scales finite and positive, zero
   points finite integers inside the integer grid.

A Hugging Face architecture must be one of ``HF_CLASSES`` and its config of that family
(``check_hf_config``). Keys that make transformers import code or reach the network
(``REACHING_KEYS``, attention kernels other than eager/sdpa) are refused; keys the family's config
does not define are dropped, since nothing in that family reads them (a config converted from GGUF
carries ``unk_token_id``, ``_model_name_or_path``); ``_name_or_path`` is dropped too. Every failure is a
``FormatError`` naming the field; ``load`` adds the file.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from lowbit.errors import FormatError
from lowbit.spec import GRANULARITIES
from lowbit.validate import is_int, show

__all__ = [
    "parse_metadata", "check_metadata", "check_hf_config", "check_qparams", "check_memory", "registration_limit",
    "parameters_on_meta",
    "HF_CLASSES", "REACHING_KEYS", "MAX_METADATA_CHARS", "MAX_DEPTH", "MAX_ENTRIES", "BYTES_PER_FILE_BYTE",
    "SLACK_BYTES", "REGISTRATIONS_PER_ENTRY", "REGISTRATION_SLACK",
]  # fmt: skip

# A 70B LLaMA's metadata is ~150 KiB, 6 levels deep, ~3,000 tensors; these limits leave room for far more.
MAX_METADATA_CHARS = 32 * 2**20
MAX_DEPTH = 64
MAX_ENTRIES = 2**17  # tensors, layers, aliases (each)
MAX_DIM = 2**31 - 1  # one dimension of a weight; every integer of an architecture's settings is below it too
BYTES_PER_FILE_BYTE = 32
SLACK_BYTES = 16 * 2**20
REGISTRATIONS_PER_ENTRY, REGISTRATION_SLACK = 8, 256  # a LLaMA block: 22 registrations, >= 9 tensors

# Hugging Face classes a file may name -> the ``model_type`` its config must have.
HF_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "GPT2LMHeadModel": "gpt2",
}
# config keys through which transformers imports code or reaches the network -> why they are refused
REACHING_KEYS: dict[str, str] = {
    "auto_map": "names classes to import from a repository",
    "trust_remote_code": "lets transformers run a repository's code",
    "custom_pipelines": "names pipeline code to import from a repository",
    "custom_generate": "names generation code to import from a repository",
    "quantization_config": "makes transformers load a quantization backend",
    "backbone": "names a backbone to download",
    "backbone_config": "builds a second model that may come from a repository",
    "backbone_kwargs": "configures a backbone to download",
    "use_pretrained_backbone": "downloads a backbone's weights",
    "use_timm_backbone": "builds a timm backbone that may be downloaded",
    "experts_implementation": "may name kernels on the Hugging Face Hub",
    "kernel_config": "names kernels on the Hugging Face Hub",
}
ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
ATTENTIONS = (None, "eager", "sdpa")  # anything else may name a kernel repository
DTYPES = (None, "float32", "float16", "bfloat16")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
DROPPED_KEYS = ("_name_or_path",)  # where the model once came from: a path or a repository, never followed


# -- parsing ---------------------------------------------------------------------------------------


def _parse_int(text: str) -> int:
    value = int(text) if len(text.lstrip("-")) <= 19 else None  # int() of a long text takes quadratic time
    if value is None or not -(2**63) <= value < 2**63:
        raise FormatError(f"the metadata holds the integer {show(text, 30)}: at most 64-bit integers are allowed")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FormatError(f"the metadata holds the number {show(text, 30)}: numbers must be finite")
    return value


def _refuse_constant(text: str) -> None:
    raise FormatError(f"the metadata holds {text}: numbers must be finite")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise FormatError(f"the metadata repeats the key {show(repeated)}")
    return out


def parse_metadata(raw: Any) -> Any:
    """The JSON value of ``raw`` within the limits above (``FormatError`` otherwise)."""
    if not isinstance(raw, str):
        raise FormatError("the metadata is not text")
    if len(raw) > MAX_METADATA_CHARS:
        raise FormatError(f"the metadata is {len(raw):_} characters long: at most {MAX_METADATA_CHARS:_} are allowed")
    try:
        value = json.loads(
            raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )  # fmt: skip
    except FormatError:
        raise
    except RecursionError:
        raise FormatError(f"the metadata nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, and int() of a number too long to convert
        raise FormatError(f"the metadata is not valid JSON ({e})") from None
    stack = [(value, 1)]
    while stack:  # nesting depth, without recursion
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_DEPTH:
                raise FormatError(f"the metadata nests deeper than {MAX_DEPTH} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return value


# -- the metadata's fields -------------------------------------------------------------------------


def _fail(where: str, value: Any, allowed: str) -> FormatError:
    return FormatError(f"{where}={show(value)}; allowed {allowed}")


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    if not is_int(value) or not lo <= value <= hi:
        raise _fail(where, value, f"an integer from {lo:_} to {hi:_}")
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, value, "true or false")
    return value


def _keys(where: str, spec: Any, required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise _fail(where, spec, "a mapping")
    missing, unknown = sorted(required - set(spec)), sorted(set(spec) - required - optional)
    if missing or unknown:
        raise FormatError(f"{where} has keys {sorted(spec)}: missing {missing}, unknown {unknown}")
    return spec


def _plain(where: str, value: Any) -> None:
    """JSON settings whose integers lie within ``MAX_DIM`` (a dimension, a count, a token id)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _plain(f"{where}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain(f"{where}[{i}]", v)
    elif is_int(value) and not -MAX_DIM <= value <= MAX_DIM:
        raise _fail(where, value, f"an integer of magnitude at most {MAX_DIM:_}")


def check_metadata(meta: dict[str, Any], n_tensors: int) -> None:
    """Types and ranges of everything in ``meta`` (without ``sha256``) that does not need the tensors."""
    _keys("metadata", meta, {"format_version", "architecture", "layers"}, frozenset({"aliases"}))
    arch = meta["architecture"]
    if arch is not None:
        if isinstance(arch, dict) and "registry" in arch:
            _keys("architecture", arch, {"registry"}, frozenset({"args"}))
            if not isinstance(arch["registry"], str):
                raise _fail("architecture.registry", arch["registry"], "a model name")
            if not isinstance(arch.get("args", {}), dict):
                raise _fail("architecture.args", arch["args"], "a mapping")
            _plain("architecture.args", arch.get("args", {}))
        elif isinstance(arch, dict) and "hf_class" in arch:
            _keys("architecture", arch, {"hf_class", "hf_config"})
            if not isinstance(arch["hf_class"], str) or arch["hf_class"] not in HF_CLASSES:
                raise _fail("architecture.hf_class", arch["hf_class"], f"one of {sorted(HF_CLASSES)}")
            if not isinstance(arch["hf_config"], dict):
                raise _fail("architecture.hf_config", arch["hf_config"], "a mapping")
        else:
            raise _fail("architecture", arch, "null, {registry, args} or {hf_class, hf_config}")
    layers, aliases = meta["layers"], meta.get("aliases", {})
    for field, value in (("layers", layers), ("aliases", aliases)):
        if not isinstance(value, dict):
            raise _fail(field, value, "a mapping")
        if len(value) > MAX_ENTRIES:
            raise FormatError(f"{field} has {len(value):_} entries: at most {MAX_ENTRIES:_} are allowed")
    if len(layers) > n_tensors:
        raise FormatError(f"layers has {len(layers):_} entries but the file holds only {n_tensors:_} tensors")
    for k, v in aliases.items():
        if not k or not isinstance(v, str) or not v:
            raise _fail(f"aliases[{show(k)}]", v, "the name of a tensor of the file")
    for name, spec in layers.items():
        if not name:
            raise _fail("layers", name, "module names (not empty)")
        _check_layer(f"layers[{name!r}]", spec, layers)


_FLOAT_LAYER = {"kind", "shape", "bits", "input"}
_INT_LAYER = _FLOAT_LAYER | {"signed", "granularity", "axis", "group_size"}
_INPUT = {"bits", "signed", "symmetric", "granularity", "axis"}


_KINDS = ("linear", "conv2d", "embedding", "tied_head")


def _check_layer(where: str, spec: Any, layers: dict[str, Any]) -> None:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "tied_head":  # a head reading a quantized embedding of the same file; no tensors of its own
        _keys(where, spec, {"kind", "embedding", "bias"})
        target = spec["embedding"]
        if not isinstance(target, str) or not isinstance(layers.get(target), dict) or \
                layers[target].get("kind") != "embedding":  # fmt: skip
            raise _fail(f"{where}.embedding", target, "the name of a layer of kind 'embedding' in this file")
        _bool(f"{where}.bias", spec["bias"])
        return
    bits = spec.get("bits") if isinstance(spec, dict) else None
    _keys(where, spec, _FLOAT_LAYER if bits == 32 else _INT_LAYER, frozenset({"adapter", "grid", "offset"}))
    if "offset" in spec and spec["offset"] != "float16":
        raise _fail(f"{where}.offset", spec["offset"], "'float16' (absent: the integer zero point, s·(q − z))")
    kind, shape = spec["kind"], spec["shape"]
    if kind not in _KINDS:
        raise _fail(f"{where}.kind", kind, f"one of {_KINDS}")
    if kind == "embedding" and spec["input"] is not None:
        raise _fail(f"{where}.input", spec["input"], "null: an embedding's input is token ids")
    ndim = 4 if kind == "conv2d" else 2
    if not isinstance(shape, list) or len(shape) != ndim:
        raise _fail(f"{where}.shape", shape, f"a list of {ndim} dimensions")
    for i, d in enumerate(shape):
        _int(f"{where}.shape[{i}]", d, 1, MAX_DIM)
    if bits != 32:
        _int(f"{where}.bits", bits, 1, 8)
        _bool(f"{where}.signed", spec["signed"])
        granularity, axis, group_size = spec["granularity"], spec["axis"], spec["group_size"]
        if granularity not in GRANULARITIES:
            raise _fail(f"{where}.granularity", granularity, f"one of {GRANULARITIES} (32 bits: a float weight)")
        _int(f"{where}.axis", axis, -ndim, ndim - 1)
        cols = math.prod(shape[1:])
        if granularity == "group":
            _int(f"{where}.group_size", group_size, 1, cols)  # the last group may be ragged
        elif group_size is not None:
            raise _fail(f"{where}.group_size", group_size, "null unless granularity is 'group'")
        _check_grid(where, spec)
    if spec["input"] is not None:
        _check_input(f"{where}.input", spec["input"])
    if "adapter" in spec:
        _check_adapter(f"{where}.adapter", spec["adapter"], kind, shape)


def _check_grid(where: str, spec: dict[str, Any]) -> None:
    """The optional ``grid``: only ``binary`` ({-s, +s}), and then 1 bit, signed, per tensor or channel."""
    if "grid" not in spec:
        return
    if spec["grid"] != "binary":
        raise _fail(f"{where}.grid", spec["grid"], "'binary' (absent: the integer grid)")
    if spec["bits"] != 1 or spec["signed"] is not True or spec["granularity"] not in ("tensor", "channel"):
        raise _fail(where, {k: spec[k] for k in ("bits", "signed", "granularity")},
                    "bits 1, signed true and granularity 'tensor' or 'channel' with grid 'binary'")  # fmt: skip


def _check_input(where: str, spec: Any) -> None:
    _keys(where, spec, _INPUT, frozenset({"grid"}))
    _int(f"{where}.bits", spec["bits"], 1, 8)
    _bool(f"{where}.signed", spec["signed"])
    _bool(f"{where}.symmetric", spec["symmetric"])
    if spec["granularity"] not in ("tensor", "channel"):
        raise _fail(f"{where}.granularity", spec["granularity"], "'tensor' or 'channel'")
    _int(f"{where}.axis", spec["axis"], -4, 3)  # activations of linear and conv2d layers have 2 to 4 dims
    _check_grid(where, spec)


def _check_adapter(where: str, spec: Any, kind: str, shape: list[int]) -> None:
    if kind != "linear":
        raise FormatError(f"{where}: a {kind} layer has no adapter; only linear layers do")
    _keys(where, spec, {"rank", "alpha"})
    _int(f"{where}.rank", spec["rank"], 1, min(shape))
    alpha = spec["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < math.inf:
        raise _fail(f"{where}.alpha", alpha, "a finite number > 0")


def check_hf_config(
    hf_class: str, config: dict[str, Any], fields: set[str], max_layers: int
) -> tuple[dict[str, Any], list[str]]:
    """(keyword arguments for the config class of ``hf_class``, unknown keys dropped) from a file's ``hf_config``.

    ``fields``: the keys that family's config writes (``to_dict`` of a default one); ``max_layers``:
    how many layers the file's tensors can fill (one tensor each, at least).
    """
    where = "architecture.hf_config"
    expected = HF_CLASSES[hf_class]
    if config.get("model_type") != expected:
        raise _fail(f"{where}.model_type", config.get("model_type"), f"{expected!r} (a {hf_class} config)")
    _refuse_reaching(where, config)
    kwargs: dict[str, Any] = {}
    for k, v in config.items():
        if k in ATTENTION_KEYS:
            if v not in ATTENTIONS:
                raise _fail(f"{where}.{k}", v, f"one of {ATTENTIONS}: other values may name a kernel repository")
            kwargs["attn_implementation"] = v
        elif k in fields and k not in DROPPED_KEYS and k != "model_type":
            _plain(f"{where}.{k}", v)
            kwargs[k] = v
    unknown = sorted(set(config) - fields - {*ATTENTION_KEYS})
    for k in ("dtype", "torch_dtype"):
        if k in kwargs and kwargs[k] not in DTYPES:
            raise _fail(f"{where}.{k}", kwargs[k], f"one of {DTYPES}")
    for k in LAYER_COUNT_KEYS:
        if k in kwargs:
            _int(f"{where}.{k}", kwargs[k], 1, max_layers)
    return kwargs, unknown


def _refuse_reaching(where: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in REACHING_KEYS:
                raise FormatError(f"{where}.{k} is not allowed: it {REACHING_KEYS[k]}")
            _refuse_reaching(f"{where}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_reaching(f"{where}[{i}]", v)


# -- building and loading --------------------------------------------------------------------------


@contextmanager
def registration_limit(entries: int) -> Iterator[None]:
    """Refuse, as it happens, a build (in this thread) that registers more modules, parameters and buffers
    than ``REGISTRATIONS_PER_ENTRY`` per tensor or alias of the file (``entries``), plus a few: a million
    declared layers stop there instead of filling the memory with modules."""
    owner, count = threading.get_ident(), 0
    limit = REGISTRATIONS_PER_ENTRY * entries + REGISTRATION_SLACK

    def hook(module: nn.Module, name: str, value: Any) -> None:
        nonlocal count
        if threading.get_ident() == owner:
            count += 1
            if count > limit:
                raise FormatError(
                    f"the architecture registers more than {limit:_} modules, parameters and buffers: "
                    "more than the file's tensors can fill"
                )

    handles = [
        register_module_module_registration_hook(hook),
        register_module_parameter_registration_hook(hook),
        register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile (in this thread) moves to the meta device; buffers stay real.
    For the second build of a checked architecture, which only supplies the buffers a model computes."""
    owner = threading.get_ident()

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != owner:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)  # type: ignore[arg-type]  # may return a param
    try:
        yield
    finally:
        handle.remove()


def check_memory(skeleton: nn.Module, file_bytes: int) -> None:
    """Refuse a (meta) skeleton whose tensors need more bytes than a file of ``file_bytes`` can fill."""
    named = dict(chain(skeleton.named_parameters(), skeleton.named_buffers()))  # tied tensors once
    sizes = {k: t.numel() * t.element_size() for k, t in named.items()}
    total, allowed = sum(sizes.values()), BYTES_PER_FILE_BYTE * file_bytes + SLACK_BYTES
    if total > allowed:
        largest = max(sizes, key=sizes.__getitem__)
        raise FormatError(
            f"the architecture declares {total:_} bytes of tensors, more than a file of {file_bytes:_} bytes can "
            f"fill (at most {allowed:_}); the largest is {largest!r} of shape {tuple(named[largest].shape)}"
        )


def check_qparams(name: str, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> None:
    """Scales finite and positive; zero points finite integers in ``[qmin, qmax]``. ``name``: ``L.weight``."""
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise FormatError(f"tensor {name}_scale has non-finite or non-positive values: scales are positive")
    if zero_point is None:
        return
    ok = torch.isfinite(zero_point) & (zero_point == zero_point.round()) & (zero_point >= qmin) & (zero_point <= qmax)
    if not bool(ok.all()):
        bad = zero_point[~ok].reshape(-1)[0].item()
        raise FormatError(f"tensor {name}_zero_point holds {bad!r}; allowed integers from {qmin} to {qmax}")
