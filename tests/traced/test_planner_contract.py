"""The planner contract, checked without a planner: what meta-pytorch/autoparallel reads from a region node in
its capture (Dynamo export with PyTorch's local_map wrapping on, then the joint export under PyTorch's
deferral), on every supported PyTorch release.

A region node in the joint graph:
* is a ``call_function`` whose target prints with ``call_local_map`` in it (``call_local_map`` forward,
  ``call_local_map_backward`` backward) and takes only the region's tensors, activations first;
* carries ``meta["local_map_kwargs"]``: ``in_placements`` and ``out_placements`` (one placement tuple per mesh
  dim, per input and output), ``device_mesh`` (the region's mesh) and ``in_grad_placements`` None;
* the forward's ``meta["val"]`` is its outputs (global shapes) then its activations (this rank's local shapes);
  the backward takes exactly those activations, then one tangent per ``in_placements`` entry, and its
  ``out_placements`` are the gradient placements of the forward's inputs as the body implies them;
* its region graph runs on this rank's local shapes.

The values: a planner that honours these placements (split each input by its placements, run the region graph
on every rank, join each output by its placements) gets the gradients of one device.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate, Shard

import localmap
from localmap import collectives as C
from localmap.testing import on_one_device, planner_capture, region_nodes, run_joint, simulated_mesh
from localmap.traced.operator import region_graph_of

S0, S1, R, P = (Shard(0),), (Shard(1),), (Replicate(),), (Partial(),)


def matmul(x, w):
    return x @ w


def tp_mlp(x, w1, w2):
    return C.all_reduce(torch.relu(x @ w1) @ w2, "tp")


class Issue515(nn.Module):
    """autoparallel issue #515: x Shard(0), w Replicate; w's gradient is a partial sum."""

    def __init__(self, mesh):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.region = localmap.local_map(matmul, out_placements=(S0,), in_placements=(S0, R), device_mesh=mesh)

    def forward(self, x):
        return self.region(x, self.w)


class TensorParallelMLP(nn.Module):
    """Column-parallel w1, row-parallel w2, the partial sum reduced in the body: x's gradient is Partial."""

    def __init__(self, mesh):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(16, 64) / 4), nn.Parameter(torch.randn(64, 16) / 8)
        self.region = localmap.local_map(tp_mlp, out_placements=(R,), in_placements=(R, S1, S0), device_mesh=mesh)

    def forward(self, x):
        return self.region(x, self.w1, self.w2)


BODIES = {"issue515": lambda x, w: x @ w, "tp_mlp": lambda x, w1, w2: torch.relu(x @ w1) @ w2}  # one device
MODELS = {  # model, input shape, (forward in_placements, out_placements), backward out_placements
    "issue515": (Issue515, (32, 16), ((S0, R), (S0,)), (S0, P)),
    "tp_mlp": (TensorParallelMLP, (8, 16), ((R, S1, S0), (R,)), (P, S1, S0)),
}


def _capture(model, x):
    return planner_capture(model, x)[1]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_region_nodes_as_the_planner_reads_them(fake_mesh_4, name):
    cls, shape, (ins, outs), grads = MODELS[name]
    joint = _capture(cls(fake_mesh_4), torch.randn(*shape, requires_grad=True))
    forward, backward = region_nodes(joint)
    assert "call_local_map" in str(forward.target) and "call_local_map" in str(backward.target)
    assert (forward.target.__name__, backward.target.__name__) == ("call_local_map", "call_local_map_backward")
    for node in (forward, backward):
        kwargs = node.meta["local_map_kwargs"]
        assert kwargs["device_mesh"] is fake_mesh_4 and kwargs["in_grad_placements"] is None
        assert all(isinstance(a, torch.fx.Node) for a in node.args) and not node.kwargs
    assert forward.meta["local_map_kwargs"]["in_placements"] == ins
    assert forward.meta["local_map_kwargs"]["out_placements"] == outs
    assert backward.meta["local_map_kwargs"]["in_placements"] == outs  # one tangent per output
    assert backward.meta["local_map_kwargs"]["out_placements"] == grads  # the body's gradient placements


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_pairing_activations_and_local_shapes(fake_mesh_4, name):
    cls, shape, (ins, outs), _ = MODELS[name]
    model = cls(fake_mesh_4)
    joint = _capture(model, torch.randn(*shape, requires_grad=True))
    forward, backward = region_nodes(joint)
    values = forward.meta["val"]
    num_outputs = len(outs)
    activations = values[num_outputs:]
    assert len(activations) >= 1
    # outputs global (the model's output, shape[0] rows of 16); activations local (as the region graph gives them)
    assert tuple(values[0].shape) == (shape[0], 16)
    graph = region_graph_of(forward.target)
    graph_outputs = graph.graph.find_nodes(op="output")[0].args[0]
    assert [tuple(a.shape) for a in activations] == [tuple(o.meta["val"].shape) for o in graph_outputs[num_outputs:]]
    # the backward's first arguments are exactly the forward's activations, by getitem index
    saved = backward.args[:len(activations)]
    assert [(a.target, a.args) for a in saved] == [(operator.getitem, (forward, num_outputs + i))
                                                   for i in range(len(activations))]
    assert len(backward.args) == len(activations) + len(backward.meta["local_map_kwargs"]["in_placements"])
    # the region graph's inputs are this rank's shards of the node's global inputs
    local = [tuple(n.meta["val"].shape) for n in graph.graph.find_nodes(op="placeholder")]
    for arg, placements, local_shape in zip(forward.args, ins, local, strict=True):
        global_shape = list(arg.meta["val"].shape)
        for mesh_dim, p in enumerate(placements):
            if isinstance(p, Shard):
                global_shape[p.dim] //= fake_mesh_4.shape[mesh_dim]
        assert tuple(global_shape) == local_shape


