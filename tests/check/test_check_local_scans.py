"""A scan or normalization over each rank's piece of a sharded dim, returned as it is and claimed a shard of that
dim, is refuted by the proof (``check.scans``), not only by the test against the one-rank run. Followed by a
log-sum-exp merge, an exclusive-prefix correction or any op that does not keep values one to one, it is not
matched: right programs there stay ok or tested."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import R, S0, S1, check_region, max_diff, randn
from localmap import PlacementError, local_map
from localmap import collectives as C
from localmap.testing import distribute, full, on_one_device, simulated_mesh
from torch.distributed.tensor import Shard

REFUTED = [
    ("softmax", lambda x: x.softmax(-1), "softmax"),
    ("softmax in float64", lambda x: F.softmax(x, -1, dtype=torch.float64), "softmax"),
    ("log_softmax", lambda x: x.log_softmax(1), "log_softmax"),
    ("x - logsumexp", lambda x: x - x.logsumexp(-1, keepdim=True), "x - logsumexp(x)"),
    ("exp(x - logsumexp)", lambda x: (x - x.logsumexp(-1, keepdim=True)).exp(), "x - logsumexp(x)"),
    ("x - amax", lambda x: x - x.amax(-1, keepdim=True), "x - amax(x)"),
    ("exp(x - detached amax)", lambda x: (x - x.amax(-1, keepdim=True).detach()).exp(), "x - amax(x)"),
    ("cumsum", lambda x: x.cumsum(1), "cumsum"),
    ("cumprod", lambda x: x.cumprod(1), "cumprod"),
    ("logcumsumexp", lambda x: x.logcumsumexp(1), "logcumsumexp"),
    ("softmax, transposed and back, contiguous, cloned",
     lambda x: x.softmax(-1).t().contiguous().t().clone(), "softmax"),
    ("cumsum of a shifted input, copied to its own dtype", lambda x: (x - 1).cumsum(1).to(torch.float32), "cumsum"),
]


def _really_wrong(mesh, body, x, ins, out):
    """With the check off the region differs from the body run on one device (the refusal is right)."""
    with on_one_device():
        ref = body(x.clone())
    y = local_map(body, out, [ins], None, mesh, check=False)(distribute(x, mesh, ins))
    return max_diff(full(y), ref) > 1e-3


@pytest.mark.parametrize("name, body, op", REFUTED, ids=[r[0] for r in REFUTED])
def test_a_scan_over_the_sharded_dim_claimed_shard_is_refused_by_the_proof(sim_mesh_4, name, body, op):
    x = randn(4, 8)
    region = local_map(body, [S1], [[S1]], None, sim_mesh_4)
    with pytest.raises(PlacementError) as info:
        region(distribute(x, sim_mesh_4, [S1]))
    message = str(info.value)
    assert f"is the {op} along dim 1, which is sharded on mesh dim 0" in message, message
    assert "its test refutes" not in message and "fix:" in message and "all_gather dim 1" in message
    assert ("exclusive-prefix" if op.startswith(("cum", "logcum")) else "log-sum-exp") in message
    assert _really_wrong(sim_mesh_4, body, x, [S1], [S1])


def test_a_view_that_keeps_the_scanned_dim_whole_is_followed(sim_mesh_4):
    """[4, 8] -> [2, 2, 8]: the sharded dim 1 is dim 2 of the view."""
    body = lambda x: x.softmax(-1).view(2, 2, x.shape[1])  # noqa: E731
    region = local_map(body, [Shard(2)], [[S1]], None, sim_mesh_4)
    with pytest.raises(PlacementError, match="is the softmax along dim 1, which is sharded"):
        region(distribute(randn(4, 8), sim_mesh_4, [S1]))


def test_on_a_2d_mesh_the_mesh_dim_that_shards_the_scanned_dim_is_named(sim_mesh_2x2):
    body = lambda x: x.cumsum(1)  # noqa: E731
    region = local_map(body, [S0, S1], [[S0, S1]], None, sim_mesh_2x2)
    with pytest.raises(PlacementError, match=r"cumsum along dim 1, which is sharded on mesh dim 1 \('tp'\)"):
        region(distribute(randn(4, 8), sim_mesh_2x2, [S0, S1]))


def test_a_softmax_over_an_unsharded_dim_claimed_shard_is_proven(sim_mesh_4):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_region(sim_mesh_4, lambda x: x.softmax(-1), [randn(8, 4)], [[S0]], [S0], check="strict")
        check_region(sim_mesh_4, lambda x: x.cumsum(1), [randn(8, 4)], [[S0]], [S0], check="strict")


def _silent_and_right(mesh, body, ref, x, ins, out):
    """The default check neither refuses nor warns, and the region matches `ref` on one device."""
    with on_one_device():
        want = ref(x.clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = local_map(body, out, [ins], None, mesh)(distribute(x, mesh, ins))
    assert not [str(w.message) for w in caught if str(w.message).startswith("local_map:")]
    assert max_diff(full(y), want) <= 1e-5


def _prefix_corrected_cumsum(x):
    """Context-parallel cumsum: the local scan plus the exclusive prefix of the all-gathered shard totals."""
    totals = C.all_gather(x.sum(-1, keepdim=True), 0, dim=-1)
    before = totals * (torch.arange(totals.shape[-1]) < C.axis_index(0))
    return x.cumsum(-1) + before.sum(-1, keepdim=True)


@pytest.mark.parametrize("body, ref", [
    (_prefix_corrected_cumsum, lambda x: x.cumsum(-1)),
    (lambda x: torch.sign(x.softmax(-1)), lambda x: torch.ones_like(x)),  # not one to one: all ones
    (lambda x: x.cumsum(1) * 0, lambda x: torch.zeros_like(x)),
    (lambda x: torch.ones_like(x).cumprod(1), lambda x: torch.ones_like(x)),  # a source constant by construction
], ids=["exclusive-prefix correction", "sign of a softmax", "cumsum times zero", "cumprod of ones"])
def test_right_programs_with_a_scan_over_the_sharded_dim_are_not_refused(sim_mesh_4, body, ref):
    _silent_and_right(sim_mesh_4, body, ref, randn(4, 8), [S1], [S1])


def test_a_local_softmax_merged_by_log_sum_exp_is_not_refused():
    """Context-parallel attention: each rank's softmax over its key shard, rescaled by the blocks' log-sum-exp
    and summed (catalogue), is right: never refused, proven silently (check.merges)."""
    from test_catalogue_parallel import PROGS, _matches, run

    prog = next(p for p in PROGS if p.name == "context-parallel attention, log-sum-exp merge")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffs = run(prog)
    assert not [str(w.message) for w in caught if str(w.message).startswith("local_map:")]
    assert _matches(diffs)


def test_a_scan_followed_by_an_op_that_is_not_one_to_one_is_left_to_the_test(sim_mesh_4):
    """abs after a cumsum over the sharded dim: wrong, but the proof stops at abs; the test refutes it."""
    region = local_map(lambda x: x.cumsum(1).abs(), [S1], [[S1]], None, sim_mesh_4)
    with pytest.raises(PlacementError, match="its test refutes") as info:
        region(distribute(randn(4, 8), sim_mesh_4, [S1]))
    assert "which is sharded on" not in str(info.value)


def test_a_mesh_dim_of_one_rank_is_not_refused():
    """On a (4, 1) mesh the scanned dim is cut into one piece on mesh dim 1: the local softmax is the global one."""
    with simulated_mesh((4, 1), ("dp", "tp")) as mesh:
        check_region(mesh, lambda x: x.softmax(-1), [randn(8, 4)], [[S0, S1]], [S0, S1])


def test_a_replicated_input_is_not_matched(sim_mesh_4):
    """A softmax of a Replicate value is the same on every rank: a Shard claim is refused as before (not as a
    local scan)."""
    region = local_map(lambda x: x.softmax(-1), [S1], [[R]], None, sim_mesh_4)
    with pytest.raises(PlacementError) as info:
        region(distribute(randn(4, 8), sim_mesh_4, [R]))
    assert "is the same on every rank but is claimed Shard" in str(info.value)
