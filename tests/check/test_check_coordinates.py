"""Bodies that read the mesh on purpose (check.coordinates, NOTE "meaning that follows the mesh"): an all_reduce of
a shard, rows moved in equal splits, ppermute and shift, a shard scaled by the rank's coordinate. Their meaning on
the call's mesh is stated and proven (check="strict", no warning), and their values and gradients match that
meaning computed on one device; values read from the rank in other ways are not proven, and wrong claims on
these values are refused."""

from __future__ import annotations

import warnings

import pytest
import torch

from collective_cases import CASES, run_collective_region
from helpers import P, R, S0, S1, randn
from localmap import PlacementError, UnprovenError, local_map
from localmap import collectives as C
from localmap.testing import distribute

MESH_DEPENDENT = ["all_reduce_sum", "all_reduce_avg", "all_reduce_max", "all_reduce_min", "all_to_all_single_even",
                  "ppermute_reverse", "shift_plus_1", "shift_minus_1", "axis_index"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in MESH_DEPENDENT], ids=lambda c: c[0])
@pytest.mark.parametrize("mesh_name", ["sim_mesh_4", "sim_mesh_2x2"])
def test_a_body_that_reads_the_mesh_is_proven_with_its_meaning_on_the_calls_mesh(case, mesh_name, request):
    mesh = request.getfixturevalue(mesh_name)
    name, body, reference, shapes, in_pl, out_pl = case
    m = mesh.ndim - 1  # the inner mesh dim on the 2x2 mesh: the other dim is Replicate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_collective_region(mesh, m, body, reference(mesh.shape[m]), [randn(*s) for s in shapes], in_pl, out_pl,
                              check="strict")


def _refused(mesh, body, x, in_pl, out_pl):
    """Strict mode refuses the claim, as wrong or as unproven: it is never proven."""
    region = local_map(body, out_pl, in_pl, None, mesh, check="strict")
    with pytest.raises((PlacementError, UnprovenError)):
        region(distribute(x, mesh, in_pl[0]))


@pytest.mark.parametrize("body,in_pl,out_pl", [
    # positions offset by the coordinate alone, not by it times the local length: not the rows' global positions
    (lambda x: x * (torch.arange(x.shape[0]) + C.axis_index(0)).unsqueeze(1), [S0], [S0]),
    # a per-rank scalar read from the data (a local sum over the sharded dim) is no coordinate value
    (lambda x: x / x.sum(), [S0], [S0]),
    # the coordinate scaling a value the same on every rank: it differs per rank
    (lambda x: x * (1 + C.axis_index(0)), [R], [R]),
    # the coordinate scaling a partial sum: the ranks' scaled shares do not sum to anything stated
    (lambda x: x * (1 + C.axis_index(0)), [P], [P]),
    # ppermute of partial sums, claimed Partial: no permutation of shares is proven to keep their sum
    (lambda x: C.shift(x, 0, 1), [P], [P]),
    # the all_reduce of a shard is the same on every rank: claimed a shard, its rows would be counted n times
    (lambda x: C.all_reduce(x, 0), [S0], [S0]),
    # a sum of a replicated value (a second all_reduce of one value) is n times it: no meaning derived
    (lambda x: C.all_reduce(x, 0), [R], [R]),
    # rows moved in equal splits from a shard of dim 1: not a shard of the rows
    (lambda x: C.all_to_all_single(x, 0), [S1], [S0]),
], ids=["offset_without_local_length", "scalar_from_data", "coordinate_on_whole", "coordinate_on_partial",
        "shift_of_partial", "all_reduce_claimed_shard", "all_reduce_of_whole", "equal_splits_of_columns"])
def test_values_read_from_the_rank_otherwise_are_not_proven(sim_mesh_4, body, in_pl, out_pl):
    _refused(sim_mesh_4, body, randn(8, 8), [in_pl], out_pl)


def test_the_coordinate_of_another_mesh_dim_does_not_make_a_shard(sim_mesh_2x2):
    """x is Shard(0) on mesh dim 0 and whole on dim 1; scaled by the coordinate on dim 1 it differs across dim 1's
    ranks with no shard there."""
    pl = [S0, R]
    region = local_map(lambda x: x * (1 + C.axis_index(1)), [pl], [pl], None, sim_mesh_2x2, check="strict")
    with pytest.raises((PlacementError, UnprovenError)):
        region(distribute(randn(8, 4), sim_mesh_2x2, pl))


def test_a_shift_and_its_inverse_are_the_identity_and_proven(sim_mesh_4):
    """A ring step forward then back: the meaning stated on the mesh composes to the input itself."""
    x = randn(8, 6)
    run_collective_region(sim_mesh_4, 0, lambda d, a: C.shift(C.shift(a, d, 1), d, -1).sin(),
                          lambda a: a.sin(), [x], [S0], S0, check="strict")