@pytest.mark.parametrize("name", sorted(MODELS))
def test_planned_gradients_match_one_device(name):
    """Run with the node's placements, the weight (#515) and data (tensor-parallel MLP) gradients are one
    device's; read as PyTorch's operator states them (the input's own placement, Replicate), they are one
    rank's partial sum instead."""
    cls, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    with simulated_mesh(4, ("tp",)) as mesh, on_one_device():
        model = cls(mesh)
        x = torch.randn(*shape)
        joint = _capture(model, x.clone().requires_grad_())
        params = [p.detach().clone() for p in model.parameters()]
        ref_inputs = [p.clone().requires_grad_() for p in params] + [x.clone().requires_grad_()]
        ref_out = BODIES[name](ref_inputs[-1], *ref_inputs[:-1])
        tangent = torch.randn(ref_out.shape)
        ref_out.backward(tangent)

        ((out,), grads), record = run_joint(joint, [*params, x, tangent])  # (outputs, input gradients)
        assert not record.disagreements
        assert torch.allclose(out, ref_out, atol=1e-4)
        for got, ref in zip(grads, ref_inputs, strict=True):
            assert torch.allclose(got, ref.grad, atol=1e-4)

        # PyTorch's operator states the input's own placement (Replicate) for the gradient: one rank's part
        backward_graph = region_graph_of(region_nodes(joint)[1].target)
        kwargs = backward_graph.meta["local_map_kwargs"]
        as_torch = tuple(None if ps is None else tuple(Replicate() if isinstance(p, Partial) else p for p in ps)
                         for ps in kwargs["out_placements"])
        backward_graph.meta["local_map_kwargs"] = {**kwargs, "out_placements": as_torch}
        try:
            (_, wrong), record = run_joint(joint, [*params, x, tangent])
        finally:
            backward_graph.meta["local_map_kwargs"] = kwargs
        assert any("claimed Replicate on mesh dim 0 but ranks hold different values" in d for d in record.disagreements)
        partial_input = {"issue515": 0, "tp_mlp": -1}[name]  # w, resp. x
        assert not torch.allclose(wrong[partial_input], ref_inputs[partial_input].grad, atol=1e-3)


def test_captured_joint_graph_reruns_under_the_planners_deferral(fake_mesh_4):
    """A planner re-runs its capture (shape propagation, estimates): the region nodes run again on global fakes
    and give the shapes recorded on them."""
    from torch._higher_order_ops.local_map import defer_inlining as torch_defer_inlining
    from localmap.compat import detect_fake_mode, pytree

    joint = _capture(TensorParallelMLP(fake_mesh_4), torch.randn(8, 16, requires_grad=True))
    placeholders = joint.graph.find_nodes(op="placeholder")
    fake_mode = detect_fake_mode([n.meta["val"] for n in placeholders])
    fakes = {n.name: torch.empty_like(n.meta["val"]) for n in placeholders}
    with fake_mode, torch_defer_inlining():
        outs = joint([v for k, v in fakes.items() if k.startswith("primals")],
                     [v for k, v in fakes.items() if k.startswith("tangents")])
    expected = [n.meta["val"] for n in joint.graph.find_nodes(op="output")[0].args[0] if n is not None]
    got = [o for o in pytree.tree_leaves(outs) if o is not None]
    assert [tuple(o.shape) for o in got] == [tuple(e.shape) for e in expected]


