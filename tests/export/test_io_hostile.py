"""``lowbit.load`` on files written to hurt (issue 12): nothing is built before it is checked, nothing a
file declares reaches the network or imports code, every scale and zero point is checked, and every
refusal is a quick ``FormatError`` naming the file and the field. Valid files of every allowed
architecture still round-trip exactly.

The hostile files are what an attacker can write: a valid file edited and signed again (the digest is
a checksum, not a signature), or metadata text written by hand.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import lowbit
from lowbit import FormatError, QuantConfig, QuantSpec, Rule
from lowbit.export.checks import HF_CLASSES
from lowbit.models import build_model

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def _digest(meta: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """The file's sha256, as the format documents it (written out again here, not imported)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _open(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lowbit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.pop("sha256")
    return meta, tensors


def _write(path: Path, meta: dict[str, Any], tensors: dict[str, Tensor], text: str | None = None) -> Path:
    """A file signed like lowbit.save signs it; ``text`` replaces the metadata's JSON as written."""
    if text is None:
        text = json.dumps({**meta, "sha256": _digest(meta, tensors)})
    save_file(tensors, str(path), metadata={"lowbit": text})
    return path


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, Any], dict[str, Tensor]], None]) -> Path:
    meta, tensors = _open(src)
    edit(meta, tensors)
    return _write(dst, meta, tensors)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _refused(path: Path, *words: str, seconds: float = 5.0) -> str:
    """Load ``path``: a FormatError naming the file and ``words``, within ``seconds``, peak memory flat."""
    rss, t0 = _max_rss_bytes(), time.perf_counter()
    with pytest.raises(FormatError) as info:
        lowbit.load(path)
    elapsed, grown = time.perf_counter() - t0, _max_rss_bytes() - rss
    message = str(info.value)
    assert str(path) in message
    for w in words:
        assert w in message, message
    assert elapsed < seconds, f"took {elapsed:.2f} s: {message}"
    assert grown < 64 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB: {message}"
    return message


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every attempt to resolve or connect (and refuses it)."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# -- valid files -----------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, width=32)
    cfg = QuantConfig(weight=QuantSpec(bits=3, symmetric=False), act=QuantSpec(bits=4, symmetric=False))
    lowbit.prepare(model, cfg, calib=[X])
    with torch.no_grad():  # off-grid learned zero points and a negative learned scale: used rounded and by |s|
        for m in model.modules():
            if getattr(m, "input_quantizer", None) is not None:
                m.input_quantizer.zero_point.add_(0.3)
        model.features[1].input_quantizer.scale.neg_()
    return model.eval()


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lowbit.save(_mlp(), tmp_path_factory.mktemp("mlp") / "mlp.safetensors")


def _tiny(hf_class: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, hf_class)
    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 8,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    if hf_class == "GPT2LMHeadModel":
        sizes = {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 1,
                 "eos_token_id": 2}  # fmt: skip
    torch.manual_seed(0)
    model = cls(cls.config_class(**sizes, tie_word_embeddings=hf_class == "LlamaForCausalLM"))
    keep_head = () if hf_class == "GPT2LMHeadModel" else (Rule(match="lm_head", skip=True),)  # GPT-2: its only Linear
    cfg = QuantConfig(
        weight=QuantSpec(bits=4, granularity="channel"), act=QuantSpec(bits=8, symmetric=False), rules=keep_head
    )
    return lowbit.prepare(model, cfg, calib=[IDS]).eval()


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lowbit.save(_tiny("LlamaForCausalLM"), tmp_path_factory.mktemp("llama") / "llama.safetensors")


def test_asymmetric_inputs_round_trip_exactly_with_integer_zero_points(tmp_path: Path) -> None:
    model = _mlp()
    path = lowbit.save(model, tmp_path / "m.safetensors")
    assert torch.equal(lowbit.load(path)(X), model(X))
    _, tensors = _open(path)
    zero_points = [t for k, t in tensors.items() if k.endswith("zero_point")]
    assert len(zero_points) == 6 and all(torch.equal(z, z.round()) for z in zero_points)
    assert all(bool((t > 0).all()) for k, t in tensors.items() if k.endswith("_scale"))


