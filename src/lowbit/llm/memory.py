"""Predict the peak memory of one training step of a LLaMA-shaped model, per training method.

Methods: ``eval`` (inference only), ``fp32`` (full fine-tuning of the float model, held in ``dtype``),
``full_qat`` (LSQ on the 7 linears of every block, every parameter trains), ``lrqat``, ``scales_only``
and ``qlora`` (the low-rank layer kinds of ``lowbit.methods.lrqat``). Sizes: ``h`` hidden, ``i`` intermediate, ``L``
layers, ``a`` heads of size ``d``, ``kv`` key/value heads, ``V`` vocabulary, ``N = batch·seq`` tokens,
``e`` bytes per element of ``dtype``, ``r`` rank; ``W`` the weights of the 7 linears of one block.

Weights. The model's own parameters are held in ``dtype``. lrqat / scales_only store ``Φ0`` at
1 byte per weight (``fixed_point8``), 2 (``bf16``), 4 (``fp32``) or ``bits/8`` packed (``int``);
qlora stores int8 integers plus a cached float32 dequantized weight (1 + 4 bytes). Adapters
``r·(out+in)`` and scales (``out`` per channel, ``out·⌈in/group_size⌉`` per group) are float32. Embeddings,
norms and the head are frozen in lrqat / scales_only / qlora and train in fp32 / full_qat.
Gradients have the bytes of the trainable parameters; AdamW keeps two states like each parameter (as
``torch.optim.AdamW`` does), so float32 adapters cost 16 bytes per value and a bf16 model trained in
full 8 (the paper's 62 GB for checkpointed full QAT of LLaMA-2-7B needs this: fp32 states would not fit).

Activations saved for backward by one Hugging Face ``LlamaDecoderLayer`` in eager attention (checked
tensor by tensor against transformers 5.23; ``P = batch·a·seq²`` attention probabilities):

- ``2·N·h·4``: the inputs of the two RMSNorms, upcast to float32 (not saved in the first block when
  the embeddings are frozen, as its input needs no gradient);
- ``2·N·h·e``: the normalised inputs, only when the norm weights train (fp32, full_qat);
- ``2·N·h·e + N·a·d·e``: the norm outputs and the attention output, inputs of the linears (LR-QAT's
  checkpoint keeps them to recompute its weights);
- ``3·N·a·d·e``: q and the head-repeated k and v (``repeat_kv``) of the two attention matmuls;
- ``P·4`` (+ ``P·e`` when ``e != 4``): the float32 softmax output and its cast back to ``dtype``;
- ``4·N·i·e``: gate output, SiLU output, up output and their product;
- qlora: ``7·N·r·4``, the ``B·x`` of each adapter; full_qat: ``W·(e+1)``, the fake-quantized weight
  (the "intermediate results" of the paper) and the STE mask, kept by each linear.

After the last block: the final norm's float32 input ``N·h·4`` (plus ``2·N·h·e`` when norm and head
train). With ``block_checkpointing`` the blocks keep only their inputs ``L·N·h·e`` and the causal mask
``batch·seq²·e``, and one block's activations are recomputed at a time during backward.

Logits: ``3·N·V·4`` at the start of backward (saved log-softmax, the NLL gradient and the log-softmax
gradient, float32 whatever ``dtype``). Temporaries, in the total only: the backward of one linear
recomputes and differentiates its weight, about 20 bytes per weight of the largest linear for lrqat,
12 for scales_only and ``5·e`` for full_qat (measured with a live-tensor tracker); AdamW's foreach
step (torch's default on GPU) needs one copy of the trainable parameters, its for-loop step
(``foreach=False``, the CPU default) two copies of the largest parameter.

``eval`` is a ``no_grad`` forward with Hugging Face's default ``use_cache=True``: the weights, the KV
cache ``2·L·N·kv·d·e``, and the larger of one block's tensors (bounded by the training set above) and
the logits ``N·V·e``.

``total`` is the peak of a steady-state step (optimizer states already allocated, gradients set to
None before the forward): weights + optimizer + max(activations + max(logits, recomputed block +
temporary), gradients + step temporary). Activations are freed as gradients arrive, so the two never
add up in full. With ``grad_accumulation=True`` gradients are alive during the forward and the
backward too, so they add to the activations (the paper's setup, 8 accumulation steps). Not counted:
the CUDA context, allocator caching and fragmentation, kernel workspaces, the data loader; buffers under
1 KB per layer (quantizer flags, rotary frequencies); in full training with block checkpointing, the
overlap of the recomputed first block with nearly all gradients at the end of backward (+12% on the step
in ``benchmarks/results/memory.md``, where the for-loop AdamW makes the gradient phase the peak).

FSDP over ``devices = D > 1``: PyTorch FSDP2 ``fully_shard`` with its defaults, one unit per decoder block
and one for the root (the rest: embeddings, final norm, head), as ``lowbit.distributed.shard_model`` applies
it; ``D = 1`` is no FSDP (``shard_model`` leaves a world of one alone), the model above exactly. Every entry
is then per device. Each device runs its own ``batch`` (``batch`` is the per-device batch), so the
activations, the saved Ŵ, the logits, the KV cache and the backward's temporaries do not change with D.
Three kinds of bytes:

- sharded, ``1/D`` on each device: every *parameter*, frozen or trainable: float weights, embeddings,
  norms, head, LSQ and LR-QAT scales, adapters, QLoRA's frozen scales, and LR-QAT's Φ0, which
  ``lowbit.methods.lrqat`` holds as a frozen parameter (``requires_grad=False``) so that FSDP shards it;
  the gradients of the trainable ones (FSDP reduce-scatters a block's gradients once its backward is done,
  also between accumulation steps, so accumulated gradients are shards too); AdamW's two states (the
  optimizer steps the local shards, so its step temporaries are ``1/D`` as well). FSDP splits dim 0 and
  pads it to a multiple of D; the padding (under D rows per tensor) is ignored, so these are exactly ``1/D``;
- replicated, whole on each device: buffers, which ``fully_shard`` moves but does not shard: QLoRA's int8
  integers and cached float32 weight (``5·W`` per block);
- unsharded transients, the ``unsharded`` entry (its value in the blocks' backward). A block's parameters
  (frozen and trainable, in their stored dtype: no mixed-precision policy) are all-gathered while the block
  runs forward or backward, and FSDP2 prefetches the next block's: two blocks' parameters. In backward a
  block's unsharded gradients live until its reduce-scatter, and the previous block's reduce-scatter input
  (a copy of its unsharded gradients) is kept until then (``reduce_scatter_max_input_buffers=1``): two
  blocks' gradients. The root unit ``(V·h·(2-tied) + h)·e`` is gathered for the whole step, not only while
  the head runs: FSDP2 does not reshard the root after forward (``reshard_after_forward=None`` means False
  for the root) and reshards it, and reduce-scatters its gradients, only in its final callback after
  backward. When the root trains (fp32, full_qat with ``train_embeddings``), its unsharded head and
  final-norm gradients ``(V·h + h)·e`` are alive from the loss's backward on, and the embedding gradient
  joins them at the end.

Peak for ``D > 1``: ``(weights - replicated)/D + replicated + 3·trainable/D + max(activation phase,
gradient phase)``. Activation phase: ``kept + accumulated gradients/D + root + head gradients +
max(logits + 1 block's parameters (prefetched by the head's backward), recomputed + temporary + 2 blocks'
parameters + 2 blocks' gradients)``. Gradient phase: ``trainable/D + max(step temporary/D, root + root
gradients)``, the end of backward before the final callback, then the step on the shards. ``eval``:
``weights/D + replicated + KV cache + root + max(block + 2 blocks' parameters, logits)``. Also not counted
under FSDP: the flat all-gather output and reduce-scatter input while they are copied from or to the
per-tensor ones (a second copy of one block for a moment), the communication library's buffers, and the
caching allocator's per-stream pools. FSDP can so cost memory where little is sharded: the gathered root
and blocks come on top of their shards, and qlora (its weights are replicated buffers) or scales_only on a
model with a large vocabulary (llama3.2-1b) can need more at D = 2 than on one device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowbit.config import PHI_STORAGES as PHI_KINDS
from lowbit.errors import ConfigError

__all__ = ["CONFIGS", "METHODS", "estimate_training_memory", "load_config"]

METHODS = ("eval", "fp32", "full_qat", "lrqat", "scales_only", "qlora")
CONFIGS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_DTYPES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_RECOMPUTE_BYTES = {"lrqat": 20.0, "scales_only": 12.0}  # per weight of the largest linear, float32 copies


def load_config(name: str) -> dict[str, Any]:
    """A built-in config (a key of ``CONFIGS``: ``llama2-7b``, ``llama2-13b``, ``llama3.2-1b``, ``smollm2-135m``)
    or a Hugging Face ``config.json`` path."""
    if name in CONFIGS:
        return dict(CONFIGS[name])
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"config={name!r} is not allowed: use one of {', '.join(CONFIGS)} or a config.json path")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"config={name!r} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config={name!r} holds {type(data).__name__}: use a JSON object")
    return data


def _field(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    if value is None and default is None:
        raise ConfigError(f"config.{key} is missing: a LLaMA config needs {', '.join(_REQUIRED)}")
    return value


def _dims(config: Any) -> dict[str, int]:
    d = {k: _field(config, k) for k in _REQUIRED}
    d["num_key_value_heads"] = _field(config, "num_key_value_heads", d["num_attention_heads"])
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"config.{k}={v!r} is not allowed: use a positive integer")
    head_dim = _field(config, "head_dim", False) or d["hidden_size"] // d["num_attention_heads"]
    return {**d, "head_dim": int(head_dim), "tied": int(bool(_field(config, "tie_word_embeddings", False)))}


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def estimate_training_memory(
    config: Any,
    method: str,
    *,
    bits: int = 4,
    rank: int = 32,
    phi: str = "fixed_point8",
    granularity: str = "channel",
    group_size: int | None = None,
    batch: int = 1,
    seq_len: int = 512,
    dtype: torch.dtype = torch.float32,
    block_checkpointing: bool = False,
    grad_accumulation: bool = False,
    foreach: bool = True,
    loss_chunk: int | None = None,
    train_embeddings: bool = True,
    devices: int = 1,
) -> dict[str, float]:
    """Bytes of one training step of ``method`` (see the module docstring for the model).

    Returns ``frozen``, ``trainable``, ``gradients``, ``optimizer``, ``activations`` (incl. one
    recomputed block), ``intermediate`` (full_qat's saved fake-quantized weights), ``logits``, ``unsharded``
    (FSDP's gathered units) and ``total``, the step's peak (not the sum: gradients and activations are not
    all alive at once).

    ``loss_chunk``: tokens per chunk of ``lowbit.tasks.text.causal_lm_loss`` (head and loss recomputed per
    chunk, so only one chunk's logits live at a time); None is the full logits of a plain loss.
    ``train_embeddings=False``: fp32 / full_qat train the 7 linears (and scales) only, embeddings,
    head and norms frozen, as ``lowbit train`` and ``benchmarks/lrqat.py`` do.
    ``devices``: FSDP over that many devices (1: none); every entry is then per device, and ``unsharded``
    holds FSDP's gathered root and blocks (0 on one device).
    """
    c = _dims(config)
    _check(method in METHODS, "method", method, f"use one of {', '.join(METHODS)}")
    _check(phi in PHI_KINDS, "phi", phi, f"use one of {', '.join(PHI_KINDS)}")
    _check(dtype in _DTYPES, "dtype", dtype, "use torch.float32, torch.bfloat16 or torch.float16")
    ints = (("bits", bits, 2), ("rank", rank, 1), ("batch", batch, 1), ("seq_len", seq_len, 1), ("devices", devices, 1))
    for name, value, low in ints:
        _check(
            isinstance(value, int) and not isinstance(value, bool) and value >= low, name, value, f"use an int >= {low}"
        )
    _check(bits <= 8, "bits", bits, "use 2..8")
    _check(
        loss_chunk is None or (isinstance(loss_chunk, int) and not isinstance(loss_chunk, bool) and loss_chunk >= 1),
        "loss_chunk", loss_chunk, "None (full logits) or an int >= 1",
    )  # fmt: skip
    _check(granularity in ("channel", "group"), "granularity", granularity, "use 'channel' or 'group'")
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    ad, kvd = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = [(ad, h), (kvd, h), (kvd, h), (h, ad), (i, h), (i, h), (h, i)]  # (out, in) of q k v o gate up down
    if granularity == "group":
        ok = isinstance(group_size, int) and not isinstance(group_size, bool) and group_size > 0
        _check(ok, "group_size", group_size, "a positive integer (a last group the inputs do not fill is ragged)")
    else:
        _check(group_size is None, "group_size", group_size, "None unless granularity='group'")
    _check(
        method not in ("lrqat", "qlora") or rank <= min(min(s) for s in shapes),
        "rank",
        rank,
        f"use 1..{min(min(s) for s in shapes)} for this config",
    )
    e = _DTYPES[dtype]
    weights = sum(o * n for o, n in shapes)  # W: weights of the 7 linears of one block
    g = group_size if granularity == "group" else None
    scales = sum(o * (-(-n // g) if g else 1) for o, n in shapes)  # (out,) per channel, (out, ⌈in / g⌉) per group
    adapters = sum(rank * (o + n) for o, n in shapes)
    floats = (vocab * h * (2 - c["tied"]) + (2 * layers + 1) * h) * e  # embeddings, head, norms
    if method in ("eval", "fp32", "full_qat"):
        params = layers * weights * e + floats
        frozen = params if method == "eval" else 0
        trainable = 0 if method == "eval" else params + 4 * layers * scales * (method == "full_qat")
        if method != "eval" and not train_embeddings:
            frozen, trainable = floats, trainable - floats
    elif method == "qlora":  # int8 integers + cached float32 weight; frozen float32 scales
        frozen, trainable = layers * (5 * weights + 4 * scales) + floats, 4 * layers * adapters
    else:
        if phi == "int":
            phi0 = sum((o * n * bits + 7) // 8 for o, n in shapes)  # packed per layer
        else:
            phi0 = weights * {"fixed_point8": 1, "bf16": 2, "fp32": 4}[phi]
        frozen = layers * phi0 + floats
        trainable = 4 * layers * (scales + (adapters if method == "lrqat" else 0))
    # FSDP (devices > 1): buffers whole on each device, the rest sharded; the root and block units unsharded
    replicated = layers * 5 * weights if method == "qlora" else 0  # QLoRA's integers and cache are buffers
    root = (vocab * h * (2 - c["tied"]) + h) * e  # embeddings, head (untied), final norm
    root_trains = method in ("fp32", "full_qat") and train_embeddings
    block_params = (frozen + trainable - root - replicated) // layers  # exact: the rest is per block
    block_grads = (trainable - root * root_trains) // layers
    head_grad = (vocab * h + h) * e * root_trains  # head (or tied embedding) and final norm gradients

    n_tok, probs = batch * seq_len, batch * c["num_attention_heads"] * seq_len**2
    norms_train = method in ("eval", "fp32", "full_qat") and train_embeddings
    block = (
        2 * n_tok * h * 4  # RMSNorm inputs, float32
        + 2 * n_tok * h * e * norms_train  # normalised inputs (norm weights train)
        + (2 * h + ad) * n_tok * e  # inputs of the linears
        + 3 * n_tok * ad * e  # q, repeated k and v
        + probs * (4 + (e if e != 4 else 0))  # softmax (float32) and its cast
        + 4 * n_tok * i * e  # MLP: gate, SiLU, up, product
        + 7 * n_tok * rank * 4 * (method == "qlora")  # adapters' B·x
    )
    intermediate_block = weights * (e + 1) if method == "full_qat" else 0
    live = n_tok if loss_chunk is None else min(n_tok, batch * (seq_len - 1), loss_chunk)
    logits = (n_tok * vocab * e) if method == "eval" else 3 * live * vocab * 4
    out = {
        "frozen": float(frozen),
        "trainable": float(trainable),
        "gradients": float(trainable),
        "optimizer": 2.0 * trainable,
        "logits": float(logits),
    }
    if devices > 1:  # per device: the parameters, their gradients and AdamW's states are 1/devices shards
        out.update(frozen=(frozen - replicated) / devices + replicated, trainable=trainable / devices)
        out.update(gradients=out["trainable"], optimizer=2 * out["trainable"])
    if method == "eval":  # no_grad: the KV cache, plus one block's tensors at a time or the logits
        kv_cache = 2 * layers * n_tok * kvd * e
        out.update(activations=float(kv_cache + block), intermediate=0.0, unsharded=0.0)
        if devices == 1:
            out["total"] = float(frozen + kv_cache + max(block, logits))
        else:  # the root gathered throughout, two blocks' parameters while the blocks run
            out["unsharded"] = float(root + 2 * block_params)
            out["total"] = out["frozen"] + kv_cache + root + max(block + 2 * block_params, logits)
        return out
    head = n_tok * h * 4 + 2 * n_tok * h * e * norms_train  # final norm input (+ its output and normalised)
    if block_checkpointing:
        kept, recomputed = layers * n_tok * h * e + batch * seq_len**2 * e + head, block + intermediate_block
        intermediate = intermediate_block
    else:
        first = 0 if norms_train else n_tok * h * 4  # frozen embeddings: the first block's input needs no grad
        kept, recomputed = layers * block - first + head + layers * intermediate_block, 0
        intermediate = layers * intermediate_block
    largest = max(o * n for o, n in shapes)
    temporary = largest * (_RECOMPUTE_BYTES.get(method, 0.0) + 5 * e * (method == "full_qat"))
    if foreach:  # torch's foreach AdamW: one temporary copy of all trainable parameters
        step_temporary = trainable
    elif method in ("fp32", "full_qat"):  # the for-loop AdamW: two temporaries of the largest parameter
        step_temporary = 2 * max(vocab * h, largest) * e
    else:
        step_temporary = 2 * 4 * max(rank * max(max(s) for s in shapes) * (method != "scales_only"), scales)  # tiny
    grads_during_backward = trainable if grad_accumulation else 0
    out.update(activations=float(kept + recomputed - intermediate), intermediate=float(intermediate), unsharded=0.0)
    if devices == 1:
        dynamic = max(
            kept + max(logits, recomputed + temporary) + grads_during_backward,
            trainable + step_temporary,  # gradients + the optimizer step's temporaries
        )
        out["total"] = float(frozen + trainable + 2 * trainable + dynamic)
        return out
    units = 2 * (block_params + block_grads)  # this block and the prefetched one; this one's and the last's grads
    backward = max(logits + block_params, recomputed + temporary + units)  # head (last block prefetched), blocks
    activation_phase = kept + grads_during_backward / devices + root + head_grad + backward
    # the end of backward (the root and its gradients, before the final callback), then the step on the shards
    gradient_phase = trainable / devices + max(step_temporary / devices, root + root * root_trains)
    out["unsharded"] = float(root + head_grad + units)
    out["total"] = out["frozen"] + 3 * out["trainable"] + max(activation_phase, gradient_phase)
    return out
