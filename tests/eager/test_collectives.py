"""localmap.collectives inside regions: values and gradients against a single-device reference for every
collective, on 1-D and 2-D simulated meshes and on each mesh dim; the checker's rules for them. Captured programs
with collectives: tests/program/test_captured_collectives.py; gloo processes:
tests/distributed/test_collectives_gloo.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from collective_cases import CASES, R, S0, blocks, moe_experts, moe_inputs, moe_reference, ring_attention, \
    run_collective_region
from helpers import randn

from localmap import LocalMapError, PlacementError, Partial, Shard, local_map
from localmap import collectives as C
from localmap.testing import distribute, simulated_mesh


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mesh_shape,m", [((4,), 0), ((2, 2), 0), ((2, 2), 1)], ids=["1d", "2d-dp", "2d-tp"])
def test_collective_values_and_gradients(case, mesh_shape, m):
    name, body, reference, shapes, in_pl, out_pl = case
    names = ("tp",) if len(mesh_shape) == 1 else ("dp", "tp")
    with simulated_mesh(mesh_shape, names) as mesh:
        n = mesh.size(m)
        run_collective_region(mesh, m, body, reference(n), [randn(*s) for s in shapes], in_pl, out_pl)


def test_mesh_dim_by_index_and_explicit_mesh(sim_mesh_2x2):
    x = randn(8, 6)
    run_collective_region(sim_mesh_2x2, 1, lambda d, x: C.all_reduce(x, 1, mesh=sim_mesh_2x2),
                          lambda x: blocks(x, 2).sum(0), [x], [S0], R)


# ---- the checker's rules for collectives ---------------------------------------------------------------------

def test_all_reduce_result_meeting_per_rank_data_needs_pvary(sim_mesh_4):
    def body(x):
        return x * C.all_reduce(x.sum(0, keepdim=True), 0)  # no pvary: its gradient would miss other ranks

    x = randn(8, 6)
    with pytest.raises(PlacementError, match=r"(?s)meets per-rank data in aten.mul.*pvary"):
        local_map(body, [S0], ([S0],), device_mesh=sim_mesh_4)(distribute(x, sim_mesh_4, [S0]))
    # The verdict is backed by numbers: unchecked, the forward is right but the gradient is not.
    with pytest.raises(AssertionError, match="grad0"):
        run_collective_region(sim_mesh_4, 0, lambda d, x: body(x), lambda x: x * x.sum(0, keepdim=True),
                              [x], [S0], S0, check=False)


def test_all_gather_result_claimed_replicate_is_an_error_and_wrong_gradient(sim_mesh_4):
    x = randn(8, 6)
    with pytest.raises(PlacementError, match="claimed Replicate"):
        local_map(lambda a: C.all_gather(a, 0) * 2, [R], ([S0],), device_mesh=sim_mesh_4)(
            distribute(x, sim_mesh_4, [S0]))
    with pytest.raises(AssertionError, match="grad0"):  # reduce-scatter sums n copies of a replicated gradient
        run_collective_region(sim_mesh_4, 0, lambda d, a: C.all_gather(a, d) * 2, lambda a: a * 2, [x], [S0], R,
                              check=False)


def test_all_reduce_of_a_partial_sum_and_of_a_shard_is_replicate(sim_mesh_4):
    """A partial sum all-reduced is proven Replicate (claimed Partial: refused). The shards themselves summed are
    the sum of the global rows' blocks, a meaning that follows the mesh's size, stated on the call's mesh (NOTE in
    check.coordinates): proven Replicate too, and claimed Partial or a shard, refused (every rank holds the same
    value, so the ranks' pieces would count it n times)."""
    x = distribute(randn(8, 6), sim_mesh_4, [S0])
    summed = lambda a: C.all_reduce(a.sum(0, keepdim=True), 0)  # noqa: E731
    blocks = lambda a: C.all_reduce(a, 0)  # noqa: E731
    for body in (summed, blocks):
        assert local_map(body, [R], ([S0],), device_mesh=sim_mesh_4, check="strict")(x).placements == (R,)
    for body, claim in ((summed, Partial()), (blocks, Partial()), (blocks, S0)):
        with pytest.raises(PlacementError, match=f"claimed {claim!r}".replace("(", r"\(").replace(")", r"\)")):
            local_map(body, [claim], ([S0],), device_mesh=sim_mesh_4)(x)


def test_all_reduce_of_per_rank_values_one_shard_long_is_unproven_by_its_shapes(sim_mesh_4):
    """Per-rank values with no global form (a shard less its local maximum), summed: the same on every rank and
    one shard long, where the one-rank run is the whole dim long. The test calls the difference a dependence (the
    shapes follow the mesh's size), so it runs with an "unproven" warning, never silently and never refused."""
    x = distribute(randn(8, 6), sim_mesh_4, [S0])
    with pytest.warns(UserWarning, match="unproven.*shapes that follow the mesh's size"):
        local_map(lambda a: C.all_reduce(a - a.max(), 0), [R], ([S0],), device_mesh=sim_mesh_4)(x)


def test_replicate_input_meeting_gathered_data_gets_partial_gradient(sim_mesh_4):
    """A Replicate weight used with all_gather'd data (the same on every rank, its gradient per rank, as it meets
    this rank's shard): inferred Partial and right."""
    x, w = randn(8, 6), randn(6, 6)
    body = lambda d, x, w: x * (C.all_gather(x, d) @ w).sum(0)  # noqa: E731
    out_ref = lambda x, w: x * (x @ w).sum(0)  # noqa: E731
    run_collective_region(sim_mesh_4, 0, body, out_ref, [x, w], [S0, R], S0,
                          grad_placements=[(S0,), (Partial(),)])


def test_bad_collective_arguments_name_the_argument(sim_mesh_4):
    x = distribute(randn(8, 6), sim_mesh_4, [S0])
    with pytest.raises(LocalMapError, match="mesh_dim: names no dim"):
        local_map(lambda a: C.all_reduce(a, "nope"), [R], ([S0],), device_mesh=sim_mesh_4, check=False)(x)
    with pytest.raises(LocalMapError, match="op: is not a reduction"):
        local_map(lambda a: C.all_reduce(a, 0, "prod"), [R], ([S0],), device_mesh=sim_mesh_4, check=False)(x)
    with pytest.raises(LocalMapError, match="perm"):
        local_map(lambda a: C.ppermute(a, 0, [(0, 1), (1, 1)]), [S0], ([S0],), device_mesh=sim_mesh_4,
                  check=False)(x)
    with pytest.raises(LocalMapError, match="mesh: a collective needs a mesh"):
        C.all_reduce(torch.ones(2), 0)


# ---- MoE expert parallelism and ring attention ------------------------------------------------------------------

def test_moe_expert_parallel_region_matches_one_device():
    with simulated_mesh(4, ("ep",)) as mesh:
        inputs = moe_inputs()
        diffs = run_collective_region(mesh, 0, lambda d, *a: moe_experts(*a), moe_reference, inputs,
                                      [S0, R, S0, S0], S0)
    assert diffs["grad1"] <= 1e-4  # the router weight's gradient (inferred Partial over 'ep') is right


def test_ring_attention_region_matches_one_device():
    with simulated_mesh(4, ("cp",)) as mesh:
        q, k, v = randn(2, 2, 16, 4), randn(2, 2, 16, 4), randn(2, 2, 16, 4)
        seq = Shard(2)
        run_collective_region(mesh, 0, lambda d, *a: ring_attention(*a), F.scaled_dot_product_attention,
                              [q, k, v], [seq, seq, seq], seq)
