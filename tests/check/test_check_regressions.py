"""Regression tests for the placement check, from failures the property tests (tests/check/test_properties.py)
found, one plain case each, compared with one device where values matter."""

import pytest
import torch

from helpers import P, R, S0, S1, max_diff, randn
from localmap import Partial, PlacementError, Shard, local_map
from localmap.testing import distribute, full, simulated_mesh


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


def test_sum_of_partial_avg_value_is_partial_avg():
    """sum is linear: the sum of a Partial('avg') value is Partial('avg'). The check refused it."""
    with simulated_mesh(2) as mesh:
        x = randn(4, 3)
        xd = distribute(x, mesh, [Partial("avg")], requires_grad=True)
        out = local_map(lambda a: a.sum(0), [Partial("avg")], ([Partial("avg")],), None, mesh)(xd)
        out.backward(distribute(torch.ones(3), mesh, [R]))
        assert max_diff(full(out), x.sum(0)) < 1e-5
        assert xd.grad.placements == (R,) and max_diff(full(xd.grad), torch.ones(4, 3)) < 1e-6


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


def test_a_claim_shorter_than_the_mesh_is_checked_with_its_trailing_dims_replicate(sim_mesh_2x2):
    """out_placements [Partial()] on a 2-d mesh means (Partial, Replicate), as the region's output is built; the
    check compared nothing for such a claim and called x * 2 of a [Shard(0), Shard(0)] input proven."""
    region = local_map(lambda x: x * 2, [P], [[S0, S0]], None, sim_mesh_2x2, check="strict")
    with pytest.raises(PlacementError, match="inferred Shard"):
        region(distribute(randn(8, 3), sim_mesh_2x2, [S0, S0]))


@pytest.mark.parametrize("shape, body, claim", [
    ((1, 1, 4), lambda t: t.sigmoid().flatten(0, 1), S1),  # batch and heads of 1: the flattened dims are 1
    ((1, 1, 1), lambda t: t.sigmoid().flatten(0, 1), S1),  # uneven: 1 column on rank 0, none on rank 1
    ((1, 1, 4), lambda t: t.flatten(1, 2), S1),
])
def test_flatten_beside_dims_of_one_keeps_the_shard_on_its_own_dim(shape, body, claim):
    """A flatten of dims of size 1 before a shard of dim 2 (property seed 30 on 2.14.1): the local view (1, 1, k)
    -> (1, k) also fits a global (2, k) sharded on dim 0, which the check took, so it refused the right claim
    Shard(1) as wrong. The shard now lands on the output dim the view makes of dim 2: proven, and equal to one
    device; the other claim is refused."""
    with simulated_mesh(2) as mesh:
        x = randn(*shape)
        y = local_map(body, [claim], ([Shard(2)],), None, mesh)(distribute(x, mesh, [Shard(2)]))
        assert max_diff(full(y), body(x)) == 0
        with pytest.raises(PlacementError, match="is a shard of dim 1 but is claimed Shard"):
            local_map(body, [S0], ([Shard(2)],), None, mesh)(distribute(x, mesh, [Shard(2)]))
