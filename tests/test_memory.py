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
        (dict(method="lrqat", granularity="group", group_size=0), "group_size"),
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


# Today's single-device figures (frozen, trainable, activations, intermediate, logits, total), printed by the
# estimator as it was before FSDP (commit c055558): devices=1 must give them exactly.
SETTINGS: dict[str, dict[str, Any]] = {
    "paper": dict(batch=1, seq_len=1024, dtype=torch.bfloat16, grad_accumulation=True),  # the 20.5 GB figure
    "default": dict(),
    "ckpt": dict(batch=2, seq_len=256, block_checkpointing=True, foreach=False, loss_chunk=128,
                 train_embeddings=False, phi="int", bits=3),
}  # fmt: skip
TODAY = {
    ("paper", "llama2-7b", "eval"): (13476831232, 0, 929038336, 0, 65536000, 14405869568),
    ("paper", "llama2-7b", "fp32"): (0, 13476831232, 12582912000, 0, 393216000, 67384156160),
    ("paper", "llama2-7b", "full_qat"): (0, 13482270720, 12582912000, 19428016128, 393216000, 86390898688),
    ("paper", "llama2-7b", "lrqat"): (7000825856, 325255168, 12012486656, 0, 393216000, 21216108544),
    ("paper", "llama2-7b", "scales_only"): (7000825856, 5439488, 12012486656, 0, 393216000, 19576135680),
    ("paper", "llama2-7b", "qlora"): (32910286848, 319815680, 12041846784, 0, 393216000, 46624612352),
    ("paper", "smollm2-135m", "eval"): (269030016, 0, 106954752, 0, 100663296, 393286272),
    ("paper", "smollm2-135m", "fp32"): (0, 269030016, 2505572352, 0, 603979776, 4185672192),
    ("paper", "smollm2-135m", "full_qat"): (0, 269652096, 2505572352, 318504960, 603979776, 4506665472),
    ("paper", "smollm2-135m", "lrqat"): (162861696, 39697920, 2430074880, 0, 603979776, 3355708032),
    ("paper", "smollm2-135m", "scales_only"): (162861696, 622080, 2430074880, 0, 603979776, 3199404672),
    ("paper", "smollm2-135m", "qlora"): (588157056, 39075840, 2457600000, 0, 603979776, 3806040192),
    ("default", "llama2-7b", "eval"): (26953662464, 0, 744488960, 0, 65536000, 27698151424),
    ("default", "llama2-7b", "fp32"): (0, 26953662464, 6668943360, 0, 196608000, 134768312320),
    ("default", "llama2-7b", "full_qat"): (0, 26959101952, 6668943360, 32380026880, 196608000, 134795509760),
    ("default", "llama2-7b", "lrqat"): (7525646336, 325255168, 6106906624, 0, 196608000, 15510093824),
    ("default", "llama2-7b", "scales_only"): (7525646336, 5439488, 6106906624, 0, 196608000, 14189936640),
    ("default", "llama2-7b", "qlora"): (33435107328, 319815680, 6121586688, 0, 196608000, 40712749056),
    ("default", "smollm2-135m", "eval"): (538060032, 0, 57409536, 0, 100663296, 662316288),
    ("default", "smollm2-135m", "fp32"): (0, 538060032, 1018036224, 0, 301989888, 2934206208),
    ("default", "smollm2-135m", "full_qat"): (0, 538682112, 1018036224, 530841600, 301989888, 3466914048),
    ("default", "smollm2-135m", "lrqat"): (219555072, 39697920, 943718400, 0, 301989888, 1584357120),
    ("default", "smollm2-135m", "scales_only"): (219555072, 622080, 943718400, 0, 301989888, 1467129600),
    ("default", "smollm2-135m", "qlora"): (644850432, 39075840, 957480960, 0, 301989888, 2021548800),
    ("ckpt", "llama2-7b", "eval"): (26953662464, 0, 710934528, 0, 65536000, 27664596992),
    ("ckpt", "llama2-7b", "fp32"): (1049640960, 25904021504, 451411968, 0, 49152000, 105714302976),
    ("ckpt", "llama2-7b", "full_qat"): (1049640960, 25909460992, 451411968, 1011875840, 49152000, 105736060928),
    ("ckpt", "llama2-7b", "lrqat"): (3478142976, 325255168, 451411968, 0, 49152000, 5807095808),
    ("ckpt", "llama2-7b", "scales_only"): (3478142976, 5439488, 451411968, 0, 49152000, 4486938624),
    ("ckpt", "llama2-7b", "qlora"): (33435107328, 319815680, 451870720, 0, 49152000, 34846425088),
    ("ckpt", "smollm2-135m", "eval"): (538060032, 0, 50331648, 0, 100663296, 662316288),
    ("ckpt", "smollm2-135m", "fp32"): (113386752, 424673280, 63832064, 0, 75497472, 2038572288),
    ("ckpt", "smollm2-135m", "full_qat"): (113386752, 425295360, 63832064, 17694720, 75497472, 2041060608),
    ("ckpt", "smollm2-135m", "lrqat"): (153199872, 39697920, 63832064, 0, 75497472, 384884480),
    ("ckpt", "smollm2-135m", "scales_only"): (153199872, 622080, 63832064, 0, 75497472, 267656960),
    ("ckpt", "smollm2-135m", "qlora"): (644850432, 39075840, 64290816, 0, 75497472, 874668800),
}
BUILTIN = ("llama2-7b", "smollm2-135m")


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("config", BUILTIN)
def test_one_device_is_the_single_device_model_exactly(setting: str, config: str) -> None:
    for method in METHODS:
        for kw in ({}, {"devices": 1}):
            est = estimate_training_memory(CONFIGS[config], method, **SETTINGS[setting], **kw)
            got = tuple(est[k] for k in ("frozen", "trainable", "activations", "intermediate", "logits", "total"))
            assert got == TODAY[setting, config, method], (method, kw)
            assert est["gradients"] == est["trainable"] and est["optimizer"] == 2 * est["trainable"]
            assert est["unsharded"] == 0


