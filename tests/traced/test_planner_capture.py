"""Regions in a planner's capture (meta-pytorch/autoparallel's pipeline, run here without autoparallel): Dynamo
export with PyTorch's local_map wrapping on, then the joint export with PyTorch's operator deferred.

The same model is written once with PyTorch's local_map and once with localmap's; the captures must hold the
same region nodes (forward and backward), placements, local shapes and region graphs."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import local_map as torch_local_map

import localmap
from localmap import collectives as C
from localmap.check.checker import PlacementError
from localmap.compat import dynamo as compat_dynamo
from localmap.hop import defer_inlining, local_map_hop, region_operator
from localmap.testing import planner_capture, region_nodes
from localmap.traced.operator import region_graph_of

S0, R = (Shard(0),), (Replicate(),)


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


class Block(nn.Module):
    """Attention-like (heads sharded) then an MLP (rows sharded, weights replicated): two regions."""

    def __init__(self, lm, mesh, heads=4, seq=8, dim=16):
        super().__init__()
        self.heads, self.seq, self.dim = heads, seq, dim
        self.wq = nn.Parameter(torch.randn(dim, dim) / 4)
        self.wk = nn.Parameter(torch.randn(dim, dim) / 4)
        self.w1 = nn.Parameter(torch.randn(dim, 2 * dim) / 4)
        self.w2 = nn.Parameter(torch.randn(2 * dim, dim) / 4)
        self.attention = lm(attention, out_placements=(S0,), in_placements=(S0, S0, S0), device_mesh=mesh)
        self.mlp = lm(mlp, out_placements=(S0,), in_placements=(S0, R, R), device_mesh=mesh)

    def forward(self, x):
        # distinct tensors: PyTorch's Dynamo rule localizes a tensor passed twice twice (its own local_map fails)
        o = self.attention(x @ self.wq, x @ self.wk, x)
        return self.mlp(o.reshape(self.heads * self.seq, self.dim), self.w1, self.w2).sum()


def _capture(model, *args, operator="torch"):
    with warnings.catch_warnings(), region_operator(operator):
        warnings.simplefilter("ignore")  # the gradient-placement warning has its own test
        return planner_capture(model, *args)


def _region_graph(joint, node):
    """The graph a region node runs: a submodule (localmap's operator, PyTorch 2.14's) or the graph PyTorch
    2.13's call_local_map closure holds."""
    if region_graph_of(node.target) is not None:  # localmap's operator in a planner's capture
        return region_graph_of(node.target)
    if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr":
        return getattr(joint, node.args[0].target)
    cells = [c.cell_contents for c in node.target.__closure__ or ()]
    return next(c for c in cells if isinstance(c, torch.fx.GraphModule))


def _summary(joint):
    """Per region node: placements, local input shapes, op counts of its graph."""
    out = []
    for node in region_nodes(joint):
        gm = _region_graph(joint, node)
        kwargs = node.meta["local_map_kwargs"]
        ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        shapes = [tuple(n.meta["val"].shape) for n in gm.graph.find_nodes(op="placeholder")
                  if isinstance(n.meta.get("val"), torch.Tensor)]
        out.append((tuple(kwargs["in_placements"]), tuple(kwargs["out_placements"]), shapes, ops))
    return out


def test_same_region_nodes_as_pytorch_local_map(fake_mesh_4):
    x = torch.randn(4, 8, 16)
    torch_joint = _capture(Block(torch_local_map, fake_mesh_4), x)[1]
    ours_dynamo, ours_joint = _capture(Block(localmap.local_map, fake_mesh_4), x)
    dynamo_regions = [n for n in ours_dynamo.graph.nodes if "local_map_hop" in str(n.target)]
    assert len(dynamo_regions) == 2  # Dynamo's graph: one node per region call
    assert len(region_nodes(torch_joint)) == 4  # a forward and a backward node per region
    theirs, ours = _summary(torch_joint), _summary(ours_joint)
    assert ours == theirs
    assert ours[0][:3] == ((S0, S0, S0), (S0,), [(1, 8, 16)] * 3)  # attention forward on one head of 4
    assert ours[1][:3] == ((S0, R, R), (S0,), [(8, 16), (16, 32), (32, 16)])  # mlp forward on 8 rows of 32
    for node in region_nodes(ours_joint):
        assert any(name in str(node.target) for name in compat_dynamo.torch_region_target_names())
        assert node.meta["local_map_kwargs"]["in_grad_placements"] is None  # what the planner requires


