"""The plain training loop: float pre-training, calibration, QAT, evaluation, checkpoints, resume.

A run directory (``runs/<name>/``) holds ``config.yaml`` (the fully resolved recipe), ``metrics.jsonl``
(one JSON object per evaluation), ``checkpoints/<stage>.safetensors`` (atomic, resumable), the
exported integer model ``model.safetensors`` + ``model.json`` (``lowbit.load``), ``summary.json``, and
the report (``plots/``, ``report.html``). The float checkpoint is cached by a hash of everything that
determines it (data, model, pre-training stage, seed) under ``<runs root>/.cache/``, so QAT at other
bit widths reuses it.

Determinism: the order of each epoch depends only on (seed, epoch) and the global RNG state is saved
in each checkpoint, so a run resumed after an interruption (even ``kill -9``) reaches the same weights
as an uninterrupted one.

The loop takes method objects (``attach``, ``loss``, ``step``, ``state_dict``) and never asks which
method it holds. Weights train with the stage's optimizer (SGD by default, cosine schedule per step);
quantizer scales and zero points with their own optimizer (Adam at a small lr, constant), as in the
papers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from lowbit.api import convert, prepare, quantized_layers
from lowbit.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from lowbit.config import Recipe, StageConfig, recipe_to_dict, stage_hash
from lowbit.data import load_dataset
from lowbit.data.vision import VisionData, iterate_batches, num_batches
from lowbit.errors import FormatError, TrainingError
from lowbit.export.io import save
from lowbit.methods import Method, build_methods, call_hooks
from lowbit.models import build_model
from lowbit.quant.quantizer import Quantizer

__all__ = ["run", "evaluate", "train_stage", "model_bytes", "split_parameters"]

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """What ``train_stage`` needs to know about one stage of a run."""

    name: str  # "pretrain" or "qat"
    config: StageConfig
    checkpoint: Path
    metrics: Path
    seed: int
    checkpoint_every: int = 0
    progress: bool = True


# -- parameters and optimizers ---------------------------------------------------------------------


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, quantizer parameters): scales and zero points train with their own optimizer."""
    qparams = _qparam_ids(model)
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in qparams]
    quant = [p for p in model.parameters() if p.requires_grad and id(p) in qparams]
    return weights, quant


def _optimizer(kind: str, params: list[nn.Parameter], lr: float, momentum: float, wd: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=momentum > 0)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _schedule(kind: str, total: int):  # noqa: ANN202 - a plain lr multiplier
    if kind == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