def _replicated(config: dict[str, Any], method: str) -> int:
    """QLoRA's int8 integers and float32 cache, 5 bytes per weight of the 7 linears: buffers, not sharded."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    ad = h  # head_dim · heads
    kvd = config["num_key_value_heads"] * h // config["num_attention_heads"]
    weights = 2 * ad * h + 2 * kvd * h + 3 * i * h
    return layers * 5 * weights if method == "qlora" else 0


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fsdp_shards_divide_by_n_and_the_rest_stays(config: str) -> None:
    c = CONFIGS[config]
    for method in METHODS:
        one = estimate_training_memory(c, method, **SETTINGS["paper"])
        rep = _replicated(c, method)
        gathered = None
        for n in (2, 4, 8):
            est = estimate_training_memory(c, method, devices=n, **SETTINGS["paper"])
            for key in ("trainable", "gradients", "optimizer"):  # sharded: exactly 1/N (padding ignored)
                assert est[key] * n == one[key], (method, n, key)
            assert (est["frozen"] - rep) * n == one["frozen"] - rep, (method, n)  # buffers stay whole
            for key in ("activations", "intermediate", "logits"):  # each device runs its own batch
                assert est[key] == one[key], (method, n, key)
            assert est["unsharded"] > 0 and gathered in (None, est["unsharded"])  # a root and blocks, any N
            gathered = est["unsharded"]


def _on(config: str, method: str, devices: int, setting: str) -> dict[str, float]:
    return estimate_training_memory(CONFIGS[config], method, devices=devices, **SETTINGS[setting])


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_fsdp_totals_fall_with_n_but_not_below_the_unsharded_part(setting: str) -> None:
    for config in CONFIGS:
        for method in METHODS:
            ests = [_on(config, method, n, setting) for n in (2, 4, 8)]
            totals = [e["total"] for e in ests]
            assert totals[0] > totals[1] > totals[2], (config, method)
            for e in ests:  # what no N shards: the activations and the gathered root and blocks
                assert e["total"] >= e["activations"] + e["unsharded"], (config, method)


def test_fsdp_from_one_to_two_devices() -> None:
    """Sharding saves memory for every built-in model and method at the paper's setting, except QLoRA on a
    model with a large vocabulary: its weights are replicated buffers, and the root FSDP gathers for the
    whole step (128256 x 2048 bf16 embeddings) comes on top of its shard."""
    for config in CONFIGS:
        for method in METHODS:
            one, two = (_on(config, method, n, "paper")["total"] for n in (1, 2))
            assert (two > one) == ((config, method) == ("llama3.2-1b", "qlora")), (config, method, one, two)


def test_fsdp_by_hand() -> None:
    """TINY, rank 2, batch 1 x seq 4, float32, 2 devices (the single-device terms as in the tests above)."""
    kw: dict[str, Any] = dict(rank=2, batch=1, seq_len=4, devices=2)
    root = (10 * 8 * 2 + 8) * 4  # embeddings, head, final norm: gathered for the whole step
    # lrqat: Φ0 (a frozen parameter) + norms + float32 scales and adapters of one block, unsharded
    block = 576 * 1 + 2 * 8 * 4 + 4 * (64 + 256)
    grads = 4 * (64 + 256)
    frozen, trainable = HAND["lrqat"]
    units = 2 * block + 2 * grads  # the running block and the prefetched one; its gradient and the last's
    kept, recompute, logits = 2 * 2176, 128 * 20, 3 * 4 * 10 * 4
    est = estimate_training_memory(TINY, "lrqat", **kw)
    assert (est["frozen"], est["trainable"], est["unsharded"]) == (frozen / 2, trainable / 2, root + units)
    backward = max(logits + block, recompute + units)
    assert est["total"] == frozen / 2 + 3 * trainable / 2 + max(kept + root + backward, trainable / 2 + trainable / 2)
    # fp32: the root trains, so its head and final-norm gradients (80 + 8 values) stay unsharded in backward
    # and at its end all root gradients meet the root; the whole model's gradients are 1/2
    block = grads = 576 * 4 + 2 * 8 * 4
    head_grad = (80 + 8) * 4
    trainable = HAND["fp32"][1]
    kept = 2 * (2176 + 2 * 4 * 8 * 4) + 4 * 8 * 4 + 2 * 4 * 8 * 4  # normalised inputs, final norm's terms
    units = 2 * block + 2 * grads
    est = estimate_training_memory(TINY, "fp32", **kw)
    assert est["unsharded"] == root + head_grad + units
    backward = max(logits + block, units)
    phases = max(kept + root + head_grad + backward, trainable / 2 + max(trainable / 2, 2 * root))
    assert est["total"] == 3 * trainable / 2 + phases
    # qlora: the int8 integers and float32 cache (5 bytes per weight) are buffers, whole on each device
    frozen = HAND["qlora"][0]
    qlora = estimate_training_memory(TINY, "qlora", **kw)
    assert qlora["frozen"] == (frozen - 2 * 5 * 576) / 2 + 2 * 5 * 576
    # eval: weights halved, the KV cache, the root, then a block's tensors with two blocks' weights
    ev = estimate_training_memory(TINY, "eval", **kw)
    kv_cache, eval_block = 2 * 2 * 4 * 4 * 4, 2176 + 2 * 4 * 8 * 4
    assert ev["total"] == HAND["eval"][0] / 2 + kv_cache + root + max(eval_block + 2 * block, 4 * 10 * 4)


@pytest.mark.parametrize("devices", [0, -1, 2.5, True, "2", None])
def test_bad_devices_name_the_field(devices: Any) -> None:
    with pytest.raises(ConfigError, match=r"^devices=.* is not allowed: use an int >= 1"):
        estimate_training_memory(TINY, "lrqat", devices=devices)


def test_new_configs_have_the_published_parameter_counts() -> None:
    counts = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama3.2-1b": 1_235_814_400,
              "smollm2-135m": 134_515_008}  # fmt: skip
    for name, count in counts.items():
        assert estimate_training_memory(load_config(name), "fp32")["trainable"] == 4 * count  # float32 bytes


def test_cli_per_device_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--devices", "4", "--unit", "GB", "--method", "lrqat", "--grad-accumulation"]) == 0
    out = capsys.readouterr().out
    assert "FSDP over 4 devices (GB per device)" in out.splitlines()[0]
    assert out.splitlines()[1].split()[-3:] == ["(peak)", "per", "device"]
    row = next(line.split() for line in out.splitlines() if line.split()[0] == "lrqat")
    est = estimate_training_memory(
        CONFIGS["llama2-7b"], "lrqat", seq_len=1024, dtype=torch.bfloat16, grad_accumulation=True, loss_chunk=256,
        devices=4,
    )  # fmt: skip
    assert row[-1] == f"{est['total'] / 1e9:.2f}" and row[-2] == f"{est['unsharded'] / 1e9:.2f}"
    assert main(["memory", "--method", "lrqat"]) == 0
    assert "per device" not in capsys.readouterr().out  # one device: no FSDP
    assert main(["memory", "--devices", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "devices=0 is not allowed" in err
    assert main(["memory", "--unit", "MB"]) == 2
    assert "--unit='MB' is not allowed" in capsys.readouterr().err


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
