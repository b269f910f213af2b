"""The memory estimator: hand-computed bytes, monotonicity, configs, errors, the CLI, and a real model."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowbit.cli import main
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec, Rule
from lowbit.errors import ConfigError
from lowbit.llm.memory import CONFIGS, METHODS, estimate_training_memory, load_config

# h 8, i 16, 2 layers, 2 heads of 4, 1 kv head, vocab 10, untied.
TINY: dict[str, Any] = dict(
    hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, vocab_size=10, tie_word_embeddings=False,
)  # fmt: skip
# By hand, per layer: (out, in) = q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16
#   weights W = 64 + 32 + 32 + 64 + 128 + 128 + 128 = 576; per-channel scales = 8+4+4+8+16+16+8 = 64
#   rank-2 adapters r·(out+in) = 2·(16 + 12 + 12 + 16 + 24 + 24 + 24) = 256
# float parameters: embeddings 80 + head 80 + norms (2·2 + 1)·8 = 40 -> 200 values
FLOAT_FP32 = 200 * 4
PHI_ORDER = ("int", "fixed_point8", "bf16", "fp32")  # Φ0 storage, smallest first
HAND = {  # (frozen, trainable) bytes at float32, rank 2, fixed_point8 Φ0 (1 byte per weight)
    "lrqat": (2 * 576 * 1 + FLOAT_FP32, 4 * 2 * (64 + 256)),
    "scales_only": (2 * 576 * 1 + FLOAT_FP32, 4 * 2 * 64),
    "qlora": (2 * (576 * (1 + 4) + 64 * 4) + FLOAT_FP32, 4 * 2 * 256),  # int8 + float32 cache, frozen scales
    "full_qat": (0, (2 * 576 + 200) * 4 + 4 * 2 * 64),  # every parameter + the LSQ scales
    "fp32": (0, (2 * 576 + 200) * 4),
    "eval": ((2 * 576 + 200) * 4, 0),
}


@pytest.mark.parametrize("method", sorted(HAND))
def test_weights_gradients_and_adamw_by_hand(method: str) -> None:
    est = estimate_training_memory(TINY, method, rank=2)
    frozen, trainable = HAND[method]
    assert (est["frozen"], est["trainable"]) == (frozen, trainable)
    assert est["gradients"] == trainable  # gradients have the parameters' bytes
    assert est["optimizer"] == 2 * trainable  # AdamW: exp_avg and exp_avg_sq


def test_chunked_loss_and_frozen_embeddings_by_hand() -> None:
    """Chunked loss: one chunk of min(B·(T−1), chunk) positions holds 3 float32 (·, vocab) tensors; with
    frozen embeddings full QAT trains only the linears and scales (200 float values move to frozen)."""
    full = estimate_training_memory(TINY, "lrqat", rank=2, batch=2, seq_len=9)
    assert full["logits"] == 3 * 18 * 10 * 4
    assert estimate_training_memory(TINY, "lrqat", rank=2, batch=2, seq_len=9, loss_chunk=5)["logits"] == 3 * 5 * 10 * 4
    big = estimate_training_memory(TINY, "lrqat", rank=2, batch=2, seq_len=9, loss_chunk=1000)
    assert big["logits"] == 3 * 16 * 10 * 4  # never more than the B·(T−1) scored positions
    qat = estimate_training_memory(TINY, "full_qat", rank=2, train_embeddings=False)
    assert (qat["frozen"], qat["trainable"]) == (FLOAT_FP32, 2 * 576 * 4 + 4 * 2 * 64)
    with pytest.raises(ConfigError, match="loss_chunk"):
        estimate_training_memory(TINY, "lrqat", loss_chunk=0)


def test_phi_storage_group_scales_and_bf16_by_hand() -> None:
    def frozen(phi: str) -> float:
        return estimate_training_memory(TINY, "lrqat", rank=2, phi=phi)["frozen"]

    assert frozen("int") == 2 * 576 // 2 + FLOAT_FP32  # packed 4-bit: half a byte per weight
    assert frozen("bf16") == 2 * 576 * 2 + FLOAT_FP32
    assert frozen("fp32") == 2 * 576 * 4 + FLOAT_FP32
    group = estimate_training_memory(TINY, "lrqat", rank=2, granularity="group", group_size=4)
    assert group["trainable"] == 4 * 2 * (576 // 4 + 256)  # one scale per 4 weights
    bf16 = estimate_training_memory(TINY, "full_qat", dtype=torch.bfloat16)
    assert bf16["trainable"] == (2 * 576 + 200) * 2 + 4 * 2 * 64  # bf16 weights, float32 scales
    assert bf16["optimizer"] == 2 * bf16["trainable"]  # AdamW states take each parameter's dtype


def test_activations_logits_and_peak_by_hand() -> None:
    est = estimate_training_memory(TINY, "lrqat", rank=2, batch=1, seq_len=4)
    n, h, i, ad, probs = 4, 8, 16, 8, 1 * 2 * 4 * 4
    block = 2 * n * h * 4 + (2 * h + ad) * n * 4 + 3 * n * ad * 4 + probs * 4 + 4 * n * i * 4
    assert block == 2176
    activations = 2 * block - n * h * 4 + n * h * 4  # first block's input needs no grad; final norm input
    assert est["activations"] == activations and est["intermediate"] == 0
    assert est["logits"] == 3 * n * 10 * 4
    recompute = 128 * 20  # the largest linear's weight rebuilt and differentiated in backward
    frozen, trainable = HAND["lrqat"]
    assert est["total"] == frozen + trainable + 2 * trainable + max(activations + recompute, 2 * trainable)


def test_full_qat_saves_the_fake_quantized_weights() -> None:
    full = estimate_training_memory(TINY, "full_qat", batch=1, seq_len=4)
    fp32 = estimate_training_memory(TINY, "fp32", batch=1, seq_len=4)
    assert full["intermediate"] == 2 * 576 * (4 + 1)  # Ŵ float32 + 1-byte STE mask, per layer
    assert full["activations"] == fp32["activations"]


def test_more_rank_more_memory() -> None:
    for method in ("lrqat", "qlora"):
        totals = [estimate_training_memory(CONFIGS["llama2-7b"], method, rank=r)["total"] for r in (1, 8, 32, 256)]
        assert totals == sorted(totals) and len(set(totals)) == 4


def test_phi_order_int_fixed_point_bf16_fp32() -> None:
    for key in ("frozen", "total"):
        got = [estimate_training_memory(CONFIGS["llama2-7b"], "lrqat", phi=p)[key] for p in PHI_ORDER]
        assert got[0] < got[1] < got[2] < got[3]


def test_longer_sequences_and_checkpointing() -> None:
    c = CONFIGS["smollm2-135m"]
    short, long = (estimate_training_memory(c, "lrqat", seq_len=s)["activations"] for s in (256, 1024))
    assert long > 4 * short  # attention probabilities grow with seq²
    for m in ("lrqat", "full_qat"):
        plain = estimate_training_memory(c, m, seq_len=1024)
        ckpt = estimate_training_memory(c, m, seq_len=1024, block_checkpointing=True)
        assert ckpt["activations"] < plain["activations"] / 5 and ckpt["total"] < plain["total"]


def test_llama2_7b_near_the_paper() -> None:
    """The paper (METHODS.md §2.4): LR-QAT 20.5 GB, full-model QAT 98.5 GB for LLaMA-2-7B, bf16, seq 1024."""
    kw: dict[str, Any] = dict(batch=1, seq_len=1024, dtype=torch.bfloat16, grad_accumulation=True)
    lrqat = estimate_training_memory(CONFIGS["llama2-7b"], "lrqat", **kw)["total"] / 1e9
    full = estimate_training_memory(CONFIGS["llama2-7b"], "full_qat", **kw)["total"] / 1e9
    assert 18 < lrqat < 24
    assert 75 < full < 105 and full > 3.5 * lrqat


def test_transformers_config_and_json_path(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**CONFIGS["smollm2-135m"])
    assert estimate_training_memory(cfg, "lrqat") == estimate_training_memory(CONFIGS["smollm2-135m"], "lrqat")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIGS["llama2-7b"], "model_type": "llama"}))
    assert load_config(str(path))["hidden_size"] == 4096
    assert load_config("llama2-7b") == CONFIGS["llama2-7b"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(method="lora"), "method"),
        (dict(method="lrqat", phi="fp8"), "phi"),
        (dict(method="lrqat", dtype=torch.float64), "dtype"),
        (dict(method="lrqat", bits=1), "bits"),
        (dict(method="lrqat", rank=0), "rank"),
        (dict(method="lrqat", rank=9), "rank"),  # above the smallest layer dimension (4)
        (dict(method="lrqat", batch=0), "batch"),
        (dict(method="lrqat", granularity="group", group_size=3), "group_size"),
        (dict(method="lrqat", granularity="tensor"), "granularity"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}="):
        estimate_training_memory(TINY, **kwargs)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="config.vocab_size is missing"):
        estimate_training_memory({k: v for k, v in TINY.items() if k != "vocab_size"}, "lrqat")
    with pytest.raises(ConfigError, match="config.hidden_size=0"):
        estimate_training_memory({**TINY, "hidden_size": 0}, "lrqat")
    with pytest.raises(ConfigError, match="llama2-7b"):
        load_config("no-such-model")


def test_cli_table_for_llama2_7b(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama2-7b: batch 1 x seq 1024, bf16 weights, W4 per channel, rank 32")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.split()[0] in METHODS}
    assert set(rows) == set(METHODS)
    lrqat = estimate_training_memory(CONFIGS["llama2-7b"], "lrqat", seq_len=1024, dtype=torch.bfloat16)
    assert rows["lrqat"][-1] == f"{lrqat['total'] / 2**30:.2f}"


def test_cli_bad_value_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dtype='fp16'" in err and "bf16" in err
    assert main(["memory", "--phi", "q4"]) == 2
    assert "phi='q4' is not allowed" in capsys.readouterr().err


class _LiveTensors(TorchDispatchMode):
    """Peak bytes held by storages created under this mode (those of ``known`` tensors excluded)."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.sizes = {t.untyped_storage().data_ptr(): 0 for t in known}
        self.live = self.peak = 0

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.sizes:
                st = t.untyped_storage()
                self.sizes[st.data_ptr()] = st.nbytes()
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, st.data_ptr())
        return out


