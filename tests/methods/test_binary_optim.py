"""Binary-weight optimizers: the SGD+weight-decay ⇔ EMA equivalence, CEMA and Bop against naive per-element
references, LatentAdam against Adam + clamp, bit-identical resume (in memory and through a checkpoint)."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lowbit.checkpoint import load_checkpoint, save_checkpoint
from lowbit.errors import ConfigError
from lowbit.methods.binary_optim import CEMA, Bop, LatentAdam, flip_ratio

torch.set_num_threads(1)

DTYPES: dict[torch.dtype, Any] = {torch.float64: np.float64, torch.float32: np.float32}  # scalars of that precision


def _gradients(seed: int, steps: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(steps)]


def _step(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()
    opt.step()


# -- the paper's claim: SGD + weight decay on w is an EMA of −g on m = λw, with α = ηλ -------------------------


@pytest.mark.parametrize("eta, lam", [(0.1, 0.01), (0.01, 0.5), (0.5, 0.2), (1.0, 1e-3)])
def test_sgd_with_weight_decay_is_an_ema_of_negative_gradients(eta: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(256, generator=gen, dtype=torch.float64) * 0.05 / lam  # m_0 = λ·w_0 ~ 0.05: flips happen
    p = nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=eta, weight_decay=lam)
    alpha, m = eta * lam, lam * w0
    flips = 0
    for g in _gradients(2, 200, (256,)):
        before = torch.sign(m)
        _step(opt, [p], [g])
        m = (1 - alpha) * m + alpha * (-g)
        assert torch.equal(torch.sign(p.detach()), torch.sign(m))
        torch.testing.assert_close(lam * p.detach(), m, rtol=1e-9, atol=1e-13)
        flips += int((torch.sign(m) != before).sum())
    assert flips > 10  # the sign trajectory compared is not a constant one


# -- CEMA ------------------------------------------------------------------------------------------------------


def _cema_reference(w0: Tensor, grads: list[Tensor], alphas: list[float], gamma: float) -> list[tuple[Tensor, ...]]:
    """Per element, in numpy scalars of the tensors' precision: (w, v, u) after every step."""
    ftype = DTYPES[w0.dtype]
    w: list[Any] = [ftype(1.0) if x >= 0 else ftype(-1.0) for x in w0.tolist()]
    v: list[Any] = [ftype(0.0)] * len(w)
    u: list[Any] = [ftype(0.0)] * len(w)
    out = []
    for g, alpha in zip(grads, alphas, strict=True):
        for i, gi in enumerate(g.tolist()):
            v[i] = ftype(1.0 - gamma) * v[i] + ftype(gamma) * ftype(gi)
            u[i] = ftype(1.0 - alpha) * u[i] + ftype(alpha) * v[i]
            if u[i] * w[i] > 0:
                w[i] = -w[i]
        out.append(tuple(torch.tensor(np.array(x), dtype=w0.dtype) for x in (w, v, u)))
    return out


