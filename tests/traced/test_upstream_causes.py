"""Causes found by running PyTorch's own local_map tests with localmap's local_map swapped in
(scripts/upstream_local_map_tests.py, docs/planner.md): each checked here in our own terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard

import localmap
from localmap.compat import dynamo as compat_dynamo
from localmap.errors import LocalMapError
from localmap.testing import on_one_device, planner_capture, region_nodes, run_joint, simulated_mesh

S0, R = (Shard(0),), (Replicate(),)


class Scale(nn.Module):
    """A module handed to a region as a non-tensor argument (its factor read inside the body)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor


def scaled_matmul(x, w, scale):
    return (x * scale.factor) @ w


class ModuleArgument(nn.Module):
    def __init__(self, mesh):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.scale = Scale(3.0)
        self.region = localmap.local_map(scaled_matmul, out_placements=(S0,), in_placements=(S0, R, None),
                                         device_mesh=mesh)

    def forward(self, x):
        return self.region(x, self.w, self.scale)


def test_module_argument_captures_as_one_region_matching_one_device():
    """An nn.Module passed as a non-tensor argument: one forward and one backward region node in the planner's
    capture (was: Dynamo's 'assume_constant_result argument conversion failed'), and the joint graph run by the
    nodes' placements gives one device's output and gradients."""
    torch.manual_seed(0)
    with simulated_mesh(4, ("tp",)) as mesh, on_one_device():
        model = ModuleArgument(mesh)
        x = torch.randn(8, 16)
        joint = planner_capture(model, x.clone().requires_grad_())[1]
        assert len(region_nodes(joint)) == 2
        w = model.w.detach().clone().requires_grad_()
        x_ref = x.clone().requires_grad_()
        ref = (x_ref * 3.0) @ w
        tangent = torch.randn(ref.shape)
        ref.backward(tangent)
        ((out,), grads), record = run_joint(joint, [model.w.detach().clone(), x, tangent])
        assert not record.disagreements
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(grads[0], w.grad, atol=1e-4) and torch.allclose(grads[1], x_ref.grad, atol=1e-4)


def fold_pairs(x, w):
    # reshape(-1, 2, ...) is traced with this rank's sizes: the region graph holds them
    return x.reshape(-1, 2, x.shape[-1]).sum(1) @ w


def test_compile_with_only_pytorchs_wrapping_runs_the_function_on_the_tensors_given(fake_mesh_4):
    """torch.compile with PyTorch's local_map wrapping on but no deferral (PyTorch's own operator tests):
    the region is inlined as PyTorch inlines its own, the function on the tensors as given (was: the region
    graph, traced on one rank's shard sizes, run on the whole tensors: a size error)."""
    region = localmap.local_map(fold_pairs, out_placements=(S0,), in_placements=(S0, R), device_mesh=fake_mesh_4)
    x, w = torch.randn(16, 8, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with compat_dynamo.local_map_wrapping_on():
        out = torch.compile(lambda a, b: region(a, b), backend="aot_eager", fullgraph=True)(x, w)
    tangent = torch.randn(out.shape)
    out.backward(tangent)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = fold_pairs(x_ref, w_ref)
    ref.backward(tangent)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5) and torch.allclose(w.grad, w_ref.grad, atol=1e-5)


def test_count_mismatch_messages_carry_pytorchs_phrase(fake_mesh_4):
    """A wrong number of placement specs says it in PyTorch's words too (its tests and user code match them)."""
    two_inputs = localmap.local_map(lambda x, y: x + y, out_placements=(S0,), in_placements=(S0,),
                                    device_mesh=fake_mesh_4)
    two_outputs = localmap.local_map(lambda x: (x + 1, x + 2), out_placements=(S0,), in_placements=(S0,),
                                     device_mesh=fake_mesh_4)
    x = torch.randn(8, 8)
    with compat_dynamo.planner_capture_context():
        with pytest.raises(LocalMapError, match="Expecting 1 inputs to local_map function based on placements, "
                                                "but found 2"):
            torch.compile(lambda a: two_inputs(a, a), backend="eager", fullgraph=True)(x)
        with pytest.raises(LocalMapError, match="Expecting 1 outputs to local_map function based on placements, "
                                                "but found 2"):
            torch.compile(lambda a: two_outputs(a), backend="eager", fullgraph=True)(x)
