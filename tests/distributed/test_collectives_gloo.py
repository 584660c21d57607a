"""Every collective under real gloo processes (2 ranks, and 2x2), and torch.compile(fullgraph=True) of a region
with collectives against eager, on every rank."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from collective_cases import CASES, R, S0, moe_experts, moe_inputs, moe_reference, run_collective_region

from localmap import collectives as C
from localmap import local_map
from localmap.testing import distribute, full, run_gloo

pytestmark = pytest.mark.slow


def _collectives_on_gloo(mesh):
    """Every collective case on every mesh dim of a real gloo mesh; returns the largest difference."""
    worst = 0.0
    torch.manual_seed(0)  # the same global inputs on every rank
    for m in range(mesh.ndim):
        n = mesh.size(m)
        for name, body, reference, shapes, in_pl, out_pl in CASES:
            inputs = [torch.randn(*s) for s in shapes]
            diffs = run_collective_region(mesh, m, body, reference(n), inputs, in_pl, out_pl)
            worst = max(worst, *diffs.values())
    inputs = moe_inputs()
    if mesh.ndim == 1:
        ep = type(mesh)("cpu", mesh.mesh, mesh_dim_names=("ep",))
        diffs = run_collective_region(ep, 0, lambda d, *a: moe_experts(*a), moe_reference, inputs,
                                      [S0, R, S0, S0], S0)
        worst = max(worst, *diffs.values())
    return worst


@pytest.mark.parametrize("world,shape", [(2, (2,)), (4, (2, 2))], ids=["2", "2x2"])
def test_collectives_under_gloo(world, shape):
    names = ("tp",) if len(shape) == 1 else ("dp", "tp")
    for worst in run_gloo(_collectives_on_gloo, world, mesh_shape=shape, mesh_dim_names=names, timeout=240):
        assert worst <= 1e-4


def _compiled_collectives(mesh):
    """torch.compile(fullgraph=True) of regions with collectives: the same values and gradients as eager."""
    from helpers import rel_diff

    torch.manual_seed(0)
    q, k = torch.randn(8, 6), torch.randn(8, 6)

    def body(q, k):
        s = C.pvary(C.all_reduce(q.sum(0, keepdim=True), "tp"), "tp")
        return (q @ C.all_gather(k, "tp").T) * s.sum() + C.shift(q, "tp", 1).sum(1, keepdim=True)

    region = local_map(body, [S0], ([S0], [S0]), device_mesh=mesh)

    def step(q, k):
        return (region(q, k) ** 2).sum()

    def grads(fn):
        leaves = [distribute(t, mesh, [S0], requires_grad=True) for t in (q, k)]
        loss = fn(*leaves)
        loss.backward()
        return [full(loss)] + [full(d.grad) for d in leaves]

    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True))
    return max(rel_diff(c, e) for c, e in zip(compiled, eager))


def test_collectives_under_torch_compile():
    for diff in run_gloo(_compiled_collectives, 2, mesh_dim_names=("tp",), timeout=300):
        assert diff < 1e-5


# Catalogue programs whose all-reduced values are used again in the body (a log, a division): a gradient penalty
# through them differentiates the all_reduce's backward (tests/eager/test_double_backward.py on simulated meshes).
PENALTY_PROGRAMS = ("parallel: Megatron vocab-parallel cross-entropy, detached max",
                    "parallel: context-parallel attention, log-sum-exp merge")


def _gradient_penalty_on_gloo(mesh):
    """Outputs, first- and second-order gradients of each program against one device: the largest relative
    difference per program."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "matrix"))
    from catalogue import BY_ID
    from matrix_paths import compare, draw, on_dtensors, reference

    worst = {}
    for name in PENALTY_PROGRAMS:
        prog = BY_ID[name]
        named = type(mesh)("cpu", mesh.mesh, mesh_dim_names=prog.mesh[1])
        t = draw(prog, 1)
        diffs = compare(on_dtensors(prog, t, named, "single", penalty=True), reference(prog, t, "single", True))
        worst[name] = max(diffs.values())
    return worst


def test_gradient_penalty_through_collectives_under_gloo():
    for worst in run_gloo(_gradient_penalty_on_gloo, 2, timeout=240):
        assert all(d <= 1e-4 for d in worst.values()), worst

