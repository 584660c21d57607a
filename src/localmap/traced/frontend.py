"""The traced front end: ``local_map`` called on plain global-shaped tensors while regions are deferred.

The region's function is traced into a body GraphModule on local fake tensors (this rank's shard of each
input), the body gets the region's placements in ``meta["local_map_kwargs"]``, and ``local_map_hop`` is
called on the global arguments. Tensor and SymInt arguments become operator inputs; every other argument
(ints, None, modules, keyword arguments) is a constant of the body.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from localmap import compat as _compat
from localmap.check.verdict import describe
from localmap.check.function import check_function
from localmap.check.tested import one_rank_world
from localmap.context import check_mode, default_mesh, enclosing_region_mesh, in_region, recorder
from localmap.sites import caller_site
from localmap.compat import pytree, to_local_substituted
from localmap.errors import LocalMapError, body_error, fail, region_name
from localmap.core.plan import CallPlan, plan_call
from localmap.core.refusals import TRACED, TRACED_CALL, traced_untraceable_error, uneven_error
from localmap.traced.closure import (
    HOLD_FIX, Lifted, as_full_dtensor, closed_over, rebound, region_placements, unregistered_dtensors,
)
from localmap.traced.graphs import mesh_coordinate, trace_body
from localmap.traced.meta import SOURCE, set_region_meta
from localmap.traced.operator import local_map_hop
from localmap.placements.shapes import is_uneven, like_stride, local_shape
from localmap.placements.specs import (
    check_non_tensor_leaf, check_output_leaf, fit_spec_to_mesh, leaf_path, normalize_shard_dims,
    resolve_input_specs, resolve_output_specs,
)


def _leaf_specs(spec_arg: Any, name: str, args: tuple, flat: list, mesh: Any) -> list:
    specs = resolve_input_specs(spec_arg, args, len(flat), name)
    out = []
    for i, (a, s) in enumerate(zip(flat, specs, strict=True)):
        if isinstance(a, torch.Tensor):
            if s is None:
                raise fail(leaf_path("args", args, i), f"is a tensor but its {name} spec is None",
                           expected="a list of placements", given=None,
                           fix="give its placements, e.g. [Replicate()] or [Shard(0)]")
            s = fit_spec_to_mesh(s, mesh, leaf_path("args", args, i), name)
            s = normalize_shard_dims(s, a.ndim, leaf_path("args", args, i), name, mesh)
            if name == "in_placements" and _uneven(a, s, mesh):
                raise uneven_error(leaf_path("args", args, i), a.shape, s, mesh.shape, TRACED)
        else:
            check_non_tensor_leaf(args, i, a, s, name)
        out.append(s)
    return out


def _uneven(a: torch.Tensor, placements: Any, mesh: Any) -> bool:
    """Whether `a` would be cut into shards of different sizes (only known for concrete sizes)."""
    from torch.distributed.tensor.placement_types import Shard

    dims = {p.dim for p in placements if isinstance(p, Shard)}
    if any(not isinstance(a.shape[d], int) for d in dims):
        return False
    return is_uneven(a.shape, placements, mesh)


@dataclasses.dataclass
class TracedRegion:
    """A region call traced into a body: what the operator is called with, and how its results are put back."""

    body: Any  # the body GraphModule, placements in meta["local_map_kwargs"]
    hop_args: list  # the operator's arguments: the call's tensor (and SymInt) leaves, then closed-over stand-ins
    leaf_paths: list[str]  # each operator argument's path ("args[0]", "args[1]['w']", ..., "self.w1")
    flat_out: list  # the body's output leaves as traced (non-tensor leaves are the values to return)
    out_tree: Any  # the output's pytree structure
    verdict: Any  # the placement check's verdict (None when check=False)
    inferred: bool  # whether in_grad_placements were inferred by the check (not given)


def trace_region(region: Any, args: tuple, kwargs: dict) -> TracedRegion:
    """Trace the region's function into a body on this rank's local fakes (the DTensor parameters it closes over
    as extra inputs: traced.closure), run the check, record the placements (inferred gradient placements as
    in_grad_placements) on the body."""
    mesh = _traced_mesh(region)
    flat, treespec = pytree.tree_flatten(args)
    specs = _leaf_specs(region.in_placements, "in_placements", args, flat, mesh)
    grads = None
    if region.in_grad_placements is not None:
        grads = _leaf_specs(region.in_grad_placements, "in_grad_placements", args, flat, mesh)
    lifted = _lifted(region.func, mesh)
    lifted_specs = [region_placements(c.info, mesh) for c in lifted.closed]
    inputs = [i for i, a in enumerate(flat) if isinstance(a, (torch.Tensor, torch.SymInt))]
    hop_args = [flat[i] for i in inputs] + [c.value for c in lifted.closed]
    hop_specs = [specs[i] for i in inputs] + lifted_specs
    local = _local_fakes(hop_args, hop_specs, mesh)
    body, out = _trace_region_body(region, args, kwargs, inputs, local, mesh, lifted)
    check_leaves = list(flat) + local[len(inputs):]
    for i, v in zip(inputs, local, strict=False):
        check_leaves[i] = v
    held = [s if isinstance(a, torch.Tensor) else None for a, s in zip(flat, specs, strict=True)] + lifted_specs
    given = None if grads is None else grads + [None] * len(lifted_specs)  # a closed-over tensor's: never given
    call = plan_call(lambda: check_function(
        region.func, check_leaves, specs + lifted_specs, region.out_placements, given, mesh, treespec, kwargs,
        lifted=lifted if lifted.closed else None), check_mode(region.check), TRACED_CALL, held, given, None)
    verdict = call.verdict
    flat_out, out_tree = pytree.tree_flatten(out)
    out_specs = resolve_output_specs(region.out_placements, out, len(flat_out))
    tensor_specs = [p for p in (check_output_leaf(out, i, o, s, mesh)
                                for i, (o, s) in enumerate(zip(flat_out, out_specs, strict=True))) if p is not None]
    set_region_meta(body, {
        "in_placements": tuple(hop_specs),
        "out_placements": tuple(tensor_specs),
        "in_grad_placements": _in_grads(call, grads, inputs, len(flat), len(hop_specs)),
        "device_mesh": mesh,
    })
    body.meta[SOURCE] = {"name": region_name(region.func), "source": caller_site(),
                         "verdict": "unchecked" if verdict is None else verdict.summary(),
                         "verdict_detail": describe(verdict), "check": region.check,
                         "closed_over": list(lifted.paths)}
    inferred = grads is None and verdict is not None and verdict.grad_placements is not None
    return TracedRegion(body, hop_args, [leaf_path("args", args, i) for i in inputs] + list(lifted.paths),
                        flat_out, out_tree, verdict, inferred)


def call_traced(region: Any, args: tuple, kwargs: dict) -> Any:
    """Trace the region's function into a body and call the operator on the global arguments."""
    traced = trace_region(region, args, kwargs)
    results = iter(local_map_hop(traced.body, *traced.hop_args))
    return pytree.tree_unflatten(
        [next(results) if isinstance(o, torch.Tensor) else o for o in traced.flat_out], traced.out_tree)


