"""The run directory: one recipe end to end, the same layout for every task and method.

``run(recipe, run_dir)`` does, for image classification and causal language models alike:

1. check and write ``config.yaml`` (the fully resolved recipe); a resumed run must match it, and the
   error names the first key that differs;
2. the float model (pre-trained by the loop and cached, or loaded pretrained) and its evaluation;
3. ``lowbit.prepare`` with the recipe's ``quant`` section (layer kinds, LR-QAT included, from its rules),
   the methods attached, the direct (round-to-nearest, before any QAT step) evaluation;
4. QAT through ``lowbit.train.train_stage`` (0 steps: round-to-nearest is the result), then the
   methods' ``finish`` hooks;
5. ``lowbit.convert``, the integer model's evaluation (equal to the fake-quant model's), and
   ``model.safetensors`` + ``model.json`` (``lowbit.load``), plus what the task keeps beside it (an LLM's
   tokenizer);
6. ``summary.json`` and the report (``plots/``, ``report.html``).

``metrics.jsonl`` rows: ``pretrain`` (classification), ``float``, ``direct``, ``qat`` (each evaluation)
and ``final`` (the integer model), each with ``test_<metric>`` and ``test_loss`` (and, for language
models, ``other_perplexity``), plus ``train_loss`` and ``lr`` while training and each method's metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lowbit import distributed
from lowbit.api import convert, prepare
from lowbit.checkpoint import atomic_write_text, remove_stale_temp_files
from lowbit.config import Recipe, recipe_to_dict
from lowbit.errors import ConfigError, FormatError
from lowbit.export.io import save
from lowbit.methods import attach_methods, build_methods, call_hooks
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.size import act_bits, float_bytes, payload_bytes, weight_bits
from lowbit.tasks import build_task
from lowbit.train import (
    Stage,
    append_metrics,
    config_difference,
    logged_row,
    split_parameters,
    stage_steps,
    train_stage,
    truncate_metrics,
)
from lowbit.validate import read_yaml

__all__ = [
    "run", "check_run_name", "runs_child", "run_lock",
    "idle_cores", "choose_threads",
]  # fmt: skip

log = logging.getLogger(__name__)


def _bits(value: float | None) -> float | int:
    """A mean bit width as the summary records it: an int when whole, else 3 decimals; 32 for float."""
    if value is None:
        return 32
    return int(value) if float(value).is_integer() else round(value, 3)


def idle_cores(sample_seconds: float = 0.25) -> int | None:
    """How many of this process's cores other processes leave idle, from two samples of ``/proc/stat``
    (None where it cannot be read). A training step's threads wait for the slowest one, so a thread on a
    core another process keeps busy slows every step (``benchmarks/results/contention.md``)."""

    def busy_idle() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, idle

    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        b0, i0 = busy_idle()
        time.sleep(sample_seconds)
        b1, i1 = busy_idle()
    except (OSError, ValueError, IndexError):
        return None
    total = (b1 - b0) + (i1 - i0)
    machine = os.cpu_count() or cores
    busy = machine * (b1 - b0) / total if total > 0 else 0.0
    return max(1, min(cores, round(cores - busy)))


def choose_threads(recipe: Recipe) -> str | None:
    """Set torch's thread count for a run: the recipe's ``threads``, else ``OMP_NUM_THREADS``, else the cores
    other processes leave idle; returns what was chosen and why (for the log), None if nothing was changed."""
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
        return f"{recipe.threads} threads (recipe)"
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    idle, threads = idle_cores(), torch.get_num_threads()
    if idle is None or idle >= threads:
        return None
    torch.set_num_threads(idle)
    return f"{idle} of {threads} threads: other processes keep the other cores busy (set threads to override)"


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]{0,127}")


def check_run_name(name: str, field: str = "name") -> str:
    """``name`` if it is a safe single path component for a run directory, else a ``ConfigError``."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{field}={name!r} is not allowed: a run name is one folder name of letters, digits and . _ - + = , "
            "(at most 128 characters, starting with a letter or digit; no /, no ..)"
        )
    return name


