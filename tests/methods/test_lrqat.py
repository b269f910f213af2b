"""LR-QAT: fixed-point down-cast, step 0 = round-to-nearest, only A/B/s train, exact merge (convert), save/load,
set_bits re-expressing Φ0."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import ConfigError
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec, Rule
from lowbit.methods.lrqat import LowRankQuantLinear, QLoRALinear, from_fixed_point, to_fixed_point
from lowbit.quant import functional as F


class Block(nn.Module):
    """A LLaMA-shaped toy block: attention projections and a gated MLP, named like Hugging Face's."""

    def __init__(self, d: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(-1, -2) / 4, -1) @ self.v_proj(h)
        x = x + self.o_proj(a)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(50, 32), Block(), Block(), nn.Linear(32, 50))


TOKENS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


def lrqat(
    model: nn.Module,
    bits: int = 4,
    rank: int = 32,
    granularity: str = "channel",
    group_size: int | None = None,
    phi: str = "fixed_point8",
    checkpoint: bool = True,
    variant: str = "lrqat",
    skip: tuple[str, ...] = ("3", "lm_head"),
    symmetric: bool = True,
) -> nn.Module:
    """``lowbit.prepare`` with a lowrank setting: every linear but the head becomes a low-rank layer."""
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=group_size, init="lp", symmetric=symmetric)
    names = {n for n, _ in model.named_modules()}
    rules = tuple(Rule(match=h, skip=True) for h in skip if h in names)
    lowrank = LowRankSpec(rank=rank, phi=phi, recompute=checkpoint, variant=variant)
    config = QuantConfig(weight=spec, act=None, lowrank=lowrank, rules=rules, freeze_unquantized=True)
    return lowbit.prepare(model, config)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_fixed_point_round_trip_is_exact_on_its_grid(bits: int) -> None:
    qmin, qmax = F.int_range(bits, True)
    step = 2.0 ** (bits - 8)
    grid = torch.arange(qmin / step, qmax / step + 1) * step  # every Q(b).(8−b) value in [qmin, qmax]
    y = to_fixed_point(grid, bits)
    assert y.dtype == torch.int8
    assert torch.equal(from_fixed_point(y, bits), grid)
    x = torch.randn(1000) * 3
    err = (from_fixed_point(to_fixed_point(x, bits), bits) - x.clamp(qmin, qmax)).abs().max()
    assert float(err) <= step / 2 + 1e-7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fixed_point8_stores_unsigned_grids_exactly(bits: int) -> None:
    from lowbit.methods.lrqat import PHI_CODECS

    codec = PHI_CODECS["fixed_point8"]
    step = 2.0 ** (bits - 8)
    grid = torch.arange(0, (2**bits - 1) / step + 1) * step  # every Q(b).(8−b) value in [0, 2^b − 1]
    stored = codec.encode(grid, bits, False)
    assert stored.dtype == torch.int8
    assert torch.equal(codec.decode(stored, bits, False, (1, grid.numel())), grid)


@pytest.mark.parametrize("phi", ["fixed_point8", "bf16", "fp32", "int"])
def test_asymmetric_step_zero_is_round_to_nearest_with_its_zero_point(phi: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.add_(0.05)  # skewed rows: the zero point is not the middle of the grid
    layer = LowRankQuantLinear(lin, lowbit.QuantSpec(bits=2, symmetric=False, init="lp"), rank=4, phi=phi)
    q = layer.weight_quantizer
    assert not q.zero_point.requires_grad and torch.equal(q.zero_point, q.zero_point.round())
    s = F.positive_scale(q.scale.detach(), F.SCALE_EPS).reshape(-1, 1)
    z = q.zero_point.reshape(-1, 1)
    rtn = torch.clamp(torch.round(lin.weight.detach() / s) + z, 0, 3)
    ints = layer.weight_int().detach()
    assert float((ints != rtn).float().mean()) < (0.05 if phi in ("fixed_point8", "bf16") else 1e-9)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, (ints - z) * s, lin.bias))
    with pytest.raises(ConfigError, match="asymmetric"):
        layer.set_bits(3)


@pytest.mark.parametrize("phi", ["fixed_point8", "bf16", "fp32", "int"])
def test_step_zero_is_round_to_nearest_of_phi0(phi: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    layer = LowRankQuantLinear(lin, lowbit.QuantSpec(bits=4, init="lp"), rank=4, phi=phi)
    q = layer.weight_quantizer
    s = F.positive_scale(q.scale.detach(), F.SCALE_EPS).reshape(-1, 1)
    rtn = torch.clamp(torch.round(lin.weight.detach() / s), -8, 7)
    ints = layer.weight_int().detach()
    if phi in ("fp32", "int"):
        assert torch.equal(ints, rtn)
    else:  # Φ0 is rounded to the down-cast grid first: only values within its precision of a tie may differ
        assert float((ints != rtn).float().mean()) < 0.05
        assert torch.equal(ints, torch.round(layer.phi0_float()).clamp(-8, 7))
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, ints * s, lin.bias))


