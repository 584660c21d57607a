"""localmap.placements.algebra: the gradient default (Partial read as Replicate), average scaling over
Partial('avg') mesh dims, and extreme Partials (max/min), with the mesh a fake 2x4 ('dp', 'tp')."""

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from helpers import expect_error
from localmap.placements.algebra import (avg_grad_scale, avg_ranks, extreme_grad_error, grad_default, has_avg,
                                         has_extreme, is_extreme, whole_grad_ranks)
from localmap.testing import fake_mesh

S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()
AVG, MAX, MIN = Partial("avg"), Partial("max"), Partial("min")


@pytest.fixture
def fake_mesh_2x4():
    with fake_mesh((2, 4), ("dp", "tp")) as mesh:
        yield mesh


def test_grad_default_reads_partial_as_replicate():
    assert grad_default((P,)) == (R,)
    assert grad_default((S0, P)) == (S0, R)
    assert grad_default((AVG, MAX, MIN)) == (R, R, R)
    assert grad_default((R, S1)) == (R, S1)
    assert grad_default((S0, P)) == (S0, R)  # again: the memoized answer is the same


def test_has_avg():
    assert has_avg((S0, AVG)) and not has_avg((S0, P)) and not has_avg((R, MAX))


def test_avg_ranks(fake_mesh_2x4):
    assert avg_ranks([AVG, R], fake_mesh_2x4) == 2
    assert avg_ranks([R, AVG], fake_mesh_2x4) == 4
    assert avg_ranks([AVG, AVG], fake_mesh_2x4) == 8
    assert avg_ranks([P, AVG], fake_mesh_2x4) == 4  # a sum is not averaged
    assert avg_ranks([S0, R], fake_mesh_2x4) == 1


def test_avg_grad_scale(fake_mesh_2x4):
    assert avg_grad_scale([AVG, AVG], [R, R], fake_mesh_2x4) == 8
    assert avg_grad_scale([AVG, AVG], [R, AVG], fake_mesh_2x4) == 2  # only where the gradient is Replicate
    assert avg_grad_scale([R, AVG], [R, R], fake_mesh_2x4) == 4
    assert avg_grad_scale([P, S0], [R, S0], fake_mesh_2x4) == 1
    assert avg_grad_scale(None, [R, R], fake_mesh_2x4) == 1 and avg_grad_scale([AVG, R], None, fake_mesh_2x4) == 1


def test_whole_grad_ranks(fake_mesh_2x4):
    """The ranks over which a Partial input's Replicate gradient is whole on each rank (double backward)."""
    assert whole_grad_ranks([P, P], [R, R], fake_mesh_2x4) == 8
    assert whole_grad_ranks([AVG, S0], [R, S0], fake_mesh_2x4) == 2  # a mean as a sum
    assert whole_grad_ranks([R, P], [P, R], fake_mesh_2x4) == 4  # a Replicate input's Partial gradient: shares
    assert whole_grad_ranks([P, R], [P, R], fake_mesh_2x4) == 1  # a gradient given Partial: shares already
    assert whole_grad_ranks([R, S0], [R, S0], fake_mesh_2x4) == 1
    assert whole_grad_ranks(None, [R, R], fake_mesh_2x4) == 1


def test_extreme_partials():
    assert is_extreme(MAX) and is_extreme(MIN)
    assert not is_extreme(P) and not is_extreme(AVG) and not is_extreme(R) and not is_extreme(S0)
    assert has_extreme((R, MIN)) and has_extreme((MAX,))
    assert not has_extreme((P, AVG)) and not has_extreme((S0, R))


def test_extreme_grad_error(fake_mesh_2x4):
    err = extreme_grad_error("outputs[1]", (S0, MAX), fake_mesh_2x4)

    def raise_it():
        raise err

    msg = str(expect_error(raise_it, "outputs[1]", ("is Partial(max) and requires grad",
                                                    "given:    (Shard(dim=0), Partial(max))", "all_reduce")))
    assert msg.splitlines()[0].endswith(" on mesh dim 1 ('tp')"), msg
    assert err.path == "outputs[1]" and err.mesh_dim == 1
