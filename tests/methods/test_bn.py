"""Batch-norm re-estimation equals the directly computed average of per-batch statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import ConfigError
from lowbit.methods.bn import BNReestimation, reestimate_bn


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.Flatten()
    )
    lowbit.prepare(
        model,
        lowbit.QuantConfig(weight=lowbit.QuantSpec(bits=4), act=lowbit.QuantSpec(bits=4)),
        calib=[torch.randn(8, 3, 6, 6)],
    )
    return model


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(16, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def test_reestimation_equals_the_average_of_batch_statistics() -> None:
    model = _model()
    model.train()
    for x in _batches(3):  # some training-time EMA statistics to overwrite
        model(x)
    batches = _batches(7)
    # the reference: the BN inputs of the eval-mode model (quantizers in eval), batch by batch
    bns = [model[1], model[4]]
    model.eval()
    with torch.no_grad():
        ref0 = [model[0](x) for x in batches]  # the first BN's inputs
    mean0 = torch.stack([t.mean((0, 2, 3)) for t in ref0]).mean(0)
    var0 = torch.stack([t.var((0, 2, 3), unbiased=True) for t in ref0]).mean(0)
    model.train()
    n = reestimate_bn(model, iter(batches), num_batches=50)
    assert n == 7
    assert torch.allclose(bns[0].running_mean, mean0, atol=1e-6)
    assert torch.allclose(bns[0].running_var, var0, rtol=1e-5)
    assert model.training and all(m.training for m in model.modules()), "modes restored"
    assert bns[0].momentum == 0.1


def test_only_batch_norm_buffers_change() -> None:
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reestimate_bn(model, iter(_batches(4)), num_batches=2)
    after = model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], after[k])}
    assert changed == {
        "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "4.running_mean", "4.running_var", "4.num_batches_tracked",
    }


def test_num_batches_limits_and_errors() -> None:
    model = _model()
    assert reestimate_bn(model, iter(_batches(9)), num_batches=3) == 3
    with pytest.raises(ConfigError, match="num_batches=0"):
        reestimate_bn(model, iter(_batches(1)), num_batches=0)
    with pytest.raises(ConfigError, match="no batches"):
        reestimate_bn(model, iter([]), num_batches=5)
    assert reestimate_bn(nn.Sequential(nn.Linear(2, 2)), iter(_batches(1))) == 0


def test_method_hooks() -> None:
    model = _model()
    off, on = BNReestimation(total_steps=1), BNReestimation(total_steps=1, num_batches=2, every_eval=True)
    assert off.before_eval(model, iter(_batches(2))) is False
    before = model[1].running_mean.clone()
    assert on.before_eval(model, iter(_batches(2))) is True
    assert not torch.equal(before, model[1].running_mean)
    with pytest.raises(ConfigError, match="every_eval"):
        BNReestimation(total_steps=1, every_eval="yes")