def test_region_nodes_carry_their_costs(fake_mesh_4):
    """node.meta["localmap_cost"]: the #515 region on a rank's 8 of 32 rows: forward 2*8*16*16 FLOPs, saves
    x's shard (8*16 floats); backward (w's gradient only: x needs none) 2*16*8*16; no collective in either.
    The tensor-parallel MLP's forward sends its all_reduce: 2*(4-1)/4 of an 8x16 float output."""
    forward, backward = region_nodes(_capture(Issue515(fake_mesh_4), torch.randn(32, 16)))
    assert dict(forward.meta["localmap_cost"]) == {"flops": 2 * 8 * 16 * 16, "saved_bytes": 8 * 16 * 4,
                                                   "comm_bytes": 0.0}
    assert dict(backward.meta["localmap_cost"]) == {"flops": 2 * 16 * 8 * 16, "saved_bytes": 0, "comm_bytes": 0.0}
    forward = region_nodes(_capture(TensorParallelMLP(fake_mesh_4), torch.randn(8, 16, requires_grad=True)))[0]
    assert forward.meta["localmap_cost"]["comm_bytes"] == 2 * 3 / 4 * 8 * 16 * 4


class Issue515Loss(Issue515):
    """#515 with a loss after the region: ops on the region's output inside the captured model."""

    def forward(self, x):
        return (self.region(x, self.w) ** 2).sum()


def test_capture_on_a_simulated_mesh_with_ops_after_the_region():
    """Captured inside a simulated mesh (its LocalTensorMode on the dispatch stack), any op on a region's output
    used to fail in the joint export ("Attempting to use FunctionalTensor on its own": the set-aside mode still saw
    every op first); the capture takes the simulation off the stack, and the joint graph gives one device's numbers."""
    torch.manual_seed(0)
    with simulated_mesh(4, ("tp",)) as mesh:
        with on_one_device():
            model, x = Issue515Loss(mesh), torch.randn(32, 16)
            w = model.w.detach().clone().requires_grad_()
            ref_x = x.clone().requires_grad_()
            ref_loss = ((ref_x @ w) ** 2).sum()
            ref_loss.backward()
        joint = _capture(model, x.clone().requires_grad_())  # the simulation active, as a test on a mesh has it
        ((loss,), (grad_w, grad_x)), _ = run_joint(joint, [model.w.detach(), x, torch.ones(())])
        with on_one_device():
            torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(grad_w, w.grad, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(grad_x, ref_x.grad, rtol=1e-5, atol=1e-4)


def _torch_operator_run(model_of, x, warns):
    """Capture under PyTorch's operator (with the warnings it must give), run its joint graph per rank."""
    from localmap.hop import region_operator

    with simulated_mesh(4, ("tp",)) as mesh:
        with on_one_device():
            model = model_of(mesh)
        with region_operator("torch"), pytest.warns(UserWarning) as record:
            joint = _capture(model, x.clone().requires_grad_())
        said = [str(w.message) for w in record if "region_operator('localmap')" in str(w.message)]
        assert [any(fragment in s for s in said) for fragment in warns] == [True] * len(warns), said
        assert len(said) == len(warns), said
        ((out,), grads), record = run_joint(joint, [*(p.detach() for p in model.parameters()), x, torch.ones(())])
        return out, grads, [p.detach() for p in model.parameters()]


class Issue515Sum(Issue515):
    def forward(self, x):
        return self.region(x, self.w).sum()


def test_pytorch_operator_nodes_run_per_rank():
    """run_joint runs PyTorch's own region nodes (region_operator("torch")) per rank as it runs localmap's, with
    the placements they state: x's gradient is one device's; w's, stated Replicate where the body gives a partial
    sum (the capture warns, naming args[1]), is rank 0's part."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    out, (grad_w, grad_x), (w,) = _torch_operator_run(Issue515Sum, x, [r"args[1] has placements (Replicate(),) but "
                                                                       r"its gradient is (Partial(sum),)"])
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = (ref_x @ ref_w).sum()
    ref.backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_x, ref_x.grad, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(grad_w, ref_w.grad, atol=1e-3)  # what the warning says a planner gets


class PartialOutput(nn.Module):
    """x Shard(1), w Shard(0): the output is a partial sum (Partial), its gradient Replicate."""

    def __init__(self, mesh):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.region = localmap.local_map(matmul, out_placements=(P,), in_placements=(S1, S0), device_mesh=mesh)

    def forward(self, x):
        return (self.region(x, self.w) ** 2).sum()


def test_pytorch_operator_partial_output_tangent_warns():
    """PyTorch's backward node states a Partial output's tangent Partial too, so a planner honouring it hands each
    rank a piece of the gradient: the capture warns, naming the output, and those gradients are wrong (localmap's
    node states the tangent Replicate: test_region_nodes_as_the_planner_reads_them)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    out, (grad_w, grad_x), (w,) = _torch_operator_run(PartialOutput, x, ["outputs[0] has placements (Partial(sum),)"])
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = ((ref_x @ ref_w) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-3)
    assert not torch.allclose(grad_x, ref_x.grad, atol=1e-3) and not torch.allclose(grad_w, ref_w.grad, atol=1e-3)