def test_only_adapters_and_scales_train() -> None:
    model = lrqat(_model(), bits=3, rank=4)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_a", "lora_b", "weight_quantizer.scale")) for n in names)
    assert len(names) == 2 * 7 * 3
    model(TOKENS).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
    # A starts at 0, so only A (and the scales) get a gradient at step 0; B's gradient is A-weighted
    layer = model[1].q_proj
    assert float(layer.lora_a.grad.abs().sum()) > 0 and float(layer.lora_b.grad.abs().sum()) == 0


@pytest.mark.parametrize(
    "granularity, group_size, phi, symmetric",
    [("channel", None, "fixed_point8", True), ("group", 16, "int", True), ("group", 16, "fixed_point8", False),
     ("channel", None, "bf16", False), ("group", 20, "int", True), ("group", 20, "fixed_point8", False)],
)  # fmt: skip
def test_convert_is_exact_after_training(
    tmp_path: Path, granularity: str, group_size: int | None, phi: str, symmetric: bool
) -> None:
    model = lrqat(_model(), bits=3, rank=4, granularity=granularity, group_size=group_size, phi=phi,
                  symmetric=symmetric)  # fmt: skip
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(TOKENS).reshape(-1, 50), TOKENS.roll(1, 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert float(model[1].q_proj.lora_a.detach().abs().sum()) > 0
    with torch.no_grad():
        ref = model(TOKENS)
        merged = lowbit.convert(model)
        assert torch.equal(merged(TOKENS), ref)
        for name, m in model.named_modules():
            if isinstance(m, LowRankQuantLinear):
                int_layer = dict(merged.named_modules())[name]
                assert torch.equal(int_layer.qweight.weight_int, m.weight_int().round().to(torch.int8))
                assert (int_layer.qweight.weight_zero_point is None) == symmetric
        lowbit.save(merged, tmp_path / "llm.safetensors")
        loaded = lowbit.load(tmp_path / "llm.safetensors", model=_model(seed=5))
        assert torch.equal(loaded(TOKENS), ref)


@pytest.mark.parametrize(
    ("granularity", "group_size", "rank", "phi", "symmetric"),
    [
        ("channel", None, 2, "fixed_point8", True),
        ("group", 16, 2, "fixed_point8", True),
        ("channel", None, 0, "bf16", True),
        ("tensor", None, 3, "int", True),
        ("group", 16, 2, "fixed_point8", False),
        ("channel", None, 3, "int", False),
        ("group", 20, 2, "fixed_point8", True),  # ragged last groups: 32 = 20 + 12, 48 = 20 + 20 + 8
        ("group", 20, 3, "int", False),
    ],
)
def test_recomputing_function_gives_autograds_gradients(
    granularity: str, group_size: int | None, rank: int, phi: str, symmetric: bool
) -> None:
    """The hand-written backward (checkpoint=True) equals autograd through the plain path, clipping included."""
    grads = []
    for ck in (True, False):
        model = lrqat(
            _model(), bits=4, rank=rank, granularity=granularity, group_size=group_size, phi=phi, checkpoint=ck,
            symmetric=symmetric,
        )
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LowRankQuantLinear):
                    m.lora_a.normal_(0, 8.0, generator=torch.Generator().manual_seed(3))  # some values clip
                    m.weight_quantizer.scale.view(-1)[0] *= -1  # a negative raw scale: |s| with sign gradient
        model(TOKENS).pow(2).mean().backward()
        grads.append([(n, p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad])
    for (name, a), (_, b) in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    clipped = [m for m in model.modules() if isinstance(m, LowRankQuantLinear)]
    assert (
        any(bool((m._build(m.lora_a, m.lora_b, m.weight_quantizer.scale)[1]).logical_not().any()) for m in clipped)
        or rank == 0
    )


def test_recomputing_function_with_bias_and_batched_input() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=True)
    layers = [
        LowRankQuantLinear(lin, lowbit.QuantSpec(bits=3, init="minmax"), 4, checkpoint=ck) for ck in (True, False)
    ]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 5, 16)
    grads = []
    for layer in layers:
        layer.bias.requires_grad_(True)
        with torch.no_grad():
            layer.lora_a.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.sin().sum().backward()
        grads.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="rank=40"):
        lrqat(_model(), rank=40)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with pytest.raises(ConfigError, match="lowrank .*applies to Linear layers, not Conv2d"):
        lowbit.prepare(conv, QuantConfig(act=None, lowrank=LowRankSpec(rank=2)))
    with pytest.raises(ConfigError, match="lowrank needs a quantized weight"):
        lowbit.prepare(_model(), QuantConfig(weight=None, act=None, lowrank=LowRankSpec(rank=2)))
    with pytest.raises(ConfigError, match="variant"):
        LowRankSpec(variant="lsq")


