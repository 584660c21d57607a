"""Regions under Dynamo capture for a planner: each region call one region node, never a silent inline.

A planner (meta-pytorch/autoparallel) captures a model with Dynamo with PyTorch's local_map wrapping on, then
exports the joint graph with PyTorch's operator deferred, and plans every region node as one op with fixed
placements. Dynamo makes a region node only for PyTorch's own ``_local_map_wrapped``; when Dynamo traces a
localmap region on plain tensors with wrapping on, ``call_captured`` therefore:

1. at trace time (``compat.at_trace_time``: real Python while Dynamo traces), traces the body on this rank's
   local fakes and runs the placement check (``traced.frontend.trace_region``: the same specs, errors and
   inferred gradient placements as every other path), and keeps the result as a ``CapturePlan``;
2. records one opaque call, ``_localmap_region_node(key, *tensors)``, whose key is derived from the plan's
   content (``traced.plan_keys``: the body's code, placements, mesh, argument metadata; plans of different
   functions share a key only where they also run the same on the tensors as given), so two compiles of the
   same program print the same graph; the joint export traces that call into localmap's own operator
   (``localmap.hop``; the default, "localmap"), whose region nodes take the form planners find regions by on
   every PyTorch release (``traced.operator.planner_node_target``: targets named ``call_local_map``,
   ``in_grad_placements`` None)
   and whose backward node's ``out_placements`` are the gradient placements the body implies (a Replicate
   weight meeting sharded data: Partial, so the planner reduces it); or, under ``region_operator("torch")``,
   calls PyTorch's ``_local_map_wrapped`` on the tensor leaves with flat placements (PyTorch's own region
   nodes, which carry no gradient placements: the capture warns, naming each input whose gradient differs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
import weakref
from typing import Any, Callable, Iterator

import torch

from localmap.caches import register_cache
from localmap import compat
from localmap.compat import dynamo as compat_dynamo
from localmap.compat import pytree
from localmap.context import innermost, pop_region_mesh, push_region_mesh, pushed, stack
from localmap.core.refusals import planner_closed_over_error
from localmap.errors import fail
from localmap.placements.algebra import grad_default
from localmap.placements.specs import placements_str
from localmap.sites import caller_site
from localmap.traced.closure import unregistered_dtensors
from localmap.traced.frontend import TracedRegion, trace_region
from localmap.traced.operator import defer_inlining, is_deferring, local_map_hop
from localmap.traced.plan_keys import content_digest, graph_fingerprint, joint_fingerprint, slot_key

OPERATORS = ("torch", "localmap")
_TENSOR = "localmap.tensor"  # marks a tensor's metadata in the arguments handed to trace time
_OBJECT = "localmap.object"  # marks an object Dynamo cannot pass as a constant (an nn.Module), by handle


@contextlib.contextmanager
def region_operator(operator: str) -> Iterator[None]:
    """Which operator localmap regions become under Dynamo capture with local_map wrapping on: "localmap" (the
    default: localmap's own operator in the planner's node form, gradient placements on the backward node) or
    "torch" (PyTorch's local_map operator: no gradient placements; on torch 2.14 its nodes are no longer
    named call_local_map). Nestable, per thread, read while Dynamo traces."""
    if operator not in OPERATORS:
        raise fail("region_operator", "is not an operator regions can become", expected=OPERATORS,
                   given=repr(operator), fix="use 'localmap' (localmap.hop, the default) or 'torch' (PyTorch's local_map_hop)")
    with pushed("region_operators", operator):
        yield


def current_operator() -> str:
    return innermost("region_operators", "localmap")


@dataclasses.dataclass
class CapturePlan:
    """What trace time decided for one region call: placements of the tensor leaves, the output's structure,
    and (for the localmap operator) the traced body."""

    operator: str
    mesh: Any
    in_specs: tuple  # one placement tuple per tensor argument leaf
    out_specs: tuple  # one placement tuple per tensor output leaf
    out_constants: tuple  # the output leaves, None where a tensor goes
    out_is_tensor: tuple  # per output leaf
    out_tree: Any  # the output's structure as plain constants (_template)
    key: int  # this plan's entry in _PLANS (the localmap operator's opaque call finds its body there); set last


@dataclasses.dataclass
class PlannedRegion:
    """Trace-time state of one region call: the body traced on local fakes (a region node when a deferral is
    on) and the region's function on the call's flat tensors as given (run when no deferral is on)."""

    traced: TracedRegion
    inline: Callable[..., tuple]
    func: Callable  # the region's function (plans of one function share a key without comparing)
    content: bytes  # plan_keys.content_digest of everything the key stands for
    metas: tuple  # the call's arguments' metadata (fakes of the tensors as given, for comparing inlines)
    inline_fingerprint: tuple | None = None  # the inline's joint trace on those tensors, once compared
    equal_funcs: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)  # other functions found
    # to run the same (each layer of a model wrapping its own closure compares once, not once per compile)


# Trace-time state by plan key (a plan reaches later trace-time calls and the joint export as its key only):
# each region's traced body and mesh. The key is derived from the plan's content (plan_keys), so two compiles
# of the same program print the same graph. Bounded: the least recently planned entries go first.
PLAN_LIMIT = 4096
_PLANS: dict[int, "PlannedRegion"] = register_cache("capture_plans", {}, limit=PLAN_LIMIT, eviction="oldest first")


def in_wrapping_capture() -> bool:
    """Whether Dynamo is tracing with PyTorch's local_map wrapping on (the planner's capture)."""
    return torch.compiler.is_compiling() and _wrapping_now()


@compat_dynamo.at_trace_time
def _wrapping_now() -> bool:
    return compat_dynamo.local_map_wrapping()


def call_captured(region: Any, args: tuple, kwargs: dict) -> Any:
    """A region call on plain tensors while Dynamo traces with local_map wrapping: one region node."""
    _check_no_tensor_kwargs(kwargs)
    plan = _plan(region, _metas(args), _metas(kwargs))
    leaves = pytree.tree_leaves(args)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    if plan.operator == "localmap":
        results = iter(_localmap_region_node(plan.key + 0, *tensors))  # + 0: a fresh constant, no source
    else:
        results = iter(compat_dynamo.call_torch_local_map(
            _flat_body(region, args, kwargs, plan), plan.out_specs, plan.in_specs, plan.mesh, *tensors))
    flat_out = [next(results) if is_tensor else c for is_tensor, c in zip(plan.out_is_tensor, plan.out_constants)]
    return _rebuild(plan.out_tree, flat_out)


def _rebuild(template: Any, leaves: list) -> Any:
    """The output from its leaves and its structure as plain constants (see _template): Dynamo cannot walk a
    TreeSpec made at trace time."""
    if isinstance(template, int):
        return leaves[template]
    kind, context, children = template
    items = [_rebuild(c, leaves) for c in children]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    return dict(zip(context, items))


def _template(spec: Any, counter: Iterator[int]) -> Any:
    """A TreeSpec of tuples, lists and dicts as plain constants: a leaf's index, else (kind, keys, children)."""
    if spec.is_leaf():
        return next(counter)
    kinds = {tuple: "tuple", list: "list", dict: "dict"}
    if spec.type not in kinds:
        raise fail("outputs", "are a structure a region captured for a planner cannot return",
                   expected="tensors and non-tensors in tuples, lists and dicts", given=spec.type.__name__,
                   fix="return a tuple (or list, or dict) of the values")
    context = tuple(spec.context) if spec.type is dict else None
    return kinds[spec.type], context, tuple(_template(c, counter) for c in spec.children_specs)


