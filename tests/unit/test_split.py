"""localmap.program.split: a global value's per-rank pieces (split) and the value from every rank's piece (join)
for Shard (torch.chunk slices, nested over mesh dims), Replicate and Partial(sum/avg/max/min), on small mesh
shapes; each piece is checked against the slice or share worked out by hand, then joined back."""

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from helpers import expect_error
from localmap.program.split import coordinates, join, split

S0, S1, R = Shard(0), Shard(1), Replicate()


def _pieces(value, placements, mesh_shape):
    return {c: split(value, placements, mesh_shape, c) for c in coordinates(mesh_shape)}


def _join(pieces, placements, mesh_shape):
    notes = []
    out = join(pieces, placements, mesh_shape, notes.append)
    return out, notes


def test_coordinates_in_mesh_order():
    assert coordinates((2, 3)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert coordinates((4,)) == [(0,), (1,), (2,), (3,)]


def test_shard_uneven_rows():
    x = torch.arange(20.0).reshape(10, 2)
    pieces = _pieces(x, [S0], (4,))
    assert [p.shape[0] for p in pieces.values()] == [3, 3, 3, 1]
    assert torch.equal(pieces[(2,)], x[6:9]) and torch.equal(pieces[(3,)], x[9:10])
    out, notes = _join(pieces, [S0], (4,))
    assert torch.equal(out, x) and notes == []


def test_shard_of_one_dim_on_two_mesh_dims():
    x = torch.arange(7.0)
    pieces = _pieces(x, [S0, S0], (2, 2))  # 7 -> 4, 3 over mesh dim 0, then 2, 2 and 2, 1 over mesh dim 1
    assert {c: p.tolist() for c, p in pieces.items()} == {(0, 0): [0.0, 1.0], (0, 1): [2.0, 3.0],
                                                           (1, 0): [4.0, 5.0], (1, 1): [6.0]}
    out, notes = _join(pieces, [S0, S0], (2, 2))
    assert torch.equal(out, x) and notes == []


def test_shard_of_two_dims():
    x = torch.arange(24.0).reshape(4, 6)
    pieces = _pieces(x, [S0, S1], (2, 2))
    assert torch.equal(pieces[(1, 0)], x[2:4, 0:3]) and torch.equal(pieces[(0, 1)], x[0:2, 3:6])
    out, notes = _join(pieces, [S0, S1], (2, 2))
    assert torch.equal(out, x) and notes == []


def test_replicate():
    x = torch.arange(6.0).reshape(2, 3)
    pieces = _pieces(x, [R], (3,))
    assert all(torch.equal(p, x) for p in pieces.values())
    out, notes = _join(pieces, [R], (3,))
    assert torch.equal(out, x) and notes == []
    pieces[(2,)] = x + 1  # ranks disagree on a "replicated" value: noted, rank 0's value returned
    out, notes = _join(pieces, [R], (3,))
    assert torch.equal(out, x) and notes == ["claimed Replicate on mesh dim 0 but ranks hold different values"]


@pytest.mark.parametrize("op,rank,want", [
    ("sum", 1, lambda x: x * 0.2),  # shares (c + 1) / 10 on 4 ranks: 0.1, 0.2, 0.3, 0.4 (sum 1)
    ("avg", 0, lambda x: x * 0.4),  # the same shares times 4: 0.4, 0.8, 1.2, 1.6 (mean 1)
    ("max", 2, lambda x: x - 3),  # rank 0 holds the value, rank c the value - 1 - c
    ("min", 2, lambda x: x + 3),  # rank 0 holds the value, rank c the value + 1 + c
])
def test_partial_pieces_reduce_to_the_value(op, rank, want):
    x = torch.tensor([[1.0, -2.0], [4.0, 8.0]])
    pieces = _pieces(x, [Partial(op)], (4,))
    assert torch.allclose(pieces[(rank,)], want(x))
    assert torch.equal(pieces[(0,)], x) == (op in ("max", "min"))  # unequal pieces for sum and avg
    out, notes = _join(pieces, [Partial(op)], (4,))
    assert torch.allclose(out, x) and notes == []


@pytest.mark.parametrize("placements", [[S0, Partial("sum")], [Partial("avg"), S1], [R, Partial("max")],
                                        [Partial("min"), R]], ids=str)
def test_round_trip_on_a_2d_mesh(placements):
    x = torch.arange(1.0, 13.0).reshape(4, 3) / 4
    out, notes = _join(_pieces(x, placements, (2, 2)), placements, (2, 2))
    assert torch.allclose(out, x) and notes == []


def test_non_tensors_and_no_placements_pass_through():
    assert split(3, [S0], (2,), (1,)) == 3
    x = torch.ones(2)
    assert split(x, None, (2,), (1,)) is x
    assert join({(0,): "a", (1,): "b"}, None, (2,), print) == "a"


def test_unsupported_partial_is_refused():
    expect_error(lambda: split(torch.ones(2), [Partial("prod")], (2,), (1,)), "run",
                 ("Partial('prod') inputs are not supported by run",))
