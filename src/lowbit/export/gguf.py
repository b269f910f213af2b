"""GGUF export for llama.cpp: the trained integer grid written block for block, never re-quantized.

``export_gguf(model, path, ...)`` writes a LLaMA-architecture integer model (``lowbit.load`` of an LLM
run, or ``lowbit.convert``'s output) as a GGUF file that llama.cpp loads. Each quantized linear becomes
raw blocks of one GGML type, built from the layer's own integers and scales:

- ``Q4_0`` where every integer lies in −8..7 (4-bit grids, and narrower ones such as 3-bit or binary):
  per block of 32 inputs one float16 scale ``d`` and 16 bytes holding ``q + 8`` two to a byte (the
  block's first 16 values in the low nibbles, the next 16 in the high ones); value ``(nibble − 8)·d``;
- ``Q8_0`` where they lie in −128..127: ``d`` and 32 int8 values;
- ``Q4_1`` for grids trained with ``format: q4_1`` (integers 0..15, ``offset: float16``): per block ``d``,
  the float16 minimum ``m = float16(−d·z)`` and the 16 bytes of ``q`` as Q4_0 lays them out; llama.cpp's
  ``d·q + m`` is lowbit's value. An asymmetric grid with an integer zero point (``s·(q − z)``) is refused:
  its ``−s·z`` is not a float16 number in general;
- ``TQ2_0`` for ternary layers (integers in {−1, 0, 1}, as ``resiliency`` trains at 2 bits) whose rows are
  multiples of 256 with one scale per 256 (per tensor, per channel, or groups of 256k): per block of 256,
  64 bytes of 2-bit codes ``q + 1`` and one float16 scale, 2.06 bits a weight. Other ternary layers are
  ``Q4_0`` (exact too). SmolLM2's width 576 is not a multiple of 256, so only its ``down_proj`` (1536
  inputs) can be TQ2_0. ``Q1_0`` and ``Q2_0`` are not in the installed llama.cpp (0.3.36's) or gguf.

A block's scale is the layer's scale for that block: one per tensor, per output channel, or per group
when the group size is a multiple of 32 (a group of 64 is two blocks with the same scale). The scale must
be a float16 number already (train with ``format: q4_0`` or ``scale_dtype: float16``, which round the
scales in training, so the file's are the trained ones exactly); otherwise the export refuses, naming the
layer, unless ``round_scales`` accepts rounding them (then the file is not exactly the trained model).
Quantized inputs (activation quantization) are refused: the file holds weights, and llama.cpp quantizes
activations itself.

The token embedding, when trained on a grid (``quant.embedding``, e.g. ``format: q8_0`` or ``q4_0``), is
written the same way from its own integers, rows of ``dim`` values; a head tied to it is llama.cpp's
default (no ``output.weight``: llama.cpp multiplies by ``token_embd``), so the file's head is the trained one.

Everything else: the norms in float32; a float token embedding (and an untied output head that stayed
float) as ``F16`` (default), ``F32`` or ``Q8_0`` by gguf's reference quantizer (``embeddings``); linears
that stayed float (or a float model: ``nn.Linear``) as ``float_linears``: ``f16``, ``f32``, or ``q8_0`` /
``q4_0`` / ``q4_1`` by gguf's reference round-to-nearest, which is what ``llama-quantize`` would write (the baseline
that training on the grid is measured against). Query and
key rows are permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved one, as
llama.cpp's own converter does; a row permutation moves whole blocks, so it changes no value.

Tokenizer: the ``tokenizer.*`` fields of the GGUF file the model came from, copied (SmolLM2 ships as
one), or for lowbit's byte-level tokenizer (random LLaMA smoke models) a GPT-2-style BPE vocabulary of
the 256 bytes with one inert merge, which llama.cpp tokenizes byte by byte.

``read_gguf_weights(path)`` dequantizes a GGUF file's tensors with gguf's reference code, for checks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.export.intmodules import IntEmbedding, IntLinear, IntTiedHead
from lowbit.quant.functional import offset_float16

__all__ = ["export_gguf", "read_gguf_weights", "pack_blocks", "EMBEDDING_TYPES", "BLOCK"]

log = logging.getLogger(__name__)

BLOCK = 32  # values per block of Q4_0 and Q8_0
TQ_BLOCK = 256  # values per block of TQ2_0 (ternary), one scale each
RANGES = {"Q4_0": (-8, 7), "Q8_0": (-128, 127)}
EMBEDDING_TYPES = ("f16", "f32", "q8_0", "q4_0", "q4_1")  # of a float table: q* by gguf's round-to-nearest
# Hugging Face LLaMA module names -> llama.cpp tensor names (blk.N. prefix for the decoder layers)
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError('GGUF export needs the gguf package: pip install "lowbit[llm]"') from None
    return gguf


# -- blocks ------------------------------------------------------------------------------------------


def _halves(x: np.ndarray, rows: int, blocks: int) -> np.ndarray:
    """Float16 values as their 2 bytes each, ``(rows, blocks, 2)`` uint8 (a block's ``d`` or ``m``)."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(rows, blocks, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """Blocks of 32 codes 0..15, ``(.., 32)`` -> ``(.., 16)`` bytes: the first 16 in the low nibbles."""
    n = codes.astype(np.uint8)
    return n[..., : BLOCK // 2] | (n[..., BLOCK // 2 :] << 4)


def pack_blocks(ints: np.ndarray, scales: np.ndarray, kind: str, offsets: np.ndarray | None = None) -> np.ndarray:
    """Raw ``Q4_0`` / ``Q8_0`` / ``Q4_1`` / ``TQ2_0`` blocks, ``(rows, bytes per row)`` uint8, of integers
    ``(rows, cols)`` and float16 scales per block of 32 ``(rows, cols / 32)`` (for ``TQ2_0``, equal within
    each 256); ``Q4_1`` also takes the float16 minimum of every block (``offsets``, the same shape).

    - ``Q4_0``: ``d``, then ``q + 8`` two to a byte; ``Q8_0``: ``d``, then 32 int8; ``Q4_1``: ``d``, ``m``,
      then ``q`` (0..15) as Q4_0 lays them out;
    - ``TQ2_0`` (256 values): 64 bytes of 2-bit codes ``q + 1`` (within each 128 values, byte ``m`` holds
      values ``m, m + 32, m + 64, m + 96`` from the low bits up), then ``d`` (llama.cpp's ``block_tq2_0``).
    """
    rows, cols = ints.shape
    if kind == "TQ2_0":
        blocks = cols // TQ_BLOCK
        codes = (ints + 1).astype(np.uint8).reshape(rows, blocks, 2, 4, 32)  # (.., half, n, m)
        body = (codes << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=-2, dtype=np.uint8)
        body = body.reshape(rows, blocks, TQ_BLOCK // 4)
        return np.concatenate([body, _halves(scales[:, :: TQ_BLOCK // BLOCK], rows, blocks)], -1).reshape(rows, -1)
    blocks = cols // BLOCK
    q = ints.reshape(rows, blocks, BLOCK)
    head = [_halves(scales, rows, blocks)]
    if kind == "Q4_1":
        assert offsets is not None
        head.append(_halves(offsets, rows, blocks))
        body = _nibbles(q)
    elif kind == "Q4_0":
        body = _nibbles(q + 8)
    else:
        body = q.astype(np.int8).view(np.uint8)
    return np.concatenate([*head, body], axis=-1).reshape(rows, -1)


def _block_scales(name: str, qw: Any, rows: int, cols: int, round_scales: bool, values: Any = None) -> np.ndarray:
    """The layer's scale (or ``values`` of the scale's shape: Q4_1's minima) of every block of 32 inputs,
    ``(rows, cols / 32)`` float32."""
    s = (qw.weight_scale if values is None else values).detach().float().cpu()
    if qw.granularity == "tensor":
        per_block = s.reshape(1, 1).expand(rows, cols // BLOCK)
    elif qw.granularity == "channel":
        if qw.axis % 2 != 0:
            raise ConfigError(f"layer {name!r}: scales per input channel (axis {qw.axis}) have no GGUF block type")
        per_block = s.reshape(rows, 1).expand(rows, cols // BLOCK)
    else:
        g = int(qw.group_size)
        if g % BLOCK:
            raise ConfigError(f"layer {name!r}: group_size={g}; GGUF's Q4_0 / Q8_0 blocks hold {BLOCK} values "
                              f"with one scale, so groups must be a multiple of {BLOCK} (train with format: q4_0)")
        # a ragged last group (cols not a multiple of g, but of 32) covers only its first blocks
        per_block = s.reshape(rows, -1).repeat_interleave(g // BLOCK, dim=1)[:, : cols // BLOCK]
    out = per_block.contiguous().numpy()
    if not round_scales and not np.array_equal(out.astype(np.float16).astype(np.float32), out):
        raise ConfigError(f"layer {name!r}: its scales are not float16 numbers, and GGUF stores float16 scales: "
                          "train with format: q4_0 (or quant.weight.scale_dtype: float16) so the file holds the "
                          "trained scales exactly, or export with round_scales (--round-scales) to round them")
    return out


def _quantized(
    name: str, layer: IntLinear | IntEmbedding, round_scales: bool, ternary: bool = False
) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None]:
    """(integers (rows, cols), block scales, GGML type name, Q4_1's block minima or None) of an integer
    linear layer or embedding table;
    ``ternary``: ``TQ2_0`` where the integers lie in {-1, 0, 1}, rows are multiples of 256 and each 256
    share a scale (llama.cpp's CPU kernels; else ``Q4_0``, exact too)."""
    qw = layer.qweight
    ints = qw.weight_int.detach().to(torch.int32).cpu().numpy()
    rows, cols = ints.shape
    if qw.weight_zero_point is not None and not qw.offset16:
        raise ConfigError(f"layer {name!r}: an asymmetric grid with an integer zero point, s·(q − z), has no exact "
                          "GGUF type (Q4_1 stores s·q + m with a float16 m): train with format: q4_1, or "
                          "symmetric, e.g. format: q4_0")  # fmt: skip
    if cols % BLOCK:
        raise ConfigError(f"layer {name!r}: {cols} inputs are not a multiple of GGUF's block of {BLOCK}")
    lo, hi = int(ints.min()), int(ints.max())
    if qw.offset16:
        if lo < 0 or hi > 15:
            raise ConfigError(f"layer {name!r}: integers in [{lo}, {hi}]; Q4_1 holds 0..15 (format: q4_1)")
        minima = offset_float16(qw.weight_scale.detach().float(), qw.weight_zero_point.detach().float())
        offsets = _block_scales(name, qw, rows, cols, True, minima)  # float16(−s·z), as the model computes it
        return ints, _block_scales(name, qw, rows, cols, round_scales), "Q4_1", offsets
    kind = next((k for k, (a, b) in RANGES.items() if a <= lo and hi <= b), None)
    if kind is None:
        raise ConfigError(f"layer {name!r}: integers in [{lo}, {hi}] fit no GGUF block type (Q4_0: -8..7, Q8_0: "
                          "-128..127)")  # fmt: skip
    scales = _block_scales(name, qw, rows, cols, round_scales)
    if ternary and lo >= -1 and hi <= 1 and cols % TQ_BLOCK == 0:  # 2.06 bits a weight against Q4_0's 4.5
        per = scales.reshape(rows, cols // TQ_BLOCK, TQ_BLOCK // BLOCK)
        if np.array_equal(per, np.repeat(per[..., :1], TQ_BLOCK // BLOCK, axis=-1)):
            kind = "TQ2_0"
    return ints, scales, kind, None


def _permute_rows(a: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half rows of a query / key projection -> llama.cpp's interleaved rotary rows."""
    return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


# -- the file ----------------------------------------------------------------------------------------


def _tensors(
    model: nn.Module, cfg: Any, embeddings: str, round_scales: bool, float_linears: str, ternary: bool
) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, GGML type or None for plain float) of every tensor llama.cpp reads."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    out: list[tuple[str, np.ndarray, Any]] = []

    def floating(gname: str, t: torch.Tensor | np.ndarray, kind: str) -> None:
        a = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else t
        if kind in ("q8_0", "q4_0", "q4_1"):  # gguf's reference round-to-nearest, as llama-quantize would
            if a.shape[-1] % BLOCK:
                raise ConfigError(f"{gname}: {a.shape[-1]} columns are not a multiple of {BLOCK} for {kind}")
            t_ = getattr(q, kind.upper())
            out.append((gname, gguf.quants.quantize(a, t_), t_))
        else:
            out.append((gname, a.astype(np.float16 if kind == "f16" else np.float32), None))

    def linear(gname: str, hf: str, layer: nn.Module, permute_heads: int | None) -> None:
        if isinstance(layer, nn.Linear) or (isinstance(layer, IntLinear) and not hasattr(layer.qweight, "weight_int")):
            w = (layer.weight if isinstance(layer, nn.Linear) else layer.qweight.weight_float).detach().float()
            w = w.cpu().numpy()
            floating(gname, _permute_rows(w, permute_heads) if permute_heads else w, float_linears)
            return
        if not isinstance(layer, IntLinear):
            raise ConfigError(f"layer {hf!r} is {type(layer).__name__}: export an integer model (lowbit.convert)")
        if layer.qweight.input_quantizer is not None:
            bits = int(layer.qweight.input_quantizer.bits)
            raise ConfigError(f"layer {hf!r} quantizes its inputs ({bits} bits): a GGUF file holds weights only,"
                              " and llama.cpp quantizes activations its own way (8 bits per "
                              "block of 32); train with quant.act: null for llama.cpp")  # fmt: skip
        ints, scales, kind, offsets = _quantized(hf, layer, round_scales, ternary)
        if permute_heads:
            ints, scales = _permute_rows(ints, permute_heads), _permute_rows(scales, permute_heads)
            offsets = None if offsets is None else _permute_rows(offsets, permute_heads)
        out.append((gname, pack_blocks(ints, scales, kind, offsets), getattr(q, kind)))

    decoder = model.model
    emb = decoder.embed_tokens
    if isinstance(emb, IntEmbedding):  # trained on a block grid (quant.embedding): its own integers and scales
        ints, scales, kind, offsets = _quantized("model.embed_tokens", emb, round_scales, ternary)
        out.append(("token_embd.weight", pack_blocks(ints, scales, kind, offsets), getattr(q, kind)))
    else:
        floating("token_embd.weight", emb.weight, embeddings)
    for i, block in enumerate(decoder.layers):
        for hf, short in LAYER_NAMES.items():
            mod = block.get_submodule(hf)
            gname = f"blk.{i}.{short}.weight"
            if short.endswith("norm"):
                out.append((gname, mod.weight.detach().float().cpu().numpy(), None))
            else:
                heads_of = {"attn_q": heads, "attn_k": kv_heads}.get(short)
                linear(gname, f"model.layers.{i}.{hf}", mod, heads_of)
    out.append(("output_norm.weight", decoder.norm.weight.detach().float().cpu().numpy(), None))
    head = model.lm_head
    float_tie = isinstance(head, nn.Linear) and head.weight is getattr(emb, "weight", None)
    tied = isinstance(head, IntTiedHead) or float_tie
    if not tied:  # a tied head is llama.cpp's default: it reads token_embd
        if isinstance(head, IntLinear):
            linear("output.weight", "lm_head", head, None)
        else:
            floating("output.weight", head.weight, embeddings)
    return out


def _byte_vocab(writer: Any, cfg: Any) -> None:
    """GPT-2-style byte-level BPE over the 256 bytes, no merges: lowbit's byte tokenizer (id = byte)."""
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in visible else chr(next(extra)) for b in range(256)}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([chars[b] for b in range(cfg.vocab_size)])
    writer.add_token_types([1] * cfg.vocab_size)
    # llama.cpp requires a merges list and gguf writes no empty array: one merge of bytes 0x00 and 0x01, whose
    # result is no token, so llama.cpp falls back to the two bytes (tokenization stays byte for byte)
    writer.add_token_merges([f"{chars[0]} {chars[1]}"])
    for key, tid in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))


def _copy_tokenizer(writer: Any, source: Path) -> None:
    """Every ``tokenizer.*`` field of the GGUF file ``source``, as it is."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    copied = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub)
        copied += 1
    if not copied:
        raise ConfigError(f"{str(source)!r} has no tokenizer.* fields to copy")


def export_gguf(
    model: nn.Module, path: str | Path, *, name: str = "lowbit", tokenizer_gguf: str | Path | None = None,
    embeddings: str = "f16", round_scales: bool = False, float_linears: str = "f16", ternary: bool = True,
) -> Path:  # fmt: skip
    """Write the integer LLaMA ``model`` to ``path`` as GGUF (module docstring); returns the path. ``ternary``:
    write ternary layers as ``TQ2_0`` where exact (else, and with ``False``, as ``Q4_0``)."""
    gguf = _gguf()
    if embeddings not in EMBEDDING_TYPES:
        raise ConfigError(f"embeddings={embeddings!r} is not allowed: use one of {', '.join(EMBEDDING_TYPES)}")
    if float_linears not in EMBEDDING_TYPES:
        allowed = EMBEDDING_TYPES
        raise ConfigError(f"float_linears={float_linears!r} is not allowed: use one of {allowed}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama" or not hasattr(model, "model") or not hasattr(model, "lm_head"):
        arch = getattr(cfg, "model_type", type(model).__name__)
        raise ConfigError(f"GGUF export writes LLaMA-architecture causal LMs (llama.cpp's 'llama'); got {arch!r}")
    # every refusal before the file is touched
    tensors = _tensors(model, cfg, embeddings, round_scales, float_linears, ternary)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    kinds = {k for _, _, k in tensors if k is not None}
    ftypes = {gguf.GGMLQuantizationType.TQ2_0: "MOSTLY_TQ2_0", gguf.GGMLQuantizationType.Q4_0: "MOSTLY_Q4_0",
              gguf.GGMLQuantizationType.Q4_1: "MOSTLY_Q4_1",
              gguf.GGMLQuantizationType.Q8_0: "MOSTLY_Q8_0"}  # fmt: skip
    ftype = next((v for k, v in ftypes.items() if k in kinds), "MOSTLY_F16" if float_linears == "f16" else "ALL_F32")
    writer.add_file_type(int(getattr(gguf.LlamaFileType, ftype)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf))
    else:
        _byte_vocab(writer, cfg)
    for gname, data, kind in tensors:
        writer.add_tensor(gname, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    size = path.stat().st_size
    log.info("wrote %s (%d tensors, %s, %d bytes)", path, len(tensors), sorted(k.name for k in kinds), size)
    return path


def read_gguf_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, dequantized by gguf's reference code, in (rows, cols) order."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dimensions fastest first
        data = np.asarray(t.data)
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            out[t.name] = data.astype(np.float32).reshape(shape)
        else:
            out[t.name] = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32).reshape(shape)
    return out