def _lifted(func: Any, mesh: Any) -> Lifted:
    """The stand-ins `func` closes over; a DTensor it closes over that stands for nothing cannot be captured."""
    closed = closed_over(func)
    if recorder("capture") is not None:
        known = {c.path for c in closed}
        stray = [p for p in unregistered_dtensors(func) if p not in known]
        if stray:
            raise fail(stray[0], "is a DTensor the region's body reads that is no input of the captured program",
                       given=f"{len(stray)} such DTensor(s): {', '.join(stray[:3])}",
                       fix=HOLD_FIX)
    return Lifted(closed)


def _in_grads(call: CallPlan, grads: list | None, inputs: list[int], n_flat: int, n_hop: int) -> tuple | None:
    """Gradient placements per operator input, from the call's plan (None for a SymInt); None when none is
    given or inferred (the default for all)."""
    if grads is None and (call.verdict is None or call.verdict.grad_placements is None):
        return None
    return tuple(call.grads[i] for i in inputs + list(range(n_flat, n_flat + n_hop - len(inputs))))


def _traced_mesh(region: Any) -> Any:
    """The region's mesh when traced: its own, else the enclosing region's, else the default (use_mesh)."""
    outer = enclosing_region_mesh()
    mesh = region.device_mesh or outer or default_mesh()
    if outer is not None and mesh is not outer and mesh != outer:
        raise fail("device_mesh", "of a region nested in another region differs from the enclosing region's mesh",
                   expected=outer, given=mesh,
                   fix="give the inner region the enclosing region's mesh (or no device_mesh), or call it outside")
    if mesh is None:
        raise fail("device_mesh", "is needed to trace a region on plain tensors", given=None,
                   fix="pass device_mesh= to local_map, or trace inside `with localmap.use_mesh(mesh):`")
    if region.in_placements is None:
        raise fail("in_placements", "are needed to trace a region on plain tensors", given=None,
                   fix="give one spec per argument, e.g. in_placements=([Shard(0)], [Replicate()])")
    return mesh


def _local_fakes(values: list, placements: list, mesh: Any) -> list:
    """Fresh fakes of this rank's shards of the operator's arguments (SymInts pass through).

    Local metadata is read here, where the arguments may still be wrapped (functionalization, torch.func
    transforms); the body is then traced in isolation on the fresh fakes, without autograd (its backward is
    built later from the body graph)."""
    fake_mode = _compat.detect_fake_mode(values) or _compat.new_fake_mode()
    coordinate = mesh_coordinate(mesh)
    local_meta = [_local_meta(a, p, mesh, coordinate) for a, p in zip(values, placements, strict=True)]
    with _compat.isolated_tracing(), fake_mode:
        return [torch.empty_strided(m[0], m[1], dtype=m[2], device=m[3]) if isinstance(m, tuple) else m
                for m in local_meta]


