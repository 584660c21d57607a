"""Shapes of shards: torch.chunk layout, uneven detection, global <-> local shapes.

DTensor lays a Shard(d) dim out like ``torch.chunk``: ``ceil(n / k)`` rows per rank until the rows run out
(10 rows on 4 ranks: 3, 3, 3, 1). With several mesh dims sharding the same tensor dim, the earlier mesh dim
splits first and each later one splits the blocks it was given.

These are pure functions of sizes and placements (SymInt-safe for tracing); gathering the global shapes of
uneven region outputs, which needs communication, is ``localmap.eager.uneven``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed.tensor import DeviceMesh
from torch.distributed.tensor.placement_types import Placement, Shard


def chunk_sizes(total: int, parts: int) -> list[int]:
    """Sizes of the pieces torch.chunk (and DTensor's Shard) cuts `total` rows into across `parts` ranks."""
    step = -(-total // parts) if total else 0
    return [max(0, min(step, total - i * step)) for i in range(parts)]


def shard_dims(placements: Sequence[Placement]) -> dict[int, list[int]]:
    """tensor dim -> the mesh dims sharding it, in mesh order."""
    out: dict[int, list[int]] = {}
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):
            out.setdefault(p.dim, []).append(mesh_dim)
    return out


def is_uneven(shape: Sequence[int], placements: Sequence[Placement], mesh: DeviceMesh) -> bool:
    """Whether shards of a tensor of `shape` differ in size along some sharded dim (plain loops: Dynamo
    traces this)."""
    mesh_shape = mesh.shape
    for dim, mesh_dims in shard_dims(placements).items():
        ranks = 1
        for m in mesh_dims:
            ranks *= mesh_shape[m]
        if shape[dim] % ranks:
            return True
    return False


def dense_stride(shape: Sequence[int], like_stride: Sequence[int]) -> tuple[int, ...]:
    """Dense strides for `shape`, ordering dims as `like_stride` does (outermost = largest stride)."""
    order = sorted(range(len(shape)), key=lambda d: (-like_stride[d], d))
    stride: list[Any] = [0] * len(shape)
    step: Any = 1
    for d in reversed(order):
        stride[d] = step
        step = step * torch.sym_max(shape[d], 1)
    return tuple(stride)


# ---- global <-> local metadata for tracing (fake tensors; sizes may be SymInts) --------------------------------

def _ceil_div(a: Any, b: int) -> Any:
    return -((-a) // b)


def local_shape(shape: Sequence[Any], placements: Sequence[Placement], mesh_shape: Sequence[int],
                coordinate: Sequence[int]) -> list[Any]:
    """The local shape at `coordinate` of a tensor of global `shape` (torch.chunk layout, nested shards)."""
    out = list(shape)
    for m, p in enumerate(placements):
        if isinstance(p, Shard):
            size, n, c = out[p.dim], mesh_shape[m], coordinate[m]
            step = _ceil_div(size, n)
            out[p.dim] = torch.sym_max(0, torch.sym_min(step, size - c * step))
    return out


def even_global_shape(shape: Sequence[Any], placements: Sequence[Placement],
                      mesh_shape: Sequence[int]) -> list[Any]:
    """The global shape of an evenly sharded tensor from its local shape."""
    out = list(shape)
    for m, p in enumerate(placements):
        if isinstance(p, Shard):
            out[p.dim] = out[p.dim] * mesh_shape[m]
    return out


def like_stride(shape: Sequence[Any], stride: Sequence[Any]) -> tuple[Any, ...]:
    """Dense strides for `shape` in the dim order of `stride`, keeping broadcast (0) strides as 0."""
    dense = dense_stride(shape, stride)
    return tuple(0 if s == 0 and n != 1 else d for s, n, d in zip(stride, shape, dense, strict=True))


def view_group(in_shape: Sequence[int], out_shape: Sequence[int], dim: int) -> tuple[int, ...]:
    """The output dims a reshape from `in_shape` to `out_shape` makes of input dim `dim`: the shapes are walked
    in step, grouping dims until their sizes' products agree (a flatten groups several input dims into one
    output dim, a split one input dim into several). A size-1 dim left over at the end joins the last group.
    Empty where the sizes do not match as a reshape would need."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        ins, outs = [i], [j]
        a, b = in_shape[i], out_shape[j]
        while a != b:
            if a < b and i + 1 < len(in_shape):
                i += 1
                ins.append(i)
                a *= in_shape[i]
            elif b < a and j + 1 < len(out_shape):
                j += 1
                outs.append(j)
                b *= out_shape[j]
            else:
                return ()
        groups.append((ins, outs))
        i, j = i + 1, j + 1
    if not groups:
        return ()
    groups[-1][0].extend(range(i, len(in_shape)))
    groups[-1][1].extend(range(j, len(out_shape)))
    return next((tuple(outs) for ins, outs in groups if dim in ins), ())
