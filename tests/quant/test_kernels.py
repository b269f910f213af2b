"""The fused CPU kernel against the torch-ops path: identical values, matching gradients."""

from __future__ import annotations

import shutil

import pytest
import torch

from lowbit.quant import functional as F
from lowbit.quant import kernels


@pytest.fixture
def torch_path():  # noqa: ANN201
    kernels.set_enabled(False)
    yield
    kernels.set_enabled(True)


def _both(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, qmin: int, qmax: int):  # noqa: ANN202
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        xs = x.detach().clone().requires_grad_()
        ss = s.detach().clone().requires_grad_()
        zs = z.detach().clone().requires_grad_() if z is not None else None
        y = F.fake_quantize(xs, ss, zs, qmin, qmax)
        y.backward(g)
        out.append((y.detach(), xs.grad, ss.grad, zs.grad if zs is not None else None))
    kernels.set_enabled(True)
    return out


LAYOUTS = [
    ((32, 6, 5, 5), ()),  # per tensor
    ((32, 6, 5, 5), (1, 6, 1, 1)),  # per channel of activations
    ((6, 3, 3, 3), (6, 1, 1, 1)),  # per output channel of a conv weight
    ((10, 4, 8), (10, 4, 1)),  # per group: (rows, groups, group_size)
    ((7, 300), (1, 300)),  # per channel along the last axis
]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_the_kernel_builds_here() -> None:
    assert kernels.fused() is not None, "the fused kernel did not build: see the log for the compiler error"


@pytest.mark.parametrize("shape,sshape", LAYOUTS)
@pytest.mark.parametrize("bits,signed,asym", [(4, True, False), (3, False, True), (8, False, True), (2, True, False)])
def test_fused_equals_torch_path(shape: tuple, sshape: tuple, bits: int, signed: bool, asym: bool) -> None:
    gen = torch.Generator().manual_seed(hash((shape, sshape, bits)) % 2**31)
    qmin, qmax = F.int_range(bits, signed)
    x = torch.randn(shape, generator=gen) * 2
    s = torch.rand(sshape, generator=gen) * 0.3 + 0.02
    s = torch.where(torch.rand(sshape, generator=gen) < 0.3, -s, s)  # raw scales may be negative
    z = torch.randint(qmin, qmax + 1, sshape, generator=gen).float() if asym else None
    (y1, dx1, ds1, dz1), (y2, dx2, ds2, dz2) = _both(x, s, z, qmin, qmax)
    assert torch.equal(y1, y2)
    assert torch.equal(dx1, dx2)
    torch.testing.assert_close(ds1, ds2, rtol=1e-4, atol=1e-3)
    if asym:
        torch.testing.assert_close(dz1, dz2, rtol=1e-4, atol=1e-3)


def test_non_contiguous_and_float64_inputs_use_the_torch_path() -> None:
    x = torch.randn(8, 6).t()  # not contiguous
    assert F._fused_layout(x, torch.tensor(0.1), None) is None
    assert F._fused_layout(torch.randn(4, 4, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64), None) is None
    y = F.fake_quantize(x, torch.tensor(0.1), None, -8, 7)
    ref = torch.fake_quantize_per_tensor_affine(x.contiguous(), 0.1, 0, -8, 7)
    assert torch.equal(y, ref)


def test_disabled_by_environment(torch_path: None) -> None:
    assert kernels.fused() is None
    assert F._fused_layout(torch.randn(4, 4), torch.tensor(0.1), None) is None


def test_results_do_not_depend_on_the_thread_count() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 24, 16, 16, generator=gen)  # large enough to be split across threads
    s = torch.tensor(0.05)
    g = torch.randn(x.shape, generator=gen)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
            F.fake_quantize(xs, ss, None, -8, 7).backward(g)
            out.append((xs.grad, ss.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


def test_second_derivatives_through_the_kernel_are_refused_not_wrong() -> None:
    """The C++ node's backward is not differentiable: create_graph must fail loudly, and the torch-ops
    path (``kernels.torch_ops()``) gives the second derivative."""
    x = torch.randn(16, 8, requires_grad=True)
    s = torch.tensor(0.2, requires_grad=True)
    (g,) = torch.autograd.grad(F.fake_quantize(x, s, None, -8, 7).square().sum(), s, create_graph=False)
    assert torch.isfinite(g)
    with pytest.raises(RuntimeError, match="torch_ops"):
        torch.autograd.grad(F.fake_quantize(x, s, None, -8, 7).square().sum(), s, create_graph=True)
    with kernels.torch_ops():
        (g2,) = torch.autograd.grad(F.fake_quantize(x, s, None, -8, 7).square().sum(), s, create_graph=True)
        (h,) = torch.autograd.grad(g2, s)
    torch.testing.assert_close(g2.detach(), g, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(h)


def test_the_kernel_is_one_autograd_node_with_no_python_backward() -> None:
    y = F.fake_quantize(torch.randn(4, 6, requires_grad=True), torch.tensor(0.1, requires_grad=True), None, -8, 7)
    assert y.grad_fn is not None and y.grad_fn.name().startswith("torch::autograd::CppNode")