def _flat_body(region: Any, args: tuple, kwargs: dict, plan: CapturePlan) -> Any:
    """The region's function on flat local tensors, returning its tensor outputs as a tuple (what PyTorch's
    wrapped local_map traces: one placement per argument and per output)."""
    def body(*local_tensors: Any) -> tuple:
        local = iter(local_tensors)
        local_args = pytree.tree_map_only(torch.Tensor, lambda _: next(local), args)
        _enter_body(plan.key)  # the region's mesh for localmap.collectives, at trace time
        out = region.func(*local_args, **kwargs)
        _exit_body(plan.key)
        return tuple(o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor))

    return body


@compat_dynamo.at_trace_time
def _enter_body(key: int) -> bool:
    push_region_mesh(_PLANS[key].traced.body.meta["local_map_kwargs"]["device_mesh"])
    return True


@compat_dynamo.at_trace_time
def _exit_body(key: int) -> bool:
    pop_region_mesh()
    return True


@compat_dynamo.at_trace_time
def _plan(region: Any, metas: tuple, kwargs_metas: dict) -> CapturePlan:
    """Trace time: the body traced and checked on fakes of the arguments' metadata; the plan of its node."""
    fake_mode = compat.detect_fake_mode([]) or compat.new_fake_mode()
    with fake_mode:
        args = _fakes(metas)
        kwargs = _fakes(kwargs_metas)
    closed = unregistered_dtensors(region.func)
    if closed:  # read at trace time, each would be one rank's shard frozen into the region graph
        raise planner_closed_over_error(region.func, closed)
    traced = trace_region(region, args, kwargs)
    operator = current_operator()
    region_kwargs = traced.body.meta["local_map_kwargs"]
    if operator == "torch":
        _warn_uncarried_grads(region, traced, region_kwargs)
    plan = CapturePlan(
        operator, region_kwargs["device_mesh"], tuple(region_kwargs["in_placements"]),
        tuple(region_kwargs["out_placements"]),
        tuple(None if isinstance(o, torch.Tensor) else o for o in traced.flat_out),
        tuple(isinstance(o, torch.Tensor) for o in traced.flat_out), _template(traced.out_tree, itertools.count()),
        key=-1)
    num_inputs = sum(isinstance(a, (torch.Tensor, torch.SymInt)) for a in pytree.tree_leaves(args))
    content = content_digest((operator, metas, kwargs_metas, _region_content(traced, num_inputs),
                              plan.out_constants, plan.out_tree))
    planned = PlannedRegion(traced, _flat_body(region, args, kwargs, plan), region.func, content, metas)
    _file_plan(planned, plan)
    return plan