def scaled_mlp(x, weights, scale, act):
    """A pytree argument (two weights under one prefix spec) and non-tensor arguments between tensors."""
    w1, w2 = weights
    return act(x @ w1) @ w2 * scale, 2


def test_prefix_specs_and_non_tensor_arguments(fake_mesh_4):
    """A prefix spec for a tuple of weights, None for a float and a function argument, a non-tensor output:
    the same node as PyTorch's local_map given the flat specs (Nones last, as it requires)."""
    ours = localmap.local_map(scaled_mlp, out_placements=(S0, None), in_placements=(S0, R, None, None),
                              device_mesh=fake_mesh_4)

    def flat(x, w1, w2, scale):
        return (torch.relu(x @ w1) @ w2 * scale,)

    theirs = torch_local_map(flat, out_placements=(S0,), in_placements=(S0, R, R, None), device_mesh=fake_mesh_4)

    class Ours(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32, 16))

        def forward(self, x):
            y, two = ours(x, (self.w1, self.w2), 0.5, torch.relu)
            return y.sum() * two

    class Theirs(Ours):
        def forward(self, x):
            return theirs(x, self.w1, self.w2, 0.5)[0].sum() * 2

    x = torch.randn(32, 16)
    ours_summary = _summary(_capture(Ours(), x)[1])
    assert ours_summary == _summary(_capture(Theirs(), x)[1])
    assert ours_summary[0][:3] == ((S0, R, R), (S0,), [(8, 16), (16, 32), (32, 16)])


def row_parallel(x, w):
    return C.all_reduce(x @ w, "tp")


class RowParallel(nn.Module):
    def __init__(self, mesh):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.region = localmap.local_map(row_parallel, out_placements=(R,), in_placements=((Shard(1),), S0),
                                         device_mesh=mesh)

    def forward(self, x):
        return self.region(x, self.w).sum()


@pytest.mark.parametrize("operator", ["torch", "localmap"])
def test_collective_in_body_stays_in_the_region(fake_mesh_4, operator):
    """The body's all_reduce (mesh from the region, read at trace time) is in the region's graph; the global
    graph has no collective (a planner refuses one)."""
    joint = _capture(RowParallel(fake_mesh_4), torch.randn(8, 16), operator=operator)[1]
    nodes = region_nodes(joint)
    assert len(nodes) == 2
    outside = [str(n.target) for n in joint.graph.nodes if n.op == "call_function"]
    assert not any("_c10d_functional" in t for t in outside)
    forward = _region_graph(joint, nodes[0])
    inside = collections.Counter(str(n.target) for n in forward.graph.nodes if n.op == "call_function")
    assert inside["_c10d_functional.all_reduce.default"] == 1
    assert nodes[0].meta["local_map_kwargs"]["out_placements"] == (R,)


def test_collective_with_explicit_mesh_in_captured_body_is_refused(fake_mesh_4):
    def body(x, w):
        return C.all_reduce(x @ w, "tp", mesh=fake_mesh_4)

    model = RowParallel(fake_mesh_4)
    model.region = localmap.local_map(body, out_placements=(R,), in_placements=((Shard(1),), S0),
                                      device_mesh=fake_mesh_4)
    with pytest.raises(localmap.LocalMapError, match="drop mesh="):
        _capture(model, torch.randn(8, 16))


