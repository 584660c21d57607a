"""Backward with create_graph=True through an eager region: the input gradients stay differentiable, so second
derivatives (a gradient penalty) match one device."""

from __future__ import annotations

import pytest
import torch

from helpers import R, S0, S1, max_diff, randn
from localmap import Partial, local_map
from localmap.collectives import all_reduce
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


# ---- a gradient penalty through the three linear layouts, with a bias outside the region ---------------------
def _matmul(a, c):
    return a @ c


def _mean_of_products(a, c):
    """x @ w / k over the k contracted columns: a mean over a sharded dim is a Partial('avg') of local means."""
    return (a.unsqueeze(-1) * c).mean(1)


def _reduced_matmul(a, c):
    """Row-parallel then all_reduce: a Replicate output whose gradient meets per-rank data in the body."""
    return all_reduce(a @ c, 0)


# (name, x placements, w placements, output placements, body): row-parallel gives a partial sum or mean
LAYOUTS = [
    ("row", [S1], [S0], [Partial()], _matmul),
    ("row_all_reduce", [S1], [S0], [R], _reduced_matmul),
    ("row_avg", [S1], [S0], [Partial("avg")], _mean_of_products),
    ("batch", [S0], [R], [S0], _matmul),
    ("column", [R], [S1], [S1], _matmul),
]


def _penalized(x, w, b, region):
    """Loss tanh(x @ w + b).sum() and its gradient penalty: the gradients of x, w and b (kept differentiable),
    squared and summed."""
    loss = torch.tanh(region(x, w) + b).sum()
    grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
    return grads, sum(g.pow(2).sum() for g in grads)


@pytest.mark.parametrize("name,x_pl,w_pl,out_pl,body", LAYOUTS, ids=[case[0] for case in LAYOUTS])
def test_gradient_penalty_layouts_match_one_device(sim_mesh_4, name, x_pl, w_pl, out_pl, body):
    """First- and second-order gradients of x, w and a bias outside the region equal one device's, and every
    Replicate gradient is the same on every rank (``full`` refuses one that is not)."""
    x, w, b = randn(8, 8), randn(8, 4), randn(4)
    with on_one_device():
        ref = [t.clone().requires_grad_() for t in (x, w, b)]
        ref_grads, ref_penalty = _penalized(*ref, _matmul if body is _reduced_matmul else body)
        ref_penalty.backward()
    region = local_map(body, out_pl, (x_pl, w_pl), None, sim_mesh_4)
    dts = [distribute(x, sim_mesh_4, x_pl, requires_grad=True), distribute(w, sim_mesh_4, w_pl, requires_grad=True),
           distribute(b, sim_mesh_4, [R], requires_grad=True)]
    grads, penalty = _penalized(*dts, region)
    for k, (g, g_ref) in enumerate(zip(grads, ref_grads)):
        assert max_diff(full(g), g_ref) < 1e-4, ("first order", k)
    penalty.backward()
    for k, (d, r) in enumerate(zip(dts, ref)):
        assert max_diff(full(d.grad), r.grad) < 1e-4, ("second order", k)
