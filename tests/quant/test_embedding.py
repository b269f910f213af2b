"""Embeddings as a quantized layer kind (``quant.embedding``): the table on the weight grid, a tied head
reading the same integers, convert / save / load exact, and refusals that name the layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig, QuantSpec, Rule, recipe_from_dict
from lowbit.errors import ConfigError, FormatError
from lowbit.export.intmodules import IntEmbedding, IntTiedHead
from lowbit.quant.embedding import QuantEmbedding, QuantTiedHead
from lowbit.quant.modules import quantized_layers

transformers = pytest.importorskip("transformers")

Q4_0 = QuantSpec(format="q4_0", init="minmax")


class TinyLM(nn.Module):
    """Embedding -> linear -> head, the head tied to the embedding or not."""

    def __init__(self, tied: bool = True, vocab: int = 40, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _config(emb: QuantSpec | None = Q4_0, skip_head: bool = True) -> QuantConfig:
    rules = (Rule(match="head", skip=True),) if skip_head else ()
    return QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), act=None, rules=rules, embedding=emb)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(seed))


def test_lookups_are_rows_of_the_table_on_its_grid() -> None:
    """Against a naive reference: every looked-up row is s·clamp(round(w/s), −8, 7) per block of 32."""
    torch.manual_seed(0)
    model = lowbit.prepare(TinyLM(), _config())
    emb = model.embed
    assert isinstance(emb, QuantEmbedding) and [n for n, _ in quantized_layers(model)] == ["embed", "mix"]
    s = emb.weight_quantizer.scale_value().detach()  # (vocab, dim / 32), float16 numbers
    assert s.shape == (40, 2) and torch.equal(s.half().float(), s)
    w = emb.weight.detach()
    naive = (torch.clamp(torch.round(w / s.repeat_interleave(32, 1)), -8, 7) * s.repeat_interleave(32, 1))
    ids = _ids()
    torch.testing.assert_close(emb(ids), naive[ids], rtol=0, atol=1e-7)
    assert torch.equal(emb.weight_int().detach(), emb.weight_int().detach().round())


def test_a_tied_head_reads_the_embeddings_integers_and_trains_one_table() -> None:
    torch.manual_seed(0)
    model = lowbit.prepare(TinyLM(), _config())
    assert isinstance(model.head, QuantTiedHead) and model.head.weight is model.embed.weight
    assert sum(p is model.embed.weight for p in model.parameters()) == 1  # registered once
    x = torch.randn(2, 64)
    torch.testing.assert_close(model.head(x), x @ model.embed.quantized_weight().t(), rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.embed.weight.detach().clone()
    nn.functional.cross_entropy(model(_ids()).reshape(-1, 40), _ids(1).reshape(-1)).backward()
    assert model.embed.weight.grad is not None and model.embed.weight_quantizer.scale.grad is not None
    opt.step()
    assert not torch.equal(model.embed.weight.detach(), before)


@pytest.mark.parametrize("tied", [True, False])
def test_convert_save_load_are_exact_and_the_table_is_stored_at_4_bits(tmp_path: Path, tied: bool) -> None:
    torch.manual_seed(0)
    model = lowbit.prepare(TinyLM(tied), _config(skip_head=tied)).eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        int_model = lowbit.convert(model)
        assert isinstance(int_model.embed, IntEmbedding)
        assert isinstance(int_model.head, IntTiedHead) == tied
        assert torch.equal(int_model(ids), ref)
        path = lowbit.save(int_model, tmp_path / "m.safetensors")
        loaded = lowbit.load(path, model=TinyLM(tied))
        assert torch.equal(loaded(ids), ref)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["layers"]["embed"]["kind"] == "embedding" and meta["layers"]["embed"]["bits"] == 4
    if tied:
        assert meta["layers"]["head"] == {"kind": "tied_head", "embedding": "embed", "bias": False}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("embed.weight_packed").numel() == 40 * 64 // 2  # two 4-bit codes a byte
        assert "head.weight" not in f.keys() and "embed.weight" not in f.keys()  # noqa: SIM118


def test_embeddings_stay_float_unless_asked_and_refusals_name_the_layer() -> None:
    model = lowbit.prepare(TinyLM(), _config(emb=None))
    assert type(model.embed) is nn.Embedding and type(model.head) is nn.Linear
    with pytest.raises(ConfigError, match=r"layer 'head' shares its weight with the embedding 'embed'.*skip: true"):
        lowbit.prepare(TinyLM(), _config(skip_head=False))
    with pytest.raises(ConfigError, match=r"embedding\.binary"):
        QuantConfig(embedding=QuantSpec(bits=1, binary=lowbit.config.BinarySpec()))
    with pytest.raises(ConfigError, match=r"embedding\.axis=1"):
        QuantConfig(embedding=QuantSpec(bits=4, granularity="channel", axis=1))
    with pytest.raises(ConfigError, match="already quantized"):
        lowbit.prepare(lowbit.prepare(TinyLM(), _config()), _config())
    bag = nn.Sequential(nn.Embedding(10, 32, max_norm=1.0), nn.Linear(32, 2))
    with pytest.raises(ConfigError, match=r"layer '0': max_norm"):
        lowbit.prepare(bag, _config(skip_head=False))


def test_a_recipe_sets_the_embedding_grid_with_a_format() -> None:
    r = recipe_from_dict({"task": "causal_lm", "model": {"name": "random-llama"},
                          "quant": {"act": None, "embedding": {"format": "q8_0"}}})  # fmt: skip
    assert r.quant.embedding == QuantSpec(format="q8_0")
    assert r.quant.embedding.bits == 8 and r.quant.embedding.group_size == 32
    with pytest.raises(ConfigError, match=r"quant\.embedding\.bits=3"):
        recipe_from_dict({"quant": {"embedding": {"format": "q4_0", "bits": 3}}})


def _saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return lowbit.save(lowbit.convert(lowbit.prepare(TinyLM(), _config()).eval()), tmp_path / "m.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda layers: layers["head"].update(embedding="mix"), r"layers\['head'\]\.embedding='mix'"),
    (lambda layers: layers["head"].update(embedding="nowhere"), r"layers\['head'\]\.embedding='nowhere'"),
    (lambda layers: layers["head"].update(extra=1), r"layers\['head'\]"),
    (lambda layers: layers["embed"].update(input=layers["mix"]["input"] or {"bits": 8, "signed": True,
     "symmetric": True, "granularity": "tensor", "axis": 0}), r"layers\['embed'\]\.input"),
    (lambda layers: layers["embed"].update(kind="lookup"), r"layers\['embed'\]\.kind='lookup'"),
])  # fmt: skip
def test_hostile_embedding_entries_are_refused_by_field(tmp_path: Path, change, message: str) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    from lowbit.checkpoint import digest

    path = _saved(tmp_path)
    meta = json.loads((tmp_path / "m.json").read_text())
    change(meta["layers"])
    tensors = load_file(str(path))
    meta.pop("sha256")
    meta["sha256"] = digest(meta, tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"lowbit": json.dumps(meta)})
    with pytest.raises(FormatError, match=message):
        lowbit.load(bad, model=TinyLM())


def test_a_file_head_tied_to_an_embedding_needs_a_linear_of_the_tables_shape(tmp_path: Path) -> None:
    path = _saved(tmp_path)

    class Other(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(64, 41, bias=False)

    with pytest.raises(FormatError, match=r"layer 'head' \(tied to 'embed'"):
        lowbit.load(path, model=Other())


def test_under_freeze_unquantized_the_table_stays_and_its_scales_learn() -> None:
    torch.manual_seed(0)
    cfg = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), act=None, rules=(Rule(match="head", skip=True),),
                      embedding=Q4_0, freeze_unquantized=True)  # fmt: skip
    model = lowbit.prepare(TinyLM(), cfg)
    assert not model.embed.weight.requires_grad and model.embed.weight_quantizer.scale.requires_grad
    assert model.mix.weight.requires_grad  # a quantized linear trains (full QAT of the linears)
    full = lowbit.prepare(TinyLM(), _config())
    assert full.embed.weight.requires_grad
