"""A body whose Python branches on tensor values is checked on the values of the call, the branch each rank
actually takes (issue 19, item 6), instead of running with guessed gradient placements; a body that cannot be
traced even so is refused where its gradient placements would be a guess. Compared with one device."""

from __future__ import annotations

import warnings

import pytest
import torch

from localmap import LocalMapError, PlacementError, local_map
from localmap.testing import distribute, full, on_one_device, simulated_mesh
from helpers import P, R, S0, doubled, max_diff, randn


def branchy(x, w):
    if x.sum() > 0:  # a data-dependent Python branch: fake tensors cannot take it
        return x @ w
    return (x @ w).sum(0, keepdim=True).expand(x.shape[0], -1)  # a partial sum over the row shards


def _one_device(x, w):
    with on_one_device():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = branchy(xr, wr) if x.sum() > 0 else xr @ wr
        out.backward(torch.ones_like(out))
        return out.detach(), xr.grad, wr.grad


def test_a_branch_on_values_is_checked_on_the_branch_taken_and_gets_the_right_weight_gradient():
    """x row-sharded meets a replicated w: w's gradient is a partial sum. Guessed (Replicate), each rank kept
    its own share; checked on the values, it is Partial and sums to one device's gradient."""
    with simulated_mesh(2) as mesh:
        x, w = randn(8, 6).abs(), randn(6, 4)  # positive on every rank: every rank takes `x @ w`
        ref, gx, gw = _one_device(x, w)
        region = local_map(branchy, (S0,), ((S0,), (R,)), None, mesh)
        dx, dw = distribute(x, mesh, (S0,), requires_grad=True), distribute(w, mesh, (R,), requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # checked: nothing to warn about
            out = region(dx, dw)
        out.backward(distribute(torch.ones(8, 4), mesh, (S0,)))
        assert max_diff(full(out), ref) < 1e-5
        assert max_diff(full(dx.grad), gx) < 1e-5
        assert max_diff(full(dw.grad), gw) < 1e-5


def test_each_call_is_checked_on_its_own_values():
    """The verdict of one call's values is not reused for another call: the branch that returns a partial sum
    claimed Shard(0) is refused when a call takes it, after a call that took the right branch."""
    with simulated_mesh(2) as mesh:
        w = distribute(randn(6, 4), mesh, (R,))
        region = local_map(branchy, (S0,), ((S0,), (R,)), None, mesh)
        region(distribute(randn(8, 6).abs(), mesh, (S0,)), w)
        with pytest.raises(PlacementError, match="partial sum"):
            region(distribute(-randn(8, 6).abs(), mesh, (S0,)), w)


def test_ranks_taking_branches_the_check_judges_differently_are_refused():
    with simulated_mesh(2) as mesh:
        x = randn(8, 6).abs()
        x[4:] *= -1  # rank 1's rows are negative: it takes the other branch
        region = local_map(branchy, (S0,), ((S0,), (R,)), None, mesh)
        with pytest.raises(LocalMapError, match="ranks take branches") as info:
            region(distribute(x, mesh, (S0,)), distribute(randn(6, 4), mesh, (R,)))
        assert "rank 0" in str(info.value) and "rank 1" in str(info.value)


def untraceable(x, w):
    return doubled(x) @ w


def test_a_body_no_trace_can_follow_is_refused_where_a_gradient_placement_would_be_a_guess():
    with simulated_mesh(2) as mesh:
        region = local_map(untraceable, (S0,), ((S0,), (R,)), None, mesh)
        dx, dw = distribute(randn(8, 6), mesh, (S0,), requires_grad=True), distribute(randn(6, 4), mesh, (R,),
                                                                                       requires_grad=True)
        with pytest.raises(LocalMapError, match=r"args\[1\]") as info:
            region(dx, dw)
        assert "in_grad_placements" in info.value.fix


def test_the_same_body_with_its_gradient_placements_given_is_tested_silently_and_is_right():
    """No trace follows the body; with its gradient placements given, the test runs the body itself on the call
    against its one-rank run: "tested", silently (before: a warning, "could not be checked")."""
    with simulated_mesh(2) as mesh:
        x, w = randn(8, 6), randn(6, 4)
        with on_one_device():
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            (xr * 2 @ wr).sum().backward()
        region = local_map(untraceable, (S0,), ((S0,), (R,)), ((S0,), (P,)), mesh)
        dx, dw = distribute(x, mesh, (S0,), requires_grad=True), distribute(w, mesh, (R,), requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = region(dx, dw)
        out.sum().backward()
        assert region.region.verdicts()[0].status == "tested"
        assert max_diff(full(out), x * 2 @ w) < 1e-5
        assert max_diff(full(dw.grad), wr.grad) < 1e-5
        assert max_diff(full(dx.grad), xr.grad) < 1e-5