def _region_content(traced: TracedRegion, num_inputs: int) -> tuple:
    """What a region's node does besides its arguments: the body's code and constants, its placements, the
    identity of its mesh and of what the body closes over (the call site and check verdict are not part)."""
    kwargs = traced.body.meta["local_map_kwargs"]
    placements = {k: v for k, v in kwargs.items() if k != "device_mesh"}
    return (graph_fingerprint(traced.body), repr(placements), id(kwargs["device_mesh"]),
            tuple(id(v) for v in traced.hop_args[num_inputs:]))


def _file_plan(planned: PlannedRegion, plan: CapturePlan) -> None:
    """Give `plan` its key: the first slot of its content that is free or holds a plan doing the same (kept,
    so graphs compiled earlier keep their plan); two compiles of the same program get the same key."""
    slot = 0
    while True:
        plan.key = slot_key(planned.content, slot)
        held = _PLANS.get(plan.key)
        if held is None:
            while len(_PLANS) >= PLAN_LIMIT:
                del _PLANS[next(iter(_PLANS))]
            _PLANS[plan.key] = planned
            return
        if held.content == planned.content and _same_inline(held, planned):
            _PLANS[plan.key] = _PLANS.pop(plan.key)  # planned again: the newest entry, the last to be evicted
            return
        slot += 1


