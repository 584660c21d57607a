"""A region's checks under ``torch.compile``, run once while Dynamo traces, on stand-ins of its arguments.

``eager.compiled`` (the code Dynamo traces) describes each argument leaf by hashable metadata (local sizes and
strides, dtype, whether it requires grad, placements and mesh; other leaves by value) and calls the functions
below, which Dynamo runs for real at trace time (``compat.trace_time``): their results enter the graph as
constants, their errors reach the caller as the errors eager raises. Each rebuilds the arguments as stand-ins
(meta tensors; DTensors over meta local tensors with the same specs) and runs the eager path's own plan, leaf
checks and placement check on them, so both paths raise and infer the same.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement

from localmap.caches import register_cache
from localmap.check.tested import agree_while_tracing
from localmap.core.plan import plan_call
from localmap.core.refusals import COMPILED, refuse_untraceable, simulated_factory_error, uneven_error
from localmap.compat import (
    compiling_one_graph, dynamo_graph_mark, factory_calls_since, global_shape_and_stride, make_dtensor, make_spec, pytree,
    spec_of, surfacing_types, trace_time,
)
from localmap.eager.plans import (
    check_body, check_kwargs, check_non_dtensor_leaves, common_mesh, input_leaf_target, make_input_plan,
    make_output_plan,
)
from localmap.context import stack
from localmap.errors import region_name
from localmap.placements.algebra import avg_grad_scale, avg_ranks, extreme_grad_error, has_extreme
from localmap.placements.shapes import dense_stride, local_shape
from localmap.placements.specs import check_output_leaf, leaf_path, resolve_input_specs

Placements = tuple[Placement, ...]
register_cache("surfacing_types", surfacing_types(), limit=None, eviction="unbounded")  # errors met at trace time


@trace_time
def plan_inputs(config: tuple, bound_to: Any, mesh: Any, skeleton: Any, leaves: tuple, kwargs: dict) -> tuple:
    """The eager path's input checks and placement check for a call with these argument leaves: per DTensor
    leaf, (index, the placements to redistribute it to or None, its gradient placements: given, inferred by the
    check, or the default; the factor on its local gradient, placements.algebra.avg_grad_scale).
    `config`, `bound_to`: eager.compiled.definition of the region."""
    region = _Region(bound_to, *config)
    args, flat, treespec = _stand_ins(skeleton, leaves)
    kwargs = {k: _stand_in(v) for k, v in kwargs.items()}
    check_kwargs(kwargs)
    dtensor_idx = [i for i, a in enumerate(flat) if isinstance(a, DTensor)]
    if region.device_mesh is None:
        common_mesh(args, flat, dtensor_idx)
    plan = make_input_plan(region.in_placements, region.in_grad_placements, mesh, args, flat)
    check_non_dtensor_leaves(plan, args, flat)
    checked = []
    for i in dtensor_idx:
        target, grads = input_leaf_target(plan, args, flat, i, mesh, region.redistribute_inputs)
        a = flat[i] if flat[i].placements == target else _redistributed(flat[i], target)
        checked.append((i, a, grads, spec_of(a)))
    given = region.in_grad_placements is not None  # then each checked gradient placement is the given one
    held: list = [None] * len(flat)
    given_grads: list = [None] * len(flat)
    for i, a, grads, _ in checked:
        held[i], given_grads[i] = tuple(a.placements), grads if given else None
    # the same rule eager reaches, agreed by every rank (check.function caches it across paths)
    # (a body Dynamo cannot trace is refused by name before the verdict is enforced: core.refusals)
    call = plan_call(lambda: refuse_untraceable(agree_while_tracing(lambda: check_body(
        region.func, region.out_placements, plan, flat, treespec, checked, mesh, kwargs), mesh),
        compiling_one_graph()), region.check, COMPILED, held, given_grads, region.in_grad_placements)
    planned = []
    for i, a, _, _ in checked:
        grads = call.grads[i]
        planned.append((i, None if a is flat[i] else tuple(a.placements), grads,
                        avg_grad_scale(a.placements, grads, mesh)))
    return tuple(planned)


@trace_time
def plan_outputs(config: tuple, bound_to: Any, mesh: Any, skeleton: Any, leaves: tuple, grad_enabled: bool) -> tuple:
    """The eager path's output checks: per output leaf, (its placements, None for non-tensors; the divisor
    of its local gradient, placements.algebra.avg_ranks)."""
    region = _Region(bound_to, *config)
    out, flat_out, _ = _stand_ins(skeleton, leaves)
    plan = make_output_plan(region.out_placements, out, flat_out, mesh)
    specs = [check_output_leaf(out, i, t, plan.specs[i], mesh) for i, t in enumerate(flat_out)]
    for i, (t, p) in enumerate(zip(flat_out, specs, strict=True)):
        if p is not None and grad_enabled and t.requires_grad and has_extreme(p):
            raise extreme_grad_error(leaf_path("outputs", out, i), p, mesh)
    return tuple((p, 1 if p is None else avg_ranks(p, mesh)) for p in specs)


@trace_time
def refuse_uneven(skeleton: Any, i: int, shape: tuple, placements: tuple, mesh_shape: tuple) -> None:
    """Argument leaf `i` is unevenly sharded, which the compiled path does not support (eager does)."""
    raise uneven_error(leaf_path("args", skeleton, i), shape, placements, mesh_shape, COMPILED)


@trace_time
def body_mark() -> str | None:
    """The last node of Dynamo's graph before a region's body is traced (refuse_simulated_factories). Makes
    this thread's stack of region anchors first, so Dynamo reads an existing one (context.region_anchor)."""
    stack("region_anchors")
    return dynamo_graph_mark()


