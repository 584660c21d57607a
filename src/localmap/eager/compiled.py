"""The region under ``torch.compile``: what Dynamo traces, with every check run once at trace time.

Dynamo traces this function instead of the eager path (it knows DTensor's ``to_local``/``from_local``, not
localmap's batched autograd nodes, and the caches' dictionaries would become guards). Everything that decides
or may raise runs in ``eager.compile_time`` at trace time on the arguments' metadata: the plan and leaf checks,
the placement check and the gradient placements it infers, the output checks. What Dynamo records is only the
conversions, with those placements as constants: a compiled call costs what PyTorch's local_map costs.
Recompiles follow Dynamo's own guards (input sizes, strides, placements, the region object).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from localmap.compat import compiling_simulated, optimization_hint, pytree, size_hint, traced_local
from localmap.context import pop_region_mesh, push_region_mesh, stack
from localmap.eager.autograd import ScaledGradient
from localmap.eager.modes import CallMode, call_mode
from localmap.eager.compile_time import (
    body_mark, plan_inputs, plan_outputs, plan_plain_call, refuse_simulated_factories, refuse_uneven,
)
from localmap.placements.shapes import is_uneven
from localmap.traced.dynamo_capture import call_plain_compiling, wrapping_now


def call_compiling(region: Any, args: tuple, kwargs: dict) -> Any:
    """Run `region` (a RegionCallable) while Dynamo traces."""
    flat, treespec, skeleton = _structure(args)
    dtensor_idx = [i for i, a in enumerate(flat) if isinstance(a, DTensor)]
    config, bound_to = definition(region)
    # plain tensors: a region node in the planner's capture, else inlined (never silently)
    if call_mode(bool(dtensor_idx)) is CallMode.PLANNER_CAPTURE:
        if not wrapping_now():
            plan_plain_call(config, bound_to, skeleton, tuple(describe(a) for a in flat))  # the spec count
        return call_plain_compiling(region, args, kwargs)
    mesh = region.device_mesh if region.device_mesh is not None else flat[dtensor_idx[0]].device_mesh
    for i in dtensor_idx:  # (before describing them: uneven shards' local sizes are per rank)
        _refuse_if_uneven(skeleton, i, flat[i])
    leaves = tuple(describe(a) for a in flat)
    locals_ = list(flat)
    planned = plan_inputs(config, bound_to, mesh, skeleton, leaves, {k: describe(v) for k, v in kwargs.items()})
    for i, target, grads, grad_scale in planned:
        a = flat[i]
        if target is not None:
            a = a.redistribute(mesh, target)
            _refuse_if_uneven(skeleton, i, a)
        locals_[i] = _scaled(a.to_local(grad_placements=grads), grad_scale, 1)
    # for localmap.collectives inside the body: the mesh, and on a simulated mesh a local input to make index
    # tensors from (context.region_anchor); there a tensor the body itself made by a factory is refused after it
    # (the anchors' stack only there: a thread-local Dynamo first reads absent, then present, would recompile)
    simulated = compiling_simulated()
    mark = body_mark() if simulated else None
    push_region_mesh(mesh)
    if simulated:
        stack("region_anchors").append(locals_[dtensor_idx[0]])
    try:
        out = region.func(*(locals_ if treespec is None else pytree.tree_unflatten(locals_, treespec)), **kwargs)
    finally:
        if simulated:
            stack("region_anchors").pop()
        pop_region_mesh()
    if simulated:
        refuse_simulated_factories(config, mark)
    flat_out, out_tree, out_skeleton = _structure(out) if not isinstance(out, torch.Tensor) else ((out,), None, 0)
    planned = plan_outputs(config, bound_to, mesh, out_skeleton, tuple(describe(t) for t in flat_out),
                           torch.is_grad_enabled())
    results = [t if spec is None else DTensor.from_local(_scaled(t, 1, avg), mesh, spec, run_check=False)
               for t, (spec, avg) in zip(flat_out, planned, strict=True)]
    if out_tree is not None:
        return pytree.tree_unflatten(results, out_tree)
    return results[0] if isinstance(out, torch.Tensor) else tuple(results)  # (a flat tuple: no treespec)


def _scaled(t: torch.Tensor, times: int, divided_by: int) -> torch.Tensor:
    """`t`, its gradient scaled for Partial('avg') as eagerly (DTensor's to_local/from_local do not scale)."""
    if (times == 1 and divided_by == 1) or not (t.requires_grad and torch.is_grad_enabled()):
        return t
    return ScaledGradient.apply(t, times, divided_by)


def definition(region: Any) -> tuple[tuple, Any]:
    """What defines `region` (a RegionCallable), as values Dynamo can hand to trace-time code even when the
    region is made inside the compiled function (torchtitan builds one per forward; such an object is not
    real while Dynamo traces): (its function, specs and options; the object a bound method is bound to, passed
    on its own because Dynamo converts an object only as a whole argument)."""
    func = region.func
    bound = type(func) is types.MethodType
    return (func.__func__ if bound else func, region.out_placements, region.in_placements,
            region.in_grad_placements, region.device_mesh, region.redistribute_inputs, region.check), \
        (func.__self__ if bound else None)


def _structure(tree: Any) -> tuple[Any, Any, Any]:
    """(flat leaves, treespec, skeleton: the structure with each leaf's index in its place, which Dynamo can
    pass as a constant). Positional tensors only: no pytree (Dynamo traces every call of it)."""
    if type(tree) is tuple and all(isinstance(a, torch.Tensor) for a in tree):
        return tree, None, tuple(range(len(tree)))
    flat, treespec = pytree.tree_flatten(tree)
    return flat, treespec, pytree.tree_unflatten(list(range(len(flat))), treespec)


def _refuse_if_uneven(skeleton: Any, i: int, a: DTensor) -> None:
    if is_uneven(a.shape, a.placements, a.device_mesh):  # a guard on symbolic sizes, a constant otherwise
        refuse_uneven(skeleton, i, tuple(size_hint(s) for s in a.shape), tuple(a.placements),
                      tuple(a.device_mesh.shape))


def describe(leaf: Any) -> tuple:
    """A leaf as hashable metadata for the trace-time checks: ("D", local size, local stride, dtype,
    requires_grad, placements, mesh) for a DTensor, ("T", size, stride, dtype, requires_grad) for a tensor,
    ("V", value) otherwise. Sizes Dynamo made symbolic are read as their example values."""
    if isinstance(leaf, DTensor):
        local = traced_local(leaf)
        return ("D", tuple(map(optimization_hint, local.shape)), tuple(map(optimization_hint, local.stride())),
                leaf.dtype, leaf.requires_grad, tuple(leaf.placements), leaf.device_mesh)
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(map(optimization_hint, leaf.shape)), tuple(map(optimization_hint, leaf.stride())),
                leaf.dtype, leaf.requires_grad)
    return ("V", size_hint(leaf))
