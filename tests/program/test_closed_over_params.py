"""DTensor parameters a region's body reads from its module (torchtitan's ``self.w1.to_local()``) are inputs of
the captured program, like arguments: the region node takes them with their placements, run gives each rank its
shard, verify's one-device reference reads the full tensors and compares their gradients, on a fake, a simulated
and a real (gloo) mesh."""

from __future__ import annotations

import collections
import functools
import itertools
import types
import warnings

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

import localmap
from localmap import LocalMapError, VerificationError
from localmap.hop import local_map_hop
from localmap.models import GroupedExperts
from localmap.testing import distribute, fake_mesh, full, on_one_device, run_gloo, simulated_mesh
from helpers import R, S0, S1, rel_diff

S2 = localmap.Shard(2)


class _Loss(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.moe = experts

    def forward(self, x):
        return self.moe(x).pow(2).mean()


def _model(mesh, experts=4, seed=0):
    with on_one_device():
        torch.manual_seed(seed)
        model = _Loss(GroupedExperts(8, 16, experts, mesh))
        x = torch.randn(experts, 6, 8)
    model.moe.shard(distribute)
    return model, x


def _one_device(model, x):
    """The loss and weight gradients on one device, written out (the full weights, plain code)."""
    with on_one_device():
        w1, w2, w3 = (full(getattr(model.moe, n)).requires_grad_() for n in ("w1", "w2", "w3"))
        y = torch.bmm(torch.nn.functional.silu(torch.bmm(x, w1)) * torch.bmm(x, w3), w2)
        loss = y.pow(2).mean()
        return loss.detach(), dict(zip(("moe.w1", "moe.w2", "moe.w3"), torch.autograd.grad(loss, [w1, w2, w3])))


def test_capture_makes_closed_over_weights_region_inputs():
    with fake_mesh((2, 2), ("ep", "tp")) as mesh:
        model, x = _model(mesh)
        assert isinstance(model.moe.w1, DTensor)
        prog = localmap.capture(model, x)
    (region,) = prog.regions
    assert region.closed_over == ["moe.w1", "moe.w2", "moe.w3"]
    assert region.in_placements == ((S0, R), (S0, S2), (S0, S1), (S0, S2))
    assert region.global_in_shapes[1:] == [[4, 8, 16], [4, 16, 8], [4, 8, 16]]
    assert region.local_in_shapes[1:] == [[2, 8, 8], [2, 8, 8], [2, 8, 8]]  # this rank's shards
    assert region.in_grad_placements[1:] == ((S0, S2), (S0, S1), (S0, S2))
    (node,) = [n for n in prog.forward.graph.nodes if n.target is local_map_hop]
    placeholders = {p.name: i for i, p in enumerate(prog.forward.graph.find_nodes(op="placeholder"))}
    assert [prog.input_names[placeholders[a.name]] for a in node.args[1:]] == ["args[0]", "moe.w1", "moe.w2",
                                                                                 "moe.w3"]
    assert {n: p.placements for n, p in prog.dtensor_params.items()} == {
        "moe.w1": (S0, S2), "moe.w2": (S0, S1), "moe.w3": (S0, S2)}
    (bw,) = [n for n in prog.backward.graph.nodes if n.target is local_map_hop]
    # global-shaped weight gradients (x needs none)
    assert [g if g is None else tuple(g.shape) for g in bw.meta["val"]] == [None, (4, 8, 16), (4, 16, 8), (4, 8, 16)]
    assert '"closed_over": ["moe.w1", "moe.w2", "moe.w3"]' in prog.to_json(indent=None)
    report = prog.report()  # the report (and the CLI's table: demo, inspect) names them among the inputs
    assert "2x6x8 moe.w1=2x8x8 moe.w2=2x8x8 moe.w3=2x8x8" in report
    assert "DTensor parameters read inside regions" in report and "moe.w2 (S(0),S(1))" in report


@pytest.mark.parametrize("shape,names", [((2,), ("ep",)), ((2, 2), ("ep", "tp"))])
def test_run_and_verify_on_a_simulated_mesh(shape, names):
    with simulated_mesh(shape, names) as mesh:
        model, x = _model(mesh)
        prog = localmap.capture(model, x)
        result = prog.run(x)
        report = localmap.verify(model, x)
        eager = full(model(distribute(x, mesh, [S0] + [R] * (len(shape) - 1))))
        ref_loss, ref_grads = _one_device(model, x)
    assert rel_diff(result.loss, ref_loss) < 1e-5 and rel_diff(eager, ref_loss) < 1e-5
    assert set(result.grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert rel_diff(result.grads[name], g) < 1e-5, name
    assert report.regions_checked == 1 and set(report.grad_diffs) == set(ref_grads)
    assert report.region_diffs["_grouped_mm.0"][1] < 1e-5  # outputs and every input's gradient, weights too


def test_verify_still_catches_a_wrong_claim():
    with simulated_mesh((2, 2), ("ep", "tp")) as mesh:
        model, x = _model(mesh)
        experts = model.moe
        # The output is a partial sum over tp; claiming Replicate (unchecked) keeps one rank's share.
        experts.experts = localmap.local_map(experts._grouped_mm, out_placements=[S0, R], in_placements=([S0, R],),
                                             device_mesh=mesh, check=False)
        with pytest.raises(VerificationError, match=r"region _grouped_mm\.0 .*output 0"):
            localmap.verify(model, x)


def test_the_eager_check_types_closed_over_weights():
    with simulated_mesh((2, 2), ("ep", "tp")) as mesh:
        model, x = _model(mesh)
        model(distribute(x, mesh, [S0, R]))
        (verdict,) = model.moe.experts.region.verdicts()
    # The weights are typed by their placements (check.closure); their gradients follow what their to_local()
    # declares (the default: their own placements), which the check found consistent with the body.
    assert verdict.status == "ok" and verdict.grad_placements is not None, verdict
    assert len(verdict.grad_placements) == 1  # the argument's; the weights are no arguments


def test_a_closed_over_dtensor_that_is_no_program_input_is_named():
    with fake_mesh((2,), ("ep",)) as mesh:
        model, x = _model(mesh)
        with pytest.raises(LocalMapError, match=r"self\.w1: is a DTensor the region's body reads that is no input"):
            localmap.capture(lambda t: model(t), x)  # a function, not the module: its weights are no inputs


def test_weights_on_a_sub_mesh_are_replicated_on_the_other_dims():
    with simulated_mesh((2, 2), ("dp", "ep")) as mesh:
        with on_one_device():
            torch.manual_seed(0)
            experts = GroupedExperts(8, 16, 4, mesh["ep"])
            x = torch.randn(4, 6, 8)
        experts.shard(distribute)
        # The region runs on the 2-D mesh: tokens over dp, experts over ep; the weights live on 'ep' alone.
        experts.experts = localmap.local_map(experts._grouped_mm, out_placements=[S1, S0],
                                             in_placements=([S1, S0],), device_mesh=mesh)
        model = _Loss(experts)
        prog = localmap.capture(model, x)
        localmap.verify(model, x)
    assert prog.regions[0].in_placements[1:] == ((R, S0), (R, S0), (R, S0))


def _verify_on_gloo(mesh):
    """On every rank: capture, run and verify the experts with closed-over DTensor weights on a real mesh."""
    model, x = _model(mesh)
    report = localmap.verify(model, x)
    ref_loss, ref_grads = _one_device(model, x)
    result = localmap.capture(model, x).run(x)
    return {"loss": rel_diff(result.loss, ref_loss), "regions": report.regions_checked,
            "grads": max(rel_diff(result.grads[n], g) for n, g in ref_grads.items()),
            "local": tuple(model.moe.w1.to_local().shape)}


@pytest.mark.slow
def test_closed_over_weights_on_real_processes():
    results = run_gloo(_verify_on_gloo, 2, (2,), ("ep",), timeout=120)
    for r in results:
        assert r["loss"] < 1e-5 and r["grads"] < 1e-5 and r["regions"] == 1 and r["local"] == (2, 8, 16)


_WEIGHTS: dict = {}  # a module global a body reads a DTensor from

# Where _ColumnParallel holds its weight -> the program input's name.
_HOLDS = {
    "parameter": "w", "buffer": "w", "attribute": "w",
    "list": "ws[0]",  # a list of expert weights as DTensors
    "dict": "table['w']",  # a module holding a dict of DTensors
    "tuple": "ws[1]",  # a tuple attribute
    "nested": "ws[0]['w'][1]",  # a list of dicts of namedtuples
    "object": "cfg.table['w']",  # a plain config object holding a DTensor table
    "global": "_WEIGHTS['w']",  # a module global the body's code names
    "global name": "_HELD_W",  # a module global that is the DTensor itself
    "twice": "w",  # the same DTensor as an attribute and in a list (read from the list): one input
    "unregistered": "ws[0].w",  # the parameter of a module held in a plain list (no submodule of the model)
}


_Pair = collections.namedtuple("_Pair", "a b")


class _Holder(nn.Module):
    def __init__(self, w) -> None:
        super().__init__()
        self.w = nn.Parameter(w)


def _column_mm(w, x):
    return x @ w.to_local()


class _ColumnParallel(nn.Module):
    """A column-sharded weight read inside the region as ``.to_local(...)``, held as a parameter, a buffer, a plain
    attribute (issue 19, items 4 and 5), in a list, dict or nested containers, on a plain object or in a module
    global (_HOLDS); or where capture takes no input from: made by a generator, held by a C object
    (itertools.repeat), or bound as a partial's argument."""

    def __init__(self, mesh, w: torch.Tensor, hold: str, declared: bool) -> None:
        super().__init__()
        weight = distribute(w, mesh, [S1], requires_grad=hold != "buffer")
        if hold == "parameter":
            self.w = nn.Parameter(weight)
        elif hold == "buffer":
            self.register_buffer("w", weight)
        elif hold in ("attribute", "twice"):
            self.w = weight  # neither parameter nor buffer
        held = {"list": lambda: [weight], "twice": lambda: [weight], "nested": lambda: [{"w": _Pair(None, weight)}],
                "tuple": lambda: (None, weight),
                "unregistered": lambda: [_Holder(weight)],
                "dict": lambda: {"w": weight}, "object": lambda: types.SimpleNamespace(table={"w": weight}),
                "generator": lambda: (weight for _ in iter(int, 1)), "c_object": lambda: itertools.repeat(weight)}
        if hold in held:
            name = {"dict": "table", "object": "cfg", "generator": "source", "c_object": "source"}.get(hold, "ws")
            setattr(self, name, held[hold]())
        elif hold == "global":
            _WEIGHTS["w"] = weight
        elif hold == "global name":
            globals()["_HELD_W"] = weight
        self.hold, self.declared = hold, declared
        body = functools.partial(_column_mm, weight) if hold == "partial" else self._mm
        self.region = localmap.local_map(body, out_placements=[S1], in_placements=([R],), device_mesh=mesh)

    def held(self):
        """The weight, read where it is held."""
        return {"list": lambda: self.ws[0], "twice": lambda: self.ws[0], "nested": lambda: self.ws[0]["w"].b,
                "tuple": lambda: self.ws[1], "unregistered": lambda: self.ws[0].w,
                "dict": lambda: self.table["w"], "object": lambda: self.cfg.table["w"], "global": lambda: _WEIGHTS["w"],
                "global name": lambda: _HELD_W,  # noqa: F821 (set by __init__)
                "generator": lambda: next(self.source), "c_object": lambda: next(self.source)}.get(
                    self.hold, lambda: self.w)()

    def _mm(self, x):
        w = self.held()
        # the form localmap's own fix line recommends, or the plain one
        w = w.to_local(grad_placements=[S1]) if self.declared else w.to_local()
        return x @ w

    def forward(self, x):
        return self.region(x).pow(2).sum()


@pytest.fixture(autouse=True)
def _no_global_weights():
    yield
    _WEIGHTS.clear()
    globals().pop("_HELD_W", None)


@pytest.mark.parametrize("declared", [False, True], ids=["to_local()", "to_local(grad_placements=...)"])
@pytest.mark.parametrize("hold", list(_HOLDS))
def test_weights_held_any_way_run_and_verify_like_one_device(hold, declared):
    """A DTensor held as a plain attribute, in a list, dict or nested containers, on a plain object or in a
    global is a program input like a parameter (each rank its shard, not one rank's shard frozen into every body:
    before, capture refused those held elsewhere than an attribute); one input where it is held twice; verify's
    reference reads the full tensor even where to_local declares gradient placements (it crashed inside
    DTensor); capture and verify put the module's own DTensor back everywhere."""
    name = _HOLDS[hold]
    with simulated_mesh(2) as mesh:
        with on_one_device():
            torch.manual_seed(0)
            w, x = torch.randn(8, 6), torch.randn(4, 8)
            wr = w.clone().requires_grad_(hold != "buffer")
            ref = (x @ wr).pow(2).sum()
            ref_grads = {name: torch.autograd.grad(ref, wr)[0]} if hold != "buffer" else {}
        model = _ColumnParallel(mesh, w, hold, declared)
        weight = model.held()
        prog = localmap.capture(model, x)
        result = prog.run(x)
        report = localmap.verify(model, x)
        assert model.held() is weight and (hold != "twice" or model.w is weight)
    assert prog.input_names == [name, "args[0]"] and prog.regions[0].closed_over == [name]
    assert list(prog.dtensor_params) == [name] and prog.dtensor_params[name].placements == (S1,)
    assert rel_diff(result.loss, ref.detach()) < 1e-5
    assert set(result.grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert rel_diff(result.grads[n], g) < 1e-5, n
    assert report.regions_checked == 1 and set(report.grad_diffs) == set(ref_grads)


def test_a_plain_attribute_dtensor_that_is_no_program_input_is_named():
    with simulated_mesh(2) as mesh:
        with on_one_device():
            w, x = torch.randn(8, 6), torch.randn(4, 8)
        model = _ColumnParallel(mesh, w, "attribute", False)
        with pytest.raises(LocalMapError, match=r"self\.w: is a DTensor the region's body reads that is no input"):
            localmap.capture(lambda t: model(t), x)


@pytest.mark.parametrize("hold", ["attribute", "list", "nested", "object", "global"])
def test_the_eager_check_types_a_held_dtensor_by_its_placements(hold):
    """Read as a constant, the column shard would be typed Replicate and the Shard(1) claim left unproven (so it
    was, before, for a DTensor in a module's list or on a plain object it holds)."""
    with simulated_mesh(2) as mesh:
        with on_one_device():
            w, x = torch.randn(8, 6), torch.randn(4, 8)
        model = _ColumnParallel(mesh, w, hold, False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model.region(distribute(x, mesh, [R]))
        (verdict,) = model.region.region.verdicts()
    assert verdict.status == "ok", verdict
    assert rel_diff(full(out), x @ w) < 1e-5


@pytest.mark.parametrize("hold, path, why", [
    ("generator", "a DTensor", "is a DTensor read by to_local() while capturing that is no input of the captured "
                               "program"),
    ("c_object", "a DTensor", "is a DTensor read by to_local() while capturing that is no input of the captured "
                              "program"),
    ("partial", "partial[0]", "is a DTensor the region's body reads that is no input of the captured program")],
    ids=["generator", "c_object", "partial"])
def test_a_dtensor_held_where_capture_takes_no_input_is_refused_by_name(hold, path, why):
    """Made by a generator, held by a C object or bound as a partial's argument, a DTensor has no place capture
    can put a program input: read by to_local() while the program is traced on fake tensors, its real shard would
    be a constant of the program (on real ranks this process's shard in every rank's body; on a simulated mesh
    the per-rank shards, whose disagreeing loss the matrix read as GuardOnDataDependentSymNode). Refused, named
    (where capture can name it), with the places that are inputs as the fix."""
    with simulated_mesh(2) as mesh:
        with on_one_device():
            w, x = torch.randn(8, 6), torch.randn(4, 8)
        model = _ColumnParallel(mesh, w, hold, False)
        for run in (lambda: localmap.capture(model, x).run(x), lambda: localmap.verify(model, x)):
            with pytest.raises(LocalMapError) as info:
                run()
            message = str(info.value)
            assert message.startswith(f"local_map: {path}: {why}"), message
            if path == "a DTensor":
                assert "given:    (8, 6) (Shard(dim=1),) on mesh (2,) (held where capture does not look)" in message
            assert "an item of a list, tuple or dict they hold" in message, message
