"""Every valid placement combination of a matmul body and an elementwise body, on a simulated 1-D (4) and
2-D (2x2) mesh: values and gradients equal the same computation on one device.

Per mesh dim, a combination is (placements of the two inputs, of the output, of the two input gradients).
On a 2-D mesh every pair of per-dim combinations is valid, because the bodies are bilinear and each mesh dim
shards independently. The gradient placements follow the transpose rule: Shard stays Shard, Partial becomes
Replicate, and Replicate becomes Partial where it met data that varies across that mesh dim.
"""

import itertools

import pytest
import torch

from helpers import P, R, S0, S1, check_region, randn

# (x, w) -> y for y = x @ w, with the gradient placements of x and w.
MATMUL = {
    "row-parallel x": ((S0, R), S0, (S0, P)),
    "column-parallel w": ((R, S1), S1, (P, S1)),
    "contraction split": ((S1, S0), P, (S1, S0)),
    "replicated": ((R, R), R, (R, R)),
    "partial x": ((P, R), P, (R, P)),
    "partial w": ((R, P), P, (P, R)),
}

# (a, b) -> y for y = a * b
ELEMENTWISE = {
    "both rows": ((S0, S0), S0, (S0, S0)),
    "both cols": ((S1, S1), S1, (S1, S1)),
    "replicated": ((R, R), R, (R, R)),
    "partial a": ((P, R), P, (R, P)),
    "partial b": ((R, P), P, (P, R)),
}


def _combine(per_dim):
    """Combine one per-mesh-dim combination per mesh dim into full placement tuples."""
    ins = tuple(tuple(c[0][k] for c in per_dim) for k in range(2))
    out = tuple(c[1] for c in per_dim)
    grads = tuple(tuple(c[2][k] for c in per_dim) for k in range(2))
    return ins, out, grads


def _cases(table, ndim):
    for names in itertools.product(table, repeat=ndim):
        yield pytest.param(_combine([table[n] for n in names]), id=" x ".join(names))


def matmul(x, w):
    return x @ w


def mul(a, b):
    return a * b


@pytest.mark.parametrize("case", list(_cases(MATMUL, 1)))
def test_matmul_1d(sim_mesh_4, case):
    ins, out, grads = case
    check_region(sim_mesh_4, matmul, [randn(8, 12), randn(12, 16)], ins, out, grads)


@pytest.mark.parametrize("case", list(_cases(MATMUL, 2)))
def test_matmul_2d(sim_mesh_2x2, case):
    ins, out, grads = case
    check_region(sim_mesh_2x2, matmul, [randn(8, 12), randn(12, 16)], ins, out, grads)


@pytest.mark.parametrize("case", list(_cases(ELEMENTWISE, 1)))
def test_elementwise_1d(sim_mesh_4, case):
    ins, out, grads = case
    check_region(sim_mesh_4, mul, [randn(8, 12), randn(8, 12)], ins, out, grads)


@pytest.mark.parametrize("case", list(_cases(ELEMENTWISE, 2)))
def test_elementwise_2d(sim_mesh_2x2, case):
    ins, out, grads = case
    check_region(sim_mesh_2x2, mul, [randn(8, 12), randn(8, 12)], ins, out, grads)


def test_replicated_weight_gradient_needs_partial(sim_mesh_2x2):
    """A weight Replicate on 'tp' used with activations sharded on 'tp': its gradient is a partial sum.

    Given as [Partial()] on that dim it is right; left out (in_grad_placements=None) it is inferred as Partial
    and right too; claimed Replicate (PyTorch's local_map default) the check refuses it, and with the check off
    each rank holds only its own contribution, so the result is wrong."""
    from localmap.check.checker import PlacementError

    x, w = randn(8, 12), randn(12, 16)
    check_region(sim_mesh_2x2, matmul, [x, w], [(R, S0), (R, R)], (R, S0), [(R, S0), (R, P)])
    diffs = check_region(sim_mesh_2x2, matmul, [x, w], [(R, S0), (R, R)], (R, S0), None,
                         expected_grads=[(R, S0), (R, P)])
    assert diffs["grad1"] < 1e-5
    with pytest.raises(PlacementError, match="in_grad_placements for args\\[1\\].*partial sum"):
        check_region(sim_mesh_2x2, matmul, [x, w], [(R, S0), (R, R)], (R, S0), [(R, S0), (R, R)])
    # Ranks then disagree on a "replicated" value (the simulation refuses to reconcile it) or it is wrong.
    with pytest.raises(AssertionError, match="differs from single-device|must be the same"):
        check_region(sim_mesh_2x2, matmul, [x, w], [(R, S0), (R, R)], (R, S0), [(R, S0), (R, R)], check=False)


def test_nonlinear_elementwise(sim_mesh_2x2):
    body = lambda a, b: torch.tanh(a) * b + a.exp()  # noqa: E731
    check_region(sim_mesh_2x2, body, [randn(8, 12), randn(8, 12)], [(S0, S1), (S0, S1)], (S0, S1),
                 [(S0, S1), (S0, S1)])
    check_region(sim_mesh_2x2, body, [randn(8, 12), randn(12)], [(S0, R), (R, R)], (S0, R),
                 [(S0, R), (P, R)])


def test_specs_shorter_than_the_mesh_leave_trailing_dims_replicate(sim_mesh_2x2):
    """PyTorch's meaning: [Shard(0)] on a 2-d mesh is (Shard(0), Replicate()), for inputs, outputs and gradient
    placements; values and gradients as on one device."""
    from localmap import local_map
    from localmap.testing import distribute, full

    x, w = randn(8, 12), randn(12, 16)
    region = local_map(matmul, [S0], ([S0], [R]), ([S0], [P]), sim_mesh_2x2)
    dx, dw = distribute(x, sim_mesh_2x2, (S0, R), requires_grad=True), distribute(w, sim_mesh_2x2, (R, R),
                                                                                   requires_grad=True)
    out = region(dx, dw)
    assert tuple(out.placements) == (S0, R)
    out.sum().backward()
    assert (tuple(dx.grad.placements), tuple(dw.grad.placements)) == ((S0, R), (P, R))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr).sum().backward()
    assert torch.allclose(full(out), x @ w, atol=1e-5)
    assert torch.allclose(full(dx.grad), xr.grad, atol=1e-5) and torch.allclose(full(dw.grad), wr.grad, atol=1e-5)


def test_messages_carry_pytorchs_phrases(sim_mesh_2x2):
    """Code matching PyTorch's local_map messages matches ours: "expects placements" (a DTensor input given
    None), "set redistribute_inputs=True" (placements that differ)."""
    from localmap import LocalMapError, local_map
    from localmap.testing import distribute

    x = distribute(randn(8, 4), sim_mesh_2x2, (S0, R))
    with pytest.raises(LocalMapError, match="expects placements"):
        local_map(lambda a: a, [S0, R], (None,), device_mesh=sim_mesh_2x2)(x)
    with pytest.raises(LocalMapError, match="set redistribute_inputs=True"):
        local_map(lambda a: a, [R, R], ([R, R],), device_mesh=sim_mesh_2x2)(x)