def test_wrong_claim_refused_at_capture(fake_mesh_4):
    """A partial sum claimed Replicate (the all_reduce forgotten): localmap's check runs at capture time."""
    def forgot_all_reduce(x, w):
        return x @ w

    model = RowParallel(fake_mesh_4)
    model.region = localmap.local_map(forgot_all_reduce, out_placements=(R,), in_placements=((Shard(1),), S0),
                                      device_mesh=fake_mesh_4)
    with pytest.raises(PlacementError, match="Partial"):
        _capture(model, torch.randn(8, 16))


def test_wrong_spec_count_refused_at_capture(fake_mesh_4):
    model = RowParallel(fake_mesh_4)
    model.region = localmap.local_map(row_parallel, out_placements=(R,), in_placements=((Shard(1),),),
                                      device_mesh=fake_mesh_4)
    with pytest.raises(localmap.LocalMapError, match="in_placements"):
        _capture(model, torch.randn(8, 16))


def test_uncarried_gradient_placement_warns_naming_the_input(fake_mesh_4):
    """Replicate weights meeting rows of data: their gradients are Partial, which PyTorch's operator cannot
    carry; the capture says so for each weight (not for the data, whose gradient is its own placement)."""
    with pytest.warns(UserWarning, match=r"args\[1\] has placements \(Replicate\(\),\) but its gradient is "
                                         r"\(Partial\(sum\),\)") as record:
        with region_operator("torch"):
            planner_capture(Block(localmap.local_map, fake_mesh_4), torch.randn(4, 8, 16))
    paths = sorted(str(w.message).split(": ")[1].split(" ")[0] for w in record
                   if "carries no gradient placements" in str(w.message))
    assert paths == ["args[1]", "args[2]"]


def test_localmap_operator_keeps_gradient_placements(fake_mesh_4):
    """localmap's operator (the default): region nodes in the form a planner reads (targets named
    call_local_map / call_local_map_backward, in_grad_placements None); the backward node's out_placements
    hold the inferred Partial gradients of the weights; the forward graph keeps them too; no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        joint = planner_capture(Block(localmap.local_map, fake_mesh_4), torch.randn(4, 8, 16))[1]
    nodes = region_nodes(joint)
    assert [n.target.__name__ for n in nodes] == ["call_local_map"] * 2 + ["call_local_map_backward"] * 2
    roles = [n.meta["localmap"]["role"] for n in nodes]
    assert roles == ["forward", "forward", "backward", "backward"]
    mlp_forward, mlp_backward = nodes[1], nodes[2]  # backward nodes run in reverse order
    partial = (Partial(),)
    assert all(n.meta["local_map_kwargs"]["in_grad_placements"] is None for n in nodes)
    assert region_graph_of(mlp_forward.target).meta["local_map_kwargs"]["in_grad_placements"] == (S0, partial, partial)
    assert mlp_backward.meta["local_map_kwargs"]["out_placements"] == (S0, partial, partial)
    assert mlp_backward.meta["local_map_kwargs"]["in_placements"] == (S0,)


def test_region_operator_refuses_unknown_names():
    with pytest.raises(localmap.LocalMapError, match="'torch'"):
        with region_operator("jax"):
            pass


# ---- nothing silent: a region inlined where a region node was expected warns ----------------------------------

def test_inlined_under_pytorch_deferral_warns(fake_mesh_4):
    """PyTorch's defer_inlining without Dynamo (make_fx): the region is inlined, with a warning."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._higher_order_ops.local_map import defer_inlining as torch_defer_inlining

    region = localmap.local_map(mlp, out_placements=(S0,), in_placements=(S0, R, R), device_mesh=fake_mesh_4)
    args = (torch.randn(8, 16), torch.randn(16, 32), torch.randn(32, 16))
    with torch_defer_inlining(), pytest.warns(UserWarning, match="inside PyTorch's local_map defer_inlining"):
        gm = make_fx(lambda *a: region(*a))(*args)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        torch.ops.aten.mm.default, torch.ops.aten.relu.default, torch.ops.aten.mm.default]


