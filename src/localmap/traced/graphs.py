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


def trace_body(fn: Callable[..., tuple], local_inputs: Sequence[Any],
               paths: Sequence[str] | None = None) -> fx.GraphModule:
    """Trace ``fn(*local_inputs) -> tuple of tensors`` into a body GraphModule with a flat signature."""
    with _compat.isolated_tracing():
        fake_mode = _compat.detect_fake_mode(local_inputs)
        with _compat.ignore_fresh_unbacked(fake_mode):
            gm = _compat.make_fx(fn, tracing_mode="fake")(*local_inputs)
    check_no_input_mutation(gm, paths)
    return gm
