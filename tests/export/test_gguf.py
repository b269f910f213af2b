"""GGUF export (``lowbit.export.gguf``): blocks byte for byte against a naive packer and gguf's reference
dequantizer; a LLaMA trained on the Q4_0 grid round-trips exactly; refusals name the layer and the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit import ConfigError, QuantConfig, QuantSpec  # noqa: E402
from lowbit.config import LowRankSpec, Rule  # noqa: E402
from lowbit.export.gguf import export_gguf, pack_blocks, read_gguf_weights  # noqa: E402
from lowbit.llm.models import load_causal_lm  # noqa: E402

RNG = np.random.default_rng(0)


def _naive_block(ints: np.ndarray, d: np.float16, kind: str) -> bytes:
    """One block as llama.cpp's block_q4_0 / block_q8_0 structs lay it out."""
    head = np.array([d], dtype=np.float16).tobytes()
    if kind == "Q8_0":
        return head + bytes(int(v) & 0xFF for v in ints)
    return head + bytes(((int(ints[j]) + 8) | ((int(ints[j + 16]) + 8) << 4)) for j in range(16))


@pytest.mark.parametrize("kind, lo, hi", [("Q4_0", -8, 7), ("Q8_0", -128, 127)])
def test_blocks_equal_a_naive_packer_and_dequantize_exactly(kind: str, lo: int, hi: int) -> None:
    ints = RNG.integers(lo, hi + 1, size=(3, 96))
    scales = (RNG.random((3, 3)) * 0.1 + 1e-3).astype(np.float16).astype(np.float32)
    raw = pack_blocks(ints, scales, kind)
    blocks = [(r, b) for r in range(3) for b in range(3)]
    naive = b"".join(_naive_block(ints[r, b * 32 : (b + 1) * 32], scales[r, b], kind) for r, b in blocks)
    assert raw.tobytes() == naive
    back = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
    np.testing.assert_array_equal(back, ints * np.repeat(scales, 32, axis=1))


