"""The one training loop: ``train_stage(model, task, stage, methods)``, for every task and every method.

One stage (float pre-training, or QAT) trains the model on the task's batches: the loss is the task's
plus what each method adds; weights (or adapters) step with the stage's optimizer under its schedule,
quantizer scales and zero points with their own optimizer (Adam at a small lr, constant unless
``schedule_scales``), as in the papers; ``grad_clip`` clips the global gradient norm. The loop
evaluates every ``eval_every`` steps (0: each epoch) and at the end, appending a row to
``metrics.jsonl``; checkpoints at those points and every ``checkpoint_every`` steps.

Checkpoints (``checkpoints/<stage>.safetensors``, atomic) hold the model's state (frozen parameters
outside the quantized layers, such as an LLM's embeddings, are not copied each time), optimizer and
scheduler state, method state, the RNG and the step. Batches depend only on (seed, step), so a run
resumed after an interruption (even ``kill -9``) reaches the same weights as an uninterrupted one.
Resuming refuses a checkpoint written for another method list, naming it.

Under torchrun (``lowbit.distributed``) each rank trains on its slice of every global batch, and the
gradients are averaged after the backward pass, as DistributedDataParallel computes them, without
wrapping the model in DDP: a task's loss may call parts of the model (a causal LM's decoder, then its
head chunk by chunk), which DDP's reducer does not follow, and DDP's buffer broadcast would overwrite
the ranks' own state with rank 0's. The price is no overlap of the all-reduce with the backward pass.
Rank 0 writes checkpoints and metrics; each evaluation checks that model, optimizer and method state
are bit-identical on every rank.

The loop takes method objects and never asks which method it holds (``lowbit.methods``), and a task
object and never asks which task it is (``lowbit.tasks``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import distributed
from lowbit.checkpoint import atomic_write_text, flatten_state, load_checkpoint, save_checkpoint
from lowbit.config import StageConfig
from lowbit.errors import FormatError, TrainingError
from lowbit.methods import Method, call_hooks
from lowbit.quant.modules import quantized_layers
from lowbit.quant.quantizer import Quantizer

__all__ = [
    "Stage", "train_stage", "split_parameters", "stage_steps", "append_metrics", "truncate_metrics",
    "config_difference", "logged_row",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """What ``train_stage`` needs to know about one stage of a run."""

    name: str  # "pretrain" or "qat"
    config: StageConfig
    run_dir: Path
    seed: int
    checkpoint_every: int = 0
    progress: bool = True
    method_names: tuple[str, ...] = ()
    recipe: dict[str, Any] | None = None  # the resolved recipe, stored in checkpoints and checked on resume

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / f"{self.name}.safetensors"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def stage_steps(cfg: StageConfig, steps_per_epoch: int) -> int:
    """The length of a stage in optimizer steps: ``steps``, else ``epochs`` of the task's batches."""
    return cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * steps_per_epoch)


