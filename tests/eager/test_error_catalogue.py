"""One catalogue of wrong uses of localmap: each case raises LocalMapError (or its documented subclass) through
one helper, ``expect_error`` (tests/helpers.py), which asserts the message's shape (``localmap.errors.fail``):

    local_map: <path>: <problem> [on mesh dim <i> ('<name>')]
      expected: ...
      given:    ...
      fix:      ...

that is: the first line names the argument path (or the region), the message holds the expected fragments, and
it has a fix line. No case leaves global state behind (defer_inlining, dispatch modes, localmap's context stacks
and caches, process groups, grad mode), and raising again on a second try shows that no cache remembered a
half-done call.

The cases are grouped by the path that raises them: eager regions (a simulated 2x2 mesh ('dp', 'tp'), and one
case on a simulated 4-rank mesh), traced regions and capture (a fake 2x2 mesh), and the operator and its context
managers (a fake 2x2 mesh).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from helpers import R, S0, S1, expect_error, randn
from localmap import LocalMapError, Partial, Shard, capture, compat, local_map, use_mesh
import localmap
import localmap.context
from localmap import hop
from localmap.hop import defer_inlining, local_map_hop
from localmap.testing import distribute, fake_mesh, simulated_mesh

RR, S0R = [R, R], [S0, R]


class Case(NamedTuple):
    """A catalogue entry, written as a plain tuple in the tables below: (fn, path, contains[, fix])."""
    fn: Callable[[Any], Any]  # fn(mesh) raises
    path: str  # named on the message's first line
    contains: tuple[str, ...] = ()  # fragments of the message


def x4(mesh: Any, placements: Any = RR, *shape: int) -> Any:
    return distribute(randn(*(shape or (4, 4))), mesh, placements)


# ---- eager cases: fn(mesh) on a simulated 2x2 mesh ('dp', 'tp') -------------------------------------------

def _mutating(a):
    a.add_(1)
    return a * 2


def _mutating_view(a):
    a[0].mul_(2)
    return a + 1


def _shape_error(a):
    return a @ torch.ones(3, 3)


def _dtype_error(a):
    return torch.mm(a, torch.ones(4, 4, dtype=torch.int64))


def _device_error(a):
    return a + torch.ones(4, 4, device="meta")


def _index_error(a):
    return a[10]


def _key_error(a):
    return {"x": a}["y"]


EAGER: dict[str, tuple] = {
    # ---- spec arguments: wrong count, type, length or nesting -------------------------------------------------
    "in_placements not a sequence": (
        lambda m: local_map(lambda a: a, RR, {"a": RR})(x4(m)), "in_placements", ("list or tuple",)),
    "in_placements entry of wrong type": (
        lambda m: local_map(lambda a, b: a, RR, (RR, 3))(x4(m), x4(m)), "in_placements[1]", ("not a placement",)),
    "out_placements a string": (
        lambda m: local_map(lambda a: a, "Shard(0)", (RR,))(x4(m)), "out_placements", ("not a placement",)),
    "in_grad_placements not a sequence": (
        lambda m: local_map(lambda a: a, RR, (RR,), R)(x4(m)), "in_grad_placements", ("bare Placement",)),
    "in_grad_placements wrong count": (
        lambda m: local_map(lambda a, b: a + b, RR, (RR, RR), (RR,))(x4(m), x4(m)),
        "in_grad_placements", ("1 entries", "2 positional")),
    "in_grad_placements too long for the mesh": (
        lambda m: local_map(lambda a: a, RR, (RR,), ([R, R, R],))(x4(m)),
        "in_grad_placements for args[0]", ("3 placements for a 2-d mesh",)),
    "in_placements too long for the mesh": (
        lambda m: local_map(lambda a: a, RR, ([R, R, R],))(x4(m)), "args[0]",
        ("3 placements for a 2-d mesh", "('dp', 'tp')")),
    "out spec too long for the mesh": (
        lambda m: local_map(lambda a: (a, a), (RR, [R, R, R]), (RR,))(x4(m)), "outputs[1]", ("3 placements",)),
    "fewer out specs than outputs": (
        lambda m: local_map(lambda a: (a, a, a), [RR, RR], (RR,))(x4(m)), "outputs", ("3 output leaves",)),
    "out specs nested wrongly": (
        lambda m: local_map(lambda a: (a, (a, a)), (RR, [RR, RR, RR]), (RR,))(x4(m)), "outputs[1]",
        ("3 entries", "has 2")),
    "dict out specs for a tuple output": (
        lambda m: local_map(lambda a: (a, a), {"x": RR, "y": RR}, (RR,))(x4(m)), "outputs", ("output leaves",)),
    "dict out specs with other keys": (
        lambda m: local_map(lambda a: {"x": a, "y": a}, {"x": RR, "z": RR}, (RR,))(x4(m)), "outputs",
        ("keys that differ",)),
    "nested dict prefix with other keys": (
        lambda m: local_map(lambda d: d["a"]["y"], RR, ({"a": {"x": RR}},))({"a": {"y": x4(m)}}),
        "args[0]['a']", ("keys that differ",)),
    "nested list prefix of wrong length": (
        lambda m: local_map(lambda xs: xs[1][0], RR, ([RR, [RR, RR, RR]],))([x4(m), [x4(m), x4(m)]]),
        "args[0][1]", ("3 entries", "has 2")),
    "grad spec for a non-tensor": (
        lambda m: local_map(lambda a, k: a * k, RR, (RR, None), (RR, RR))(x4(m), 3), "args[1]",
        ("in_grad_placements spec",)),
    "spec for a None argument": (
        lambda m: local_map(lambda a, k: a, RR, (RR, RR))(x4(m), None), "args[1]", ("not a tensor",)),
    # Shard dims out of range or negative
    "negative Shard dim out of range (input)": (
        lambda m: local_map(lambda a: a, RR, ([R, Shard(-3)],),
                            redistribute_inputs=True)(x4(m)), "args[0]", ("Shard(-3) is out of range",
                                                                           "mesh dim 1 ('tp')")),
    "Shard dim out of range (in_grad_placements)": (
        lambda m: local_map(lambda a: a, RR, (RR,), ([Shard(2), R],))(x4(m)),
        "in_grad_placements for args[0]", ("Shard(2) is out of range",)),
    "negative Shard dim out of range (output)": (
        lambda m: local_map(lambda a: a.sum(0), [Shard(-2), R], (RR,))(x4(m)),
        "outputs", ("Shard(-2) is out of range for a 1-d tensor",)),
    "Shard of a 0-d input": (
        lambda m: local_map(lambda a: a, RR, ([S0, R],), redistribute_inputs=True)(distribute(randn(1)[0], m, RR)),
        "args[0]", ("for a 0-d tensor",)),
    # meshes
    "nested DTensor on another mesh": (
        lambda m: local_map(lambda xs: xs[0], RR, ([RR, RR],))(
            [x4(m), distribute(randn(4, 4), init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")), RR)]),
        "args[0][1]", ("different mesh",)),
    "DTensor in a dict on another mesh than device_mesh": (
        lambda m: local_map(lambda d: d["w"], [R], ({"w": [R]},), device_mesh=init_device_mesh("cpu", (4,)))(
            {"w": x4(m)}), "args[0]['w']", ("different mesh than the region's",)),
    "DTensor keyword inside a list": (
        lambda m: local_map(lambda a, *, bs: a, RR, (RR,))(x4(m), bs=[1, x4(m)]), "kwargs['bs'][1]",
        ("passed by keyword",)),
    # bodies returning the wrong number or kind of outputs
    "body returns None for a tensor spec": (
        lambda m: local_map(lambda a: None, RR, (RR,))(x4(m)), "outputs", ("not a Tensor",)),
    "body returns a string with a spec": (
        lambda m: local_map(lambda a: (a, "x"), (RR, RR), (RR,))(x4(m)), "outputs[1]", ("not a Tensor",)),
    "body returns a DTensor inside a dict": (
        lambda m: (lambda d: local_map(lambda a: {"y": d}, {"y": RR}, (RR,))(d))(x4(m)), "outputs['y']",
        ("returned a DTensor",)),
    "body returns a tensor for a None spec in a dict": (
        lambda m: local_map(lambda a: {"x": a, "y": a}, {"x": RR, "y": None}, (RR,))(x4(m)), "outputs['y']",
        ("spec is None",)),
    "Partial(max) output that needs a gradient": (
        lambda m: local_map(lambda a: a.amax(0), [Partial("max"), R], (S0R,))(
            distribute(randn(4, 4), m, S0R, requires_grad=True)), "outputs", ("Partial(max) and requires grad",)),
    # bodies mutating inputs
    "body mutates its input": (lambda m: local_map(_mutating, RR, (RR,))(x4(m)), "args[0]", ("mutated",)),
    "body mutates a view of a nested input": (
        lambda m: local_map(lambda xs: _mutating_view(xs[1]), RR, ([RR, RR],))([x4(m), x4(m)]), "args[0][1]",
        ("mutated",)),
    # PyTorch errors inside the body: named with the region and the line
    "shape error in the body": (
        lambda m: local_map(_shape_error, RR, (RR,))(x4(m)), "region '_shape_error'",
        ("RuntimeError", "test_error_catalogue.py:", "cannot be multiplied")),
    "dtype mismatch in the body": (
        lambda m: local_map(_dtype_error, RR, (RR,), check=False)(x4(m)), "region '_dtype_error'",
        ("RuntimeError",)),
    "device mismatch in the body": (
        lambda m: local_map(_device_error, RR, (RR,), check=False)(x4(m)), "region '_device_error'",
        ("RuntimeError",)),
    "index error in the body": (
        lambda m: local_map(_index_error, RR, (RR,), check=False)(x4(m)), "region '_index_error'",
        ("IndexError",)),
    "key error in the body": (
        lambda m: local_map(_key_error, RR, (RR,), check=False)(x4(m)), "region '_key_error'", ("KeyError",)),
    # arguments of local_map itself
    "func not callable": (lambda m: local_map(3, RR, (RR,)), "func", ("not callable",)),
    "check not a known value": (lambda m: local_map(lambda a: a, RR, (RR,), check="yes"), "check", ("True",)),
    "device_mesh given as a list": (
        lambda m: local_map(lambda a: a, RR, (RR,), device_mesh=[0, 1]), "device_mesh", ("not a DeviceMesh",)),
    # ---- spec counts, mesh ndim, Shard ranges, None specs, meshes, keywords, prefix structures -----------------
    "wrong number of in specs": (
        lambda m: (lambda x: local_map(lambda a, b: a + b, RR, (RR,))(x, x))(x4(m)), "in_placements",
        ("1 entries", "2 positional arguments", "expected:", "given:")),
    "Shard dim out of range (input)": (
        lambda m: local_map(lambda a: a, RR, ([R, S1],), redistribute_inputs=True)(distribute(randn(8), m, RR)),
        "args[0]", ("Shard(1) is out of range for a 1-d tensor", "mesh dim 1 ('tp')")),
    "Shard dim out of range (output)": (
        lambda m: local_map(lambda a: a.sum(), [R, S1], (S0R,))(distribute(randn(8), m, S0R)), "outputs",
        ("Shard(1) is out of range for a 0-d tensor", "mesh dim 1 ('tp')")),
    "DTensor input with a None spec": (
        lambda m: (lambda x: local_map(lambda a, b: a, RR, (RR, None))(x, x))(distribute(randn(4), m, RR)),
        "args[1]", ("is a DTensor but its in_placements spec is None", "(Replicate(), Replicate())")),
    "non-tensor input with a spec": (
        lambda m: local_map(lambda a, k: a * k, RR, (RR, RR))(distribute(randn(4), m, RR), 3), "args[1]",
        ("is not a tensor but has a placement spec", "None")),
    "placements differ without redistribute_inputs": (
        lambda m: local_map(lambda a: a, S0R, (S0R,))(x4(m)), "args[0]",
        ("differ from in_placements", "mesh dim 0 ('dp')", "redistribute_inputs=True")),
    "placements differ at a nested argument path": (
        lambda m: (lambda x: local_map(lambda xs, d: d["w"], RR, (RR, {"w": S0R}))([x], {"w": x}))(x4(m)),
        "args[1]['w']", ("differ from in_placements", "mesh dim 0 ('dp')")),
    "output count differs from the out specs": (
        lambda m: local_map(lambda a: (a, a, a), (RR, RR), (RR,))(distribute(randn(4), m, RR)), "outputs",
        ("3 output leaves", "2 specs")),
    "body returns a DTensor": (
        lambda m: (lambda x: local_map(lambda a: x, RR, (RR,))(x))(distribute(randn(4), m, RR)), "outputs",
        ("returned a DTensor", ".to_local()")),
    "body returns a DTensor in a tuple": (
        lambda m: (lambda x: local_map(lambda a: (a, x), (RR, RR), (RR,))(x))(distribute(randn(4), m, RR)),
        "outputs[1]", ("returned a DTensor",)),
    "tensor output with a None spec": (
        lambda m: local_map(lambda a: (a, a), (RR, None), (RR,))(distribute(randn(4), m, RR)), "outputs[1]",
        ("spec is None",)),
    "non-tensor output with a spec": (
        lambda m: local_map(lambda a: (a, 3), (RR, RR), (RR,))(distribute(randn(4), m, RR)), "outputs[1]",
        ("is not a Tensor but has a placement spec",)),
    "DTensor on another mesh than device_mesh": (
        lambda m: local_map(lambda a: a, [R], ([R],), device_mesh=init_device_mesh("cpu", (4,)))(
            distribute(randn(4), m, RR)), "args[0]", ("different mesh than the region's",)),
    "DTensors on different meshes without device_mesh": (
        lambda m: local_map(lambda a, b: a, RR)(distribute(randn(4), m, RR),
                                                distribute(randn(4), init_device_mesh("cpu", (4,)), [R])),
        "args[1]", ("different mesh than args[0]", "device_mesh=")),
    "bare Placement as in_placements": (
        lambda m: local_map(lambda a: a, [R], S0), "in_placements", ("bare Placement", "[Shard(dim=0)]")),
    "bare Placement as out_placements": (
        lambda m: local_map(lambda a: a, R, ([R],)), "out_placements", ("bare Placement",)),
    "in_placements entry mixing Placements with other entries": (
        lambda m: local_map(lambda a: a, [R], ([R], [R, "x"])), "in_placements[1]", ("mixes Placements",)),
    "DTensor keyword argument": (
        lambda m: (lambda x: local_map(lambda a, *, b: a + b, RR, (RR,))(x, b=x))(distribute(randn(4), m, RR)),
        "kwargs['b']", ("passed by keyword", "positionally")),
    "prefix list of the wrong length": (
        lambda m: (lambda x: local_map(lambda xs: xs[0], RR, ([RR, RR, RR],))([x, x]))(distribute(randn(4), m, RR)),
        "args[0]", ("3 entries but args[0] has 2",)),
    "prefix dict with other keys": (
        lambda m: (lambda x: local_map(lambda d: d["a"], RR, ({"a": RR, "c": RR},))({"a": x, "b": x}))(
            distribute(randn(4), m, RR)), "args[0]", ("keys that differ",)),
    "in_grad_placements None for a DTensor": (
        lambda m: (lambda x: local_map(lambda a, b: a + b, RR, (RR, RR), (RR, None))(x, x))(
            distribute(randn(4), m, RR)), "args[1]", ("in_grad_placements spec is None",)),
    "device_mesh not a mesh": (
        lambda m: local_map(lambda a: a, [R], ([R],), device_mesh="tp"), "device_mesh", ("is not a DeviceMesh",)),
}


# ---- eager cases on a simulated 4-rank mesh ---------------------------------------------------------------------

UNEVEN_ROWS = {0: 2, 1: 3, 2: 3, 3: 2}  # not torch.chunk's 3, 3, 3, 1 for 10 rows

EAGER_1D: dict[str, tuple] = {
    # Ranks returning 2,3,3,2 rows (not torch.chunk's 3,3,3,1) cannot form a DTensor: said, not guessed.
    "uneven output not in the chunk layout": (
        lambda m: local_map(lambda a: compat.simulated_rank_map(lambda r: torch.zeros(UNEVEN_ROWS[r], 2)), [S0],
                            ([S0],), check="allow_unproven")(distribute(randn(10, 2), m, [S0])), "outputs",
        ("not DTensor's chunk layout for 10 rows", "[3, 3, 3, 1]", "[2, 3, 3, 2]")),
}


# ---- traced cases: fn(mesh) on a fake 2x2 mesh (capture, traced regions, run) ------------------------------------

def _data_dependent(a):
    return a.sum() if a.sum() > 0 else -a.sum()


def _capture_region(mesh, body, out, ins, *shapes, **kw):
    f = local_map(body, out, ins, None, mesh, **kw)
    return capture(lambda *xs: f(*xs).sum(), *(torch.randn(*s, requires_grad=True) for s in shapes))


def _nested(mesh):
    inner = local_map(lambda a: a * 2, [R], ([R],), None, init_device_mesh("cpu", (4,)))
    outer = local_map(lambda a: inner(a) + 1, RR, (RR,), None, mesh)
    return capture(lambda a: outer(a).sum(), torch.randn(4, 4, requires_grad=True))


def _body_without_meta(mesh):
    gm = torch.fx.symbolic_trace(lambda a: a * 2)
    with defer_inlining():
        return local_map_hop(gm, torch.randn(2, requires_grad=True))


def _hop_wrong_count(mesh):
    gm = torch.fx.symbolic_trace(lambda a: a * 2)
    gm.meta["local_map_kwargs"] = {"in_placements": (RR, RR), "out_placements": (RR,), "device_mesh": mesh}
    with defer_inlining():
        return local_map_hop(gm, torch.randn(2, requires_grad=True))


def _run_other_shapes(mesh):
    f = local_map(lambda a, b: a @ b, S0R, (S0R, RR), None, mesh)
    prog = capture(lambda a, b: f(a, b).sum(), torch.randn(4, 3, requires_grad=True), torch.randn(3, 2))
    return prog.run(torch.randn(4, 3), torch.randn(5, 2))


TRACED: dict[str, tuple] = {
    "run with inputs of other shapes than captured": (
        _run_other_shapes, "run: args[1]", ("has another shape or dtype than when the program was captured",
                                             "expected: (3, 2) torch.float32", "given:    (5, 2) torch.float32")),
    "capture of an untraceable function": (
        lambda m: capture(_data_dependent, torch.randn(4, requires_grad=True)), "capture", ("could not trace",)),
    "capture of a non-scalar loss": (
        lambda m: capture(lambda a: a * 2, torch.randn(4, requires_grad=True)), "capture", ("scalar loss",)),
    "nested regions on conflicting meshes": (_nested, "device_mesh", ("enclosing region",)),
    "traced body mutates its input": (
        lambda m: _capture_region(m, _mutating, RR, (RR,), (4, 4)), "args[0]", ("mutated",)),
    "traced input unevenly sharded": (
        lambda m: _capture_region(m, torch.tanh, S0R, (S0R,), (5, 4)), "args[0]",
        ("unevenly sharded", "regions traced as graph nodes")),
    "traced Partial(max) output needing a gradient": (
        lambda m: _capture_region(m, lambda a: a.amax(0), [Partial("max"), R], (S0R,), (4, 4)), "outputs[0]",
        ("Partial(max) and requires grad",)),
    "traced shape error in the body": (
        lambda m: _capture_region(m, _shape_error, RR, (RR,), (4, 4), check=False), "region '_shape_error'",
        ("RuntimeError",)),
    "traced region without a mesh": (
        lambda m: (lambda f: capture(lambda a: f(a).sum(), torch.randn(4, requires_grad=True)))(
            local_map(lambda a: a, [R], ([R],))), "device_mesh", ("is needed",)),
    "traced region without in_placements": (
        lambda m: (lambda f: capture(lambda a: f(a).sum(), torch.randn(4, requires_grad=True)))(
            local_map(lambda a: a, RR, None, None, m)), "in_placements", ("are needed",)),
    "traced tensor with a None spec": (
        lambda m: _capture_region(m, lambda a: a, RR, (None,), (4,)), "args[0]", ("spec is None",)),
    "traced output with a None spec": (
        lambda m: _capture_region(m, lambda a: (a * 2, a), (RR, None), (RR,), (4,)), "outputs[1]",
        ("spec is None",)),
}


# ---- the operator and its context managers: fn(mesh) on a fake 2x2 mesh ---------------------------------------

OPERATOR: dict[str, tuple] = {
    # Built by hand (LocalMapError(...) in traced/operator.py, not errors.fail): no fix line.
    "defer_inlining with an unknown partitioner": (
        lambda m: defer_inlining("greedy").__enter__(), "defer_inlining", ("partitioner",)),
    "use_mesh with a non-mesh": (lambda m: use_mesh("tp").__enter__(), "use_mesh", ("DeviceMesh",)),
    "operator body without placements": (_body_without_meta, "body", ("local_map_kwargs",)),
    "operator with a wrong input count": (_hop_wrong_count, "in_placements", ("2 entries for 1",)),
}


def _sim_2x2():
    return simulated_mesh((2, 2), ("dp", "tp"))


def _fake_2x2():
    return fake_mesh((2, 2), ("dp", "tp"))


GROUPS: dict[str, tuple[Callable, dict[str, tuple]]] = {
    "eager": (_sim_2x2, EAGER),
    "eager 1-d": (lambda: simulated_mesh(4), EAGER_1D),
    "traced": (_fake_2x2, TRACED),
    "operator": (_fake_2x2, OPERATOR),
}


# ---- global state -----------------------------------------------------------------------------------------

def _state() -> dict:
    modes = torch._C._TorchDispatchModeKey
    return {
        "deferring": hop.is_deferring(),
        "dispatch modes": len(_get_current_dispatch_mode_stack()),
        "infra modes": [torch._C._get_dispatch_mode(k) is None for k in (modes.FAKE, modes.PROXY, modes.FUNCTIONAL)],
        "context stacks": localmap.context.thread_state(),
        "grad enabled": torch.is_grad_enabled(),
        "process group": dist.is_initialized(),
        "functorch": torch._C._functorch.peek_interpreter_stack() is None,
    }


def _cache_sizes() -> tuple[int, int]:
    info = localmap.cache_info()
    return info["verdicts_cached"], info["regions_cached"]


@contextlib.contextmanager
def _unchanged_state():
    before = _state()
    yield
    assert _state() == before
    checks, regions = _cache_sizes()
    assert checks <= 1025 and regions <= 513  # bounded


# ---- the catalogue ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group,name", [pytest.param(g, n, id=f"{g}: {n}") for g, (_, table) in GROUPS.items()
                                        for n in table])
def test_bad_input(group, name):
    make_mesh, table = GROUPS[group]
    case = Case(*table[name])
    outside = _state()
    with make_mesh() as mesh:
        with _unchanged_state():
            for _ in range(2):  # the same error again: nothing half-done was cached
                expect_error(lambda: case.fn(mesh), case.path, case.contains)
    assert _state() == outside


def test_catalogue_size():
    assert sum(len(table) for _, table in GROUPS.values()) >= 75


def test_errors_are_value_errors_with_fields():
    with simulated_mesh((2, 2), ("dp", "tp")) as mesh:
        f = local_map(lambda a: a, S0R, (S0R,))
        err = expect_error(lambda: f(x4(mesh)), "args[0]", error=ValueError)
    assert err.path == "args[0]" and err.mesh_dim == 0 and err.fix and err.expected and err.given


def test_body_error_keeps_the_original_type_and_cause():
    """A wrapped RuntimeError is still a RuntimeError (callers catching it keep working), chains the original,
    and names the region, where it is defined and the body's line."""
    with simulated_mesh(2) as mesh:
        f = local_map(_shape_error, [R], ([R],))
        err = expect_error(lambda: f(distribute(randn(4, 4), mesh, [R])), "region '_shape_error' (defined at ",
                           error=RuntimeError)
    assert isinstance(err, LocalMapError) and isinstance(err.__cause__, RuntimeError)
    assert err.original is err.__cause__
    msg = str(err)
    assert "region '_shape_error' (defined at tests/eager/test_error_catalogue.py:" in msg or \
        "region '_shape_error' (defined at " in msg
    line = _shape_error.__code__.co_firstlineno + 1
    assert f"test_error_catalogue.py:{line}" in msg, msg


def test_body_error_wrapping_is_off_the_hot_path():
    """Wrapping happens only when the body raises: a working region's result is the body's own value."""
    with simulated_mesh(2) as mesh:
        x = distribute(randn(4, 4), mesh, [S0])
        out = local_map(lambda a: a * 2, [S0], ([S0],))(x)
        assert out.placements == (S0,)