def _llama(
    weight: QuantSpec, lowrank: LowRankSpec | None = None, tied: bool = True, act: QuantSpec | None = None,
    embedding: QuantSpec | None = None,
) -> torch.nn.Module:  # fmt: skip
    args = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": tied}  # fmt: skip
    model, _ = load_causal_lm("random-llama", args, seed=0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    rules = (Rule(match="lm_head", skip=True),) if embedding is not None and tied else ()
    config = QuantConfig(weight=weight, act=act, lowrank=lowrank, embedding=embedding, rules=rules)
    model = lowbit.prepare(model, config, calib=[ids])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move the scales off their initial values: they must stay float16 numbers
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return lowbit.convert(model.eval())


def _unpermute(a: np.ndarray, heads: int) -> np.ndarray:
    return a.reshape(heads, a.shape[0] // heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


@pytest.mark.parametrize("variant", ["qat", "lrqat"])
def test_a_model_trained_on_the_q4_0_grid_is_written_exactly(tmp_path: Path, variant: str) -> None:
    lowrank = LowRankSpec(rank=4) if variant == "lrqat" else None
    model = _llama(QuantSpec(format="q4_0", init="minmax"), lowrank)
    path = export_gguf(model, tmp_path / "m.gguf")
    got = read_gguf_weights(path)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    for i, block in enumerate(model.model.layers):
        pairs = (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down"))
        for hf, short in pairs:
            layer = block.get_submodule(hf)
            want = layer.qweight.weight_int.float() * layer.qweight.weight_scale.repeat_interleave(32, dim=1)
            name = f"blk.{i}.{short}.weight"
            g = _unpermute(got[name], heads[short]) if short in heads else got[name]
            np.testing.assert_array_equal(g, want.numpy())
            assert types[name] == "Q4_0"
        np.testing.assert_array_equal(got[f"blk.{i}.attn_norm.weight"], block.input_layernorm.weight.detach().numpy())
    emb = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(got["token_embd.weight"], emb.astype(np.float16).astype(np.float32))
    head = model.lm_head.qweight  # tied in the float model; prepare gave the head its own integer weights
    want = head.weight_int.float() * head.weight_scale.repeat_interleave(32, dim=1)
    np.testing.assert_array_equal(got["output.weight"], want.numpy())
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2 and fields["llama.attention.head_count_kv"].contents() == 2
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 256


def test_q8_0_grids_untied_heads_and_copied_tokenizers(tmp_path: Path) -> None:
    model = _llama(QuantSpec(format="q8_0", init="minmax"), tied=False)
    first = export_gguf(model, tmp_path / "a.gguf", embeddings="q8_0")
    second = export_gguf(model, tmp_path / "b.gguf", embeddings="f32", tokenizer_gguf=first)
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(second))
    types = {t.name: t.tensor_type.name for t in a.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["output.weight"] == "Q8_0"  # the untied head is quantized too (it was a QuantLinear)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id"):
        assert a.fields[key].contents() == b.fields[key].contents()
    emb = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(read_gguf_weights(second)["token_embd.weight"], emb)


def test_what_gguf_cannot_hold_exactly_is_refused_by_name(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    f32 = _llama(QuantSpec(bits=4, granularity="channel", init="minmax"))
    with pytest.raises(ConfigError, match="layer 'model.layers.0.self_attn.q_proj': its scales are not float16"):
        export_gguf(f32, out)
    assert not out.exists()
    rounded = read_gguf_weights(export_gguf(f32, out, round_scales=True))["blk.0.ffn_up.weight"]
    up = f32.model.layers[0].mlp.up_proj.qweight
    np.testing.assert_array_equal(rounded, (up.weight_int.float() * up.weight_scale.half().float()[:, None]).numpy())
    out.unlink()
    g16 = _llama(QuantSpec(bits=4, granularity="group", group_size=16, scale_dtype="float16", init="minmax"))
    with pytest.raises(ConfigError, match="group_size=16; GGUF's Q4_0 / Q8_0 blocks hold 32"):
        export_gguf(g16, out)
    asym = _llama(QuantSpec(bits=4, symmetric=False, granularity="channel", scale_dtype="float16", init="minmax"))
    with pytest.raises(ConfigError, match="asymmetric grid"):
        export_gguf(asym, out)
    a4 = _llama(QuantSpec(format="q4_0", init="minmax"), act=QuantSpec(bits=4, init="minmax"))
    with pytest.raises(ConfigError, match="layer 'model.layers.0.self_attn.q_proj' quantizes its inputs"):
        export_gguf(a4, out)
    with pytest.raises(ConfigError, match="embeddings='q4' is not allowed"):
        export_gguf(asym, out, embeddings="q4")
    with pytest.raises(ConfigError, match="LLaMA-architecture"):
        export_gguf(torch.nn.Linear(4, 4), out)
    assert not out.exists()


def test_gguf_formats_fix_their_fields_and_train_float16_scales() -> None:
    spec = QuantSpec(format="q4_0")
    assert (spec.bits, spec.granularity, spec.group_size, spec.scale_dtype, spec.signed) == (4, "group", 32,
                                                                                              "float16", True)
    assert QuantSpec(format="q4_0", bits=4, group_size=32) == spec
    with pytest.raises(ConfigError, match="bits=3 is not allowed: 4, which format 'q4_0' fixes"):
        QuantSpec(format="q4_0", bits=3)
    from lowbit.config import load_recipe

    tiny = Path(__file__).resolve().parents[2] / "recipes" / "llm-tiny.yaml"
    w = load_recipe(tiny, ["quant.weight={format: q4_0}"]).quant.weight  # over the default spec (per channel)
    assert w is not None and w.replace(init="mse") == QuantSpec(format="q4_0")
    with pytest.raises(ConfigError, match="quant.weight.bits=3 is not allowed: 4, which format 'q4_0' fixes"):
        load_recipe(tiny, ["quant.weight={format: q4_0, bits: 3}"])
    with pytest.raises(ConfigError, match="format='q2_k'"):
        QuantSpec(format="q2_k")
    with pytest.raises(ConfigError, match="scale_dtype='half'"):
        QuantSpec(scale_dtype="half")
    from lowbit.quant.quantizer import Quantizer

    q = Quantizer(QuantSpec(bits=4, scale_dtype="float16"), (8, 8))
    with torch.no_grad():
        q.scale.fill_(0.1)  # not a float16 number
    x = torch.randn(8, 8, requires_grad=True)
    y = q(x)
    s16 = torch.tensor(0.1).half().float()
    torch.testing.assert_close(y, torch.clamp(torch.round(x / s16), -8, 7) * s16, rtol=0, atol=0)
    y.sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0  # straight through to the float32 parameter
    assert q.export_qparams()[0] == s16


def test_a_tied_float_head_is_left_to_the_embedding(tmp_path: Path) -> None:
    from lowbit.config import Rule

    args = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4}
    model, _ = load_causal_lm("random-llama", args, seed=0)
    skip_head = [Rule(match="lm_head", skip=True)]
    cfg = QuantConfig(weight=QuantSpec(format="q4_0", init="minmax"), act=None, rules=skip_head)
    model = lowbit.convert(lowbit.prepare(model, cfg, calib=[torch.randint(0, 256, (1, 8))]).eval())
    got = read_gguf_weights(export_gguf(model, tmp_path / "m.gguf", embeddings="f32"))
    assert "output.weight" not in got  # llama.cpp reads the head from token_embd when output.weight is absent
    np.testing.assert_array_equal(got["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy())


def test_cli_exports_an_llm_run_trained_on_q4_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli import main

    # the format replaces the fields it fixes in what the recipe's weight spec (4 bits, per channel) inherits
    args = ["llm-tiny", "quant.weight={format: q4_0, init: minmax}", "qat.steps=2", "text.eval_windows=1"]
    args = ["train", *args, "--runs", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    run = tmp_path / "llm-tiny"
    assert main(["export", str(run), "--format", "gguf"]) == 0
    got = read_gguf_weights(run / "model.gguf")
    up = lowbit.load(run / "model.safetensors").model.layers[1].mlp.up_proj.qweight
    want = up.weight_int.float() * up.weight_scale.repeat_interleave(32, dim=1)
    np.testing.assert_array_equal(got["blk.1.ffn_up.weight"], want.numpy())
    with pytest.raises(SystemExit):  # argparse refuses it, with the choices
        main(["export", str(run), "--format", "gguf", "--embeddings", "q4"])


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("tied", [True, False])
def test_an_embedding_trained_on_a_block_grid_is_written_exactly(tmp_path: Path, kind: str, tied: bool) -> None:
    model = _llama(QuantSpec(format="q4_0", init="minmax"), tied=tied,
                   embedding=QuantSpec(format=kind.lower(), init="minmax"))  # fmt: skip
    path = export_gguf(model, tmp_path / "m.gguf")
    got = read_gguf_weights(path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    emb = model.model.embed_tokens.qweight
    assert types["token_embd.weight"] == kind
    want = emb.weight_int.float() * emb.weight_scale.repeat_interleave(32, dim=1)
    np.testing.assert_array_equal(got["token_embd.weight"], want.numpy())
    np.testing.assert_array_equal(got["token_embd.weight"], model.model.embed_tokens.weight.numpy())
    assert ("output.weight" in got) == (not tied)  # tied: llama.cpp multiplies by token_embd, the trained table


def test_q4_1_blocks_equal_a_naive_packer_and_dequantize_exactly() -> None:
    ints = RNG.integers(0, 16, (3, 64))
    d = RNG.uniform(0.01, 2, (3, 2)).astype(np.float16)
    m = RNG.uniform(-3, 0, (3, 2)).astype(np.float16)
    raw = pack_blocks(ints, d.astype(np.float32), "Q4_1", m.astype(np.float32))
    assert raw.shape == (3, 2 * 20)
    for r in range(3):
        for b in range(2):
            x = ints[r, 32 * b : 32 * (b + 1)]
            want = np.array([d[r, b], m[r, b]], dtype=np.float16).tobytes() + bytes(
                int(x[j]) | (int(x[j + 16]) << 4) for j in range(16))  # fmt: skip
            assert raw[r, 20 * b : 20 * (b + 1)].tobytes() == want
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    want = ints * np.repeat(d.astype(np.float32), 32, 1) + np.repeat(m.astype(np.float32), 32, 1)
    np.testing.assert_array_equal(back, want)


def test_a_model_trained_on_the_q4_1_grid_is_written_exactly(tmp_path: Path) -> None:
    model = _llama(QuantSpec(format="q4_1", init="minmax"), embedding=QuantSpec(format="q4_1", init="minmax"))
    path = export_gguf(model, tmp_path / "m.gguf")
    got = read_gguf_weights(path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    up, emb = model.model.layers[1].mlp.up_proj, model.model.embed_tokens
    assert types["blk.1.ffn_up.weight"] == types["token_embd.weight"] == "Q4_1"
    np.testing.assert_array_equal(got["blk.1.ffn_up.weight"], up.weight.numpy())  # the integer model's weights
    np.testing.assert_array_equal(got["token_embd.weight"], emb.weight.numpy())
    q = _unpermute(got["blk.0.attn_q.weight"], 4)
    np.testing.assert_array_equal(q, model.model.layers[0].self_attn.q_proj.weight.numpy())
    asym = _llama(QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32, scale_dtype="float16"))
    with pytest.raises(ConfigError, match=r"integer zero point.*format: q4_1"):
        export_gguf(asym, tmp_path / "a.gguf")


@pytest.mark.parametrize("embedding", [None, "q4_0"])
def test_llama_cpp_runs_the_file_like_the_integer_model(tmp_path: Path, embedding: str | None) -> None:
    """The real runtime (llama-cpp-python, the optional `runtime` extra; this test alone skips without it):
    llama.cpp quantizes activations to 8 bits per block of 32 in its Q4_0 matmuls, so its logits agree with
    lowbit's integer model within that rounding, not bit for bit (measured on this model: 0.004 of a largest
    logit of 1.4, perplexity within 0.02 %); greedy continuations are identical."""
    emb = QuantSpec(format=embedding, init="minmax") if embedding else None
    model = _llama(QuantSpec(format="q4_0", init="minmax"), embedding=emb)
    _agrees_in_llama_cpp(model, export_gguf(model, tmp_path / "m.gguf"))


def _agrees_in_llama_cpp(model: torch.nn.Module, path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 256, 48)]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=1, verbose=False, seed=0)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95

    def nll(logits: np.ndarray) -> float:
        lp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=1)
        return float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())

    assert abs(np.exp(nll(got)) / np.exp(nll(ref)) - 1) < 0.005
    llm.reset()
    theirs = [t for _, t in zip(range(8), llm.generate(ids[:16], temp=0.0), strict=False)]
    ours = model.generate(torch.tensor([ids[:16]]), max_new_tokens=8, do_sample=False)[0, 16:].tolist()
    assert theirs == ours


def _naive_tq2_0(ints: np.ndarray, d: np.float16) -> bytes:
    """One block_tq2_0 (256 values) as llama.cpp's reference quantizer lays it out: per 128 values, byte m
    holds values m, m+32, m+64, m+96 (code q + 1) from the low bits up; then the float16 scale."""
    out = bytearray()
    for half in range(2):
        x = ints[128 * half : 128 * (half + 1)]
        out += bytes(sum((int(x[m + 32 * n]) + 1) << (2 * n) for n in range(4)) for m in range(32))
    return bytes(out) + np.array([d], dtype=np.float16).tobytes()


def test_tq2_0_blocks_equal_a_naive_packer_and_dequantize_exactly() -> None:
    ints = RNG.integers(-1, 2, (3, 512))
    scales = RNG.uniform(0.01, 2, (3, 2)).astype(np.float16).astype(np.float32)  # one per 256
    raw = pack_blocks(ints, np.repeat(scales, 8, axis=1), "TQ2_0")
    assert raw.shape == (3, 2 * 66)
    for r in range(3):
        for b in range(2):
            want = _naive_tq2_0(ints[r, 256 * b : 256 * (b + 1)], scales[r, b])
            assert raw[r, 66 * b : 66 * (b + 1)].tobytes() == want
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.TQ2_0)
    np.testing.assert_array_equal(back, ints * np.repeat(scales, 256, axis=1))


def _ternary_llama() -> torch.nn.Module:
    """A LLaMA of width 256 with every linear ternary ({-1, 0, 1}·Δ per row, float16 Δ) by ``resiliency``."""
    from lowbit.methods import attach_methods, build_methods

    args = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2}  # fmt: skip
    model, _ = load_causal_lm("random-llama", args, seed=0)
    spec = QuantSpec(bits=2, granularity="channel", scale_dtype="float16", init="minmax")
    model = lowbit.prepare(model, QuantConfig(weight=spec, act=None, rules=(Rule(match="lm_head", skip=True),)))
    attach_methods(build_methods([{"name": "resiliency", "levels": 3}], total_steps=1), model, ["resiliency"])
    return lowbit.convert(model.eval())


def test_llama_cpp_runs_a_q4_1_file_like_the_integer_model(tmp_path: Path) -> None:
    model = _llama(QuantSpec(format="q4_1", init="minmax"), embedding=QuantSpec(format="q4_1", init="minmax"))
    _agrees_in_llama_cpp(model, export_gguf(model, tmp_path / "m.gguf"))


def test_ternary_layers_are_written_as_tq2_0_exactly_and_run_in_llama_cpp(tmp_path: Path) -> None:
    model = _ternary_llama()
    up = model.model.layers[0].mlp.up_proj.qweight
    assert set(up.weight_int.unique().tolist()) == {-1, 0, 1}
    path = export_gguf(model, tmp_path / "t.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {types[f"blk.0.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                  "ffn_up", "ffn_down")} == {"TQ2_0"}  # fmt: skip
    got = read_gguf_weights(path)
    want = up.weight_int.float() * up.weight_scale.reshape(-1, 1)
    np.testing.assert_array_equal(got["blk.0.ffn_up.weight"], want.numpy())
    q4 = read_gguf_weights(export_gguf(model, tmp_path / "q.gguf", ternary=False))
    np.testing.assert_array_equal(q4["blk.0.ffn_down.weight"], got["blk.0.ffn_down.weight"])  # the same values
    assert (tmp_path / "t.gguf").stat().st_size < (tmp_path / "q.gguf").stat().st_size
    _agrees_in_llama_cpp(model, path)