@pytest.mark.parametrize("hf_class", sorted(HF_CLASSES))
def test_every_allowed_hugging_face_class_round_trips_exactly(
    tmp_path: Path, hf_class: str, no_network: list[Any]
) -> None:
    model = _tiny(hf_class)
    with torch.no_grad():
        ref = model(IDS).logits
        loaded = lowbit.load(lowbit.save(model, tmp_path / "m.safetensors"))
        assert type(loaded).__name__ == hf_class
        assert torch.equal(loaded(IDS).logits, ref)
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert not any(t.is_meta for t in tensors)
    reference = dict(model.named_buffers())
    computed = [k for k, _ in loaded.named_buffers() if "rotary" in k or "embed_scale" in k]
    assert computed or hf_class == "GPT2LMHeadModel"
    for k, buf in loaded.named_buffers():  # computed buffers come from a real build, not left empty
        assert k not in reference or torch.equal(buf, reference[k]), k
    if hf_class == "LlamaForCausalLM":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied stays tied: one parameter
    assert not no_network


def test_a_meta_skeleton_from_the_caller_is_filled(tmp_path: Path, mlp_file: Path) -> None:
    with torch.device("meta"):
        skeleton = build_model("mlp", num_classes=10, width=32)
    loaded = lowbit.load(mlp_file, model=skeleton)
    assert loaded is skeleton and torch.equal(loaded(X), lowbit.load(mlp_file)(X))


# -- declared sizes --------------------------------------------------------------------------------


def test_a_huge_vocabulary_is_refused_before_anything_is_allocated(tmp_path: Path, llama_file: Path) -> None:
    """A 30 KB file declaring 12 million tokens: before, 1.5 GB were allocated and filled at random."""
    path = _edited(llama_file, tmp_path / "v.safetensors", lambda m, t: m["architecture"]["hf_config"].update(
        vocab_size=12_000_000))  # fmt: skip
    _refused(path, "bytes", "model.embed_tokens.weight", "(12000000, 32)")


def test_a_huge_registry_model_is_refused_before_anything_is_allocated(tmp_path: Path, mlp_file: Path) -> None:
    """52 million parameters (within the registry's own cap) declared by a 16 KB file."""
    path = _edited(mlp_file, tmp_path / "w.safetensors", lambda m, t: m["architecture"]["args"].update(
        width=65_536, depth=1))  # fmt: skip
    _refused(path, "bytes", "features.1.weight", "(65536, 784)")


def test_a_million_declared_layers_are_refused_quickly(tmp_path: Path, mlp_file: Path, llama_file: Path) -> None:
    """Before: a million-block LLaMA was built module by module until memory ran out. Registry models cap
    their own sizes; past what the file's tensors can fill, the build stops as it registers."""
    path = _edited(mlp_file, tmp_path / "d.safetensors", lambda m, t: m["architecture"]["args"].update(
        depth=256))  # fmt: skip
    _refused(path, "registers more than")
    path = _edited(llama_file, tmp_path / "l.safetensors", lambda m, t: m["architecture"]["hf_config"].update(
        num_hidden_layers=1_000_000))  # fmt: skip
    _refused(path, "num_hidden_layers")


def test_more_layer_entries_than_tensors_are_refused(tmp_path: Path, mlp_file: Path) -> None:
    def edit(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        spec = next(iter(meta["layers"].values()))
        meta["layers"].update({f"x{i}": spec for i in range(5_000)})

    _refused(_edited(mlp_file, tmp_path / "l.safetensors", edit), "layers has 5_00")


# -- Hugging Face classes and configs --------------------------------------------------------------


@pytest.mark.parametrize(
    "hf_class", ["BertModel", "DetrModel", "TimmWrapperModel", "AutoModelForCausalLM", "LlamaModel", "__class__"]
)
def test_only_allow_listed_classes_are_built(
    tmp_path: Path, llama_file: Path, hf_class: str, no_network: list[Any]
) -> None:
    """Before: any transformers class ending in Model: DETR reached for a backbone, others raised ImportError."""

    def edit(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        meta["architecture"] = {"hf_class": hf_class, "hf_config": {"model_type": "detr", "backbone": "resnet50",
                                "use_pretrained_backbone": True, "use_timm_backbone": True}}  # fmt: skip

    _refused(_edited(llama_file, tmp_path / "c.safetensors", edit), "architecture.hf_class")
    assert not no_network


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("model_type", "bert", "model_type"),
        ("auto_map", {"AutoModelForCausalLM": "evil/repo--modeling.Model"}, "auto_map"),
        ("trust_remote_code", True, "trust_remote_code"),
        ("backbone", "evil/backbone", "backbone"),
        ("use_pretrained_backbone", True, "use_pretrained_backbone"),
        ("backbone_config", {"model_type": "resnet"}, "backbone_config"),
        ("quantization_config", {"quant_method": "bitsandbytes"}, "quantization_config"),
        ("attn_implementation", "kernels-community/flash-attn", "attn_implementation"),
        ("_attn_implementation", "evil/kernel", "_attn_implementation"),
        ("rope_parameters", {"rope_type": "default", "auto_map": {}}, "rope_parameters.auto_map"),
        ("dtype", "load", "dtype"),
        ("hidden_size", 2**40, "hidden_size"),
    ],
)
def test_config_keys_that_reach_out_are_refused(
    tmp_path: Path, llama_file: Path, key: str, value: Any, field: str, no_network: list[Any]
) -> None:
    path = _edited(llama_file, tmp_path / "k.safetensors", lambda m, t: m["architecture"]["hf_config"].update(
        {key: value}))  # fmt: skip
    _refused(path, f"architecture.hf_config.{field}")
    assert not no_network


