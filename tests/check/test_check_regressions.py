"""Regression tests for failures the property tests (tests/test_properties.py) found, one plain case each,
compared with one device where values matter."""

import pytest
import torch

from helpers import P, R, S0, max_diff, randn
from localmap import LocalMapError, Partial, PlacementError, capture, local_map
from localmap.testing import distribute, fake_mesh, full, on_one_device, simulated_mesh


def test_sum_over_dim_with_empty_shards_backward():
    """1 row (and 0 rows) on 4 ranks: ranks hold 1, 0, 0, 0 rows; the gradient's per-rank strides differ and
    building its DTensor crashed (AssertionError in the simulated mesh's int comparison)."""
    for rows in (1, 0):
        with simulated_mesh(4) as mesh:
            x = randn(rows, 3)
            xd = distribute(x, mesh, [S0], requires_grad=True)
            out = local_map(lambda a: a.sum(0), [P], ([S0],), None, mesh)(xd)
            out.backward(distribute(torch.ones(3), mesh, [R]))
            assert max_diff(full(out), x.sum(0)) < 1e-6
            assert xd.grad.placements == (S0,) and max_diff(full(xd.grad), torch.ones(rows, 3)) == 0


def test_mean_over_unevenly_sharded_dim_is_refused():
    """10 rows on 4 ranks (3, 3, 3, 1): the mean of the local means is not the global mean, yet the check
    accepted Partial(avg). Even shards stay accepted and right."""
    with simulated_mesh(4) as mesh:
        x = randn(10, 3)
        f = local_map(lambda a: a.mean(0), [Partial("avg")], ([S0],), None, mesh)
        with pytest.raises(PlacementError, match="mean over dim 0, which is sharded unevenly"):
            f(distribute(x, mesh, [S0]))
        out = local_map(lambda a: a.mean(0), [Partial("avg")], ([S0],), None, mesh, check=False)(
            distribute(x, mesh, [S0]))
        assert max_diff(full(out), x.mean(0)) > 1e-3  # the value the check prevents is wrong
        y = randn(8, 3)
        assert max_diff(full(f(distribute(y, mesh, [S0]))), y.mean(0)) < 1e-6


def test_partial_max_output_with_grad_is_refused():
    """amax over a sharded dim is Partial(max); its gradient went to every rank's local maximum (wrong by the
    gradient of every non-maximal rank). Now an error when a gradient is needed; without one the value is right."""
    with simulated_mesh(4) as mesh:
        x = randn(8, 3)
        f = local_map(lambda a: a.amax(0), [Partial("max")], ([S0],), None, mesh)
        with pytest.raises(LocalMapError, match="Partial\\(max\\) and requires grad"):
            f(distribute(x, mesh, [S0], requires_grad=True))
        with torch.no_grad():
            out = f(distribute(x, mesh, [S0], requires_grad=True))
        assert max_diff(full(out), x.amax(0)) == 0
    with fake_mesh(4) as mesh:
        g = local_map(lambda a: a.amax(0), [Partial("max")], ([S0],), None, mesh)
        with pytest.raises(LocalMapError, match="Partial\\(max\\) and requires grad"):
            capture(lambda a: g(a).sum(), torch.randn(8, 3, requires_grad=True))


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


def test_mean_of_partial_value_is_partial():
    """A mean is linear: the mean of a Partial(sum) value is Partial(sum). The check refused it (DTensor's mean
    strategy asks for a redistribution); it is accepted and right."""
    with simulated_mesh(4) as mesh:
        x = randn(4, 6)
        xd = distribute(x, mesh, [P], requires_grad=True)
        out = local_map(lambda a: a.mean(1), [P], ([P],), None, mesh)(xd)
        out.backward(distribute(torch.ones(4), mesh, [R]))
        assert max_diff(full(out), x.mean(1)) < 1e-6
        assert xd.grad.placements == (R,) and max_diff(full(xd.grad), torch.full((4, 6), 1 / 6)) < 1e-6


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


def test_sum_of_partial_avg_value_is_partial_avg():
    """sum is linear: the sum of a Partial('avg') value is Partial('avg'). The check refused it."""
    with simulated_mesh(2) as mesh:
        x = randn(4, 3)
        xd = distribute(x, mesh, [Partial("avg")], requires_grad=True)
        out = local_map(lambda a: a.sum(0), [Partial("avg")], ([Partial("avg")],), None, mesh)(xd)
        out.backward(distribute(torch.ones(3), mesh, [R]))
        assert max_diff(full(out), x.sum(0)) < 1e-5
        assert xd.grad.placements == (R,) and max_diff(full(xd.grad), torch.ones(4, 3)) < 1e-6


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


