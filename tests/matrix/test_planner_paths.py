"""The path matrix, the planner's paths: a planner's capture (meta-pytorch/autoparallel's pipeline, run here
without autoparallel: ``localmap.testing.planner_capture``) under each region operator, and ``defer_inlining`` +
make_fx. Each records a graph whose regions are nodes; the cell runs that graph as the mesh would
(``run_joint``: every region node's graph once per rank of the simulated mesh, on that rank's pieces of the
program's real inputs, joined by the placements the node states) and compares outputs and gradients (and, where
the path can, second-order gradients) with one device.

Region operators: "localmap" (the default: the backward node states the gradient placements the body implies)
and "torch" (PyTorch's own operator, whose backward node states each input's own placement as its gradient's and
each output's own as its tangent's). Under "torch" the capture warns for each such placement the body's
gradients do not have: a warned argument's gradient must differ from one device (the cell checks that it does),
a warned Partial output leaves no gradient vouched for, and every other number must match."""

from __future__ import annotations

import re

import pytest
import torch

from catalogue import BY_ID
from localmap.core.refusals import PLANNER_CAPTURE, TRACED_CALL
from matrix_cells import FULL, PLANNED, TRACED, TRACED_REFUSED, expect, mesh_of, one_device, params, refuses, select
from matrix_paths import (
    TOL, Loss, PlannerModule, ProgramModule, _differentiable, captured_reference, compare, deferred_traced, draw,
    dtensor_weights, planner_captured,
)

pytestmark = pytest.mark.matrix
OPERATORS = ("localmap", "torch")

# Programs with no planner form: a planner's model holds its weights as plain tensors passed to the region, and
# this body asks whether its weight is a DTensor (to offset the ids by the rank's rows), so given a plain shard it
# is another program (the check calls it unproven, and its numbers differ). Closed over as eager runs it, the
# capture refuses it by name (test_planner_capture_refuses_closed_over_dtensors).
NO_PLANNER_FORM = {"parallel: vocab-parallel embedding, closed-over table":
                   "its body branches on isinstance(weight, DTensor), which a planner's plain weight never is"}
# PyTorch's operator refuses what localmap's takes (a PyTorch limitation, skipped with its words): program id ->
# what Dynamo's error says.
TORCH_OPERATOR_REFUSES = {"types: reshape keeps the shard": "Higher order ops do not support aliasing"}


def _want(prog, t, structure: str = "single") -> dict:
    """One device: the loss, the output and the first-order gradients."""
    want = one_device(prog, t, structure)
    return {**captured_reference(want, t), **{k: v for k, v in want.items() if k.startswith("out.")}}


def _planner_cell(prog, t, mesh, operator, want, structure: str = "single") -> dict:
    """The cell's numbers: those the capture vouches for. Under PyTorch's operator, what the capture warned a
    planner gets wrong is left out of the comparison (taken out of `want` too, which the cell then compares): a
    warned argument's gradient, which must differ from one device; with a Partial output (its tangent misstated),
    every gradient. The localmap operator warns nothing of the kind."""
    got, warned = planner_captured(prog, t, mesh, operator, structure)
    if operator == "localmap":
        assert not warned, warned
        return got
    named = [f"grad.{w}" for w in warned if not w.startswith("outputs[")]
    if len(named) == len(warned):  # each warned argument's own gradient is wrong
        diffs = compare({k: got[k] for k in named}, {k: want[k] for k in named})
        assert all(d > TOL for d in diffs.values()), f"warned {warned}, yet some match: {diffs}"
    else:  # a Partial output: each rank's tangent is a piece, so no gradient is vouched for (a linear body
        named = [k for k in got if k.startswith("grad.")]  # of a Partial input may still add the pieces up)
    for k in named:
        del got[k], want[k]
    return got


@pytest.mark.compile  # Dynamo (its export), as torch.compile runs it
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("prog", params(PLANNED, quick={"types: row-parallel matmul"}))
def test_planner_capture(prog, operator):
    if prog.id in NO_PLANNER_FORM:
        pytest.skip(f"no planner form: {NO_PLANNER_FORM[prog.id]}")
    t = draw(prog, 1)
    if operator == "torch" and prog.id in TORCH_OPERATOR_REFUSES:
        with mesh_of(prog) as mesh:
            _pytorch_refuses(lambda: planner_captured(prog, t, mesh, operator), TORCH_OPERATOR_REFUSES[prog.id],
                             "PyTorch's local_map operator refuses the body")
    if prog.id in TRACED_REFUSED:
        with mesh_of(prog) as mesh:
            refuses(lambda: planner_captured(prog, t, mesh, operator), TRACED_CALL, *TRACED_REFUSED[prog.id])
        return
    want = _want(prog, t)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: _planner_cell(prog, t, mesh, operator, want), want)


