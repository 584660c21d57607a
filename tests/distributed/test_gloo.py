"""Real processes: gloo over loopback, 2 and 4 ranks spawned by the test, forward and backward checked on
every rank against the single-device computation. Each run is bounded by a timeout and destroys its
process group (localmap.testing.run_gloo)."""

import pytest
import torch

from localmap.testing import GlooError, run_gloo

pytestmark = pytest.mark.slow


def _tp_mlp(mesh):
    """A tensor-parallel MLP from two regions, on every rank: returns the largest differences."""
    from helpers import P, R, S0, S1, rel_diff as max_diff
    from localmap import local_map
    from localmap.testing import distribute, full

    torch.manual_seed(0)  # same global tensors on every rank
    x, w1, w2 = torch.randn(10, 8), torch.randn(8, 12), torch.randn(12, 8)  # 10 rows: uneven on 4 ranks
    up = local_map(lambda a, b: torch.relu(a @ b), [S1], ([R], [S1]), ([P], [S1]))
    down = local_map(lambda h, b: h @ b, [P], ([S1], [S0]), ([S1], [S0]))
    rows = local_map(lambda a: a * 2, [S0], ([S0],))
    xd = distribute(x, mesh, [R], requires_grad=True)
    w1d = distribute(w1, mesh, [S1], requires_grad=True)
    w2d = distribute(w2, mesh, [S0], requires_grad=True)
    y = down(up(xd, w1d), w2d)
    y2 = rows(y.redistribute(mesh, [S0]))
    (y2 ** 2).sum().backward()
    rx, r1, r2 = (t.clone().requires_grad_() for t in (x, w1, w2))
    ref = (torch.relu(rx @ r1) @ r2) * 2
    (ref ** 2).sum().backward()
    return {
        "out": max_diff(full(y2), ref), "x": max_diff(full(xd.grad), rx.grad),
        "w1": max_diff(full(w1d.grad), r1.grad), "w2": max_diff(full(w2d.grad), r2.grad),
        "placements": [str(d.grad.placements) for d in (xd, w1d, w2d)],
        "local_rows": tuple(y2.to_local().shape),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_mlp_under_gloo(world):
    results = run_gloo(_tp_mlp, world, timeout=120)
    assert len(results) == world
    for rank, r in enumerate(results):
        for key in ("out", "x", "w1", "w2"):
            assert r[key] < 1e-4, (rank, key, r[key])
        assert r["placements"] == ["(Partial(sum),)", "(Shard(dim=1),)", "(Shard(dim=0),)"]
    if world == 4:  # 10 rows cut 3, 3, 3, 1
        assert [r["local_rows"][0] for r in results] == [3, 3, 3, 1]


def _two_d(mesh):
    from helpers import P, R, S0, S1, max_diff
    from localmap import local_map
    from localmap.testing import distribute, full

    torch.manual_seed(1)
    x, w = torch.randn(8, 6), torch.randn(6, 4)
    f = local_map(lambda a, b: a @ b, [S0, P], ([S0, S1], [R, S0]), ([S0, S1], [P, S0]))
    xd = distribute(x, mesh, [S0, S1], requires_grad=True)
    wd = distribute(w, mesh, [R, S0], requires_grad=True)
    out = f(xd, wd)
    out.sum().backward()
    rx, rw = x.clone().requires_grad_(), w.clone().requires_grad_()
    (rx @ rw).sum().backward()
    return max(max_diff(full(out), rx @ rw), max_diff(full(xd.grad), rx.grad), max_diff(full(wd.grad), rw.grad))


def test_2d_mesh_under_gloo():
    assert max(run_gloo(_two_d, 4, mesh_shape=(2, 2), mesh_dim_names=("dp", "tp"))) < 1e-4


def _fails_on_rank_1(mesh):
    if mesh.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    torch.distributed.barrier()  # rank 0 would wait here forever without the runner's handling
    return "unreachable"


def test_failing_rank_is_reported_without_hanging():
    with pytest.raises(GlooError, match="rank 1 failed(.|\n)*boom on rank 1"):
        run_gloo(_fails_on_rank_1, 2, timeout=60)