def runs_child(runs: Path, name: str, field: str = "name") -> Path:
    """``runs/name`` for a checked ``name``, refusing a ``runs`` that is a file."""
    runs = Path(runs)
    if runs.exists() and not runs.is_dir():
        raise ConfigError(f"--runs={str(runs)!r} is a file, not a folder: pass the folder that holds runs")
    return runs / check_run_name(name, field)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the whole run: a second run there is refused, naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"run directory {str(run_dir)!r} is in use ({holder}): wait for that run, or pass --name to start another"
        ) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _start(recipe: Recipe, run_dir: Path, resume: bool, force: bool) -> dict[str, Any]:
    """Check the run directory against this run (under its lock); write config.yaml; returns the resolved recipe."""
    resolved = json.loads(json.dumps(recipe_to_dict(recipe)))
    config_path = run_dir / "config.yaml"
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_stale_temp_files(folder)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.safetensors"))
    if not resume and not force and (checkpoints or (run_dir / "summary.json").exists()):
        what = "a finished run" if (run_dir / "summary.json").exists() else "the checkpoints of an unfinished run"
        raise ConfigError(
            f"run directory {str(run_dir)!r} holds {what}: pass --resume to continue it, --force to start over "
            "(deleting its checkpoints and results), or --name to run elsewhere"
        )
    if resume and config_path.exists():
        try:
            old = read_yaml(config_path, f"run config {str(config_path)!r}")
        except ConfigError as e:
            raise FormatError(f"{e}: start over with --force") from None
        diff = config_difference(old, resolved)
        if diff:
            raise FormatError(
                f"{config_path} differs from this recipe at {diff}: resume with the same recipe and overrides, "
                "or start over with --force"
            )
    if not resume:
        for stale in ("metrics.jsonl", "summary.json", "model.safetensors", "model.json"):
            (run_dir / stale).unlink(missing_ok=True)
        for ck in checkpoints:
            ck.unlink()
            ck.with_suffix(".json").unlink(missing_ok=True)
    atomic_write_text(config_path, yaml.safe_dump(resolved, sort_keys=False))
    return resolved


def _row(metrics: Path, stage: str, row: dict[str, Any]) -> dict[str, Any]:
    if distributed.is_main():
        truncate_metrics(metrics, stage, -1)
        append_metrics(metrics, row)
    return row


def _logged(metrics: Path, stage: str, resume: bool) -> dict[str, Any] | None:
    """The row of ``stage`` a resumed run already logged (rank 0's file, the same on every rank)."""
    return distributed.on_main(lambda: logged_row(metrics, stage)) if resume else None