def test_cema_binarizes_at_construction_with_zero_as_plus_one() -> None:
    p = nn.Parameter(torch.tensor([0.3, -0.0, 0.0, -2.0, 1e-30]))
    CEMA([p], alpha=0.1, gamma=0.1)
    assert torch.equal(p.detach(), torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cema_matches_the_naive_reference(dtype: torch.dtype) -> None:
    w0 = torch.randn(48, generator=torch.Generator().manual_seed(3), dtype=dtype)
    grads = _gradients(4, 60, (48,), dtype)
    p = nn.Parameter(w0.clone())
    opt = CEMA([p], alpha=0.2, gamma=0.3)
    reference = _cema_reference(w0, grads, [0.2] * 60, 0.3)
    flips = 0
    for t, (g, (w_ref, v_ref, u_ref)) in enumerate(zip(grads, reference, strict=True)):
        before = p.detach().clone()
        _step(opt, [p], [g])
        assert torch.equal(p.detach(), w_ref), t
        assert torch.equal(opt.state[p]["momentum_buffer"], v_ref), t
        assert torch.equal(opt.state[p]["inertia_buffer"], u_ref), t
        flips += int((before != p.detach()).sum())
    assert flips > 20


def test_cema_invariant_w_is_minus_sign_u_and_kept_where_u_is_zero() -> None:
    w0 = torch.randn(10, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = CEMA([p], alpha=0.3, gamma=0.5)
    start = p.detach().clone()
    dead = torch.zeros(10, 12, dtype=torch.bool)
    dead[:, :3] = True  # these entries only ever see zero gradients, so u stays exactly 0
    for g in _gradients(6, 100, (10, 12)):
        _step(opt, [p], [g.masked_fill(dead, 0.0)])
        u, w = opt.state[p]["inertia_buffer"], p.detach()
        assert torch.equal(w.abs(), torch.ones_like(w))
        assert torch.equal(w[u != 0], -torch.sign(u[u != 0]))
        assert torch.equal(u[dead], torch.zeros_like(u[dead]))
        assert torch.equal(w[dead], start[dead])


def test_cema_lambda_lr_schedules_alpha() -> None:
    w0 = torch.randn(32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = _gradients(8, 40, (32,))
    for schedule in (lambda t: 0.5, lambda t: 1.0 - t / 40):
        p = nn.Parameter(w0.clone())
        opt = CEMA([p], alpha=0.4, gamma=0.2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        reference = _cema_reference(w0, grads, [0.4 * (1.0 * schedule(t)) for t in range(40)], 0.2)
        unscheduled = _cema_reference(w0, grads, [0.4] * 40, 0.2)
        for g in grads:
            _step(opt, [p], [g])
            sched.step()
        assert opt.param_groups[0]["alpha"] == 0.4  # the group keeps the alpha given; α_t = alpha·lr
        assert torch.equal(opt.state[p]["inertia_buffer"], reference[-1][2])
        assert torch.equal(p.detach(), reference[-1][0])
        assert not torch.equal(opt.state[p]["inertia_buffer"], unscheduled[-1][2])


def test_cema_and_bop_skip_parameters_without_gradients() -> None:
    for opt_cls, kwargs in ((CEMA, {"alpha": 0.5, "gamma": 0.5}), (Bop, {"threshold": 0.0, "gamma": 0.5})):
        a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
        opt = opt_cls([a, b], **kwargs)
        _step(opt, [a, b], [torch.ones(4), None])
        assert torch.equal(a.detach(), -torch.ones(4))
        assert torch.equal(b.detach(), torch.ones(4)) and b not in opt.state


def test_cema_takes_its_hyperparameters_from_parameter_groups() -> None:
    """How the training loop builds a method's optimizer: ``cls(groups)``."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = CEMA([{"params": [p], "alpha": 0.1, "gamma": 0.2}, {"params": [q], "alpha": 0.3, "gamma": 0.4, "lr": 0.5}])
    assert [(g["alpha"], g["gamma"], g["lr"]) for g in opt.param_groups] == [(0.1, 0.2, 1.0), (0.3, 0.4, 0.5)]
    with pytest.raises(ConfigError, match=re.escape("alpha=None")):
        CEMA([{"params": [nn.Parameter(torch.ones(3))], "gamma": 0.2}])
    with pytest.raises(ConfigError, match=re.escape("alpha=2.0")):
        CEMA([{"params": [nn.Parameter(torch.ones(3))], "alpha": 2.0}], alpha=0.1, gamma=0.1)


# -- Bop -------------------------------------------------------------------------------------------------------


def _bop_reference(w0: Tensor, grads: list[Tensor], gammas: list[float], threshold: float) -> list[tuple[Tensor, ...]]:
    """Per element, in numpy scalars of the tensors' precision: (w, m) after every step."""
    ftype = DTYPES[w0.dtype]
    w: list[Any] = [ftype(1.0) if x >= 0 else ftype(-1.0) for x in w0.tolist()]
    m: list[Any] = [ftype(0.0)] * len(w)
    out = []
    for g, gamma in zip(grads, gammas, strict=True):
        for i, gi in enumerate(g.tolist()):
            m[i] = ftype(1.0 - gamma) * m[i] + ftype(gamma) * ftype(gi)
            if abs(m[i]) > threshold and math.copysign(1.0, m[i]) == math.copysign(1.0, w[i]):
                w[i] = -w[i]
        out.append(tuple(torch.tensor(np.array(x), dtype=w0.dtype) for x in (w, m)))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_bop_matches_the_naive_reference(dtype: torch.dtype, factor: float) -> None:
    w0 = torch.randn(48, generator=torch.Generator().manual_seed(9), dtype=dtype)
    grads = _gradients(10, 60, (48,), dtype)
    p = nn.Parameter(w0.clone())
    opt = Bop([p], threshold=0.15, gamma=0.2)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factor)
    reference = _bop_reference(w0, grads, [0.2 * factor] * 60, 0.15)
    flips = blocked = 0
    for t, (g, (w_ref, m_ref)) in enumerate(zip(grads, reference, strict=True)):
        before = p.detach().clone()
        _step(opt, [p], [g])
        m = opt.state[p]["momentum_buffer"]
        assert torch.equal(m, m_ref) and torch.equal(p.detach(), w_ref), t
        # flips exactly where |m| > τ and sign(m) = sign(w)
        agree = torch.sign(m) == before
        assert torch.equal(before != p.detach(), (m.abs() > 0.15) & agree), t
        flips += int((before != p.detach()).sum())
        blocked += int(((m.abs() <= 0.15) & agree).sum())
    assert flips > 10 and blocked > 10  # both sides of the threshold are exercised


# -- LatentAdam ------------------------------------------------------------------------------------------------


def test_latent_adam_equals_adam_then_clamp() -> None:
    w0 = torch.randn(8, 6, generator=torch.Generator().manual_seed(11)) * 0.4
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = LatentAdam([a], lr=0.05, betas=(0.8, 0.99), weight_decay=1e-3, clip=0.5)
    ref = torch.optim.Adam([b], lr=0.05, betas=(0.8, 0.99), weight_decay=1e-3)
    for g in _gradients(12, 50, (8, 6), torch.float32):
        _step(ours, [a], [g])
        _step(ref, [b], [g])
        with torch.no_grad():
            b.clamp_(-0.5, 0.5)
        assert torch.equal(a, b)
    assert (a.detach().abs() == 0.5).any()  # the clamp was active
    copied = copy.deepcopy(ours)  # deepcopy and pickle drop step hooks; the clamp must survive
    copied.param_groups[0]["params"][0].grad = torch.full((8, 6), -1.0)
    copied.param_groups[0]["lr"] = 10.0
    copied.step()
    assert copied.param_groups[0]["params"][0].detach().abs().max() == 0.5


def test_latent_adam_fires_step_hooks_once_with_weights_already_clamped() -> None:
    torch.optim.Adam([nn.Parameter(torch.ones(1))])  # torch has now wrapped Adam.step with its hook runner too
    p = nn.Parameter(torch.zeros(4))
    opt = LatentAdam([p], lr=10.0, clip=0.25)
    seen: list[float] = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(float(p.detach().abs().max())))
    p.grad = torch.ones(4)
    opt.step()
    assert seen == [0.25]


# -- resume ----------------------------------------------------------------------------------------------------

FACTORIES: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "cema": lambda ps: CEMA(ps, alpha=0.05, gamma=0.3),
    "bop": lambda ps: Bop(ps, threshold=0.05, gamma=0.2),
    "latent_adam": lambda ps: LatentAdam(ps, lr=0.05, clip=0.5),
}
SHAPES = [(8, 5), (7,), (3,)]  # the last one never gets a gradient


def _resume_case() -> tuple[list[Tensor], list[list[Tensor | None]]]:
    gen = torch.Generator().manual_seed(13)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES[:2]] + [None] for _ in range(30)]
    return init, grads