# -- evaluation and sizes ------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy of ``model`` on ``(x, y)`` in eval mode."""
    was = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was)
    n = max(x.shape[0], 1)
    return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n}


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(float bytes, quantized bytes) of a prepared model's inference state.

    Float: every parameter and persistent buffer at 32 bits. Quantized: each quantized weight at its
    bit width (packed), plus its float32 scales and zero points; everything else stays 32-bit.
    """
    float_bytes = quant_bytes = 0
    counted: set[int] = set()
    for _, mod in quantized_layers(model):
        wq = getattr(mod, "weight_quantizer", None)
        w = mod.weight
        counted.add(id(w))
        float_bytes += 4 * w.numel()
        if wq is None:
            quant_bytes += 4 * w.numel()
        else:
            quant_bytes += math.ceil(int(wq.bits) * w.numel() / 8) + 4 * wq.scale.numel()
            quant_bytes += 4 * wq.zero_point.numel() if wq.zero_point is not None else 0
        iq = getattr(mod, "input_quantizer", None)
        if iq is not None:
            quant_bytes += 4 * iq.scale.numel() * (2 if iq.zero_point is not None else 1)
            counted.update(id(t) for t in iq.parameters())
            counted.update(id(t) for t in iq.buffers())
        if wq is not None:
            counted.update(id(t) for t in wq.parameters())
            counted.update(id(t) for t in wq.buffers())
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(t) not in counted:
            counted.add(id(t))
            float_bytes += 4 * t.numel()
            quant_bytes += 4 * t.numel()
    return float_bytes, quant_bytes


# -- one stage -------------------------------------------------------------------------------------


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, stage: str, step: int) -> None:
    """Drop rows of ``stage`` logged after ``step`` (they are recomputed after a resume)."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if not (r.get("stage") == stage and r.get("step", 0) > step)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def train_stage(
    model: nn.Module,
    data: VisionData,
    stage: Stage,
    batch_size: int,
    eval_batch_size: int,
    methods: list[Method] | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Train ``model`` for one stage; checkpoints each epoch (and every ``checkpoint_every`` steps)."""
    cfg, methods = stage.config, methods or []
    bpe = num_batches(data.train_x.shape[0], batch_size)
    total = math.ceil(cfg.epochs * bpe)
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    weights, qparams = split_parameters(model)
    opts = [_optimizer(cfg.optimizer, weights, cfg.lr, cfg.momentum, cfg.weight_decay)]
    if qparams:
        opts.append(_optimizer(cfg.scale_optimizer, qparams, cfg.scale_lr, 0.9, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opts[0], _schedule(cfg.schedule, total))
    step, loss_sum, loss_count = 0, 0.0, 0
    if resume and stage.checkpoint.exists():
        state = load_checkpoint(stage.checkpoint)
        try:
            model.load_state_dict(state["model"])
            for o, s in zip(opts, state["optimizers"], strict=True):
                o.load_state_dict(s)
            sched.load_state_dict(state["scheduler"])
            for m, s in zip(methods, state.get("methods", []), strict=False):
                m.load_state_dict(s)
        except (RuntimeError, ValueError, KeyError) as e:
            raise FormatError(
                f"checkpoint {str(stage.checkpoint)!r} does not fit this recipe's model ({e}); "
                "start a new run or delete the checkpoint"
            ) from None
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
        loss_sum, loss_count = state.get("train_loss", [0.0, 0])
        _truncate_metrics(stage.metrics, stage.name, step)
        log.info("resumed %s at step %d/%d from %s", stage.name, step, end, stage.checkpoint)

    def checkpoint() -> None:
        save_checkpoint(
            stage.checkpoint,
            {
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in opts],
                "scheduler": sched.state_dict(),
                "methods": [m.state_dict() for m in methods],
                "rng": torch.get_rng_state(),
                "step": step,
                "stage": stage.name,
                "train_loss": [loss_sum, loss_count],  # the running mean since the last eval
            },
        )

    def eval_row(epoch: float) -> dict[str, Any]:
        nonlocal loss_sum, loss_count
        row: dict[str, Any] = {"stage": stage.name, "step": step, "epoch": round(epoch, 4)}
        if loss_count:
            row["train_loss"] = loss_sum / loss_count
        loss_sum, loss_count = 0.0, 0
        test = evaluate(model, data.test_x, data.test_y, eval_batch_size)
        if any(call_hooks(methods, "before_eval", model, train_inputs(data, batch_size, stage.seed, step))):
            row["before_hooks_accuracy"] = test["accuracy"]
            test = evaluate(model, data.test_x, data.test_y, eval_batch_size)
        row.update({f"test_{k}": v for k, v in test.items()})
        for extra in call_hooks(methods, "metrics", model):
            row.update(extra)
        _append_metrics(stage.metrics, row)
        return row

    model.train()
    bar = tqdm(total=end, initial=step, desc=stage.name, disable=not stage.progress, dynamic_ncols=True, leave=False)
    last: dict[str, Any] = {}
    t_start = time.perf_counter()
    while step < end:
        epoch, start_batch = divmod(step, bpe)
        for xb, yb in iterate_batches(
            data.train_x, data.train_y, batch_size, True, stage.seed, epoch, start_batch=start_batch
        ):
            loss = nn.functional.cross_entropy(model(xb), yb)
            for m in methods:
                extra = m.loss(model)
                if extra is not None:
                    loss = loss + extra
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingError(
                    f"loss became {loss.item()} at step {step} of stage {stage.name!r}: training stopped; "
                    f"the last good checkpoint {str(stage.checkpoint)!r} is kept. Lower {stage.name}.lr "
                    f"(now {cfg.lr}) or {stage.name}.scale_lr (now {cfg.scale_lr})"
                )
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            sched.step()
            step += 1
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            for m in methods:
                m.step(step)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / loss_count:.3f}")
            at_epoch_end = step % bpe == 0
            if at_epoch_end or step == end:
                last = eval_row(step / bpe)
                bar.set_postfix(acc=f"{last['test_accuracy']:.2f}")
            if at_epoch_end or step == end or (stage.checkpoint_every and step % stage.checkpoint_every == 0):
                checkpoint()
            if step >= end:
                break
    bar.close()
    if not last:  # resumed a finished stage: evaluate again
        last = eval_row(step / bpe)
    last["seconds"] = time.perf_counter() - t_start
    return last


def train_inputs(data: VisionData, batch_size: int, seed: int, step: int) -> Iterator[torch.Tensor]:
    """Training inputs for methods' hooks (batch-norm re-estimation), a fixed order per (seed, step)."""
    for xb, _ in iterate_batches(data.train_x, data.train_y, batch_size, True, seed + 2, step):
        yield xb