def test_baselines_train_what_they_should() -> None:
    scales = lrqat(_model(), bits=4, rank=0)
    names = {n for n, p in scales.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("weight_quantizer.scale") for n in names)
    qlora = lrqat(_model(), bits=4, rank=4, variant="qlora")
    assert sum(isinstance(m, QLoRALinear) for m in qlora.modules()) == 14
    names = {n for n, p in qlora.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    rtn = lrqat(_model(), bits=4, rank=4, phi="fp32")
    with torch.no_grad():  # at step 0 all three are the same round-to-nearest model
        ref = rtn(TOKENS)
        torch.testing.assert_close(qlora(TOKENS), ref)
        torch.testing.assert_close(scales(TOKENS), lrqat(_model(), bits=4, rank=4)(TOKENS))


def test_qlora_converts_with_its_adapters_and_reloads(tmp_path: Path) -> None:
    model = lrqat(_model(), bits=3, rank=4, variant="qlora")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_a.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
        model.eval()
        ref = model(TOKENS)
        converted = lowbit.convert(model)
        assert torch.equal(converted(TOKENS), ref)
        lowbit.save(converted, tmp_path / "q.safetensors")
        loaded = lowbit.load(tmp_path / "q.safetensors", model=_model(seed=9))
        assert torch.equal(loaded(TOKENS), ref)
    meta = json.loads((tmp_path / "q.json").read_text())
    assert meta["layers"]["1.q_proj"]["adapter"] == {"rank": 4, "alpha": 1.0}


@pytest.mark.parametrize("phi", ["fixed_point8", "bf16", "fp32", "int"])
@pytest.mark.parametrize("new_bits", [2, 3, 6])
def test_set_bits_reexpresses_phi0_and_keeps_the_range(phi: str, new_bits: int) -> None:
    torch.manual_seed(0)
    layer = LowRankQuantLinear(nn.Linear(32, 12), lowbit.QuantSpec(bits=4, init="lp"), rank=3, phi=phi)
    with torch.no_grad():
        layer.lora_a.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    q = layer.weight_quantizer
    s_old = F.positive_scale(q.scale.detach(), F.SCALE_EPS).clone()
    phi_old, a_old = layer.phi0_float().clone(), layer.lora_a.detach().clone()
    layer.set_bits(new_bits)
    qmin, qmax = F.int_range(new_bits, True)
    ratio = 15 / (2**new_bits - 1)
    assert q.nbits == new_bits and int(layer.phi_bits) == new_bits
    torch.testing.assert_close(F.positive_scale(q.scale.detach(), F.SCALE_EPS), s_old * ratio)  # same range
    ints = layer.weight_int().detach()
    assert int(ints.min()) >= qmin and int(ints.max()) <= qmax and torch.equal(ints, ints.round())
    # the effective latent weights s·(Φ0 + (α/r)AB) are kept: Φ0 and A are divided by the step's growth, Φ0
    # up to the storage's rounding (and clipped to the new grid), A exactly
    torch.testing.assert_close(layer.lora_a.detach(), a_old / ratio)
    step = {"fixed_point8": 2.0 ** (new_bits - 8), "bf16": 2.0**-7 * 2 ** (new_bits - 1), "fp32": 1e-6, "int": 1.0}
    err = (layer.phi0_float() - (phi_old / ratio).clamp(qmin, qmax)).abs().max()
    assert float(err) <= step[phi] / 2 + 1e-6
    x = torch.randn(4, 32)
    model = nn.Sequential(layer).eval()
    with torch.no_grad():
        assert torch.equal(lowbit.convert(model)(x), model(x))
    with pytest.raises(ConfigError, match="set_bits"):  # the quantizer alone would leave Φ0 on the old grid
        q.set_bits(4)
        layer(x)


def test_hugging_face_llama_convert_save_load(tmp_path: Path, tiny_llama: Callable[..., nn.Module]) -> None:
    """A tiny random LLaMA (tied embeddings): LR-QAT → merge → save → load rebuilds it from its HF config."""
    model = tiny_llama(tie_word_embeddings=True, max_position_embeddings=64).eval()
    lrqat(model, bits=3, rank=4, granularity="group", group_size=16)
    assert sum(isinstance(m, LowRankQuantLinear) for m in model.modules()) == 14
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankQuantLinear):
                m.lora_a.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
        ref = model(ids).logits
        merged = lowbit.convert(model)
        assert torch.equal(merged(ids).logits, ref)
        path = lowbit.save(merged, tmp_path / "llm.safetensors")
        loaded = lowbit.load(path)
        assert type(loaded).__name__ == "LlamaForCausalLM"
        assert torch.equal(loaded(ids).logits, ref)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr(), "still tied"
    # the tied embedding is stored once
    meta = json.loads((tmp_path / "llm.json").read_text())
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_generate_from_a_saved_integer_llm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lowbit generate` reloads a merged LLM and its tokenizer from a folder and prints greedy text."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from lowbit.cli import main

    words = ["the", "cat", "sat", "on", "the", "mat", "and", "the", "dog", "ran", "to", "the", "cat"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    bpe = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="the"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = lrqat(transformers.LlamaForCausalLM(cfg).eval(), bits=4, rank=2)
    lowbit.save(lowbit.convert(model), tmp_path / "model.safetensors")
    assert main(["generate", str(tmp_path), "the cat", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("the cat") and len(text.split()) == 7
