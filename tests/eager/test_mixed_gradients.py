"""A Replicate input used with shards and also returned (issue 19, item 7): its gradient is the sum of the
ranks' shares (from the uses that meet per-rank data) plus the whole gradient of the returned value, once. JAX's
shard_map casts it (pvary) where it meets the shards; localmap reads the input's gradient as Partial and divides
the returned value's gradient by the ranks (check.checker._settle_mixed), so values and gradients match one
device. Paths that cannot divide refuse by name; what cannot be made exact is refused with the pvary fix."""

from __future__ import annotations

import pytest
import torch

from helpers import R, S0, max_diff, randn, rel_diff
from localmap import LocalMapError, Partial, PlacementError, capture, local_map
from localmap import collectives as C
from localmap.testing import distribute, full, on_one_device


def _used_and_scaled(x, w):
    return x @ w, w * 3


def _used_and_returned(x, w):
    return x @ w, w


def _with_a_second_input(x, w, u):
    """u never meets the shards, but shares a Replicate output with w: its gradient is divided there too."""
    return torch.tanh(x @ w), w * u


def _loss(outs):
    return sum((o.tanh() * (k + 1)).sum() for k, o in enumerate(outs))


def _compare(mesh, body, inputs, in_pl, out_pl, grads_expected):
    with on_one_device():
        refs = [t.clone().requires_grad_() for t in inputs]
        ref_out = body(*refs)
        _loss(ref_out).backward()
    region = local_map(body, out_pl, in_pl, None, mesh)
    dts = [distribute(t, mesh, pl, requires_grad=True) for t, pl in zip(inputs, in_pl)]
    out = region(*dts)
    for o, r in zip(out, ref_out):
        assert max_diff(full(o), r) < 1e-5
    _loss(out).backward()
    for d, r, want in zip(dts, refs, grads_expected):
        assert d.grad.placements == want
        assert max_diff(full(d.grad), r.grad) < 1e-5
    return region


@pytest.mark.parametrize("body", [_used_and_scaled, _used_and_returned])
def test_replicate_input_used_with_shards_and_returned_matches_one_device(sim_mesh_4, body):
    _compare(sim_mesh_4, body, [randn(8, 4), randn(4, 4)], ([S0], [R]), ([S0], [R]), [(S0,), (Partial(),)])


def test_an_input_sharing_the_divided_output_is_partial_too(sim_mesh_4):
    _compare(sim_mesh_4, _with_a_second_input, [randn(8, 4), randn(4, 4), randn(4, 4)], ([S0], [R], [R]),
             ([S0], [R]), [(S0,), (Partial(),), (Partial(),)])


def test_two_dim_mesh_divides_only_where_the_input_meets_shards(sim_mesh_2x2):
    """x is sharded over dp only: w's gradient is Partial over dp, Replicate over tp."""
    _compare(sim_mesh_2x2, _used_and_scaled, [randn(8, 4), randn(4, 4)], ([S0, R], [R, R]), ([S0, R], [R, R]),
             [(S0, R), (Partial(), R)])


def test_gradient_penalty_through_a_divided_output_matches_one_device(sim_mesh_4):
    x, w = randn(8, 4), randn(4, 4)

    def penalized(xs, ws, region):
        a, b = region(xs, ws)
        grads = torch.autograd.grad(a.tanh().sum() + b.pow(2).sum(), (xs, ws), create_graph=True)
        return grads, sum(g.pow(2).sum() for g in grads)

    with on_one_device():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref_grads, ref_penalty = penalized(xr, wr, _used_and_scaled)
        ref_penalty.backward()
    region = local_map(_used_and_scaled, ([S0], [R]), ([S0], [R]), None, sim_mesh_4)
    xd, wd = distribute(x, sim_mesh_4, [S0], requires_grad=True), distribute(w, sim_mesh_4, [R], requires_grad=True)
    grads, penalty = penalized(xd, wd, region)
    for g, r in zip(grads, ref_grads):
        assert rel_diff(full(g), r) < 1e-5
    penalty.backward()
    assert rel_diff(full(xd.grad), xr.grad) < 1e-5 and rel_diff(full(wd.grad), wr.grad) < 1e-5


def test_returned_value_that_also_reaches_per_rank_data_is_refused_with_the_pvary_fix(sim_mesh_4):
    """w + all_reduce(...): dividing that output's gradient would also divide what reaches x; not exact."""
    def body(x, w):
        return x @ w, w + C.all_reduce(x.sum(0), 0)

    region = local_map(body, ([S0], [R]), ([S0], [R]), None, sim_mesh_4)
    xd, wd = distribute(randn(8, 4), sim_mesh_4, [S0], True), distribute(randn(4, 4), sim_mesh_4, [R], True)
    with pytest.raises(PlacementError, match=r"(?s)meets per-rank data.*also reaches per-rank data.*pvary"):
        region(xd, wd)


def test_whole_gradient_through_a_collective_is_refused_with_the_pvary_fix(sim_mesh_4):
    """w meets the shards directly and through pvary (whose backward already sums): reading w's gradient as
    Partial would count the pvary part once per rank, so the check refuses it (it used to pass silently)."""
    def body(x, w):
        return x @ w + x @ C.pvary(w, 0)

    region = local_map(body, [S0], ([S0], [R]), None, sim_mesh_4)
    xd, wd = distribute(randn(8, 4), sim_mesh_4, [S0], True), distribute(randn(4, 4), sim_mesh_4, [R], True)
    with pytest.raises(PlacementError, match=r"(?s)pvary at .*collective whose backward gives every rank"):
        region(xd, wd)


def test_capture_refuses_a_divided_output_by_name(sim_mesh_4):
    region = local_map(_used_and_scaled, ([S0], [R]), ([S0], [R]), None, sim_mesh_4)

    def step(x, w):
        a, b = region(x, w)
        return a.sum() + b.sum()

    with on_one_device():
        x, w = torch.randn(8, 4), torch.randn(4, 4, requires_grad=True)
    with pytest.raises(LocalMapError, match="a traced region .* cannot divide that output's gradient yet"):
        capture(step, x, w)