@pytest.mark.timeout(60)
def test_flatten_of_empty_sharded_tensor_does_not_hang():
    """The check asked DTensor's view rule about a (0, 4) tensor, which loops forever on a size-0 dim; the
    region hung. Now the view of an empty tensor takes the conservative rule and the call returns."""
    with simulated_mesh((3, 2)) as mesh:
        x = randn(0, 4)
        xd = distribute(x, mesh, [S0, R], requires_grad=True)
        out = local_map(lambda a: torch.tanh(a.flatten(0, 1)), [S0, R], ([S0, R],), None, mesh)(xd)
        assert tuple(out.shape) == (0,) and out.placements == (S0, R)
        out.sum().backward()
        assert tuple(xd.grad.shape) == (0, 4)


def test_full_of_dim_sharded_on_two_mesh_dims_with_empty_shards():
    """testing.full used DTensor's full_tensor, whose redistribution fails on the simulated mesh ("narrow
    unexpectedly changed concrete size") for a size-1 dim sharded on two mesh dims (shards 1, 0, 0, 0). full now
    assembles the ranks' local tensors by the placements."""
    with simulated_mesh((2, 2, 2)) as mesh:
        x = randn(1, 4, 1)
        spec = [S0, torch.distributed.tensor.Shard(2), torch.distributed.tensor.Shard(2)]
        xd = distribute(x, mesh, spec)
        assert max_diff(full(xd), x) == 0
        out = local_map(lambda a: torch.tanh(a.mean(1)), [S0, torch.distributed.tensor.Shard(1),
                                                           torch.distributed.tensor.Shard(1)], (spec,), None, mesh)(xd)
        assert max_diff(full(out), torch.tanh(x.mean(1))) < 1e-6


def test_wrong_claim_on_empty_contraction_is_refused():
    """x (1, 0) @ w (0, 4) with the empty contraction dim sharded is a partial sum (of zeros); DTensor's
    cost-based strategy choice on empty tensors made the check read it as 'varies', so a wrong Shard(0) claim
    passed and gave a (2, 4) global shape for a (1, 4) value."""
    with simulated_mesh(2) as mesh:
        x, w = randn(1, 0), randn(0, 4)
        args = (distribute(x, mesh, [torch.distributed.tensor.Shard(1)]), distribute(w, mesh, [S0]))
        with pytest.raises(PlacementError, match="partial sum over the ranks but is claimed Shard"):
            local_map(lambda a, b: a @ b, [S0], ([torch.distributed.tensor.Shard(1)], [S0]), None, mesh)(*args)
        out = local_map(lambda a, b: a @ b, [P], ([torch.distributed.tensor.Shard(1)], [S0]), None, mesh)(*args)
        assert tuple(out.shape) == (1, 4) and max_diff(full(out), x @ w) == 0


def test_view_of_partial_value_with_one_row_per_rank():
    """Flattening a Partial(sum) value whose dim 0 is sharded one row per rank (4 rows on 4 ranks): DTensor's
    view rule, asked about local sizes, has no strategy, and the fallback refused the Partial input. A view
    keeps any Partial."""
    with simulated_mesh((2, 4)) as mesh:
        a, b = randn(4, 4, 2), randn(4, 4, 2)
        spec_a, spec_b = [P, S0], [R, S0]
        f = local_map(lambda x, y: (x * 1.5 * torch.tanh(y)).flatten(0, 1), [P, S0], (spec_a, spec_b), None, mesh)
        ad, bd = distribute(a, mesh, spec_a, requires_grad=True), distribute(b, mesh, spec_b, requires_grad=True)
        out = f(ad, bd)
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        ref = (ar * 1.5 * torch.tanh(br)).flatten(0, 1)
        up = randn(16, 2)
        ref.backward(up)
        out.backward(distribute(up, mesh, [R, S0]))
        assert max_diff(full(out), ref) < 1e-5
        assert max_diff(full(ad.grad), ar.grad) < 1e-5 and max_diff(full(bd.grad), br.grad) < 1e-5