def _same_inline(held: PlannedRegion, new: PlannedRegion) -> bool:
    """Whether two plans of equal content run the same with no deferral on (the function on the tensors as
    given): the same function, or equal forward and gradient traces on those tensors. Any failure to trace
    says no: the plans then take different keys."""
    if held.func is new.func or _known_equal(held, new.func):
        return True
    try:
        if held.inline_fingerprint is None:
            held.inline_fingerprint = _inline_fingerprint(held)
        same = held.inline_fingerprint == _inline_fingerprint(new)
    except Exception:
        return False
    if same:
        with contextlib.suppress(TypeError):  # a function that takes no weak reference is compared again
            held.equal_funcs.add(new.func)
    return same


def _known_equal(held: PlannedRegion, func: Callable) -> bool:
    try:
        return func in held.equal_funcs
    except TypeError:
        return False


def _inline_fingerprint(planned: PlannedRegion) -> tuple:
    """The plan's inline traced jointly on fakes of the tensors as given."""
    with compat.new_fake_mode():
        tensors = _tensor_leaves(_fakes(planned.metas, objects=False))
    meshes = stack("region_meshes")
    depth = len(meshes)
    try:
        return joint_fingerprint(planned.inline, tensors)
    finally:
        del meshes[depth:]  # a function that failed inside left its region's mesh pushed


def _tensor_leaves(value: Any) -> list:
    return [a for a in pytree.tree_leaves(value) if isinstance(a, torch.Tensor)]


def _warn_uncarried_grads(region: Any, traced: TracedRegion, region_kwargs: dict) -> None:
    """Warn where PyTorch's operator states a placement of the backward node that the body's gradients do not
    have (it carries no gradient placements: its backward states each input's own placement as its gradient's,
    and each output's own as its tangent's): a planner honouring the node gets those numbers wrong."""
    grads = region_kwargs.get("in_grad_placements")
    how = "inferred from the body" if traced.inferred else "given in in_grad_placements"
    for path, a, spec, grad in zip(traced.leaf_paths, traced.hop_args, region_kwargs["in_placements"],
                                   grads or [None] * len(traced.hop_args), strict=True):
        if isinstance(a, torch.Tensor) and a.requires_grad and grad is not None and tuple(grad) != tuple(spec):
            _warn_torch_node(region, f"{path} has placements {placements_str(spec)} but its gradient is "
                             f"{placements_str(grad)} ({how}); PyTorch's local_map operator, which this capture "
                             f"records, carries no gradient placements, so a planner reading it takes "
                             f"{placements_str(tuple(spec))}")
    for k, spec in enumerate(region_kwargs["out_placements"]):
        if any(p.is_partial() for p in spec):
            _warn_torch_node(region, f"outputs[{k}] has placements {placements_str(spec)}; PyTorch's local_map "
                             f"operator, which this capture records, states the backward's tangent for it with "
                             f"those placements too, so a planner reading it hands each rank a piece of the "
                             f"output's gradient where the body's backward takes all of it "
                             f"({placements_str(grad_default(tuple(spec)))})")


def _warn_torch_node(region: Any, what: str) -> None:
    warnings.warn(f"local_map region {getattr(region.func, '__name__', 'region')!r} ({caller_site()}): {what}. "
                  f"Capture inside localmap.hop.region_operator('localmap') to keep the gradient placements on "
                  f"the backward node.", stacklevel=3)


def _metas(value: Any) -> Any:
    """The arguments with each tensor replaced by its metadata and each nn.Module by a handle (plain constants
    Dynamo hands to trace time)."""
    def meta(v: Any) -> tuple:
        if isinstance(v, torch.nn.Module):
            return (_OBJECT, compat_dynamo.object_handle(v))
        return (_TENSOR, tuple(v.shape), tuple(v.stride()), v.dtype, v.device, v.requires_grad)

    return _map_structure(value, lambda v: isinstance(v, (torch.Tensor, torch.nn.Module)), meta)


