"""The contract every layer kind and every method keeps, as one table (like peft's common tester).

Each case: a layer kind (QuantLinear/QuantConv2d, LR-QAT, scales-only, QLoRA-style) × a registered method
(or none) × a model (a small CNN with batch norm, and a tiny random LLaMA) goes through
prepare → forward/backward → optimizer steps (method losses and steps included) → finish hooks →
state_dict round trip into a freshly prepared model → convert → save → load, and the outputs must be
equal exactly at every hand-over. A pair a method declares unsupported (its ``unsupported(layer)``) is
skipped with the method's own reason, and attaching it must raise a ``ConfigError`` that says so.

The same table checks ``set_bits`` on every kind: after it, the integers lie in the new grid and the
converted model still equals the fake-quant one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import BinarySpec, LowRankSpec, QuantConfig, QuantSpec, Rule
from lowbit.errors import ConfigError
from lowbit.methods import METHODS, attach_methods, build_methods, call_hooks
from lowbit.quant import functional as F
from lowbit.quant.modules import quantized_layers
from lowbit.tasks.text import causal_lm_loss_and_outputs

transformers = pytest.importorskip("transformers")

KINDS: dict[str, LowRankSpec | str | None] = {
    "quant": None,
    "binary": "binary",  # QuantLinear/QuantConv2d on the binary grid {-s, +s}
    "embedding": "embedding",  # QuantEmbedding (quant.embedding) and the head tied to it, beside QuantLinear
    "lrqat": LowRankSpec(rank=4),
    "lrqat_int": LowRankSpec(rank=4, phi="int"),
    "scales_only": LowRankSpec(rank=0),
    "qlora": LowRankSpec(rank=4, variant="qlora"),
    "stretched": None,  # QuantLinear/QuantConv2d on the zero-free grid (k + 1/2)·s
    "lrqat_asym": LowRankSpec(rank=4),  # LR-QAT on the asymmetric grid (frozen integer zero point)
    "lrqat_stretched": LowRankSpec(rank=4),
    "auto_act": None,  # activation grids chosen per layer (symmetric: auto)
}
WEIGHT_CHANGES = {"stretched": {"stretched": True}, "lrqat_asym": {"symmetric": False},
                  "lrqat_stretched": {"stretched": True}}  # fmt: skip
NO_SET_BITS = ("lrqat_asym", "lrqat_stretched")  # a frozen zero point that another grid would not hold
# settings that make each method act within a few steps (defaults wait for a quarter of training)
SETTINGS: dict[str, dict[str, Any]] = {
    "oscillation_tracking": {"momentum": 0.5},
    "oscillation_dampening": {"momentum": 0.5, "start": 0.0, "lambda_start": 0.5, "lambda_final": 0.5},
    "oscillation_freezing": {"momentum": 0.5, "start": 0.0, "threshold_start": 0.05, "threshold_final": 0.05},
    "bn_reestimation": {"num_batches": 2},
    "resiliency": {},
    "qbitopt": {"average_bits": 3, "candidates": [2, 3, 4], "tau": 2, "freeze": 0.0},
    "distill": {"weight": 0.5, "temperature": 2.0},
    "binary": {"optimizer": "cema", "alpha": 0.1, "gamma": 0.5},
}
STEPS = 4


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _cnn_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(STEPS)]


def _llama_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(STEPS)]


MODELS: dict[str, dict[str, Any]] = {
    "cnn": {
        "build": _cnn,
        "batches": _cnn_batches,
        "inputs": lambda b: b[0],
        "loss": lambda model, b: (lambda out: (nn.functional.cross_entropy(out, b[1]), out))(model(b[0])),
        "logits": lambda model, x: model(x),
        # W4A8; first and last layers 8-bit; low-rank kinds apply to the linears, the convs stay QuantConv2d
        "config": lambda lowrank: QuantConfig(
            weight=QuantSpec(bits=4, granularity="channel", init="minmax"), act=QuantSpec(bits=8, init="minmax"),
            first_last_bits=8, lowrank=lowrank,
            rules=(Rule(match="features.*", lowrank=None),) if lowrank is not None else (),
        ),  # fmt: skip
    },
    "llama": {
        "build": _llama,
        "batches": _llama_batches,
        "inputs": lambda b: b,
        "loss": lambda model, b: causal_lm_loss_and_outputs(model, b),
        "logits": lambda model, x: model(x).logits,
        "config": lambda lowrank: QuantConfig(
            weight=QuantSpec(bits=4, granularity="group", group_size=16, init="minmax"), act=None,
            rules=(Rule(match="lm_head", skip=True),), lowrank=lowrank, freeze_unquantized=True,
        ),  # fmt: skip
    },
}


def _config(model_name: str, kind: str) -> QuantConfig:
    config = MODELS[model_name]["config"]
    if kind == "embedding":
        if model_name != "llama":
            pytest.skip("the CNN has no embedding")
        return dataclasses.replace(config(None), embedding=QuantSpec(bits=4, granularity="group", group_size=16,
                                                                     init="minmax"))  # fmt: skip
    if kind == "auto_act":
        return dataclasses.replace(config(None), act=QuantSpec(bits=8, init="minmax", symmetric="auto"))
    if kind in WEIGHT_CHANGES:
        cfg = config(KINDS[kind])
        return dataclasses.replace(cfg, weight=cfg.weight.replace(**WEIGHT_CHANGES[kind]))
    if kind != "binary":
        return config(KINDS[kind])
    binary = QuantSpec(bits=1, granularity="channel", binary=BinarySpec(scale="mean_abs"))
    act = QuantSpec(bits=1, binary=BinarySpec(scale="one", grad="approxsign")) if model_name == "cnn" else None
    return dataclasses.replace(config(None), weight=binary, act=act)


def _prepared(model_name: str, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    spec = MODELS[model_name]
    model = spec["build"]()
    calib = [spec["inputs"](b) for b in spec["batches"]()[:2]]
    return lowbit.prepare(model, _config(model_name, kind), calib=calib), spec


def _methods(method: str) -> list[Any]:
    return [] if method == "none" else build_methods([{"name": method, **SETTINGS[method]}], total_steps=STEPS)


def _unsupported(methods: list[Any], model: nn.Module) -> str | None:
    for m in methods:
        check = getattr(m, "unsupported", None)
        for _, layer in quantized_layers(model) if callable(check) else []:
            why = check(layer)
            if why:
                return why
    return None


def test_the_table_covers_every_registered_method() -> None:
    assert set(SETTINGS) == set(METHODS), "a new method must join the contract table"


@pytest.mark.parametrize("method", ["none", *sorted(METHODS)])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_contract(model_name: str, kind: str, method: str, tmp_path: Path) -> None:
    model, spec = _prepared(model_name, kind)
    methods = _methods(method)
    why = _unsupported(methods, model)
    if why is not None:
        with pytest.raises(ConfigError, match="cannot run on layer"):
            attach_methods(methods, model, [method])
        pytest.skip(f"{method} on {kind}: {why}")
    if method == "binary" and kind != "binary":
        pytest.skip("binary optimizes binary weights; this kind has none")
    attach_methods(methods, model, [method])
    call_hooks(methods, "use_float_model", lambda: spec["build"]().eval())
    batches = spec["batches"]()
    call_hooks(methods, "start", model, lambda s: (spec["loss"](model, b)[0] for b in [*batches[s:], *batches]), 0)
    # as the loop does: parameters a method optimizes itself (param_groups) go to its optimizer
    own = [g for groups in call_hooks(methods, "param_groups", model) for g in groups]
    owned = {id(p) for g in own for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    assert trainable or owned, "something trains"
    opts = [torch.optim.AdamW(trainable, lr=0.05)] if trainable else []
    opts += [g["optimizer"]([{k: v for k, v in g.items() if k not in ("optimizer", "schedule")}]) for g in own]
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step, batch in enumerate(batches, start=1):
        loss, out = spec["loss"](model, batch)
        for m in methods:
            extra = m.loss(model, batch, out)
            loss = loss + extra if extra is not None else loss
        assert torch.isfinite(loss)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        for m in methods:
            m.step(step)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
    call_hooks(methods, "finish", model, iter([spec["inputs"](b) for b in batches]))
    model.eval()
    x = spec["inputs"](batches[0])
    with torch.no_grad():
        ref = spec["logits"](model, x)
        # state_dict round trip into a freshly prepared model with the same methods attached
        fresh, _ = _prepared(model_name, kind)
        fresh_methods = _methods(method)
        attach_methods(fresh_methods, fresh, [method])
        fresh.load_state_dict(model.state_dict())
        for m, f in zip(methods, fresh_methods, strict=True):
            f.load_state_dict(m.state_dict())
        assert torch.equal(spec["logits"](fresh.eval(), x), ref)
        # convert: what was trained is what is exported
        int_model = lowbit.convert(model)
        assert not quantized_layers(int_model)
        assert torch.equal(spec["logits"](int_model, x), ref)
        path = lowbit.save(int_model, tmp_path / "model.safetensors")
        loaded = lowbit.load(path, model=spec["build"]()) if model_name == "cnn" else lowbit.load(path)
        assert torch.equal(spec["logits"](loaded, x), ref)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("kind", sorted(k for k in KINDS if k != "binary"))  # binary: one grid (test_binary_grid)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_set_bits_on_every_layer_kind(model_name: str, kind: str, bits: int) -> None:
    model, spec = _prepared(model_name, kind)
    layers = [(n, m) for n, m in quantized_layers(model) if m.weight_quantizer is not None]
    assert layers
    refused = [m for _, m in layers if getattr(m, "set_bits_unsupported", lambda: None)()]
    assert bool(refused) == (kind in NO_SET_BITS)
    for layer in refused:
        with pytest.raises(ConfigError, match="set_bits"):
            layer.set_bits(bits)
    for _, layer in layers:
        if layer in refused:
            continue
        q = layer.weight_quantizer
        cells = q.stretched  # the stretched grid spans 2^b steps (its levels are the cells' centres)
        span = F.positive_scale(q.scale.detach(), F.SCALE_EPS) * (q.int_grid()[1] - q.int_grid()[0] + cells)
        layer.set_bits(bits)
        qmin, qmax = q.int_grid()
        assert q.nbits == bits and (qmin, qmax) == F.int_range(bits, bool(q.signed))
        new_span = F.positive_scale(q.scale.detach(), F.SCALE_EPS) * (qmax - qmin + cells)
        torch.testing.assert_close(new_span, span)  # the range is kept
        ints = layer.weight_int().detach()
        assert int(ints.min()) >= qmin and int(ints.max()) <= qmax and torch.equal(ints, ints.round())
    model.eval()
    x = spec["inputs"](spec["batches"]()[0])
    with torch.no_grad():
        ref = spec["logits"](model, x)
        assert torch.equal(spec["logits"](lowbit.convert(model), x), ref)
        fresh, _ = _prepared(model_name, kind)  # a checkpoint taken after set_bits resumes into a fresh model
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(spec["logits"](fresh.eval(), x), ref)


def test_a_typo_in_a_method_setting_names_its_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'methods\[0\]\.thresold_start': allowed keys here are"):
        build_methods([{"name": "oscillation_freezing", "thresold_start": 0.1}], total_steps=1)
    with pytest.raises(ConfigError, match=r"methods\[1\]\.momentum='fast' is not allowed"):
        build_methods([{"name": "bn_reestimation"}, {"name": "oscillation_tracking", "momentum": "fast"}], 1)