def test_the_verdict_names_the_steps_read_by_their_meaning_on_the_mesh(sim_mesh_4):
    """Verdict.follows_mesh lists where an ok verdict rests on a meaning that follows the mesh (localmap inspect
    prints them as notes); a region whose meaning is the one-rank run's has none."""
    x = distribute(randn(8, 6), sim_mesh_4, [S0])
    blocks = local_map(lambda a: C.all_reduce(a, 0, "max"), [R], [[S0]], None, sim_mesh_4)
    whole = local_map(lambda a: C.all_reduce(a.sum(0), 0), [R], [[S0]], None, sim_mesh_4)
    shifted = local_map(lambda a: C.shift(a, 0, 1), [S0], [[S0]], None, sim_mesh_4)
    for region in (blocks, whole, shifted):
        region(x)
    (b,), (w,), (s,) = (r.region.verdicts() for r in (blocks, whole, shifted))
    assert b.status == w.status == s.status == "ok"
    assert len(b.follows_mesh) == 1 and "the max of the global value's 4 blocks along dim 0" in b.follows_mesh[0]
    assert w.follows_mesh == []
    assert len(s.follows_mesh) == 1 and "a block picked by the rank's coordinate" in s.follows_mesh[0], s.follows_mesh


def test_a_replicated_table_looked_up_at_the_coordinate_gets_a_partial_gradient(sim_mesh_4):
    """A learned per-rank scale: a Replicate table read at this rank's coordinate scales its shard. Each rank's
    gradient reaches only its own entry, so the table's gradient is a Partial sum (inferred), and values and
    gradients match the meaning on the mesh computed on one device."""
    body = lambda d, x, table: x * table.index_select(0, C.axis_index(d).reshape(1))  # noqa: E731
    reference = lambda x, table: x * table.repeat_interleave(2).unsqueeze(1)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_collective_region(sim_mesh_4, 0, body, reference, [randn(8, 6), randn(4)], [S0, R], S0,
                              grad_placements=[(S0,), (P,)], check="strict")
    region = local_map(lambda x, t: body(0, x, t), [S0], [[S0], [R]], [[S0], [R]], sim_mesh_4)
    with pytest.raises(PlacementError, match="Replicate"):  # the table's gradient given Replicate: refused
        region(distribute(randn(8, 6), sim_mesh_4, [S0]), distribute(randn(4), sim_mesh_4, [R]))


def _flash(q, k, v, mask):
    """The fused CPU kernel with a mask, called as torch 2.14's SDPA dispatches a masked call on CPU ([B, H, L, E])."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)[0]


def _global_causal(q, k, v):
    """Queries sharded along their sequence (dim 2), keys and values whole; the causal mask from the queries'
    global positions, this rank's rows of the one-device mask."""
    rows = torch.arange(q.shape[2]) + C.axis_index(0) * q.shape[2]
    mask = torch.where(rows[:, None] >= torch.arange(k.shape[2])[None, :], 0.0, float("-inf"))
    return _flash(q, k, v, mask)


def _one_device_causal(q, k, v):
    rows = torch.arange(q.shape[2])
    return _flash(q, k, v, torch.where(rows[:, None] >= torch.arange(k.shape[2])[None, :], 0.0, float("-inf")))


def test_a_fused_kernels_mask_of_the_queries_own_rows_is_proven(sim_mesh_4):
    """A fused attention kernel with a mask sharded like its queries (rows from global positions): proven, values
    and gradients equal to one device (k and v's gradients Partial, inferred)."""
    q, k, v = randn(1, 2, 8, 4), randn(1, 2, 8, 4), randn(1, 2, 8, 4)
    S2 = torch.distributed.tensor.Shard(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_collective_region(sim_mesh_4, 0, lambda d, *a: _global_causal(*a), _one_device_causal, [q, k, v],
                              [S2, R, R], S2, grad_placements=[(S2,), (P,), (P,)], check="strict")


@pytest.mark.parametrize("mask_of", [
    lambda q, k: torch.where(torch.arange(q.shape[2])[:, None] >= torch.arange(k.shape[2])[None, :], 0.0, -1e9),
    lambda q, k: torch.where((torch.arange(q.shape[2]) + (C.axis_index(0) + 1) % 4 * q.shape[2])[:, None]
                             >= torch.arange(k.shape[2])[None, :], 0.0, -1e9),
], ids=["local_positions", "next_ranks_rows"])
def test_a_fused_kernels_mask_not_cut_like_its_queries_is_not_proven(sim_mesh_4, mask_of):
    """A mask from local positions (every shard starts at query 0), or from the next rank's positions: each rank
    does not use its own rows of the one-device mask, never proven."""
    S2 = torch.distributed.tensor.Shard(2)
    region = local_map(lambda q, k, v: _flash(q, k, v, mask_of(q, k)), [S2], [[S2], [R], [R]], None, sim_mesh_4,
                       check="strict")
    with pytest.raises((PlacementError, UnprovenError)):
        region(*[distribute(randn(1, 2, 8, 4), sim_mesh_4, [p]) for p in (S2, R, R)])