def test_inlined_by_dynamo_under_localmap_deferral_warns(fake_mesh_4):
    """localmap.hop.defer_inlining around torch.compile without local_map wrapping: inlined, with a warning."""
    region = localmap.local_map(mlp, out_placements=(S0,), in_placements=(S0, R, R), device_mesh=fake_mesh_4)
    compiled = torch.compile(lambda *a: region(*a), backend="eager", fullgraph=True)
    args = (torch.ones(8, 16), torch.ones(16, 32), torch.ones(32, 16))
    with defer_inlining(), pytest.warns(UserWarning, match="inside localmap.hop.defer_inlining"):
        out = compiled(*args)
    assert torch.equal(out, mlp(*args))


def test_plain_call_outside_any_capture_is_quiet(fake_mesh_4):
    region = localmap.local_map(mlp, out_placements=(S0,), in_placements=(S0, R, R), device_mesh=fake_mesh_4)
    args = (torch.ones(8, 16), torch.ones(16, 32), torch.ones(32, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(region(*args), mlp(*args))


def test_specs_shorter_than_the_mesh_in_a_planner_capture(fake_mesh_2x2):
    """[Shard(0)] on a 2-d mesh: the region node holds (Shard(0), Replicate()), as with the full spec."""
    def model_with(in_placements, out_placements):
        model = RowParallel(fake_mesh_2x2)
        model.region = localmap.local_map(mlp, out_placements=out_placements, in_placements=in_placements,
                                          device_mesh=fake_mesh_2x2)
        model.w1, model.w2 = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32, 16))
        model.forward = lambda x: model.region(x, model.w1, model.w2).sum()
        return model

    x = torch.randn(8, 16)
    short = _summary(_capture(model_with((S0, R, R), (S0,)), x)[1])
    full = _summary(_capture(model_with(((Shard(0), Replicate()),) + ((Replicate(), Replicate()),) * 2,
                                        ((Shard(0), Replicate()),)), x)[1])
    assert short == full
    assert short[0][:2] == (((Shard(0), Replicate()), (Replicate(), Replicate()), (Replicate(), Replicate())),
                            ((Shard(0), Replicate()),))


def test_errors_under_dynamo_with_local_map_wrapping_arrive_as_themselves(fake_mesh_4):
    """torch.compile with PyTorch's local_map wrapping on (its own tests' setup): a wrong claim is a
    PlacementError there too, not Dynamo's InternalTorchDynamoError."""
    def forgot_all_reduce(x, w):
        return x @ w

    region = localmap.local_map(forgot_all_reduce, out_placements=(R,), in_placements=((Shard(1),), S0),
                                device_mesh=fake_mesh_4)
    compiled = torch.compile(lambda x, w: region(x, w), backend="eager", fullgraph=True)
    with compat_dynamo.planner_capture_context(), pytest.raises(PlacementError, match="Partial"):
        compiled(torch.randn(8, 16), torch.randn(16, 8))


def test_closed_over_dtensor_refused_at_capture():
    """A body reading a DTensor weight it closes over: a planner's region node takes the call's tensor arguments
    only, so the capture refuses, naming the weight (it used to freeze one rank's shard into the region graph and
    give neither the weight nor x a gradient)."""
    from localmap.testing import distribute, on_one_device, simulated_mesh

    with simulated_mesh(4, ("tp",)) as mesh:
        with on_one_device():
            w = distribute(torch.randn(16, 8), mesh, (Shard(1),), requires_grad=True)

        def column(x):
            return x @ w.to_local()

        class Column(nn.Module):
            def __init__(self):
                super().__init__()
                self.region = localmap.local_map(column, out_placements=((Shard(1),),), in_placements=(R,),
                                                 device_mesh=mesh)

            def forward(self, x):
                return self.region(x).sum()

        for operator in ("localmap", "torch"):
            with pytest.raises(localmap.LocalMapError, match=r"w: is a DTensor the body of region 'column' closes "
                                                             r"over, which a planner's capture"):
                _capture(Column(), torch.randn(4, 16, requires_grad=True), operator=operator)