@pytest.mark.compile
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("prog", params([p for p in TRACED if p.weights], quick=set()))
def test_planner_capture_refuses_closed_over_dtensors(prog, operator):
    """The program as eager runs it, its weights DTensors the body closes over: a planner's region node takes the
    call's tensor arguments only, so the capture refuses, naming the weight (it used to freeze one rank's shard
    into the region graph and give the weight no gradient)."""
    from localmap.hop import region_operator
    from localmap.testing import planner_capture

    t = draw(prog, 1)
    with mesh_of(prog) as mesh:
        model = Loss(ProgramModule(prog, mesh, dtensor_weights(prog, t, mesh, "parameter"), "parameter", "single",
                                   True), t.upstream)
        with region_operator(operator):
            refuses(lambda: planner_capture(model, *_differentiable(t.inputs)), PLANNER_CAPTURE, "ws.w0",
                    "closes over", "pass the weight to the region as an argument")


# The region's output in each container (a second leaf: the output doubled), on both planner paths. The full
# matrix adds a Partial output (what PyTorch's operator misstates).
STRUCTURED = [BY_ID["types: row-parallel matmul"]] + ([BY_ID["types: sharded contraction to partial"]] if FULL else [])
STRUCTURES = ["tuple", "list", "dict", "nested"]


@pytest.mark.compile
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("prog", STRUCTURED, ids=lambda p: p.id)
def test_planner_capture_structured_outputs(prog, structure, operator):
    t = draw(prog, 2)
    want = _want(prog, t, structure)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: _planner_cell(prog, t, mesh, operator, want, structure), want)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("prog", STRUCTURED, ids=lambda p: p.id)
def test_deferred_make_fx_structured_outputs(prog, structure):
    t = draw(prog, 2)
    want = one_device(prog, t, structure)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: deferred_traced(prog, t, mesh, structure), want)


@pytest.mark.compile
@pytest.mark.parametrize("operator", OPERATORS)
def test_planner_capture_gradient_penalty(operator):
    """Second order: a planner's capture holds one forward and one backward; a model that takes a gradient itself
    (a gradient penalty) is refused by PyTorch's Dynamo export, not by localmap."""
    from localmap.hop import region_operator
    from localmap.testing import planner_capture

    prog = BY_ID["types: row-parallel matmul"]
    t = draw(prog, 1)

    class Penalty(PlannerModule):
        def forward(self, *xs):
            grads = torch.autograd.grad(super().forward(*xs), list(self.parameters()) or list(xs), create_graph=True)
            return sum(g.pow(2).sum() for g in grads)

    with mesh_of(prog) as mesh, region_operator(operator):
        model = Penalty(prog, mesh, t)
        _pytorch_refuses(lambda: planner_capture(model, *_differentiable(t.inputs)), "torch.autograd.grad",
                         "PyTorch's Dynamo export refuses a gradient inside the captured model")


def _pytorch_refuses(run, says: str, what: str) -> None:
    """A PyTorch limitation: Dynamo refuses the cell (Unsupported, saying `says`); skipped in its words."""
    from torch._dynamo.exc import Unsupported

    with pytest.raises(Unsupported, match=re.escape(says)) as info:
        run()
    pytest.skip(f"{what}: {str(info.value).splitlines()[0]}")


@pytest.mark.parametrize("prog", params(TRACED, quick={"types: row-parallel matmul",
                                                       "types: partial sum claimed Replicate"}))
def test_deferred_make_fx(prog):
    if prog.id in NO_PLANNER_FORM:
        pytest.skip(f"no planner form: {NO_PLANNER_FORM[prog.id]}")
    t = draw(prog, 1)
    if prog.id in TRACED_REFUSED:
        with mesh_of(prog) as mesh:
            refuses(lambda: deferred_traced(prog, t, mesh), TRACED_CALL, *TRACED_REFUSED[prog.id])
        return
    want = one_device(prog, t)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: deferred_traced(prog, t, mesh), want)


@pytest.mark.parametrize("prog", params([p for p in select(verdicts=("ok",), differentiable=True)
                                         if p in TRACED][:3], quick=set()))
def test_deferred_make_fx_gradient_penalty(prog):
    """Second order through a deferred region: its backward graph is not differentiable, so the trace refuses
    create_graph by name (eager regions give second-order gradients: test_eager_gradient_penalty)."""
    t = draw(prog, 1)
    with mesh_of(prog) as mesh:
        refuses(lambda: deferred_traced(prog, t, mesh, penalty=True), "create_graph", "double backward",
                "traced regions do not support")