def test_informational_config_keys_are_dropped(tmp_path: Path, llama_file: Path) -> None:
    """A path or repository it came from is never followed; keys llama does not define are not passed on."""

    def edit(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        meta["architecture"]["hf_config"].update(
            _name_or_path="https://example.com/evil", _model_name_or_path="x", unk_token_id=0, num_labels=10**12,
            attn_implementation="eager",
        )  # fmt: skip

    loaded = lowbit.load(_edited(llama_file, tmp_path / "i.safetensors", edit))
    assert loaded.config.name_or_path == "" and not hasattr(loaded.config, "unk_token_id")
    assert loaded.config.num_labels == 2
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, lowbit.load(llama_file)(IDS).logits)


# -- scales, zero points and settings --------------------------------------------------------------


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "suffix, value, words",
    [
        ("input_scale", NAN, "features.1.input_scale has non-finite or non-positive"),
        ("input_scale", INF, "features.1.input_scale has non-finite or non-positive"),
        ("input_scale", 0.0, "features.1.input_scale has non-finite or non-positive"),
        ("input_scale", -0.5, "features.1.input_scale has non-finite or non-positive"),
        ("weight_scale", 0.0, "features.1.weight_scale has non-finite or non-positive"),
        ("input_zero_point", NAN, "features.1.input_zero_point holds nan"),
        ("input_zero_point", 2.5, "features.1.input_zero_point holds 2.5"),
        ("input_zero_point", 16.0, "features.1.input_zero_point holds 16.0; allowed integers from 0 to 15"),
        ("input_zero_point", -1.0, "features.1.input_zero_point holds -1.0; allowed integers from 0 to 15"),
        ("weight_zero_point", NAN, "features.1.weight_zero_point holds nan"),
        ("weight_zero_point", 0.25, "features.1.weight_zero_point holds 0.25"),
        ("weight_zero_point", 8.0, "features.1.weight_zero_point holds 8.0; allowed integers from 0 to 7"),
    ],
)
def test_scales_and_zero_points_are_checked(
    tmp_path: Path, mlp_file: Path, suffix: str, value: float, words: str
) -> None:
    """Before: NaN, infinite, zero or negative input scales and NaN or off-grid zero points loaded silently."""

    def edit(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        t = tensors[f"features.1.{suffix}"].clone()
        t.view(-1)[0] = value
        tensors[f"features.1.{suffix}"] = t

    _refused(_edited(mlp_file, tmp_path / "s.safetensors", edit), words)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("bits", True, "layers['features.1'].bits=True"),
        ("bits", 9, "bits=9"),
        ("bits", 10**18, "bits=1000000000000000000"),
        ("signed", 1, "signed=1"),
        ("axis", False, "axis=False"),
        ("axis", 2, "axis=2"),
        ("granularity", "row", "granularity='row'"),
        ("group_size", True, "group_size=True"),
        ("shape", [2**62, 784], "shape[0]"),
        ("shape", [32.0, 784], "shape[0]=32.0"),
        ("kind", "conv3d", "kind='conv3d'"),
        ("input", {"bits": 4, "signed": False, "symmetric": False, "granularity": "group", "axis": 0}, "input.gr"),
        ("input", {"bits": 4}, "missing"),
        ("adapter", {"rank": 10**9, "alpha": 1.0}, "adapter.rank"),
        ("extra", 1, "unknown ['extra']"),
    ],
)
def test_layer_settings_are_type_checked(tmp_path: Path, mlp_file: Path, field: str, value: Any, words: str) -> None:
    path = _edited(mlp_file, tmp_path / "t.safetensors", lambda m, t: m["layers"]["features.1"].update(
        {field: value}))  # fmt: skip
    _refused(path, words)


# -- the metadata's text ---------------------------------------------------------------------------


