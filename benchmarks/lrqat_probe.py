"""The step-time and peak-memory probe of ``benchmarks/lrqat.py``: a QAT method registered in the child
process that runs one row (see that module's docstring), and the per-device memory helpers it uses."""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any

import torch
from common import peak_rss_mb, release_free_memory, reset_peak_rss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mib(device: torch.device) -> tuple[float, float]:
    """(now, peak since the last reset) in MiB: CUDA allocator figures, or RSS / VmHWM on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    from common import rss_mb

    return rss_mb(), peak_rss_mb()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        release_free_memory()
        if not reset_peak_rss():
            raise RuntimeError("/proc/self/clear_refs refused: the peak RSS cannot be reset here")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """The probe's recipe settings: the device whose memory it reads."""

    device: str = "cpu"


class Probe:
    """A QAT method that only measures: step time after warm-up and peak memory while training.

    The loop calls ``step(t)`` after optimizer step ``t`` (1-based), and ``metrics`` when it writes an
    evaluation row. The peak is reset after step 1 (optimizer state then exists) and read after the last.
    """

    Settings = ProbeSettings
    last: Probe | None = None  # the instance of the current run (read by the child after ``run``)

    def __init__(self, total_steps: int, device: str = "cpu") -> None:
        self.total = total_steps
        self.device = torch.device(device)
        self.warm = min(3, total_steps - 1)
        self.t_warm: float | None = None
        self.t_end: float | None = None
        self.resident: float | None = None
        self.peak: float | None = None
        self.peak_before = 0.0  # the peak of the run up to the reset (preparation, evaluations)
        Probe.last = self

    def attach(self, model: torch.nn.Module) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: Any, outputs: Any) -> None:
        return None

    def step(self, step: int) -> None:
        if step == 1 and self.total >= 2:
            _sync(self.device)
            self.peak_before = memory_mib(self.device)[1]
            reset_peak(self.device)
            self.resident = memory_mib(self.device)[0]
        if step == self.warm:
            _sync(self.device)
            self.t_warm = time.perf_counter()
        if step == self.total:
            _sync(self.device)
            self.t_end = time.perf_counter()
            if self.total >= 2:
                self.peak = memory_mib(self.device)[1]

    def seconds_per_step(self) -> float | None:
        if self.t_warm is None or self.t_end is None or self.total <= self.warm:
            return None
        return (self.t_end - self.t_warm) / (self.total - self.warm)

    def metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"probe_seconds_per_step": self.seconds_per_step(), "probe_peak_mib": self.peak,
                "probe_resident_mib": self.resident}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