def _fresh(values: list[Tensor]) -> list[nn.Parameter]:
    return [nn.Parameter(v.detach().clone()) for v in values]


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("via", ["memory", "checkpoint"])
def test_resume_is_bit_identical(name: str, via: str, tmp_path: Path) -> None:
    init, grads = _resume_case()
    k = 12
    whole = _fresh(init)
    opt = FACTORIES[name](whole)
    for gs in grads:
        _step(opt, whole, gs)

    first = _fresh(init)
    opt1 = FACTORIES[name](first)
    for gs in grads[:k]:
        _step(opt1, first, gs)
    if via == "memory":
        saved, values = copy.deepcopy(opt1.state_dict()), [p.detach().clone() for p in first]
    else:
        path = tmp_path / "ckpt.safetensors"
        save_checkpoint(path, {"opt": opt1.state_dict(), "params": [p.detach() for p in first]})
        loaded = load_checkpoint(path)
        saved, values = loaded["opt"], loaded["params"]
    for gs in grads[k : k + 3]:  # the first run goes on: the saved state must not share its tensors
        _step(opt1, first, gs)

    second = _fresh(values)
    opt2 = FACTORIES[name](second)
    opt2.load_state_dict(saved)
    for gs in grads[k:]:
        _step(opt2, second, gs)

    for p, q in zip(whole, second, strict=True):
        assert torch.equal(p, q)
    for i in range(2):
        for key, value in opt.state[whole[i]].items():
            assert torch.equal(opt2.state[second[i]][key], value), key
    assert not torch.equal(whole[0], _fresh(init)[0])  # the optimizer did move the weights


