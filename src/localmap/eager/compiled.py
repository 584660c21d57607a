"""The eager region under ``torch.compile``: the same checks at trace time, DTensor's public conversions.

Dynamo traces this function instead of the batched autograd nodes (it knows ``to_local``/``from_local``, not
localmap's C-level shortcuts), and skips the caches (their dictionaries would become guards).
"""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import DTensor

from localmap.compat import pytree
from localmap.context import in_region
from localmap.eager.plans import InputPlan, check_input_leaf, check_non_dtensor_leaves
from localmap.errors import fail
from localmap.placements.shapes import is_uneven
from localmap.placements.specs import check_output_leaf, leaf_path, resolve_input_specs, resolve_output_specs
from localmap.traced.dynamo_capture import call_plain_compiling


def call_compiling(region: Any, args: tuple, kwargs: dict) -> Any:
    """Run `region` (a RegionCallable) on DTensor arguments while Dynamo traces."""
    flat, treespec = pytree.tree_flatten(args)
    dtensor_idx = [i for i, a in enumerate(flat) if isinstance(a, DTensor)]
    if not dtensor_idx:  # plain tensors: a region node in the planner's capture, else inlined (never silently)
        return call_plain_compiling(region, args, kwargs)
    mesh = region.device_mesh if region.device_mesh is not None else common_mesh(args, flat, dtensor_idx)
    plan = InputPlan(mesh, None, None)
    if region.in_placements is not None:
        plan.specs = resolve_input_specs(region.in_placements, args, len(flat))
    if region.in_grad_placements is not None:
        plan.grad_specs = resolve_input_specs(region.in_grad_placements, args, len(flat), "in_grad_placements")
    check_non_dtensor_leaves(plan, args, flat)
    locals_ = list(flat)
    for i in dtensor_idx:
        a, gp = check_input_leaf(plan, args, flat, i, mesh, region.redistribute_inputs)
        if is_uneven(a.shape, a.placements, mesh):
            raise fail(leaf_path("args", args, i), "is unevenly sharded, which local_map does not support "
                       "under torch.compile", given=tuple(a.shape),
                       fix="pad the sharded dim to a multiple of the mesh size, or run this region eagerly")
        locals_[i] = a.to_local(grad_placements=gp)
    with in_region(mesh):  # for localmap.collectives inside the body
        out = region.func(*pytree.tree_unflatten(locals_, treespec), **kwargs)
    flat_out, out_tree = pytree.tree_flatten(out)
    specs = resolve_output_specs(region.out_placements, out, len(flat_out))
    results = []
    for i, (t, spec) in enumerate(zip(flat_out, specs, strict=True)):
        spec = check_output_leaf(out, i, t, spec, mesh)
        results.append(DTensor.from_local(t, mesh, spec, run_check=False) if spec is not None else t)
    return pytree.tree_unflatten(results, out_tree)


def common_mesh(args: tuple, flat: Any, dtensor_idx: Any) -> Any:
    """The mesh of the DTensor inputs, which must all agree when no device_mesh is given."""
    mesh = flat[dtensor_idx[0]].device_mesh
    for i in dtensor_idx[1:]:
        other = flat[i].device_mesh
        if other is not mesh and other != mesh:
            raise fail(leaf_path("args", args, i), "is a DTensor on a different mesh than "
                       f"{leaf_path('args', args, dtensor_idx[0])}", expected=mesh, given=other,
                       fix="redistribute the inputs onto one mesh, or pass device_mesh= explicitly")
    return mesh