@trace_time
def refuse_simulated_factories(config: tuple, mark: str | None) -> None:
    """On a simulated mesh: refuse a body that made a tensor with a factory (traced after node `mark`)."""
    calls = factory_calls_since(mark)
    if calls:
        raise simulated_factory_error(region_name(config[0]), calls)


@trace_time
def plan_plain_call(config: tuple, bound_to: Any, skeleton: Any, leaves: tuple) -> bool:
    """A call without DTensor arguments: the spec count checked as eagerly (where a region node was expected,
    ``traced.dynamo_capture`` warns that the body is inlined)."""
    region = _Region(bound_to, *config)
    args, flat, _ = _stand_ins(skeleton, leaves)
    if region.in_placements is not None:
        resolve_input_specs(region.in_placements, args, len(flat))
    return True


class _Region:
    """A region's definition rebuilt at trace time, with the attribute names of a RegionCallable."""

    def __init__(self, bound_to: Any, func: Any, out_placements: Any, in_placements: Any, in_grad_placements: Any,
                 device_mesh: Any, redistribute_inputs: bool, check: Any) -> None:
        self.func = func if bound_to is None else types.MethodType(func, bound_to)
        self.out_placements, self.in_placements, self.in_grad_placements = out_placements, in_placements, \
            in_grad_placements
        self.device_mesh, self.redistribute_inputs, self.check = device_mesh, redistribute_inputs, check


# ---- stand-ins --------------------------------------------------------------------------------------------------

def _stand_ins(skeleton: Any, leaves: tuple) -> tuple[Any, list, Any]:
    """(the arguments rebuilt with stand-in leaves, the flat leaves, their treespec) from `skeleton` (the
    arguments' structure with each leaf's index in its place)."""
    indices, treespec = pytree.tree_flatten(skeleton)
    flat = [_stand_in(leaves[k]) for k in indices]
    return pytree.tree_unflatten(flat, treespec), flat, treespec


def _stand_in(info: Any) -> Any:
    """A meta tensor (or a DTensor over one) with the described metadata; a described value as itself."""
    if info[0] == "V":
        return info[1]
    local = torch.empty_strided(info[1], info[2], dtype=info[3], device="meta")
    if info[4]:
        local.requires_grad_(True)
    if info[0] == "T":
        return local
    placements, mesh = info[5], info[6]
    shape, stride = global_shape_and_stride(local, mesh, placements)
    return make_dtensor(local.detach(), make_spec(mesh, placements, shape, stride, info[3]),
                        requires_grad=info[4])


def _redistributed(a: DTensor, target: Placements) -> DTensor:
    """The stand-in `a` brought to `target` placements (even shards: any coordinate's local shape)."""
    spec = spec_of(a)
    shape = local_shape(spec.shape, target, spec.mesh.shape, (0,) * spec.mesh.ndim)
    local = torch.empty_strided(shape, dense_stride(shape, spec.stride), dtype=a.dtype, device="meta")
    return make_dtensor(local, make_spec(spec.mesh, target, spec.shape, spec.stride, a.dtype),
                        requires_grad=a.requires_grad)
