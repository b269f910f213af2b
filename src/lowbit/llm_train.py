"""Weight-only QAT of a causal language model from a recipe: ``lowbit train smollm2-lrqat-w4``.

A recipe with an ``llm`` section (``config.LLMConfig``) runs here instead of the vision loop:

1. load the model and its tokenizer (SmolLM2-135M offline, a random LLaMA for smoke runs, or a local
   Hugging Face folder), tokenize the training corpus and hold out its tail, score the float model;
2. quantize the target linears (LR-QAT, scales-only, full QAT, or round-to-nearest with no training)
   and score step 0;
3. train (``llm.LMTrainer``: AdamW, warm-up then linear decay, clipping), scoring every ``eval_every``
   steps and checkpointing every ``checkpoint_every`` steps (``--resume`` continues bit-exactly);
4. merge into an integer model (``lrqat.merge`` / ``api.convert``), score it (its perplexity equals the
   fake-quant model's), save it with the tokenizer beside it (``lowbit generate RUN "prompt"``), and
   write ``summary.json`` and the HTML report.

``metrics.jsonl`` rows: ``float`` (step 0), ``qat`` (step 0 = before training, then every evaluation)
and ``final`` (the integer model), each with ``test_perplexity`` (held-out part of the corpus),
``test_loss`` (its log) and ``other_perplexity`` (the other corpus), plus ``train_loss`` while training.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from lowbit.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from lowbit.config import LLMConfig, Recipe, recipe_to_dict
from lowbit.errors import ConfigError, FormatError, TrainingError

__all__ = [
    "run_llm",
    "load_llm",
    "load_text",
    "corpus_tokens",
    "score",
    "byte_tokenizer",
    "prepare_llm",
    "to_integer",
    "enable_block_checkpointing",
]

CHECKPOINT = "checkpoints/llm.safetensors"


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with 256 ids and no merges: any text, no download (random-llama runs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def load_llm(cfg: LLMConfig, seed: int = 0) -> tuple[nn.Module, Any]:
    """(float model, tokenizer) named by ``cfg.model``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.model == "smollm2":
        from lowbit.llm import load_smollm2

        return load_smollm2()
    if cfg.model == "random-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        args = {
            "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
            "tie_word_embeddings": True, **cfg.model_args,
        }  # fmt: skip
        try:
            config = LlamaConfig(**args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"llm.model_args={cfg.model_args!r}: not a valid LlamaConfig ({e})") from None
        torch.manual_seed(seed)
        return LlamaForCausalLM(config), byte_tokenizer()
    folder = Path(cfg.model).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"llm.model={cfg.model!r}: allowed smollm2, random-llama, or a local Hugging Face model folder "
            "(with config.json and the tokenizer files)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def load_text(spec: str, field: str) -> str:
    """A corpus by name (``shakespeare``, ``kjv``) or ``file:PATH``."""
    from lowbit.data.text import CORPORA, load_corpus

    if spec.startswith("file:"):
        path = Path(spec[5:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"llm.{field}={spec!r}: cannot read {str(path)!r} as UTF-8 text ({e})") from None
    if spec not in CORPORA:
        raise ConfigError(f"llm.{field}={spec!r}: allowed {', '.join(sorted(CORPORA))} or file:PATH")
    return load_corpus(spec)


def prepare_llm(model: nn.Module, cfg: LLMConfig) -> nn.Module:
    """Quantize ``cfg.targets`` for ``cfg.method``; everything else is frozen (and stays float)."""
    if cfg.method == "full_qat":
        import lowbit
        from lowbit.api import quantized_layers

        spec = lowbit.QuantSpec(bits=cfg.bits, granularity=cfg.granularity, group_size=cfg.group_size, init=cfg.init)
        rules = [lowbit.Rule(match=t, weight=spec) for t in cfg.targets]
        for p in model.parameters():
            p.requires_grad_(False)
        lowbit.prepare(model, lowbit.QuantConfig(weight=None, act=None, rules=rules))
        layers = quantized_layers(model)
        if not layers:
            raise ConfigError(f"llm.targets={list(cfg.targets)} match no linear layer")
        for _, layer in layers:  # LSQ: the quantized weights and their scales train
            for p in layer.parameters():
                p.requires_grad_(True)
        return model
    from lowbit.methods.lrqat import prepare_lrqat

    method = "scales_only" if cfg.method == "scales_only" else "lrqat"
    return prepare_lrqat(
        model, bits=cfg.bits, rank=cfg.rank, alpha=cfg.alpha, granularity=cfg.granularity,
        group_size=cfg.group_size, targets=cfg.targets, phi=cfg.phi, init=cfg.init, method=method,
    )  # fmt: skip


def to_integer(model: nn.Module, cfg: LLMConfig) -> nn.Module:
    """The integer model: exact merge of the LR-QAT layers, or ``convert`` of full QAT's."""
    if cfg.method == "full_qat":
        from lowbit.api import convert

        return convert(model)
    from lowbit.methods.lrqat import merge

    return merge(model)


def corpus_tokens(cfg: LLMConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(training ids, held-out ids, other-corpus ids or None) of ``cfg``'s corpora under ``tokenizer``."""
    from lowbit.data.text import split_tokens, tokenize_corpus

    train_ids, held = split_tokens(tokenize_corpus(load_text(cfg.corpus, "corpus"), tokenizer), cfg.heldout_fraction)
    other = tokenize_corpus(load_text(cfg.other_corpus, "other_corpus"), tokenizer) if cfg.other_corpus else None
    return train_ids, held, other


def score(model: nn.Module, cfg: LLMConfig, held: torch.Tensor, other: torch.Tensor | None) -> dict[str, float]:
    """Sliding-window perplexity on the held-out ids (and its log, the loss) and on the other corpus."""
    from lowbit.data.text import sliding_window_perplexity

    kw = {"window": min(cfg.eval_window, len(held)), "max_windows": cfg.eval_windows, "batch_size": 4}
    p = sliding_window_perplexity(model, held, **kw)
    row = {"test_perplexity": p, "test_loss": math.log(p)}
    if other is not None:
        row["other_perplexity"] = sliding_window_perplexity(model, other, **kw)
    return row


def enable_block_checkpointing(model: nn.Module) -> bool:
    """Recompute each decoder block in the backward pass (Hugging Face models); False if there is no switch."""
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
    return True


def _metrics_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_llm(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run an LLM recipe end to end into ``run_dir``; returns the summary (also in summary.json)."""
    from lowbit.data.text import token_blocks
    from lowbit.export.io import save
    from lowbit.llm import LMTrainer

    cfg = recipe.llm
    assert cfg is not None
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"llm.device={cfg.device!r}: this torch has no CUDA device; use cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
    ckpt_path, metrics = run_dir / CHECKPOINT, run_dir / "metrics.jsonl"
    if resume and (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() != config_text:
        raise FormatError(
            f"{run_dir}/config.yaml differs from this recipe: resume with the same recipe and overrides, "
            "or start a new run"
        )
    if not resume:
        for stale in (metrics, run_dir / "summary.json", ckpt_path):
            stale.unlink(missing_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_text)
    t0 = time.perf_counter()

    model, tok = load_llm(cfg, recipe.seed)
    train_ids, held, other = corpus_tokens(cfg, tok)
    if len(train_ids) < cfg.seq_len + 1:
        raise ConfigError(f"llm.seq_len={cfg.seq_len}: the training part of {cfg.corpus!r} has {len(train_ids)} tokens")
    blocks = token_blocks(train_ids, cfg.seq_len)
    model.to(device)

    rows = _metrics_rows(metrics) if resume else []
    float_row = next((r for r in rows if r.get("stage") == "float"), None)
    if float_row is None:
        float_row = {"stage": "float", "step": 0, **score(model, cfg, held, other)}
    float_bytes = sum(  # each storage once: a tied head shares the embedding's
        t.untyped_storage().nbytes()
        for t in {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}.values()
    )

    prepare_llm(model, cfg)
    if cfg.block_checkpoint and cfg.method != "rtn" and cfg.steps:
        enable_block_checkpointing(model)
    total = 0 if cfg.method == "rtn" else cfg.steps  # round-to-nearest: step 0 is the result
    trainer = LMTrainer(model, total, lr=cfg.lr, scale_lr=cfg.scale_lr, warmup=cfg.warmup)
    step, loss_sum, loss_n = 0, 0.0, 0
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in state["params"].items():
                named[name].copy_(t)
        trainer.load_state_dict(state["trainer"])
        step, loss_sum, loss_n = int(state["step"]), float(state["loss_sum"]), int(state["loss_n"])
    rows = [r for r in rows if r.get("stage") == "qat" and int(r.get("step", -1)) <= step]
    _write_rows(metrics, [float_row, *rows])
    if step == 0:
        _append(metrics, {"stage": "qat", "step": 0, "tokens": 0, **score(model, cfg, held, other)})

    def checkpoint() -> None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        save_checkpoint(
            ckpt_path,
            {"params": params, "trainer": trainer.state_dict(), "step": step, "loss_sum": loss_sum, "loss_n": loss_n},
        )

    t_train = time.perf_counter()
    first_step = step
    bar = tqdm(total=total, initial=step, desc=f"{cfg.method} W{cfg.bits}", disable=not progress, unit="step")
    while step < total:
        loss = trainer.train_step(LMTrainer.batch(blocks, step, cfg.batch_size, recipe.seed).to(device))
        if not math.isfinite(loss):
            kept = (
                f"the checkpoint {ckpt_path} holds step {step - step % cfg.checkpoint_every}"
                if (cfg.checkpoint_every and ckpt_path.is_file())
                else "no checkpoint was kept"
            )
            raise TrainingError(
                f"loss is {loss} at step {step + 1} ({cfg.method}, lr={cfg.lr:g}, scale_lr={cfg.scale_lr:g}); "
                f"{kept}: lower llm.lr or llm.scale_lr and resume"
            )
        step += 1
        loss_sum, loss_n = loss_sum + loss, loss_n + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            row = {
                "stage": "qat",
                "step": step,
                "tokens": step * cfg.batch_size * cfg.seq_len,
                **score(model, cfg, held, other),
            }
            _append(metrics, {**row, "train_loss": loss_sum / loss_n, "lr": trainer.lr})
            loss_sum, loss_n = 0.0, 0
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total:
            checkpoint()
    bar.close()
    train_seconds = time.perf_counter() - t_train

    last = [r for r in _metrics_rows(metrics) if r.get("stage") == "qat"][-1]
    int_model = to_integer(model.eval(), cfg)
    final = score(int_model, cfg, held, other)
    _append(metrics, {"stage": "final", "step": step, **final, "before_finish_perplexity": last["test_perplexity"]})
    exported = save(int_model.cpu(), run_dir / "model.safetensors")
    tok.save_pretrained(run_dir / "tokenizer")
    rtn = next(r for r in _metrics_rows(metrics) if r.get("stage") == "qat" and r.get("step") == 0)
    summary = {
        "recipe": recipe.name,
        "kind": "llm",
        "model": cfg.model,
        "dataset": cfg.corpus,
        "method": cfg.method,
        "weight_bits": cfg.bits,
        "granularity": cfg.granularity if cfg.granularity == "channel" else f"group {cfg.group_size}",
        "rank": cfg.rank if cfg.method == "lrqat" else None,
        "metric_name": "perplexity",
        "float_metric": float_row["test_perplexity"],
        "step0_metric": rtn["test_perplexity"],
        "qat_metric": last["test_perplexity"],
        "quant_metric": final["test_perplexity"],
        "float_other_perplexity": float_row.get("other_perplexity"),
        "quant_other_perplexity": final.get("other_perplexity"),
        "steps": step,
        "tokens": step * cfg.batch_size * cfg.seq_len,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "float_bytes": float_bytes,
        "quant_bytes": exported.stat().st_size,
        "seconds_per_step": train_seconds / (step - first_step) if step > first_step else None,
        "train_seconds": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    from lowbit.train import _write_report

    _write_report(run_dir)
    return summary
