"""Regression tests for eager regions on the simulated mesh (empty shards, Partial(max) outputs, testing.full),
from failures the property tests (tests/check/test_properties.py) found, one plain case each, compared with one
device where values matter."""

import pytest
import torch

from helpers import P, R, S0, max_diff, randn
from localmap import LocalMapError, Partial, capture, local_map
from localmap.testing import distribute, fake_mesh, full, simulated_mesh


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
