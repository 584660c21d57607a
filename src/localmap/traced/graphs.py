"""Region graphs as values: local fakes from global ones and back, running a graph, tracing a body.

A region's graphs work in local (per-shard) shapes while the program around them is global; these helpers
convert fake tensors between the two at this rank's mesh coordinate and run or trace the graphs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor import DeviceMesh
from torch.distributed.tensor.placement_types import Placement

from localmap import compat as _compat
from localmap.check.mutation import check_no_input_mutation
from localmap.errors import fail
from localmap.placements.shapes import even_global_shape, like_stride, local_shape


def mesh_coordinate(mesh: DeviceMesh) -> list[int]:
    """This rank's coordinate; tracing on a fake process group happens as rank 0 (documented)."""
    coord = mesh.get_coordinate()
    if coord is None:
        raise fail("device_mesh", "does not hold this rank, so it has no shard to trace",
                   given=f"mesh ranks {mesh.mesh.flatten().tolist()}",
                   fix="call the region on ranks of its mesh, or give it a mesh that holds this rank")
    return list(coord)


def to_local_fake(value: Any, placements: Sequence[Placement] | None, mesh: DeviceMesh) -> Any:
    """A fresh fake tensor with the local shape this rank holds of global `value` (non-tensors pass)."""
    if not isinstance(value, torch.Tensor) or placements is None:
        return value
    shape = local_shape(value.shape, placements, tuple(mesh.shape), mesh_coordinate(mesh))
    return torch.empty_strided(shape, like_stride(shape, value.stride()), dtype=value.dtype,
                               device=value.device, requires_grad=value.requires_grad)


def to_global_fake(value: Any, placements: Sequence[Placement] | None, mesh: DeviceMesh,
                   shape: Sequence[Any] | None = None) -> Any:
    """A fresh fake tensor with the global shape of local `value` (even sharding unless `shape` is known)."""
    if not isinstance(value, torch.Tensor) or placements is None:
        return value
    if shape is None:
        shape = even_global_shape(value.shape, placements, tuple(mesh.shape))
    return torch.empty_strided(shape, like_stride(shape, value.stride()), dtype=value.dtype,
                               device=value.device, requires_grad=value.requires_grad)

def run_graph(gm: fx.GraphModule, args: Sequence[Any], keep_meta: bool = False) -> tuple:
    """Run a region graph; with keep_meta, through an Interpreter so node metadata (annotations,
    checkpoint tags) reaches whatever trace is recording."""
    out = fx.Interpreter(gm).run(*args) if keep_meta else gm(*args)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_shard_shapes(gm: fx.GraphModule, args: Sequence[Any], node: str) -> None:
    """A region graph runs on one rank's shards: refuse real tensors of other (concrete) shapes by name, such as
    the whole tensors of a compiled program run on one process with its regions deferred, instead of failing
    on a size inside the graph (or broadcasting silently)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    for i, (ph, a) in enumerate(zip(placeholders, args)):
        want = ph.meta.get("val")
        if type(a) not in (torch.Tensor, torch.nn.Parameter) or not isinstance(want, torch.Tensor):
            continue
        if a.ndim == want.ndim and all(not isinstance(w, int) or w == g for w, g in zip(want.shape, a.shape)):
            continue
        raise fail(f"{node}, argument {i}", "is not one rank's shard: a region node runs its region graph (traced "
                   "on one rank's shard) on each rank's own pieces, and cannot run on whole tensors",
                   expected=f"shape {tuple(want.shape)}", given=f"shape {tuple(a.shape)}",
                   fix="run the plan per rank on that rank's shards (a planner's runtime, or "
                       "localmap.testing.run_joint on one device); to run the program on whole tensors, compile "
                       "it outside defer_inlining (localmap's or PyTorch's): the region is then inlined and its "
                       "function runs on the tensors as given, as PyTorch's local_map runs it (PyTorch cannot "
                       "run its own deferred region node either: AttributeError, no call_local_map)")


def trace_body(fn: Callable[..., tuple], local_inputs: Sequence[Any],
               paths: Sequence[str] | None = None) -> fx.GraphModule:
    """Trace ``fn(*local_inputs) -> tuple of tensors`` into a body GraphModule with a flat signature."""
    with _compat.isolated_tracing():
        fake_mode = _compat.detect_fake_mode(local_inputs)
        with _compat.ignore_fresh_unbacked(fake_mode):
            gm = _compat.make_fx(fn, tracing_mode="fake")(*local_inputs)
    check_no_input_mutation(gm, paths)
    return gm
