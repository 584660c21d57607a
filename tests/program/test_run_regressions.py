"""Regression tests for captured programs and their run (uneven inputs, Partial(avg) gradients, broadcast
gradient layouts), from failures the property tests (tests/check/test_properties.py) found, one plain case each,
compared with one device."""

import pytest
import torch

from helpers import R, S0
from localmap import LocalMapError, Partial, capture, local_map
from localmap.testing import fake_mesh, on_one_device


def test_uneven_input_to_traced_region_is_refused():
    """capture traced the region at rank 0's shard size and claimed a global shape of local x ranks (6 rows
    for 5); run then failed inside the backward graph. Now refused up front, naming the argument."""
    with fake_mesh(2) as mesh:
        f = local_map(lambda a: torch.tanh(a), [S0], ([S0],), None, mesh)
        with pytest.raises(LocalMapError, match="args\\[0\\]: is unevenly sharded"):
            capture(lambda a: f(a).sum(), torch.randn(5, 3, requires_grad=True))
        x = torch.randn(6, 3, requires_grad=True)
        prog = capture(lambda a: f(a).sum(), x)
        result = prog.run(x)
        with on_one_device():
            assert torch.allclose(result.loss, torch.tanh(x).sum())
            assert torch.allclose(result.grads["args[0]"], 1 - torch.tanh(x) ** 2)


def test_captured_gradient_of_partial_avg_input():
    """capture(...).run gave the gradient of a Partial('avg') input 1/n of its value (the eager path scales
    it by n; the traced path did not)."""
    x, w = torch.randn(3, 8), torch.randn(8, 2)
    with fake_mesh(2) as mesh:
        f = local_map(lambda a, b: a @ b, [Partial("avg")], ([R], [Partial("avg")]), None, mesh)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        result = capture(lambda a, b: f(a, b).sum(), xs, ws).run(x, w)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr).sum().backward()
    assert torch.allclose(result.loss, (x @ w).sum(), atol=1e-5)
    assert torch.allclose(result.grads["args[0]"], xr.grad, atol=1e-5)
    assert torch.allclose(result.grads["args[1]"], wr.grad, atol=1e-5)


def test_run_region_gradient_with_broadcast_layout():
    """A region whose backward returns expanded (stride 0) gradients: run copied them into a tensor with the
    traced stride-0 layout, which PyTorch refuses to write ("more than one element ... single memory
    location")."""
    x, y, up = torch.randn(3, 1, 6), torch.randn(3, 1, 6), torch.randn(1, 6)
    with fake_mesh(2) as mesh:
        f = local_map(lambda a, b: (a + b).sum(0) * 1.5, [R], ([R], [R]), None, mesh)
        prog = capture(lambda a, b: (f(a, b) * up).sum(), x.clone().requires_grad_(), y.clone().requires_grad_())
        result = prog.run(x, y)
    want = (up * 1.5).expand(3, 1, 6)
    assert torch.allclose(result.loss, (((x + y).sum(0) * 1.5) * up).sum(), atol=1e-5)
    assert torch.allclose(result.grads["args[0]"], want) and torch.allclose(result.grads["args[1]"], want)