# -- a whole run -----------------------------------------------------------------------------------


def _subset(data: VisionData, recipe: Recipe) -> VisionData:
    d = recipe.data
    if d.train_subset is None and d.test_subset is None:
        return data
    ntr = d.train_subset or data.train_x.shape[0]
    nte = d.test_subset or data.test_x.shape[0]
    return VisionData(
        name=data.name,
        train_x=data.train_x[:ntr],
        train_y=data.train_y[:ntr],
        test_x=data.test_x[:nte],
        test_y=data.test_y[:nte],
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
    )


def _float_model(recipe: Recipe, data: VisionData, run_dir: Path, resume: bool, progress: bool) -> nn.Module:
    """The pre-trained float model: from the cache, or trained now (and cached)."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model.name, num_classes=data.num_classes, **recipe.model.args)
    key = stage_hash(recipe.data, recipe.model, recipe.pretrain, recipe.seed)
    cache = run_dir.parent / ".cache" / f"float-{recipe.model.name}-{key}.safetensors"
    if cache.exists():
        try:
            model.load_state_dict(load_checkpoint(cache)["model"])
            log.info("float model from cache %s", cache)
            return model
        except (FormatError, RuntimeError) as e:
            log.warning("float cache %s is unusable (%s); training again", cache, e)
    if recipe.pretrain.epochs > 0:
        stage = Stage(
            "pretrain",
            recipe.pretrain,
            run_dir / "checkpoints" / "pretrain.safetensors",
            run_dir / "metrics.jsonl",
            recipe.seed,
            recipe.checkpoint_every,
            progress,
        )
        train_stage(model, data, stage, recipe.data.batch_size, recipe.data.eval_batch_size, resume=resume)
    save_checkpoint(cache, {"model": model.state_dict()})
    return model


def run(recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a recipe end to end into ``run_dir``; returns the summary (also written to summary.json)."""
    if recipe.llm is not None:  # weight-only QAT of a causal LM: its own loop (lowbit.llm_train)
        from lowbit.llm_train import run_llm

        return run_llm(recipe, run_dir, resume=resume, progress=progress)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
    if resume and (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() != config_text:
        raise FormatError(
            f"{run_dir}/config.yaml differs from this recipe: resume with the same recipe and overrides, "
            "or start a new run"
        )
    if not resume:
        for stale in ("metrics.jsonl", "summary.json"):
            (run_dir / stale).unlink(missing_ok=True)
        for ck in (run_dir / "checkpoints").glob("*.safetensors"):
            ck.unlink()
    atomic_write_text(run_dir / "config.yaml", config_text)
    t0 = time.perf_counter()
    data = _subset(load_dataset(recipe.data.name, recipe.data.split_seed), recipe)
    model = _float_model(recipe, data, run_dir, resume, progress)
    float_metrics = evaluate(model, data.test_x, data.test_y, recipe.data.eval_batch_size)
    metrics = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics, "float", -1)
    _append_metrics(metrics, {"stage": "float", "step": 0, **{f"test_{k}": v for k, v in float_metrics.items()}})

    calib = [
        xb
        for i, (xb, _) in zip(
            range(recipe.calib_batches),
            iterate_batches(data.train_x, data.train_y, recipe.data.batch_size, True, recipe.seed + 1, 0),
            strict=False,
        )
    ]
    torch.manual_seed(recipe.seed)
    prepare(model, recipe.quant, calib=calib)
    bpe = num_batches(data.train_x.shape[0], recipe.data.batch_size)
    methods = build_methods(recipe.methods, total_steps=math.ceil(recipe.qat.epochs * bpe))
    for m in methods:
        m.attach(model)
    # direct quantization (post-training, before any QAT step): the baseline that retraining improves on
    direct_metrics = evaluate(model, data.test_x, data.test_y, recipe.data.eval_batch_size)
    _truncate_metrics(metrics, "direct", -1)
    _append_metrics(metrics, {"stage": "direct", "step": 0, **{f"test_{k}": v for k, v in direct_metrics.items()}})
    t_qat = time.perf_counter()
    stage = Stage(
        "qat",
        recipe.qat,
        run_dir / "checkpoints" / "qat.safetensors",
        run_dir / "metrics.jsonl",
        recipe.seed,
        recipe.checkpoint_every,
        progress,
    )
    last = train_stage(model, data, stage, recipe.data.batch_size, recipe.data.eval_batch_size, methods, resume=resume)
    call_hooks(methods, "finish", model, train_inputs(data, recipe.data.batch_size, recipe.seed, last["step"]))
    qat_seconds = time.perf_counter() - t_qat
    int_model = convert(model)
    quant_metrics = evaluate(int_model, data.test_x, data.test_y, recipe.data.eval_batch_size)
    _truncate_metrics(metrics, "final", -1)
    _append_metrics(
        metrics,
        {
            "stage": "final",
            "step": last["step"],
            **{f"test_{k}": v for k, v in quant_metrics.items()},
            "before_finish_accuracy": last["test_accuracy"],
        },
    )
    float_bytes, payload_bytes = model_bytes(model)
    exported = save(int_model, run_dir / "model.safetensors")
    wspec, aspec = recipe.quant.weight, recipe.quant.act
    summary = {
        "recipe": recipe.name,
        "dataset": data.name,
        "model": recipe.model.name,
        "metric_name": "accuracy",
        "float_metric": float_metrics["accuracy"],
        "quant_metric": quant_metrics["accuracy"],
        "qat_metric": last["test_accuracy"],
        "direct_metric": direct_metrics["accuracy"],
        "methods": [spec["name"] for spec in recipe.methods],
        "weight_bits": wspec.bits if wspec else 32,
        "act_bits": aspec.bits if aspec else 32,
        "first_last_bits": recipe.quant.first_last_bits,
        "float_bytes": float_bytes,
        "quant_bytes": exported.stat().st_size,  # the exported file on disk (lowbit.load reads it)
        "quant_payload_bytes": payload_bytes,  # packed weights + scales + float tensors, without the header
        "num_parameters": sum(p.numel() for p in model.parameters() if id(p) not in _qparam_ids(model)),
        "train_seconds": time.perf_counter() - t0,
        "qat_seconds": qat_seconds,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    _write_report(run_dir)
    return summary


def _write_report(run_dir: Path) -> None:
    """The run's plots and report.html; a report that fails to draw never costs the trained run."""
    from lowbit.report import write_report

    try:
        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the run itself is done and saved; say what failed
        log.warning("could not write the report of %s: %s (retry with `lowbit report %s`)", run_dir, e, run_dir)


def restore_qat_model(recipe: Recipe, data: VisionData, checkpoint: Path) -> nn.Module:
    """The model at the end of a run: prepared, methods attached, QAT checkpoint loaded, ``finish`` hooks
    run on the same batches as in training (so it equals the model the run converted)."""
    model = build_model(recipe.model.name, num_classes=data.num_classes, **recipe.model.args)
    prepare(model, recipe.quant, calib=[data.train_x[:2]])
    methods = build_methods(recipe.methods, total_steps=1)
    for m in methods:
        m.attach(model)
    state = load_checkpoint(checkpoint)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise FormatError(f"checkpoint {str(checkpoint)!r} does not fit the run's model: {e}") from None
    call_hooks(methods, "finish", model, train_inputs(data, recipe.data.batch_size, recipe.seed, int(state["step"])))
    return model


def _qparam_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