def _raw_text_file(tmp_path: Path, mlp_file: Path, replace: Callable[[str], str]) -> Path:
    """The MLP file with its metadata's JSON text edited by hand, signed again where Python can read it."""
    meta, tensors = _open(mlp_file)
    text = replace(json.dumps(meta))
    try:
        parsed = json.loads(text)
        parsed.pop("sha256", None)
        text = text[:-1] + f', "sha256": "{_digest(parsed, tensors)}"}}'
    except (ValueError, RecursionError):
        pass
    return _write(tmp_path / "raw.safetensors", meta, tensors, text=text)


@pytest.mark.parametrize(
    "replace, words",
    [
        (lambda s: s.replace('"args": {', '"args": {"nest": ' + "[" * 100 + "]" * 100 + ", "), "nests deeper"),
        (lambda s: s.replace('"args": {', '"args": {"nest": ' + "[" * 200_000 + "]" * 200_000 + ", "), "nests deeper"),
        (lambda s: s.replace('"width": 32', '"width": ' + "9" * 5000), "integer"),
        (lambda s: s.replace('"width": 32', '"width": 100000000000000000000000000000'), "integer"),
        (lambda s: s.replace('"width": 32', '"width": 1e999'), "finite"),
        (lambda s: s.replace('"width": 32', '"width": NaN'), "NaN"),
        (lambda s: s.replace('"width": 32', '"width": 32, "width": 64'), "repeats the key 'width'"),
        (lambda s: s.replace('"format_version": 3', '"format_version": 2.0'), "format_version=2.0"),
        (lambda s: s.replace('"format_version": 3', '"format_version": true'), "format_version=True"),
        (lambda s: s.replace('"width": 32', '"width": 4294967296'), "architecture.args.width"),
        (lambda s: s.replace('"layers": {', '"unknown": 1, "layers": {'), "unknown ['unknown']"),
        (lambda s: s.replace('"architecture": {', '"architecture": {"hf_class": 1, '), "architecture"),
    ],
)
def test_metadata_text_is_parsed_within_limits(
    tmp_path: Path, mlp_file: Path, replace: Callable[[str], str], words: str
) -> None:
    """Before: deep nesting raised RecursionError; huge integers escaped as OverflowError or ValueError."""
    _refused(_raw_text_file(tmp_path, mlp_file, replace), words)


# -- a fuzzer that signs its files -----------------------------------------------------------------

ODD_VALUES = [None, True, False, 0, -1, 3, 9, 32, 10**9, 2**40, 2**63 - 1, 0.5, 1e300, "", "x", "conv2d", "group",
              [], [2**31, 1], {}, {"rank": 1, "alpha": 1.0}, [[[[[]]]]], "LlamaForCausalLM"]  # fmt: skip


def _mutated(meta: dict[str, Any], tensors: dict[str, Tensor], rng: random.Random) -> None:
    """One field of ``meta`` set to an odd value, or one tensor damaged (values, length, dtype, gone)."""
    if rng.random() < 0.7:
        nodes: list[Any] = [meta]
        for node in nodes:  # every mapping and list, breadth first
            nodes += [v for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, dict | list)]
        node = rng.choice(nodes)
        key = rng.choice(list(node) if isinstance(node, dict) else range(len(node))) if node else None
        if key is not None:
            node[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        return
    name = rng.choice(sorted(tensors))
    t, r = tensors[name].clone(), rng.random()
    if r < 0.4 and t.numel() and t.dtype.is_floating_point:
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([NAN, INF, -1.0, 0.0, 3.5, 1e30])
    elif r < 0.6:
        t = t.reshape(-1)[: max(t.numel() - 1, 0)]
    elif r < 0.8:
        t = t.to(rng.choice([torch.float16, torch.int32, torch.uint8, torch.float64]))
    else:
        del tensors[name]
        return
    tensors[name] = t


def test_signed_mutations_raise_format_error_or_load(tmp_path: Path, mlp_file: Path, llama_file: Path) -> None:
    """A fuzzer that re-signs what it damages gets past the digest: only FormatError may come out (or the
    ConfigError for a file that records no architecture), or a model."""
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    for i in range(240):
        meta, tensors = _open(mlp_file if i % 3 else llama_file)
        _mutated(meta, tensors, rng)
        path = _write(tmp_path / "f.safetensors", meta, tensors)
        try:
            lowbit.load(path)
            outcome = "loaded"
        except FormatError:
            outcome = "format_error"
        except lowbit.ConfigError as e:
            assert "records no architecture" in str(e)
            outcome = "no_architecture"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes["format_error"] > 180, outcomes


def test_a_weight_scale_of_another_dtype_is_refused(tmp_path: Path, mlp_file: Path) -> None:
    key = "features.1.weight_scale"
    path = _edited(mlp_file, tmp_path / "s.safetensors", lambda m, t: t.update({key: t[key].double()}))
    _refused(path, key, "float64", "expected float32 or float16")
