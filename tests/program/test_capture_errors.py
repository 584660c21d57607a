"""A trace that fails says what failed: a value deciding control flow gets the hint to avoid it; any other error
is the original one (its type kept, chained, the line that raised named), without that hint."""

from __future__ import annotations

import pytest
import torch

from helpers import expect_error
from localmap import BodyError, LocalMapError, capture


def _branch_on_a_value(x):
    return x.sum() if x.sum() > 0 else -x.sum()


def _shape_mistake(x):
    return torch.mm(x, x).sum()  # x is 1-d: mm refuses


def test_control_flow_on_a_value_gets_the_control_flow_hint_and_its_line():
    err = expect_error(lambda: capture(_branch_on_a_value, torch.randn(4, requires_grad=True)), "capture",
                       ("a tensor's value decides what runs", "test_capture_errors.py:14"))
    assert "torch.where" in err.fix


def test_another_error_keeps_its_type_and_line_without_the_hint():
    with pytest.raises(RuntimeError) as info:  # the original type still catches it
        capture(_shape_mistake, torch.randn(4, requires_grad=True))
    err = info.value
    assert isinstance(err, BodyError) and isinstance(err.__cause__, RuntimeError)
    assert "tracing '_shape_mistake' raised RuntimeError at" in str(err) and "test_capture_errors.py:18" in str(err)
    assert "must be 2D" in str(err) and "torch.where" not in str(err)


def test_double_backward_through_a_captured_region_is_refused_by_name():
    """A gradient penalty (create_graph=True) would need the region's backward graph to be differentiable;
    capture says so instead of failing inside the trace (eager regions support it: test_double_backward)."""
    from localmap import Replicate, Shard, local_map
    from localmap.testing import on_one_device, simulated_mesh

    with simulated_mesh(2, ("tp",)) as mesh:
        region = local_map(lambda x, w: torch.tanh(x @ w), [Shard(0)], ([Shard(0)], [Replicate()]), None, mesh)

        def step(x, w):
            y = region(x, w).sum()
            (g,) = torch.autograd.grad(y, (w,), create_graph=True)
            return y + (g ** 2).sum()

        with on_one_device():
            x, w = torch.randn(4, 3), torch.randn(3, 3, requires_grad=True)
        with pytest.raises(LocalMapError, match="create_graph: asks for a differentiable backward"):
            capture(step, x, w)
