"""Faults across real processes (gloo over loopback, 2 ranks): one rank raising inside a region, one rank
calling with other shapes or placements, one rank exiting early. Every other rank fails with a clear error
within the configured bound (run_gloo's collective_timeout, LOCALMAP_COLLECTIVE_TIMEOUT in the ranks) instead of
hanging; every run is bounded and ends its processes and process groups."""

import time

import pytest
import torch

from localmap.testing import GlooError, run_gloo

pytestmark = pytest.mark.slow

BOUND = 4.0  # seconds a rank may wait for a peer in a collective
RUN_LIMIT = 90.0  # the whole run, spawning included


def _uneven_region(mesh, mode):
    """9 rows on 2 ranks (5, 4): the region gathers the ranks' output sizes, a collective inside localmap."""
    import os

    from torch.distributed.tensor import DTensor

    from localmap import Replicate, Shard, local_map

    rank = mesh.get_rank()
    x = torch.arange(27, dtype=torch.float32).reshape(9, 3)
    if mode == "shapes" and rank == 1:
        x = x[:7]  # this rank thinks the tensor has 7 rows
    if mode == "exit" and rank == 1:
        os._exit(0)  # gone without a word, before the region

    def body(a):
        if mode == "raise" and rank == 1:
            raise RuntimeError("boom inside the region on rank 1")
        return a * 2

    placements = [Replicate()] if mode == "placements" and rank == 1 else [Shard(0)]
    f = local_map(body, [Shard(0)], (placements,))
    # Each rank builds its DTensor from its own view (no collective: the ranks may disagree on purpose).
    local = x if placements == [Replicate()] else torch.chunk(x, 2)[rank]
    out = f(DTensor.from_local(local, mesh, placements, run_check=False, shape=x.shape, stride=x.stride()))
    return tuple(out.shape)


def _run(mode):
    start = time.monotonic()
    with pytest.raises(GlooError) as info:
        run_gloo(_uneven_region, 2, args=(mode,), timeout=RUN_LIMIT, collective_timeout=BOUND, wait_all=True)
    return info.value.outcomes, time.monotonic() - start


def test_rank_raising_inside_a_region():
    outcomes, elapsed = _run("raise")
    ok1, err1 = outcomes[1]
    assert not ok1 and "BodyError" in err1 and "region 'body'" in err1 and "boom inside the region" in err1
    ok0, err0 = outcomes[0]
    assert not ok0 and "CollectiveError" in err0 and "could not gather every rank's shard sizes" in err0, err0
    assert elapsed < RUN_LIMIT


def test_rank_calling_with_other_shapes():
    """Both ranks gather the sizes (5 and 3 rows) and reach the same verdict: not a chunk layout."""
    outcomes, elapsed = _run("shapes")
    for rank in (0, 1):
        ok, err = outcomes[rank]
        assert not ok and "not DTensor's chunk layout for 8 rows" in err and "[5, 3]" in err, (rank, err)
    assert elapsed < RUN_LIMIT


def test_rank_calling_with_other_placements():
    """Rank 1's input is Replicate, where its check refuses the Shard claim; the ranks share their check outcomes
    before acting, so rank 0 refuses too, naming rank 1's reason, instead of waiting for it."""
    outcomes, elapsed = _run("placements")
    for rank in (0, 1):
        ok, err = outcomes[rank]
        assert not ok and "PlacementError" in err and "claimed Shard(dim=0)" in err, (rank, err)
    assert "rank 1's check refuses it" in outcomes[0][1], outcomes[0][1]
    assert elapsed < RUN_LIMIT


def test_rank_exiting_early():
    outcomes, elapsed = _run("exit")
    assert outcomes[1] == (False, "exited with code 0 without reporting")
    ok0, err0 = outcomes[0]  # its first wait for rank 1: the ranks' check outcomes
    assert not ok0 and "CollectiveError" in err0 and "could not gather every rank's" in err0, err0
    assert elapsed < RUN_LIMIT


def _waits_for_peer(mesh):
    if mesh.get_rank() == 1:
        time.sleep(30)  # alive but never joins: only the timeout ends rank 0's wait
    torch.distributed.barrier()
    return "joined"


def test_collective_timeout_bounds_a_wait_on_a_live_peer():
    start = time.monotonic()
    with pytest.raises(GlooError) as info:
        run_gloo(_waits_for_peer, 2, timeout=RUN_LIMIT, collective_timeout=2.0)
    ok0, err0 = info.value.outcomes[0]
    assert not ok0 and "imed out" in err0, err0
    # rank 1 was stopped, not waited for: it never reported (it sleeps 30 s before its barrier); and the run ended
    # well before its 90 s deadline (spawning two processes on a loaded 2-core machine takes up to ~25 s)
    assert 1 not in info.value.outcomes, info.value.outcomes
    assert time.monotonic() - start < 60