def _fakes(value: Any, objects: bool = True) -> Any:
    """The inverse of _metas, on fresh fakes (inside a fake mode) and the objects themselves (None without
    `objects`: a handle is only valid while the call that passed its object is traced)."""
    def fake(meta: tuple) -> Any:
        if meta[0] == _OBJECT:
            return compat_dynamo.object_from_handle(meta[1]) if objects else None
        _, shape, stride, dtype, device, requires_grad = meta
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).requires_grad_(requires_grad)

    return _map_structure(value, lambda v: isinstance(v, tuple) and len(v) in (2, 6) and v[0] in (_TENSOR, _OBJECT),
                          fake)


def _map_structure(value: Any, is_leaf: Callable[[Any], bool], leaf: Callable[[Any], Any]) -> Any:
    """`value` rebuilt (tuples, named tuples, lists, dicts) with `leaf` applied where `is_leaf`."""
    if is_leaf(value):
        return leaf(value)
    if isinstance(value, (tuple, list)):
        items = [_map_structure(v, is_leaf, leaf) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _map_structure(v, is_leaf, leaf) for k, v in value.items()}
    return value


def _check_no_tensor_kwargs(kwargs: dict) -> None:
    for path, leaf in pytree.tree_flatten_with_path(kwargs)[0]:
        if isinstance(leaf, torch.Tensor):
            raise fail("kwargs" + pytree.keystr(path), "is a tensor passed by keyword to a region captured for a "
                       "planner", expected="tensors as positional arguments (each with a spec in in_placements)",
                       given="Tensor", fix="pass it positionally")


@compat_dynamo.opaque_to_dynamo
def _localmap_region_node(key: int, *tensors: torch.Tensor) -> tuple:
    """Traced by the joint export (not by Dynamo): localmap's operator on the body traced at capture time. With
    no deferral on (torch.compile with only PyTorch's wrapping on), the region is inlined as PyTorch's operator
    inlines it: the function runs on the tensors as given."""
    planned = _PLANS[key]
    if is_deferring():
        return local_map_hop(planned.traced.body, *tensors)
    if not compat_dynamo.torch_deferring():
        return planned.inline(*tensors)
    with defer_inlining():
        return local_map_hop(planned.traced.body, *tensors)


def wrapping_now() -> bool:
    """Whether Dynamo is capturing for a planner (PyTorch's local_map wrapping on): plain calls become nodes."""
    return _wrapping_now()


def call_plain_compiling(region: Any, args: tuple, kwargs: dict) -> Any:
    """A region on plain tensors while Dynamo traces: a region node in the planner's capture (local_map wrapping
    on), else the function inlined, with a warning where a region node was expected."""
    if _wrapping_now():
        return call_captured(region, args, kwargs)
    _warn_if_expected(region)
    return region.func(*args, **kwargs)


def inlining_expected_why() -> str | None:
    """Why a region called on plain tensors here should have become a region node (None: inlining is right)."""
    if is_deferring():
        return "inside localmap.hop.defer_inlining()"
    if compat_dynamo.torch_deferring():
        return "inside PyTorch's local_map defer_inlining()"
    if torch.compiler.is_exporting():
        return "while torch.export traces the program"
    return None


def warn_inlined(region: Any, why: str) -> None:
    warnings.warn(
        f"local_map region {getattr(region.func, '__name__', 'region')!r} ({caller_site()}) is called on plain "
        f"tensors {why} and is inlined: no region node is recorded, so its placements are lost to any planner. "
        f"Capture with Dynamo and PyTorch's local_map wrapping on (localmap.testing.planner_capture) for region "
        f"nodes, or localmap.capture for localmap's own program.", stacklevel=2)


@compat_dynamo.at_trace_time
def _warn_if_expected(region: Any) -> bool:
    why = inlining_expected_why()
    if why is not None:
        warn_inlined(region, why)
    return True
