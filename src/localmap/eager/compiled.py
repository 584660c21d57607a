"""The region under ``torch.compile``: what Dynamo traces, with every check run once at trace time.

Dynamo traces this function instead of the eager path (it knows DTensor's ``to_local``/``from_local``, not
localmap's batched autograd nodes, and the caches' dictionaries would become guards). Everything that decides
or may raise runs in ``eager.compile_time`` at trace time on the arguments' metadata: the plan and leaf checks,
the placement check and the gradient placements it infers, the output checks. What Dynamo records is only the
conversions, with those placements as constants: a compiled call costs what PyTorch's local_map costs.
Recompiles follow Dynamo's own guards (input sizes, strides, placements, the region object).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from localmap.compat import pytree, size_hint, traced_local
from localmap.context import in_region
from localmap.eager.compile_time import plan_inputs, plan_outputs, plan_plain_call, refuse_uneven
from localmap.placements.shapes import is_uneven


def call_compiling(region: Any, args: tuple, kwargs: dict) -> Any:
    """Run `region` (a RegionCallable) while Dynamo traces."""
    flat, treespec = pytree.tree_flatten(args)
    skeleton = pytree.tree_unflatten(list(range(len(flat))), treespec)
    dtensor_idx = [i for i, a in enumerate(flat) if isinstance(a, DTensor)]
    if not dtensor_idx:
        plan_plain_call(region, skeleton, tuple(describe(a) for a in flat))
        return region.func(*args, **kwargs)
    mesh = region.device_mesh if region.device_mesh is not None else flat[dtensor_idx[0]].device_mesh
    for i in dtensor_idx:  # (before describing them: uneven shards' local sizes are per rank)
        _refuse_if_uneven(skeleton, i, flat[i])
    leaves = tuple(describe(a) for a in flat)
    locals_ = list(flat)
    for i, target, grads in plan_inputs(region, mesh, skeleton, leaves, {k: describe(v) for k, v in kwargs.items()}):
        a = flat[i]
        if target is not None:
            a = a.redistribute(mesh, target)
            _refuse_if_uneven(skeleton, i, a)
        locals_[i] = a.to_local(grad_placements=grads)
    with in_region(mesh):  # for localmap.collectives inside the body
        out = region.func(*pytree.tree_unflatten(locals_, treespec), **kwargs)
    flat_out, out_tree = pytree.tree_flatten(out)
    out_skeleton = pytree.tree_unflatten(list(range(len(flat_out))), out_tree)
    specs = plan_outputs(region, mesh, out_skeleton, tuple(describe(t) for t in flat_out), torch.is_grad_enabled())
    results = [t if spec is None else DTensor.from_local(t, mesh, spec, run_check=False)
               for t, spec in zip(flat_out, specs, strict=True)]
    return pytree.tree_unflatten(results, out_tree)


def _refuse_if_uneven(skeleton: Any, i: int, a: DTensor) -> None:
    if is_uneven(a.shape, a.placements, a.device_mesh):  # a guard on symbolic sizes, a constant otherwise
        refuse_uneven(skeleton, i, tuple(size_hint(s) for s in a.shape))


def describe(leaf: Any) -> tuple:
    """A leaf as hashable metadata for the trace-time checks: ("D", local size, local stride, dtype,
    requires_grad, placements, mesh) for a DTensor, ("T", size, stride, dtype, requires_grad) for a tensor,
    ("V", value) otherwise. Sizes Dynamo made symbolic are read as their example values."""
    if isinstance(leaf, DTensor):
        local = traced_local(leaf)
        return ("D", _hints(local.shape), _hints(local.stride()), leaf.dtype, leaf.requires_grad,
                tuple(leaf.placements), leaf.device_mesh)
    if isinstance(leaf, torch.Tensor):
        return ("T", _hints(leaf.shape), _hints(leaf.stride()), leaf.dtype, leaf.requires_grad)
    return ("V", size_hint(leaf))


def _hints(sizes: Any) -> tuple:
    return tuple(size_hint(s) for s in sizes)