def run(
    recipe: Recipe, run_dir: Path, resume: bool = False, progress: bool = True, force: bool = False,
    fsdp: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run a recipe end to end into ``run_dir``; returns the summary (also written to summary.json).

    ``run_dir`` is locked for the whole run. Without ``resume`` a directory holding checkpoints or a
    finished run is refused unless ``force`` (which deletes them: the user asked); with ``resume`` the
    recipe must be the one the directory was written with. Under torchrun, ``fsdp`` shards the model with
    FSDP2 (``lowbit.distributed.shard_model``) instead of holding it whole on every process; checkpoints
    hold whole tensors either way, so a run may resume with or without it, on any number of processes.
    """
    t0 = time.perf_counter()
    build_methods(recipe.methods, total_steps=1)  # a bad method setting fails before anything is written
    if fsdp and recipe.task != "causal_lm":
        raise ConfigError(f"--fsdp shards causal language models (task: causal_lm); task={recipe.task!r} trains "
                          "with the model whole on every process: leave --fsdp out")  # fmt: skip
    if fsdp and recipe.methods:
        raise ConfigError(f"--fsdp: methods {[m['name'] for m in recipe.methods]} read their layers' weights "
                          "outside the forward pass, where FSDP holds only shards; train without --fsdp")  # fmt: skip
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    distributed.init(recipe.device)  # under torchrun: join the other processes (rank 0 alone writes files)
    run_dir = Path(run_dir)
    task = build_task(recipe)  # data and model load (or fail) before the run directory is touched
    with contextlib.ExitStack() as held:
        distributed.on_main(lambda: held.enter_context(run_lock(run_dir)))
        return _run(recipe, run_dir, task, resume, progress, force, t0, fsdp)


def _quantized(recipe: Recipe, task: Any, model: nn.Module, run_dir: Path, total: int) -> list[Any]:
    """``prepare`` the float model and attach the recipe's methods; returns the methods."""
    prepare(model, recipe.quant, calib=task.calib(recipe.calib_batches))
    names = [spec["name"] for spec in recipe.methods]
    methods = build_methods(recipe.methods, total_steps=total)
    attach_methods(methods, model, names)

    def load_float() -> nn.Module:  # the cached float model again (a distillation teacher), RNG untouched
        with torch.random.fork_rng():
            return task.float_model(run_dir, resume=True, progress=False).eval()

    call_hooks(methods, "use_float_model", load_float)
    task.after_prepare(model, training=total > 0)
    return methods


def _run(
    recipe: Recipe, run_dir: Path, task: Any, resume: bool, progress: bool, force: bool, t0: float, fsdp: bool
) -> dict[str, Any]:
    resolved = distributed.on_main(lambda: _start(recipe, run_dir, resume, force))
    metrics = run_dir / "metrics.jsonl"
    model = task.float_model(run_dir, resume, progress)
    float_row = _logged(metrics, "float", resume) or _row(
        metrics, "float", {"stage": "float", "step": 0, **task.evaluate(model)}
    )
    fbytes = float_bytes(model)

    total = stage_steps(recipe.qat, task.steps_per_epoch)
    names = [spec["name"] for spec in recipe.methods]
    methods = _quantized(recipe, task, model, run_dir, total)
    if fsdp:
        distributed.shard_model(model)
    # direct quantization (round-to-nearest, before any QAT step): the baseline that QAT improves on
    direct = _logged(metrics, "direct", resume) or _row(
        metrics, "direct", {"stage": "direct", "step": 0, **task.evaluate(model)}
    )

    stage = Stage("qat", recipe.qat, run_dir, recipe.seed, recipe.checkpoint_every, progress, tuple(names), resolved)
    last = train_stage(model, task, stage, methods, resume=resume)
    call_hooks(methods, "finish", model, task.method_inputs(last["step"]))
    if distributed.is_sharded(model):  # rank 0 needs the whole model: gathered into a copy built the same way
        whole = distributed.full_tensors(model.state_dict())

        def unsharded() -> nn.Module:
            with torch.random.fork_rng():
                copy = task.float_model(run_dir, resume=True, progress=False)
                _quantized(recipe, task, copy, run_dir, total)
            copy.load_state_dict(whole)
            return copy
    else:
        unsharded = lambda: model  # noqa: E731
    # rank 0 converts, evaluates and writes; every rank returns its summary
    return distributed.on_main(lambda: _finish(recipe, run_dir, task, unsharded(), names, fbytes, float_row,
                                               direct, last, t0))  # fmt: skip


def _finish(
    recipe: Recipe, run_dir: Path, task: Any, model: nn.Module, names: list[str], fbytes: int,
    float_row: dict[str, Any], direct: dict[str, Any], last: dict[str, Any], t0: float,
) -> dict[str, Any]:  # fmt: skip
    metric, metrics = task.metric_name, run_dir / "metrics.jsonl"
    int_model = convert(model)
    final = task.evaluate(int_model)
    key = f"test_{metric}"
    _row(metrics, "final", {"stage": "final", "step": last["step"], **final, f"before_finish_{metric}": last[key]})
    exported = save(int_model.cpu(), run_dir / "model.safetensors")
    extras = task.save_extras(run_dir)
    wspec, aspec = recipe.quant.weight, recipe.quant.act
    weights, qparams = split_parameters(model)
    trainable = sum(p.numel() for p in weights + qparams)
    scales = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    summary: dict[str, Any] = {
        "recipe": recipe.name,
        "task": recipe.task,
        "dataset": task.dataset,
        "model": recipe.model.name,
        "metric_name": metric,
        "float_metric": float_row[key],
        "direct_metric": direct[key],
        "qat_metric": last[key],
        "quant_metric": final[key],
        "methods": names,
        # the bit widths actually used (means over layers where they differ: first/last layers, rules)
        "weight_bits": _bits(weight_bits(model)),
        "act_bits": _bits(act_bits(model)),
        "mean_weight_bits": weight_bits(model),
        "nominal_bits": {"weight": wspec.bits if wspec else 32, "act": aspec.bits if aspec else 32},
        "first_last_bits": recipe.quant.first_last_bits,
        "lowrank": dataclasses.asdict(recipe.quant.lowrank) if recipe.quant.lowrank else None,
        "float_bytes": fbytes,
        "quant_bytes": exported.stat().st_size,  # the exported file on disk (lowbit.load reads it)
        "quant_payload_bytes": payload_bytes(model),  # the same without the file's header and metadata
        "num_parameters": sum(p.numel() for p in model.parameters() if id(p) not in scales),
        "steps": last["step"],
        "trainable_parameters": trainable,
        "train_seconds": time.perf_counter() - t0,
        "qat_seconds": last["seconds"],
        "seconds_per_step": last["seconds_per_step"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    if "other_perplexity" in final:
        summary.update(float_other_perplexity=float_row.get("other_perplexity"),
                       direct_other_perplexity=direct.get("other_perplexity"),
                       quant_other_perplexity=final["other_perplexity"])  # fmt: skip
    summary.update(extras)
    if "tokens_per_step" in extras:
        summary["tokens"] = last["step"] * extras["tokens_per_step"]
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    write_report_safely(run_dir)
    return summary


def write_report_safely(run_dir: Path) -> None:
    """The run's plots and report.html; a report that fails to draw never costs the trained run."""
    from lowbit.report import write_report

    try:
        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the run itself is done and saved; say what failed
        log.warning("could not write the report of %s: %s (retry with `lowbit report %s`)", run_dir, e, run_dir)
