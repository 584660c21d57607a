"""Backward with create_graph=True through an eager region: the input gradients stay differentiable, so second
derivatives (a gradient penalty) match one device."""

from __future__ import annotations

import torch

from helpers import R, S0, max_diff, randn
from localmap import Partial, local_map
from localmap.testing import distribute, full, on_one_device


def _layer(a, b):
    return torch.tanh(a @ b)


def test_gradient_penalty_matches_one_device(sim_mesh_4):
    with on_one_device():
        x, w = randn(8, 3), randn(3, 3)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gx_ref,) = torch.autograd.grad(_layer(xr, wr).sum(), xr, create_graph=True)
        gx_ref.pow(2).sum().backward()
    f = local_map(_layer, [S0], ([S0], [R]), None, sim_mesh_4)
    xd = distribute(x, sim_mesh_4, [S0], requires_grad=True)
    wd = distribute(w, sim_mesh_4, [R], requires_grad=True)
    (gx,) = torch.autograd.grad(f(xd, wd).sum(), xd, create_graph=True)
    assert gx.requires_grad and max_diff(full(gx), gx_ref) < 1e-5
    gx.pow(2).sum().backward()
    assert max_diff(full(xd.grad), xr.grad) < 1e-5
    assert wd.grad.placements == (Partial(),) and max_diff(full(wd.grad), wr.grad) < 1e-5
