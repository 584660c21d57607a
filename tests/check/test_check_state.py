"""A region's check verdict is reused only while what the body reads is unchanged (issue 19, item 3): a module's
training flag, attributes its code names, global flags. Each test compares with one device where values matter."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

from localmap import PlacementError, local_map
from localmap import collectives as C
from localmap.testing import distribute, full, on_one_device, simulated_mesh
from helpers import P, R, S0, S1, max_diff, randn


class RowParallel(nn.Module):
    """x column-sharded, w row-sharded: the product is a partial sum, reduced only in training mode (a body whose
    claim, Replicate, holds in training mode and not in eval mode)."""

    def __init__(self, mesh) -> None:
        super().__init__()
        self.region = local_map(self.body, (R,), ((S1,), (S0,)), None, mesh)

    def body(self, x, w):
        y = x @ w
        if self.training:
            y = C.all_reduce(y, 0)
        return y

    def forward(self, x, w):
        return self.region(x, w)


def _inputs(mesh):
    """x column-sharded and w row-sharded (their product a partial sum), global and distributed."""
    x, w = randn(4, 6), randn(6, 3)
    return x, w, distribute(x, mesh, (S1,)), distribute(w, mesh, (S0,))


def test_eval_after_a_training_check_is_checked_again():
    with simulated_mesh(2) as mesh:
        x, w, dx, dw = _inputs(mesh)
        model = RowParallel(mesh)
        assert max_diff(full(model(dx, dw)), x @ w) < 1e-5  # training mode: checked, ok, right
        model.eval()
        with pytest.raises(PlacementError, match="Replicate"):
            model(dx, dw)  # the partial sum claimed Replicate: refused, not served the cached "ok"
        model.train()
        assert max_diff(full(model(dx, dw)), x @ w) < 1e-5


def test_a_region_built_in_eval_mode_is_refused_then_right_in_training_mode():
    with simulated_mesh(2) as mesh:
        x, w, dx, dw = _inputs(mesh)
        model = RowParallel(mesh).eval()
        with pytest.raises(PlacementError):
            model(dx, dw)
        model.train()
        assert max_diff(full(model(dx, dw)), x @ w) < 1e-5


class Outer(nn.Module):
    """The flag read by a submodule's state: the check keys every reachable module's training flag."""

    def __init__(self, mesh) -> None:
        super().__init__()
        self.inner = RowParallel(mesh)
        self.region = local_map(self.body, (R,), ((S1,), (S0,)), None, mesh)

    def body(self, x, w):
        y = x @ w
        if self.inner.training:
            y = C.all_reduce(y, 0)
        return y


def test_a_submodules_training_flag_is_part_of_the_key():
    with simulated_mesh(2) as mesh:
        x, w, dx, dw = _inputs(mesh)
        model = Outer(mesh)
        assert max_diff(full(model.region(dx, dw)), x @ w) < 1e-5
        model.inner.eval()  # only the submodule
        with pytest.raises(PlacementError):
            model.region(dx, dw)


class Flagged(nn.Module):
    def __init__(self, mesh) -> None:
        super().__init__()
        self.reduce = True
        self.region = local_map(self.body, (R,), ((S1,), (S0,)), None, mesh)

    def body(self, x, w):
        y = x @ w
        return C.all_reduce(y, 0) if self.reduce else y


def test_a_plain_attribute_the_body_reads_is_part_of_the_key():
    with simulated_mesh(2) as mesh:
        x, w, dx, dw = _inputs(mesh)
        model = Flagged(mesh)
        assert max_diff(full(model.region(dx, dw)), x @ w) < 1e-5
        model.reduce = False
        with pytest.raises(PlacementError):
            model.region(dx, dw)


REDUCE = True


def _global_flag_body(x, w):
    y = x @ w
    return C.all_reduce(y, 0) if REDUCE else y


def test_a_global_flag_the_body_reads_is_part_of_the_key():
    global REDUCE
    with simulated_mesh(2) as mesh:
        x, w, dx, dw = _inputs(mesh)
        region = local_map(_global_flag_body, (R,), ((S1,), (S0,)), None, mesh)
        assert max_diff(full(region(dx, dw)), x @ w) < 1e-5
        REDUCE = False
        try:
            with pytest.raises(PlacementError):
                region(dx, dw)
        finally:
            REDUCE = True


class HeldWeights(nn.Module):
    """A weight the body reads from a list, a dict of a plain object, or a global dict (held as capture takes
    them: docs/check-state.md), swapped for one of other placements between calls."""

    def __init__(self, mesh, w, hold: str) -> None:
        super().__init__()
        self.hold = hold
        self.ws = [w]
        self.cfg = types.SimpleNamespace(table={"w": w})
        _HELD["w"] = w
        self.region = local_map(self.body, (S0,), ((S0,),), None, mesh)

    def body(self, x):
        if self.hold == "list":
            w = self.ws[0]
        elif self.hold == "object":
            w = self.cfg.table["w"]
        else:
            w = _HELD["w"]
        return x @ w.to_local()

    def swap(self, w) -> None:
        self.ws[0], self.cfg.table["w"], _HELD["w"] = w, w, w


_HELD: dict = {}


@pytest.mark.parametrize("hold", ["list", "object", "global"])
def test_a_dtensor_swapped_where_the_body_holds_it_is_checked_again(hold):
    """Rows of x sharded, the weight Replicate: right. The same weight as a partial sum makes each rank's output
    a partial sum (the Shard(0) claim wrong); before, the verdict of the Replicate weight was served silently."""
    with simulated_mesh(2) as mesh:
        x, w = randn(8, 6), randn(6, 4)
        model = HeldWeights(mesh, distribute(w, mesh, [R]), hold)
        dx = distribute(x, mesh, [S0])
        assert max_diff(full(model.region(dx)), x @ w) < 1e-5
        model.swap(distribute(w, mesh, [P]))
        with pytest.raises(PlacementError):
            model.region(dx)
    _HELD.clear()


def test_the_shared_check_cache_keys_the_state_too():
    """A second wrapper of the same bound method (torchtitan builds one per forward) after eval(): the
    process-wide verdict cache must not serve the training-mode verdict either."""
    with simulated_mesh(2) as mesh:
        x, w, dx, dw = _inputs(mesh)
        model = RowParallel(mesh)
        model(dx, dw)
        model.eval()
        fresh = local_map(model.body, (R,), ((S1,), (S0,)), None, mesh, check="strict")  # a region of its own
        with pytest.raises(PlacementError):
            fresh(dx, dw)


def test_a_plain_function_has_no_state_to_probe():
    from localmap.check.state import body_state

    assert body_state(torch.mm) is None
    assert body_state(lambda x, w: x @ w) is None
    with on_one_device():
        model = RowParallel.__new__(RowParallel)
        nn.Module.__init__(model)
    assert body_state(model.body) is not None