# -- validation and diagnostics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, text",
    [
        (lambda p: CEMA(p, alpha=0.0, gamma=0.1), "alpha=0.0"),
        (lambda p: CEMA(p, alpha=-0.5, gamma=0.1), "alpha=-0.5"),
        (lambda p: CEMA(p, alpha=1.5, gamma=0.1), "alpha=1.5"),
        (lambda p: CEMA(p, alpha=float("nan"), gamma=0.1), "alpha=nan"),
        (lambda p: CEMA(p, alpha=0.1, gamma=0.0), "gamma=0.0"),
        (lambda p: CEMA(p, alpha=0.1, gamma=1.01), "gamma=1.01"),
        (lambda p: CEMA(p, alpha=0.1, gamma=0.1, lr=-1.0), "lr=-1.0"),
        (lambda p: Bop(p, threshold=-1e-3, gamma=0.1), "threshold=-0.001"),
        (lambda p: Bop(p, threshold=float("inf"), gamma=0.1), "threshold=inf"),
        (lambda p: Bop(p, threshold=0.0, gamma=0.0), "gamma=0.0"),
        (lambda p: Bop(p, threshold=0.0, gamma=2), "gamma=2"),
        (lambda p: LatentAdam(p, clip=0.0), "clip=0.0"),
        (lambda p: LatentAdam(p, clip=-1.0), "clip=-1.0"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_the_value(build: Callable[[list], Any], text: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(text)) as info:
        build([nn.Parameter(torch.ones(2))])
    assert "must be a finite number in" in str(info.value)


def test_a_schedule_that_pushes_a_rate_above_one_is_refused_at_the_step() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = CEMA([p], alpha=0.5, gamma=0.1, lr=3.0)
    p.grad = torch.ones(2)
    with pytest.raises(ConfigError, match=re.escape("alpha·lr=0.5·3.0=1.5")):
        opt.step()


def test_flip_ratio_by_hand() -> None:
    before = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 0.0, 3.0, -0.1])
    after = torch.tensor([-1.0, -1.0, -0.3, 3.0, -1.0, 2.0, 3.0, -0.2])
    # flipped: 1→−1, 0.5→−0.3, −2→3, 0(+1)→−1; kept: −1, 0→2, 3, −0.1→−0.2
    assert flip_ratio(before, after) == 4 / 8
    assert flip_ratio(before, before) == 0.0
    assert flip_ratio(torch.ones(0), torch.ones(0)) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        flip_ratio(torch.ones(3), torch.ones(4))


def test_cema_inertia_starts_the_filter_at_the_float_weights() -> None:
    """u_0 = −inertia·w_0, then the paper's updates: a float start's signs last until the gradients outweigh it."""
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(50, generator=g) * 0.1
    p = torch.nn.Parameter(w0.clone())
    opt = CEMA([p], alpha=0.1, gamma=0.5, inertia=1.0)
    u0 = opt.state[p]["inertia_buffer"].clone()
    assert torch.equal(u0, -w0) and torch.equal(p.detach(), torch.where(w0 < 0, -1.0, 1.0))
    v = torch.zeros(50)
    u = u0.clone()
    for _ in range(5):
        grad = torch.randn(50, generator=g) * 0.01
        p.grad = grad.clone()
        opt.step()
        v = v * (1 - 0.5) + grad * 0.5
        u = u * (1 - 0.1) + v * 0.1
        nz = u != 0
        assert torch.equal(p.detach()[nz], -torch.sign(u[nz]))
    assert flip_ratio(torch.where(w0 < 0, -1.0, 1.0), p.detach()) < 0.2  # small gradients flip few
    opt0 = CEMA([torch.nn.Parameter(w0.clone())], alpha=0.1, gamma=0.5)
    assert not opt0.state  # inertia 0: the paper's empty start, state created at the first step
