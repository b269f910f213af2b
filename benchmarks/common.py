"""Shared pieces of the benchmarks: the cached float checkpoint, interleaved step timing, peak memory,
and markdown tables.

Float checkpoint: ``float_model(model_name, model_args, epochs, seed)`` builds the same ``Recipe`` that
``lowbit train`` would (default recipe, with ``pretrain.epochs``, model and seed replaced) and goes
through ``lowbit.tasks.vision.VisionTask.float_model``, so the checkpoint is trained by lowbit's own loop and cached
under ``runs/.cache/`` by the hash of (data, model, pre-training stage, seed). A benchmark with the
default settings therefore reuses the float model of ``lowbit train default`` and vice versa.

Timing: ``interleaved_median_times`` runs one step of every contender per round, rotating the order
each round, so machine noise (other processes, thermal drift) falls on all of them alike; it reports
the median of the rounds after the warm-up.

Memory: ``reset_peak_rss`` clears the kernel's high-water mark of resident memory (Linux,
``/proc/self/clear_refs``), so that ``peak_rss_mb`` afterwards (``VmHWM``, the figure ``ru_maxrss``
reports for a process that was not forked from a larger one) covers only what ran since. Run the
thing to measure in a fresh process, so no other allocation shares the figure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.config import DataConfig, ModelConfig, Recipe
from lowbit.data import VisionData, load_dataset
from lowbit.tasks.vision import VisionTask, subset_data

__all__ = [
    "RUNS_DIR",
    "LSQ_BASELINE",
    "float_recipe",
    "load_data",
    "float_model",
    "interleaved_median_times",
    "rss_mb",
    "release_free_memory",
    "reset_peak_rss",
    "peak_rss_mb",
    "markdown_table",
    "machine_line",
]

RUNS_DIR = Path(__file__).resolve().parents[1] / "runs"  # runs/ is git-ignored; the cache is runs/.cache/
# overrides that make the default recipe plain LSQ QAT (it adds per-channel depthwise inputs and distillation):
# the baseline the method benchmarks measure against, as their published tables did
LSQ_BASELINE = ("quant.rules=[]", "methods=[]")


# -- the float checkpoint ----------------------------------------------------------------------------


def float_recipe(
    model_name: str,
    model_args: Mapping[str, object] | None,
    epochs: float,
    seed: int,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> Recipe:
    """The default recipe with the model, pre-training epochs, seed and data subset replaced."""
    base = Recipe()
    return dataclasses.replace(
        base,
        name="benchmark-float",
        seed=seed,
        model=ModelConfig(name=model_name, args=dict(model_args or {})),
        pretrain=dataclasses.replace(base.pretrain, epochs=epochs),
        data=dataclasses.replace(base.data, train_subset=train_subset, test_subset=test_subset),
    )


def load_data(data: DataConfig) -> VisionData:
    """The dataset of ``data``, cut to its ``train_subset`` / ``test_subset``."""
    return subset_data(load_dataset(data.name, data.split_seed), Recipe(data=data))


def float_model(
    model_name: str,
    model_args: Mapping[str, object] | None,
    epochs: float,
    seed: int,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    runs_dir: Path = RUNS_DIR,
    progress: bool = True,
) -> nn.Module:
    """The float model pre-trained by lowbit for ``epochs`` epochs: from the cache, or trained now."""
    recipe = float_recipe(model_name, model_args, epochs, seed, train_subset, test_subset)
    # Pre-training's scratch space (checkpoint, metrics); lowbit caches the result in its parent's .cache/.
    run_dir = runs_dir / f"benchmark-float-{model_name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return VisionTask(recipe).float_model(run_dir, resume=False, progress=progress)


# -- timing ------------------------------------------------------------------------------------------


def qat_step(model: Any, x: Any, y: Any, opts: Sequence[Any], methods: Sequence[Any] = ()) -> Callable[[], None]:
    """One training step as the loop takes it (forward, methods' losses, backward, every optimizer, methods'
    steps), on a fixed classification batch, for step-time comparisons."""
    import torch

    counter = [0]

    def step() -> None:
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        for m in methods:
            extra = m.loss(model, (x, y), out)
            loss = loss + extra if extra is not None else loss
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        counter[0] += 1
        for m in methods:
            m.step(counter[0])

    return step


def interleaved_median_times(
    steps: Mapping[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds, after ``warmup`` untimed rounds.

    Each round calls every callable once; round r starts at the r-th name (rotating), so that no
    contender always runs right after the same one.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup={warmup}, repeats={repeats}: need warmup >= 0 and repeats >= 1")
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            t0 = clock()
            steps[name]()
            dt = clock() - t0
            if r >= warmup:
                times[name].append(dt)
    return {n: statistics.median(ts) for n, ts in times.items()}


# -- memory ------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in MB, or None."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else None


def rss_mb() -> float:
    """Resident memory of this process now, in MB (``VmRSS``; ``ru_maxrss`` where there is no /proc)."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def release_free_memory() -> bool:
    """Hand memory that malloc keeps after ``free`` back to the OS (glibc ``malloc_trim``), so that the
    RSS measured next is live data rather than whatever an earlier phase left cached; False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0, see proc(5))
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB: ``VmHWM`` where /proc has it, else ``ru_maxrss``.

    Not ``ru_maxrss`` first: on Linux it also keeps the peak of the address space replaced at
    ``exec``, which for a subprocess is its parent's forked copy, so a child of a large parent
    reports at least the parent's size. ``VmHWM`` is this address space's own mark (what
    ``reset_peak_rss`` resets).
    """
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if platform.system() == "Darwin" else 1)  # bytes on macOS, KB on Linux


# -- reporting ---------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column, ``l`` or ``r`` (default: all ``l``)."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align={align!r}: need one of 'l'/'r' per column ({len(header)} columns)")
    cells = [[str(c).replace("|", "\\|") for c in header]]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, the header has {len(header)}")
        cells.append([str(c).replace("|", "\\|") for c in row])
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align, strict=True))
            + " |"
        )

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align, strict=True))
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), which every timing table names."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_line(threads: int | None = None) -> str:
    """One line naming the machine: OS, CPU count, torch version and the torch thread count."""
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{platform.system()} {platform.machine()}, nproc {nproc}, torch {torch.__version__}, "
        f"{threads if threads is not None else torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}"
    )