# -- parameters, optimizers, schedules -------------------------------------------------------------------


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights or adapters, quantizer parameters) that train: scales and zero points get their own optimizer."""
    qparams = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in qparams]
    quant = [p for p in model.parameters() if p.requires_grad and id(p) in qparams]
    return weights, quant


def _optimizer(kind: str, params: list[nn.Parameter], lr: float, cfg: StageConfig, wd: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd, nesterov=cfg.momentum > 0)
    betas = (cfg.betas[0], cfg.betas[1])
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)


def _schedule(kind: str, total: int, warmup: float):  # noqa: ANN202 - a plain lr multiplier
    n_warm = max(1, int(warmup * total))
    if kind == "linear":  # warm-up over n_warm steps, then linear decay to 0 at the end
        return lambda t: min((t + 1) / n_warm, max(0.0, (total - t) / max(total - n_warm, 1)))
    if kind == "constant":
        base = lambda t: 1.0  # noqa: E731
    else:
        base = lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / max(total, 1)))  # noqa: E731
    return base if warmup == 0 else (lambda t: min(1.0, (t + 1) / n_warm) * base(t))


def _method_groups(methods: list[Method], model: nn.Module) -> list[dict[str, Any]]:
    """The parameter groups methods optimize themselves (``param_groups(model)`` hooks), checked."""
    groups = [g for hook in call_hooks(methods, "param_groups", model) for g in hook]
    for g in groups:
        cls = g.get("optimizer") if isinstance(g, dict) else None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or "params" not in g:
            raise TypeError(f"a method's param_groups entry {g!r} needs 'params' and 'optimizer' (an Optimizer class)")
    return groups


class _Optimizers:
    """The stage's optimizers and schedulers, as one object to step and checkpoint.

    Parameters a method optimizes itself (its ``param_groups(model)``: torch parameter groups, each with an
    ``optimizer`` class; groups with the same class share one optimizer) leave the stage's optimizers;
    the loop steps, clips and checkpoints the methods' optimizers with its own, and schedules them with
    the stage's schedule (without warm-up) where a group says ``schedule: True``.
    """

    def __init__(self, model: nn.Module, cfg: StageConfig, total: int, methods: list[Method] | None = None) -> None:
        own = _method_groups(methods or [], model)
        owned = {id(p) for g in own for p in g["params"]}
        weights, qparams = ([p for p in group if id(p) not in owned] for group in split_parameters(model))
        self.params = weights + qparams + [p for g in own for p in g["params"]]
        self.opts: list[torch.optim.Optimizer] = []
        self.scheds: list[torch.optim.lr_scheduler.LambdaLR] = []
        if weights:
            self.opts.append(_optimizer(cfg.optimizer, weights, cfg.lr, cfg, cfg.weight_decay))
            sched = _schedule(cfg.schedule, total, cfg.warmup)
            self.scheds.append(torch.optim.lr_scheduler.LambdaLR(self.opts[-1], sched))
        if qparams:
            self.opts.append(_optimizer(cfg.scale_optimizer, qparams, cfg.scale_lr, cfg, 0.0))
            if cfg.schedule_scales:
                sched = _schedule(cfg.schedule, total, cfg.warmup)
                self.scheds.append(torch.optim.lr_scheduler.LambdaLR(self.opts[-1], sched))
        for cls in dict.fromkeys(g["optimizer"] for g in own):
            mine = [g for g in own if g["optimizer"] is cls]
            self.opts.append(cls([{k: v for k, v in g.items() if k not in ("optimizer", "schedule")} for g in mine]))
            if any(g.get("schedule") for g in mine):  # e.g. CEMA's α, which it reads as lr · α
                sched = _schedule(cfg.schedule, total, 0.0)
                self.scheds.append(torch.optim.lr_scheduler.LambdaLR(self.opts[-1], sched))
        self.grad_clip = cfg.grad_clip

    @property
    def lr(self) -> float:
        return float(self.opts[0].param_groups[0]["lr"]) if self.opts else 0.0

    def step(self, loss: torch.Tensor) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.params)  # one process: nothing
        if self.grad_clip is not None and self.params:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        for o in self.opts:
            o.step()
        for s in self.scheds:
            s.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.opts], "schedulers": [s.state_dict() for s in self.scheds]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, s in zip(self.opts, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sch, s in zip(self.scheds, state["schedulers"], strict=True):
            sch.load_state_dict(s)


# -- metrics.jsonl ---------------------------------------------------------------------------------------


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, stage: str, step: int) -> None:
    """Drop rows of ``stage`` logged after ``step`` (they are recomputed after a resume); drop cut lines."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    keep = [r for r in rows if not (r.get("stage") == stage and r.get("step", 0) > step)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def logged_row(path: Path, stage: str, step: int | None = None) -> dict[str, Any] | None:
    """The first row of ``stage`` (at ``step``, if given) already in ``metrics.jsonl``, if any."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(row, dict) and row.get("stage") == stage and (step is None or row.get("step") == step):
            return row
    return None


# -- checkpoints -----------------------------------------------------------------------------------------


def _frozen_float(model: nn.Module) -> set[str]:
    """Frozen parameters outside the quantized layers (an LLM's embeddings and norms): they belong to the
    float model every run starts from, and nothing changes them, so checkpoints leave them out."""
    layers = [n + "." for n, _ in quantized_layers(model)]
    return {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith(tuple(layers))}


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training or a method can change: all but the frozen float parameters."""
    frozen = _frozen_float(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    frozen = _frozen_float(model)
    expected = set(model.state_dict()) - frozen
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise FormatError(f"checkpoint {str(path)!r} does not fit this recipe's model ({what}); start a new run")
    model.load_state_dict(state, strict=False)


def config_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The first dotted key where two plain-data configs differ, with both values; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{k}" if path else str(k)
            if k not in old or k not in new:
                return f"{where}: {old.get(k, '(absent)')!r} in the run, {new.get(k, '(absent)')!r} now"
            diff = config_difference(old[k], new[k], where)
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            diff = config_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if old == new else f"{path}: {old!r} in the run, {new!r} now"


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_state(state: Any, stage: Stage, opt: _Optimizers, n_methods: int, end: int) -> None:
    """Every field the loop reads from a checkpoint, checked before any is used (``FormatError`` naming it)."""
    where = f"checkpoint {str(stage.checkpoint)!r}"

    def bad(field: str, value: Any, allowed: str) -> FormatError:
        shown = repr(value) if not isinstance(value, dict | list | torch.Tensor) else type(value).__name__
        return FormatError(f"{where}: {field}={shown[:80]} is not allowed: {allowed}")

    if not isinstance(state, dict):
        raise bad("state", state, "a mapping")
    if state.get("stage") != stage.name:
        raise bad("stage", state.get("stage"), f"{stage.name!r} (this file belongs to another stage)")
    if stage.recipe is not None:
        diff = config_difference(state.get("recipe"), json.loads(json.dumps(stage.recipe)))
        if diff:
            raise FormatError(f"{where} was written for another recipe (at {diff}): resume with the recipe it "
                              "was written for, or start over with --force")  # fmt: skip
    names = state.get("methods_names")
    if not isinstance(names, list) or tuple(names) != stage.method_names:
        raise FormatError(f"{where} was written with methods {names!r}, this recipe has {list(stage.method_names)}: "
                          "resume with the recipe it was written for, or start over with --force")  # fmt: skip
    step = state.get("step")
    if not _is_count(step) or step > end:
        raise bad("step", step, f"an integer from 0 to {end}, this stage's length")
    loss = state.get("train_loss")
    if not (isinstance(loss, list) and len(loss) == 2 and isinstance(loss[0], int | float) and _is_count(loss[1])
            and math.isfinite(loss[0])):  # fmt: skip
        raise bad("train_loss", loss, "[a finite running sum, a count]")
    rng = state.get("rng")
    ref = torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != ref.dtype or rng.shape != ref.shape:
        raise bad("rng", rng, f"a {ref.dtype} tensor of shape {tuple(ref.shape)} (torch's RNG state)")
    for field, n in (("optimizers", len(opt.opts)), ("schedulers", len(opt.scheds)), ("methods", n_methods)):
        value = state.get(field)
        if not isinstance(value, list) or len(value) != n or not all(isinstance(v, dict) for v in value):
            raise bad(field, value, f"a list of {n} state mappings")
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise bad("model", weights, "a mapping of tensors")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_hyperparameters(opt: _Optimizers, stage: Stage) -> None:
    """The optimizers' numbers as loaded: finite, so a checkpoint cannot set ``lr='x'`` for the next step."""
    where = f"checkpoint {str(stage.checkpoint)!r}"
    for o in opt.opts:
        for g in o.param_groups:
            for key in ("lr", "initial_lr", "momentum", "weight_decay", "eps", "dampening"):
                if key in g and not _finite(g[key]):
                    raise FormatError(f"{where}: optimizer {key}={g[key]!r} is not a number")
            betas = g.get("betas", (0.9, 0.999))
            if not (isinstance(betas, list | tuple) and len(betas) == 2 and all(_finite(b) for b in betas)):
                raise FormatError(f"{where}: optimizer betas={betas!r} is not allowed")
    for sch in opt.scheds:
        if not (_is_count(sch.last_epoch) and all(_finite(v) for v in sch.base_lrs)):
            raise FormatError(f"{where}: a scheduler's step or base rates are not numbers")


def _resume(
    model: nn.Module, opt: _Optimizers, methods: list[Method], stage: Stage, end: int
) -> tuple[int, float, int]:
    """Load ``stage``'s checkpoint, if any, into the model, optimizers, methods and RNG; (step, loss sum, count)."""
    if not stage.checkpoint.exists():
        return 0, 0.0, 0
    state = load_checkpoint(stage.checkpoint)
    _check_state(state, stage, opt, len(methods), end)
    try:
        _load_model_state(model, distributed.fit_state(state["model"], model.state_dict()), stage.checkpoint)
        opt.load_state_dict(state)
        for o in opt.opts:
            distributed.fit_optimizer_state(o)
        _check_hyperparameters(opt, stage)
        for m, s in zip(methods, state["methods"], strict=True):
            m.load_state_dict(s)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise FormatError(
            f"checkpoint {str(stage.checkpoint)!r} does not fit this recipe's model ({type(e).__name__}: {e}); "
            "start over with --force"
        ) from None
    torch.set_rng_state(state["rng"])
    step = int(state["step"])
    loss_sum, loss_count = state["train_loss"]
    if distributed.is_main():
        truncate_metrics(stage.metrics, stage.name, step)
    return step, float(loss_sum), int(loss_count)


def _check_ranks(model: nn.Module, opt: _Optimizers, methods: list[Method], where: str) -> None:
    """Under torchrun: the model, the optimizers' and every method's state bit-identical on every rank."""
    if distributed.world().size == 1:
        return
    tensors = dict(_model_state(model))
    for i, state in enumerate([opt.state_dict(), *(m.state_dict() for m in methods)]):
        skeleton = json.dumps(flatten_state(state, f"state{i}", tensors), sort_keys=True).encode()
        tensors[f"state{i}.plain"] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
    # under FSDP a sharded tensor holds each rank's own part: the rest must agree
    distributed.check_identical({k: v for k, v in tensors.items() if not distributed.is_dtensor(v)}, where)


# -- one stage -------------------------------------------------------------------------------------------


def train_stage(
    model: nn.Module,
    task: Any,
    stage: Stage,
    methods: list[Method] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` for one stage; returns the last evaluation row (plus ``seconds``)."""
    cfg, methods = stage.config, methods or []
    bpe = task.steps_per_epoch
    total = stage_steps(cfg, bpe)
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    if distributed.is_sharded(model):  # an evaluation before this stage left FSDP's root unit gathered:
        distributed.reshard(model)  # the optimizers must hold the shards, not copies FSDP swaps out
    opt = _Optimizers(model, cfg, total, methods)
    step, loss_sum, loss_count = _resume(model, opt, methods, stage, end) if resume else (0, 0.0, 0)
    if step:
        log.info("resumed %s at step %d/%d from %s", stage.name, step, end, stage.checkpoint)
    # methods that measure the model before or while it trains (bit reallocation) get the stage's losses:
    # losses(s) yields the task loss on each training batch from step s on, a fixed sequence per step
    call_hooks(methods, "start", model, lambda s: (task.loss(model, b)[0] for b in task.batches(s)), step)

    world = distributed.world()

    def checkpoint() -> None:  # rank 0 writes; every rank holds the same state (checked at each evaluation)
        # whole tensors, also under FSDP (gathered from the shards), so any number of processes can resume
        model_state, opt_state = distributed.full_tensors((_model_state(model), opt.state_dict()))
        if world.main:
            _save(model_state, opt_state)
        distributed.barrier()

    def _save(model_state: dict[str, torch.Tensor], opt_state: dict[str, Any]) -> None:
        save_checkpoint(
            stage.checkpoint,
            {
                "model": model_state,
                **opt_state,
                "methods": [m.state_dict() for m in methods],
                "methods_names": list(stage.method_names),
                "recipe": stage.recipe,
                "rng": torch.get_rng_state(),
                "step": step,
                "stage": stage.name,
                "train_loss": [loss_sum, loss_count],  # the running mean since the last eval
            },
        )

    metric = f"test_{task.metric_name}"

    def eval_row() -> dict[str, Any]:
        nonlocal loss_sum, loss_count
        row: dict[str, Any] = {"stage": stage.name, "step": step, "epoch": round(step / bpe, 4)}
        if loss_count:  # the mean over every rank's shards
            mean = torch.tensor([loss_sum / loss_count], dtype=torch.float64)
            row["train_loss"] = distributed.all_reduce(mean, "mean").item()
            row["lr"] = opt.lr
        loss_sum, loss_count = 0.0, 0
        _check_ranks(model, opt, methods, f"stage {stage.name!r} at step {step}")
        test = task.evaluate(model)
        if any(call_hooks(methods, "before_eval", model, task.method_inputs(step))):
            row[f"before_hooks_{task.metric_name}"] = test[metric]
            test = task.evaluate(model)
        row.update(test)
        for extra in call_hooks(methods, "metrics", model):
            row.update(extra)
        if world.main:
            append_metrics(stage.metrics, row)
        return row

    def eval_due() -> bool:
        return step == end or (step % cfg.eval_every == 0 if cfg.eval_every else step % bpe == 0)

    model.train()
    bar = tqdm(total=end, initial=step, desc=stage.name, disable=not (stage.progress and world.main),
               dynamic_ncols=True, leave=False)  # fmt: skip
    last: dict[str, Any] = {}
    t_start, first, step_seconds = time.perf_counter(), step, 0.0
    batches = task.batches(step)
    while step < end:
        t_step = time.perf_counter()
        batch, share = distributed.shard(next(batches))  # this rank's part of the global batch (share: 1.0 alone)
        loss, outputs = task.loss(model, batch)
        for m in methods:
            extra = m.loss(model, batch, outputs)
            if extra is not None:
                loss = loss + extra
        if not distributed.agree(bool(torch.isfinite(loss))):  # on any rank
            bar.close()
            kept = f"the last good checkpoint {str(stage.checkpoint)!r} is kept" if stage.checkpoint.exists() else (
                "no checkpoint was written yet")
            raise TrainingError(
                f"loss became {loss.item()} at step {step} of stage {stage.name!r}: training stopped; {kept}. "
                f"Lower {stage.name}.lr (now {cfg.lr:g}) or {stage.name}.scale_lr (now {cfg.scale_lr:g}) "
                "and start again (or --resume from the checkpoint)"
            )
        opt.step(loss * share if share != 1.0 else loss)
        distributed.average_buffers(model)  # batch-norm running statistics equal on every rank
        step += 1
        loss_sum, loss_count = loss_sum + loss.item() * share, loss_count + 1  # .item() waits
        step_seconds += time.perf_counter() - t_step
        for m in methods:
            m.step(step)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum / loss_count:.3f}")
        if eval_due():
            last = eval_row()
            bar.set_postfix({task.metric_name[:4]: f"{last[metric]:.2f}"})
        if eval_due() or (stage.checkpoint_every and step % stage.checkpoint_every == 0):
            checkpoint()
    bar.close()
    if not last:  # a stage of 0 steps, or resumed when finished: its last evaluation, or one now
        last = distributed.on_main(lambda: logged_row(stage.metrics, stage.name, step)) or eval_row()
        if end > 0 or not stage.checkpoint.exists():
            checkpoint()
    last["seconds"] = time.perf_counter() - t_start
    # the training steps alone (evaluations and checkpoints are left out)
    last["seconds_per_step"] = step_seconds / (step - first) if step > first else None
    return last
