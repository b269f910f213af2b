"""Batch-norm re-estimation (Nagel et al., 2022, §1.6 of METHODS.md).

Oscillating weights leave the running statistics of the batch-norm layers that follow them out of date:
the EMA mixes statistics of weights the network no longer has. Re-estimation replaces them by the
average of per-batch statistics of the final weights::

    running_mean = (1/N) Σ_b mean_b(x)        running_var = (1/N) Σ_b var_b(x)   (unbiased, as torch)

over ``N`` training batches (default 50), with the rest of the model in eval mode (quantizers use their
learned ranges; nothing else changes). ``BNReestimation`` runs it after QAT, before the final evaluation
(``finish``), and optionally before every evaluation (``every_eval``, as the official code does; the
re-estimated statistics then carry on into training, which the paper's own description does not do).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import ConfigError

__all__ = ["reestimate_bn", "BNReestimation"]

log = logging.getLogger(__name__)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Any], num_batches: int = 50) -> int:
    """Set every batch norm's running statistics to the mean of per-batch statistics; returns batches used.

    ``batches`` yields model inputs (or ``(input, target)`` pairs). Training modes and momenta are
    restored afterwards; a model without batch norm is left alone (returns 0).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(f"num_batches={num_batches!r} is not allowed: use an integer >= 1")
    bns = _batch_norms(model)
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    n = 0
    try:
        model.eval()
        for bn in bns:
            bn.train()
            bn.momentum = 1.0  # running buffers = this batch's statistics
        for batch in itertools.islice(batches, num_batches):
            x: Tensor = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            for bn, mean, var in zip(bns, means, variances, strict=True):
                mean.add_(bn.running_mean)
                var.add_(bn.running_var)
            n += 1
        if n == 0:
            raise ConfigError("batch-norm re-estimation got no batches: pass at least one training batch")
        for bn, mean, var in zip(bns, means, variances, strict=True):
            bn.running_mean.copy_(mean / n)
            bn.running_var.copy_(var / n)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        for m, mode in modes.items():
            m.train(mode)
    return n


@dataclass(frozen=True)
class BNSettings:
    """``bn_reestimation``: training batches averaged (``num_batches``); also before every evaluation
    (``every_eval``)."""

    num_batches: int = 50
    every_eval: bool = False

    def __post_init__(self) -> None:
        nb = self.num_batches
        if isinstance(nb, bool) or not isinstance(nb, int) or nb < 1:
            raise ConfigError(f"num_batches={nb!r} is not allowed: use an integer >= 1")
        if not isinstance(self.every_eval, bool):
            raise ConfigError(f"every_eval={self.every_eval!r} is not allowed: use true or false")


class BNReestimation:
    """Method object: re-estimate batch-norm statistics after QAT (and before every eval if asked)."""

    Settings = BNSettings

    def __init__(self, total_steps: int, **settings: Any) -> None:
        self.settings = s = BNSettings(**settings)
        self.num_batches = s.num_batches
        self.every_eval = s.every_eval

    def attach(self, model: nn.Module) -> None:
        if not _batch_norms(model):
            log.warning("bn_reestimation: the model has no batch-norm layers; nothing to re-estimate")

    def loss(self, model: nn.Module, batch: Any = None, outputs: Any = None) -> Tensor | None:
        return None

    def step(self, step: int) -> None:
        pass

    def before_eval(self, model: nn.Module, batches: Iterable[Any]) -> bool:
        return self.every_eval and reestimate_bn(model, batches, self.num_batches) > 0

    def finish(self, model: nn.Module, batches: Iterable[Any]) -> None:
        n = reestimate_bn(model, batches, self.num_batches)
        log.info("re-estimated batch-norm statistics over %d training batches", n)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
