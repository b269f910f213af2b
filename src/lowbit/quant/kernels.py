"""The fused CPU fake-quant kernel (``fused_fq.cpp``), compiled once on first use and cached.

PyTorch's own fake-quant kernels are not vectorised and a chain of torch ops makes several passes over
each activation, so a fused kernel (parallel over rows on torch's threads) is what keeps a QAT step
close to a float step on CPU (see ``benchmarks/step_time.py``). It is one C++ autograd node: forward
and backward run without Python (a Python ``autograd.Function`` cost more per call than the arithmetic
of a small weight). Its backward has no second derivative: ``torch_ops()`` below gives one. It builds
with the system C++ compiler through ``torch.utils.cpp_extension`` into torch's extension cache (about a
minute, once per machine). If it cannot be built, or ``LOWBIT_FUSED=0`` is set, lowbit uses the
equivalent torch ops: same values, same gradients up to float summation order, slower. Code under
``torch.compile`` uses the torch ops too: dynamo cannot trace a pybind call, and the compiler fuses those
ops itself (``functional._fused_layout``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("fused_fq.cpp")
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for is an OpenMP pragma in torch's headers (serial without it)
    flags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    # the cache entry is specific to the source, the flags, this CPU's instruction set and the environment
    # that links it (torch build and location, Python): two virtualenvs of one checkout keep one build each
    # instead of rebuilding each other's
    key = _SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_flags() + _environment()
    digest = hashlib.sha256(key).hexdigest()[:10]
    log.debug("lowbit: loading the fused fake-quant kernel (built on first use per machine, about a minute)")
    return cpp_extension.load(
        name=f"lowbit_fused_fq_{digest}",
        sources=[str(_SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _environment() -> bytes:
    import torch

    return f"{torch.__version__}|{Path(torch.__file__).resolve().parent}|{sys.version}|{sys.prefix}".encode()


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()


def fused() -> ModuleType | None:
    """The compiled kernel module, or None when disabled or unavailable (the reason is logged once)."""
    if not _enabled():
        return None
    if "mod" in _state:
        return _state["mod"]
    with _lock:
        if "mod" not in _state:
            try:
                _state["mod"] = _build()
            except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                log.warning("lowbit: fused fake-quant kernel unavailable (%s); using torch ops", str(e)[:300])
                _state["mod"] = None
        return _state["mod"]


_switch: dict[str, bool] = {}


def _enabled() -> bool:
    if "on" not in _switch:
        _switch["on"] = os.environ.get("LOWBIT_FUSED", "1") != "0"
        if not _switch["on"]:
            log.info("lowbit: fused fake-quant kernel disabled by LOWBIT_FUSED=0")
    return _switch["on"]


def set_enabled(enabled: bool) -> None:
    """Use the fused kernel (``True``, if it builds) or the torch-ops path (``False``), e.g. in tests
    and benchmarks; takes effect at the next call, without rebuilding anything."""
    _switch["on"] = bool(enabled)


@contextlib.contextmanager
def torch_ops() -> Iterator[None]:
    """The torch-ops path inside the block, whatever the switch says outside it: its backward is built
    from differentiable ops, so second derivatives (Hessian-vector products) flow through it."""
    before = _enabled()
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)
