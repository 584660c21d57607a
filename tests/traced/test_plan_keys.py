"""A region node under Dynamo with PyTorch's local_map wrapping on names its trace-time plan by a key derived
from the plan's content: two compiles of the same program print the same graph (PyTorch's own operator tests
compare that text), different behaviour never shares a key, and a deferred region node refuses whole tensors
by name. Values are compared with the function run on one device."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import AotEagerAndRecordGraphs, normalize_gm
from torch.distributed.tensor import Replicate, Shard

import localmap
from localmap.caches import cache_info
from localmap.compat import dynamo as compat_dynamo
from localmap.errors import LocalMapError
from localmap.testing import planner_capture, region_nodes

pytestmark = pytest.mark.compile

S0, R = (Shard(0),), (Replicate(),)


def gated(x, w):
    return torch.sigmoid(x @ w) * x


class Gate(nn.Module):
    def __init__(self, region):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.region = region

    def forward(self, x):
        return self.region(x, self.w) + 1


def decorated_region(mesh):
    @localmap.local_map(out_placements=(S0,), in_placements=(S0, R), device_mesh=mesh)
    def gated_by_decorator(x, w):
        return gated(x, w)

    return gated_by_decorator


def called_region(mesh):
    return localmap.local_map(gated, out_placements=(S0,), in_placements=(S0, R), device_mesh=mesh)


def text(gm):
    return normalize_gm(gm.print_readable(print_output=False))


def compile_and_check(model, backend, x):
    """Compile `model` with wrapping on (no deferral), run forward and backward, compare with one device."""
    x = x.clone().requires_grad_()
    with compat_dynamo.local_map_wrapping_on():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    out.sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), model.w.detach().clone().requires_grad_()
    ref = gated(x_ref, w_ref) + 1
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5) and torch.allclose(model.w.grad, w_ref.grad, atol=1e-5)


def plan_count():
    return cache_info()["capture_plans_cached"]


def test_region_by_decorator_and_by_call_print_the_same_graphs(fake_mesh_4):
    """Two regions of equal bodies (one made by decorator, one by call), each compiled once: Dynamo's graphs,
    and the forward and backward graphs, print the same text (the plan number used to differ: 0 vs 1)."""
    backend = AotEagerAndRecordGraphs()
    x = torch.randn(16, 8)
    compile_and_check(Gate(decorated_region(fake_mesh_4)), backend, x)
    compile_and_check(Gate(called_region(fake_mesh_4)), backend, x)
    assert len(backend.graphs) == 2 and "_localmap_region_node" in text(backend.graphs[0])
    assert text(backend.graphs[0]) == text(backend.graphs[1])
    assert text(backend.fw_graphs[0]) == text(backend.fw_graphs[1])
    assert text(backend.bw_graphs[0]) == text(backend.bw_graphs[1])


def test_recompiling_the_same_program_reuses_its_plan(fake_mesh_4):
    """The same model compiled again from scratch prints the same graph and adds no plan to the cache."""
    model = Gate(called_region(fake_mesh_4))
    backend = AotEagerAndRecordGraphs()
    x = torch.randn(16, 8)
    compile_and_check(model, backend, x)
    count = plan_count()
    torch._dynamo.reset()
    model.w.grad = None
    compile_and_check(model, backend, x)
    assert plan_count() == count
    assert text(backend.graphs[0]) == text(backend.graphs[1])


def times_four(x):
    return x * 4


def times_rows(x):
    return x * x.shape[0]  # 4 on one rank's shard (16 rows over 4 ranks), 16 on the whole tensor


def test_equal_shard_traces_that_differ_on_whole_tensors_keep_apart(fake_mesh_4):
    """Two functions whose traces on one rank's shard are equal (x * 4) but which differ on the tensors as given
    (x * 4 vs x * 16): with no deferral each region runs its own function, so they must not share a plan."""
    x = torch.randn(16, 8)
    backend = AotEagerAndRecordGraphs()
    outs = []
    for func in (times_four, times_rows):
        region = localmap.local_map(func, out_placements=(S0,), in_placements=(S0,), device_mesh=fake_mesh_4)
        with compat_dynamo.local_map_wrapping_on():
            outs.append(torch.compile(lambda a: region(a), backend=backend, fullgraph=True)(x))
    assert torch.equal(outs[0], x * 4) and torch.equal(outs[1], x * 16)
    assert text(backend.graphs[0]) != text(backend.graphs[1])


def test_two_planner_captures_print_the_same_dynamo_graph(fake_mesh_4):
    """A planner capturing the same model twice gets the same Dynamo graph text and region nodes."""
    model = Gate(called_region(fake_mesh_4))
    x = torch.randn(16, 8, requires_grad=True)
    first_dynamo, first_joint = planner_capture(model, x)
    second_dynamo, second_joint = planner_capture(model, x)
    assert text(first_dynamo) == text(second_dynamo)
    def nodes(joint):
        return [(n.target.__name__, repr(n.meta["local_map_kwargs"])) for n in region_nodes(joint)]

    assert nodes(first_joint) == nodes(second_joint)
    assert [name for name, _ in nodes(first_joint)] == ["call_local_map", "call_local_map_backward"]


def fold_rows(x, w):
    return x.reshape(-1, 2, x.shape[-1]).sum(1) @ w  # the shard's row count is in the region graph


def test_deferred_region_node_refuses_whole_tensors_by_name(fake_mesh_4):
    """torch.compile with the regions deferred (PyTorch's operator tests' setup) then run on one process's whole
    tensors: the region node, whose graph runs on one rank's shard, names the argument and both shapes (was: a
    size error inside the graph)."""
    region = localmap.local_map(fold_rows, out_placements=(S0,), in_placements=(S0, R), device_mesh=fake_mesh_4)
    x, w = torch.randn(16, 8, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with compat_dynamo.planner_capture_context():
        compiled = torch.compile(lambda a, b: region(a, b), backend="aot_eager", fullgraph=True)
        with pytest.raises(LocalMapError, match=r"call_local_map, argument 0: is not one rank's shard(.|\n)*"
                                                r"expected: shape \(4, 8\)(.|\n)*given:    shape \(16, 8\)"):
            compiled(x, w)