@pytest.mark.parametrize("method", ["fp32", "full_qat", "lrqat", "qlora"])
def test_estimate_matches_a_real_llama_step(method: str) -> None:
    """Weights exactly, and the step's live-tensor peak within 10%, on a random Hugging Face LLaMA."""
    transformers = pytest.importorskip("transformers")
    import lowbit
    from lowbit.quant import kernels

    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims, attn_implementation="eager"))
    if method != "fp32":  # W4 per channel on the 7 linears of every block; full QAT trains every parameter
        lowrank = {"lrqat": LowRankSpec(rank=4), "qlora": LowRankSpec(rank=4, variant="qlora")}.get(method)
        config = QuantConfig(
            weight=QuantSpec(bits=4, granularity="channel", init="minmax"), act=None,
            rules=(Rule(match="lm_head", skip=True),), lowrank=lowrank, freeze_unquantized=lowrank is not None,
        )  # fmt: skip
        model = lowbit.prepare(model, config)
    est = estimate_training_memory(dims, method, rank=4, batch=2, seq_len=32, foreach=False)  # CPU AdamW loops
    params = list(model.parameters())
    stored = {"phi0", "base_int", "weight"}  # the big buffers (Φ0; qlora's integers and dequantized cache)
    buffers = sum(b.nbytes for n, b in model.named_buffers() if n.split(".")[-1] in stored)
    weights = sum(p.nbytes for p in params) + buffers
    assert weights == est["frozen"] + est["trainable"]

    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    was_fused = kernels._enabled()
    kernels.set_enabled(False)  # the generic fake-quant path (a GPU's), which the estimate models
    try:
        for measured in (False, True):  # the first step allocates the AdamW states
            states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            mode = _LiveTensors(params + list(model.buffers()) + states)
            with mode if measured else torch.enable_grad():
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        kernels.set_enabled(was_fused)
    assert sum(t.nbytes for t in states if t.dim()) == est["optimizer"]  # the 0-d step counters aside
    step = est["total"] - est["frozen"] - est["trainable"] - est["optimizer"]
    assert mode.peak == pytest.approx(step, rel=0.10)