def test_a_float_model_is_written_as_floats_or_round_to_nearest_blocks(tmp_path: Path) -> None:
    """The baselines: a float model's linears as F32, or rounded to Q4_0 by gguf's reference quantizer."""
    args = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4}
    model, _ = load_causal_lm("random-llama", args, seed=0)
    w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    exact = read_gguf_weights(export_gguf(model, tmp_path / "f.gguf", float_linears="f32", embeddings="f32"))
    np.testing.assert_array_equal(exact["blk.0.ffn_up.weight"], w)
    rtn = read_gguf_weights(export_gguf(model, tmp_path / "r.gguf", float_linears="q4_0"))
    q4 = gguf.GGMLQuantizationType.Q4_0
    np.testing.assert_array_equal(rtn["blk.0.ffn_up.weight"], gguf.quants.dequantize(gguf.quants.quantize(w, q4), q4))
    assert not np.array_equal(rtn["blk.0.ffn_up.weight"], w)
    with pytest.raises(ConfigError, match="float_linears='int4'"):
        export_gguf(model, tmp_path / "x.gguf", float_linears="int4")


@pytest.mark.parametrize("lowrank", [None, LowRankSpec(rank=4)])
def test_a_stretched_2_bit_grid_is_written_as_q4_0_exactly(tmp_path: Path, lowrank: LowRankSpec | None) -> None:
    """ParetoQ's zero-free grid (k + 1/2)·s exports as the odd integers ±1, ±3 at s/2: Q4_0 blocks hold them,
    exactly wherever s/2 is a float16 number (not for s below float16's normal range, 1.2e-4: such a layer is
    refused unless round_scales; this random model has one, in v_proj)."""
    spec = QuantSpec(bits=2, stretched=True, granularity="group", group_size=32, scale_dtype="float16", init="lp")
    model = _llama(spec, lowrank)
    with pytest.raises(ConfigError, match="v_proj.*not float16 numbers"):
        export_gguf(model, tmp_path / "refused.gguf")
    path = export_gguf(model, tmp_path / "m.gguf", round_scales=True)
    got = read_gguf_weights(path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    exact = 0
    for i, block in enumerate(model.model.layers):
        for hf, short in (("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"), ("mlp.gate_proj", "ffn_gate")):
            qw = block.get_submodule(hf).qweight
            assert set(qw.weight_int.unique().tolist()) <= {-3, -1, 1, 3}
            assert types[f"blk.{i}.{short}.weight"] == "Q4_0"
            if torch.equal(qw.weight_scale.half().float(), qw.weight_scale):  # s/2 is float16: the file is exact
                np.testing.assert_array_equal(got[f"blk.{i}.{short}.weight"], block.get_submodule(hf).weight.numpy())
                exact += 1
    assert exact >= 3


def test_a_ragged_last_group_is_written_as_its_blocks(tmp_path: Path) -> None:
    """Groups of 64 over 96 inputs (down_proj): the last group is one block of 32 with its own scale."""
    model = _llama(QuantSpec(bits=4, granularity="group", group_size=64, scale_dtype="float16", init="minmax"))
    down = model.model.layers[0].mlp.down_proj
    assert down.qweight.weight_scale.shape == (64, 2)
    got = read_gguf_weights(export_gguf(model, tmp_path / "m.gguf"))
    np.testing.assert_array_equal(got["blk.0.ffn_down.weight"], down.weight.numpy())