def _trace_region_body(region: Any, args: tuple, kwargs: dict, inputs: list[int], local: list,
                       mesh: Any, lifted: Lifted) -> tuple[Any, Any]:
    """The region's function traced into a body graph on the local fakes (the arguments', then the closed-over
    tensors'), and its (traced) output."""
    flat, treespec = pytree.tree_flatten(args)
    traced: dict[str, Any] = {}

    def body_fn(*local_inputs: Any) -> tuple:
        leaves = list(flat)
        for i, v in zip(inputs, local_inputs, strict=False):
            leaves[i] = v
        with in_region(mesh), lifted.bind(local_inputs[len(inputs):]):
            out = region.func(*pytree.tree_unflatten(leaves, treespec), **kwargs)
        traced["out"] = out
        return tuple(o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor))

    try:
        body = trace_body(body_fn, local, [leaf_path("args", args, i) for i in inputs] + list(lifted.paths))
    except LocalMapError:
        raise
    except Exception as e:  # a PyTorch error inside the body: name the region and the line
        why = _compat.untraceable_why(e)
        if why is not None:  # no trace on fake tensors can follow it: refused by name, with the fix
            raise traced_untraceable_error(region.func, e, why) from e
        raise body_error(region.func, e, "tracing its body") from e
    return body, traced["out"]


def _local_meta(value: Any, placements: Any, mesh: Any, coordinate: list[int]) -> Any:
    """(shape, stride, dtype, device) of this rank's shard of a tensor argument; SymInts pass through."""
    if not isinstance(value, torch.Tensor):
        return value
    shape = local_shape(value.shape, placements, tuple(mesh.shape), coordinate)
    return (shape, like_stride(shape, value.stride()), value.dtype, value.device)


@contextlib.contextmanager
def _one_rank(region: Any, closed: list) -> Iterator[None]:
    """The body's one-device meaning: inside a region over the one-rank mesh of the region's mesh (its own, the
    enclosing or default one, else a closed-over DTensor's), where collectives are the identity and axis_index
    is 0 (check.tested.one_rank_world); as it is where no mesh is known (a body without collectives)."""
    mesh = region.device_mesh or enclosing_region_mesh() or default_mesh() or next(
        (c.info.mesh for c in closed), None)
    if mesh is None:
        yield
        return
    with one_rank_world(region.func, mesh) as one, in_region(one):
        yield


def call_reference(region: Any, args: tuple, kwargs: dict, records: list) -> Any:
    """Run the region inlined on one device (its function on the global tensors) and record its outputs and,
    when backward runs, the gradients of its tensor inputs (the arguments, then the closed-over DTensor
    parameters, which the body reads as their full tensors): the reference that verify compares with."""
    flat, treespec = pytree.tree_flatten(args)
    record: dict[str, Any] = {"name": region_name(region.func), "source": caller_site(),
                              "input_grads": {}}
    closed = closed_over(region.func)
    leaves = [_recorded(a, i, record) for i, a in enumerate(flat)]
    full_locals = [_recorded(c.value, len(flat) + k, record) for k, c in enumerate(closed)]
    fulls = [as_full_dtensor(t, c.info) for t, c in zip(full_locals, closed)]
    # On one device a closed-over DTensor's local tensor is the full one and so is its gradient: its to_local()
    # returns the full tensor itself, whatever grad_placements the body declares for the sharded run.
    table = {id(d): (t, []) for d, t in zip(fulls, full_locals)}
    try:
        with _one_rank(region, closed), rebound(closed, fulls), to_local_substituted(table):
            out = region.func(*pytree.tree_unflatten(leaves, treespec), **kwargs)
    except Exception as exc:  # the body on whole tensors: a body written for the shards' shapes only fails here
        raise body_error(region.func, exc, "verify's one-device reference (the body run on whole tensors)",
                         fix="a region's body must also compute the whole result from whole tensors (verify's "
                             "reference inlines it): shapes that only fit the local shards fail here; write the "
                             "body in terms of its inputs' shapes, or give verify a reference") from exc
    record["outputs"] = [o.detach().clone() for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
    record["tensor_inputs"] = [i for i, a in enumerate(flat) if isinstance(a, (torch.Tensor, torch.SymInt))] + [
        len(flat) + k for k in range(len(closed))]
    records.append(record)
    return out


def _recorded(a: Any, i: int, record: dict) -> Any:
    """`a` as the body's input number `i`, its gradient recorded when backward reaches it."""
    if not isinstance(a, torch.Tensor) or not a.requires_grad:
        return a
    view = a.view_as(a)
    view.register_hook(lambda g: record["input_grads"].__setitem__(i, g.detach().clone()))
    return view
