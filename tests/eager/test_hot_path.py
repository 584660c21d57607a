"""The eager fast path for steady-state calls (``localmap.eager.plans.HotCall``): a call whose arguments are
DTensors with the spec objects of the last full call reuses what that call derived. Each test repeats calls and
compares values and gradients with one device on every call, and checks by a spy when the full path ran: where
the fast path applies, where it must not (other specs, redistribution, a changed body state, cleared caches,
no gradient, other output metadata)."""

from __future__ import annotations

import pytest
import torch

import localmap
from helpers import P, R, S0, S1, max_diff, randn
from localmap import local_map
from localmap.eager.region import RegionCallable
from localmap.testing import distribute, fake_mesh, full


@pytest.fixture
def full_path_calls(monkeypatch):
    """How many calls took the full path (its per-input checks) so far."""
    calls = []
    original = RegionCallable._checked_inputs

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RegionCallable, "_checked_inputs", spy)
    return calls


def _step(f, x, w, xd, wd, grad):
    """One call of region `f` on (xd, wd) with backward from `grad`, checked against x @ w on one device."""
    xd.grad = wd.grad = None
    out = f(xd, wd)
    out.backward(distribute(grad, out.device_mesh, [S0]))
    assert out.placements == (S0,) and max_diff(full(out), x @ w) < 1e-5
    assert max_diff(full(xd.grad), grad @ w.T) < 1e-5 and max_diff(full(wd.grad), x.T @ grad) < 1e-5
    return out


@pytest.mark.parametrize("given", [True, False])
def test_steady_state_calls_take_the_fast_path_with_partial_weight_grads(sim_mesh_4, full_path_calls, given):
    """x Shard(0) @ w Replicate on 4 simulated ranks: w's gradient is Partial (given or inferred) on every call,
    and only the first call takes the full path."""
    x, w, grad = randn(8, 4), randn(4, 3), randn(8, 3)
    xd, wd = distribute(x, sim_mesh_4, [S0], requires_grad=True), distribute(w, sim_mesh_4, [R], requires_grad=True)
    f = local_map(torch.mm, [S0], ([S0], [R]), ([S0], [P]) if given else None, sim_mesh_4)
    for _ in range(3):
        _step(f, x, w, xd, wd, grad)
        assert wd.grad.placements == (P,)
    assert len(full_path_calls) == 1


def test_plain_tensor_output_is_remembered_and_checked_per_call(full_path_calls):
    """On a real 1-rank mesh the body's output is a plain tensor, whose spec the fast path remembers; an output
    with other local metadata for the same inputs (transposed, here) takes the full output path and its own
    spec, and is right."""
    transpose = [False]

    def body(a, b):
        out = a @ b
        return out.t().contiguous().t() if transpose[0] else out

    x, w, grad = randn(4, 4), randn(4, 4), randn(4, 4)
    with fake_mesh(1, ("tp",)) as mesh:
        xd, wd = distribute(x, mesh, [S0], requires_grad=True), distribute(w, mesh, [R], requires_grad=True)
        f = local_map(body, [S0], ([S0], [R]), ([S0], [P]), mesh, check=False)
        for flip in (False, False, True, True, False):
            transpose[0] = flip
            out = _step(f, x, w, xd, wd, grad)
            assert out.stride() == ((1, 4) if flip else (4, 1))
    assert len(full_path_calls) == 1


def test_fast_path_misses_take_the_full_path(sim_mesh_4, full_path_calls):
    """Other input specs, no gradient, and inputs that do not all require one: right values and gradients."""
    x, w, grad = randn(8, 4), randn(4, 3), randn(8, 3)
    xd, wd = distribute(x, sim_mesh_4, [S0], requires_grad=True), distribute(w, sim_mesh_4, [R], requires_grad=True)
    f = local_map(torch.mm, [S0], ([S0], [R]), None, sim_mesh_4)
    _step(f, x, w, xd, wd, grad)
    with torch.no_grad():  # same specs: the fast path, with no autograd node
        out = f(xd, wd)
    assert not out.requires_grad and max_diff(full(out), x @ w) < 1e-5
    frozen = distribute(w, sim_mesh_4, [R])  # another spec object: the full path
    out = f(xd, frozen)
    out.backward(distribute(grad, sim_mesh_4, [S0]))
    assert max_diff(full(out), x @ w) < 1e-5 and frozen.grad is None
    x2 = randn(12, 4)  # another global shape
    _step(f, x2, w, distribute(x2, sim_mesh_4, [S0], requires_grad=True), wd, randn(12, 3))
    assert len(full_path_calls) == 3
    _step(f, x2, w, distribute(x2, sim_mesh_4, [S0], requires_grad=True), wd, randn(12, 3))
    assert len(full_path_calls) == 4  # a new DTensor of the same metadata: a new spec object


def test_redistributed_inputs_always_take_the_full_path(sim_mesh_4, full_path_calls):
    """With redistribute_inputs an input held otherwise is redistributed on every call (never remembered)."""
    x, w, grad = randn(8, 4), randn(4, 3), randn(8, 3)
    xd, wd = distribute(x, sim_mesh_4, [S1], requires_grad=True), distribute(w, sim_mesh_4, [R], requires_grad=True)
    f = local_map(torch.mm, [S0], ([S0], [R]), None, sim_mesh_4, redistribute_inputs=True)
    for _ in range(3):
        _step(f, x, w, xd, wd, grad)
    assert len(full_path_calls) == 3


def test_changed_body_state_is_checked_again(sim_mesh_4, full_path_calls):
    """A module body whose training flag changes what it computes: the flag is part of the verdict's key, so a
    call after model.eval() is checked again (the full path) and right."""

    class Scale(torch.nn.Module):
        def forward(self, a, b):
            return a @ b * (2.0 if self.training else 1.0)

    x, w = randn(8, 4), randn(4, 3)
    xd, wd = distribute(x, sim_mesh_4, [S0], requires_grad=True), distribute(w, sim_mesh_4, [R], requires_grad=True)
    model = Scale()
    f = local_map(model, [S0], ([S0], [R]), None, sim_mesh_4)
    for training, calls in ((True, 1), (True, 1), (False, 2), (False, 2)):
        model.train(training)
        assert max_diff(full(f(xd, wd)), x @ w * (2.0 if training else 1.0)) < 1e-5
        assert len(full_path_calls) == calls


def test_clear_caches_forgets_the_fast_path(sim_mesh_4, full_path_calls):
    x, w, grad = randn(8, 4), randn(4, 3), randn(8, 3)
    xd, wd = distribute(x, sim_mesh_4, [S0], requires_grad=True), distribute(w, sim_mesh_4, [R], requires_grad=True)
    f = local_map(torch.mm, [S0], ([S0], [R]), None, sim_mesh_4)
    _step(f, x, w, xd, wd, grad)
    localmap.clear_caches()
    _step(f, x, w, xd, wd, grad)
    _step(f, x, w, xd, wd, grad)
    assert len(full_path_calls) == 2
