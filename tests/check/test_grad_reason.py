"""A refused in_grad_placements says why the inferred gradient placement is what it is: Shard gets its own
reason, only Replicate gets "every rank computes the same gradient"."""

import pytest
import torch

from localmap import Partial, PlacementError, Replicate, Shard, local_map
from localmap.testing import distribute, simulated_mesh


def _refusal(in_grad):
    with simulated_mesh((2,), ("tp",)) as mesh:
        f = local_map(lambda x, w: x @ w, [Shard(0)], ([Shard(0)], [Replicate()]), in_grad_placements=in_grad,
                      device_mesh=mesh)
        x = distribute(torch.randn(4, 3), mesh, [Shard(0)], requires_grad=True)
        w = distribute(torch.randn(3, 2), mesh, [Replicate()], requires_grad=True)
        with pytest.raises(PlacementError) as info:
            f(x, w)
    return str(info.value)


def test_shard_gradient_gets_its_own_reason():
    text = _refusal(([Replicate()], [Partial()]))  # x's gradient claimed Replicate; it is Shard(0)
    assert "the gradient is Shard(dim=0) (the input is sharded on dim 0, so each rank holds the gradient of its " \
           "own shard)" in text
    assert "every rank computes the same gradient" not in text


def test_partial_gradient_reason():
    text = _refusal(([Shard(0)], [Replicate()]))  # w's gradient claimed Replicate; it is a partial sum
    assert "the gradient is Partial(sum) (it meets data that varies across those ranks" in text
