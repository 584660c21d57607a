"""Shapes of shards: torch.chunk layout, uneven detection, and global shapes of a region's outputs.

DTensor lays a Shard(d) dim out like ``torch.chunk``: ``ceil(n / k)`` rows per rank until the rows run out
(10 rows on 4 ranks: 3, 3, 3, 1). With several mesh dims sharding the same tensor dim, the earlier mesh dim
splits first and each later one splits the blocks it was given.

A region's output only has local shapes. When every DTensor input is evenly sharded, outputs are taken to be
even too (global = local x mesh size; no communication, the same assumption as PyTorch's local_map). When any
input is unevenly sharded, the true global sizes are found by gathering every rank's local sizes of the sharded
output dims (one small all_gather per mesh dim), and the gathered layout is checked against DTensor's.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
from torch.distributed.tensor import DeviceMesh
from torch.distributed.tensor.placement_types import Placement, Shard

from localmap.compat import all_gather_stack, is_simulated, simulated_local, simulated_rank_map
from localmap.errors import CollectiveError, fail
from localmap.placements.specs import placements_str


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


def _local_size_matrix(tensors: Sequence[torch.Tensor], entries: Sequence[tuple[int, int]],
                       mesh: DeviceMesh) -> list:
    """Every rank's local sizes for (tensor index, dim) entries, as nested lists indexed [c0][c1]...[entry].

    One all_gather per mesh dim, innermost first, so that every rank ends with the whole table and so reaches
    the same conclusion (no rank can raise while the others go on).
    """
    device = tensors[0].device
    if any(is_simulated(t) for t in tensors):
        def sizes_on(rank: int) -> torch.Tensor:
            return torch.tensor([_size_on(tensors[i], rank, d) for i, d in entries], device=device)

        table = simulated_rank_map(sizes_on)
    else:
        table = torch.tensor([int(tensors[i].shape[d]) for i, d in entries], dtype=torch.int64, device=device)
        limit = collective_timeout()
        if limit is not None and not torch.compiler.is_compiling():  # a real process group: bounded waits
            for mesh_dim in reversed(range(mesh.ndim)):
                table = _all_gather_bounded(table, mesh, mesh_dim, limit)
            return table.tolist()
    for mesh_dim in reversed(range(mesh.ndim)):
        table = all_gather_stack(table, mesh, mesh_dim)
    return table.tolist()


def collective_timeout() -> float | None:
    """Seconds localmap's own collectives wait for the other ranks (LOCALMAP_COLLECTIVE_TIMEOUT), or None for
    the process group's timeout."""
    value = os.environ.get("LOCALMAP_COLLECTIVE_TIMEOUT")
    return float(value) if value else None


def _all_gather_bounded(t: torch.Tensor, mesh: DeviceMesh, mesh_dim: int, seconds: float) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(mesh.size(mesh_dim))]
    work = dist.all_gather(parts, t.contiguous(), group=mesh.get_group(mesh_dim), async_op=True)
    if not work.wait(timeout=timedelta(seconds=seconds)):
        raise TimeoutError(f"all_gather over mesh dim {mesh_dim} did not finish in {seconds:g}s")
    return torch.stack(parts)


def _size_on(t: torch.Tensor, rank: int, dim: int) -> int:
    return int(simulated_local(t)[rank].shape[dim]) if is_simulated(t) else int(t.shape[dim])


def _expected_layout(total: int, mesh_dims: Sequence[int], mesh_shape: Sequence[int]) -> torch.Tensor:
    """Local sizes DTensor expects at each coordinate of `mesh_dims` for a dim of `total` rows."""
    blocks = torch.tensor(total)
    for m in mesh_dims:
        n = mesh_shape[m]
        blocks = torch.tensor([chunk_sizes(int(b), n) for b in blocks.flatten().tolist()]).reshape(
            *blocks.shape, n)
    return blocks


def gather_global_shapes(tensors: Sequence[torch.Tensor], placements: Sequence[tuple[Placement, ...]],
                         mesh: DeviceMesh, paths: Sequence[str]) -> list[list[int]]:
    """Global shapes of uneven region outputs, from every rank's local sizes; checks DTensor's layout."""
    entries = [(i, d) for i, pl in enumerate(placements) for d in shard_dims(pl)]
    shapes = [list(t.shape) for t in tensors]
    if not entries:
        return shapes
    try:
        table = torch.tensor(_local_size_matrix(tensors, entries, mesh))  # [n0, ..., n_{k-1}, entries]
    except Exception as e:  # another rank failed, exited, or is in a different collective
        limit = collective_timeout()
        raise fail(paths[entries[0][0]], "could not gather every rank's shard sizes" + (
            f" within {limit:g}s" if limit else ""), mesh=mesh,
            given=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300],
            fix="another rank failed, exited, or called this region with other shapes or placements: see that "
                "rank's error (the wait is bounded by LOCALMAP_COLLECTIVE_TIMEOUT seconds, else the process "
                "group's timeout)", error=CollectiveError) from e
    mesh_shape = tuple(mesh.shape)
    for col, (i, d) in enumerate(entries):
        sizes = table[..., col]
        sharding = shard_dims(placements[i])[d]
        for m in range(mesh.ndim):
            if m in sharding:
                continue
            first = sizes.select(m, 0).unsqueeze(m)
            if not bool((sizes == first).all()):
                raise fail(paths[i], f"local sizes of dim {d} differ across ranks of a mesh dim that does "
                           f"not shard it", mesh=mesh, mesh_dim=m, expected="equal sizes",
                           given=sizes.movedim(m, 0).flatten(1).T.tolist(),
                           fix=f"shard dim {d} on that mesh dim too, or return the same size on every rank")
            sizes = first
        for m in reversed(range(mesh.ndim)):
            if m not in sharding:
                sizes = sizes.squeeze(m)
        total = int(sizes.sum())
        expected = _expected_layout(total, sharding, mesh_shape)
        if not torch.equal(sizes, expected):
            raise fail(paths[i], f"local sizes of dim {d} are not DTensor's chunk layout for {total} rows",
                       mesh=mesh, mesh_dim=sharding[-1], expected=expected.tolist(), given=sizes.tolist(),
                       fix="return shards cut like torch.chunk (ceil(n/k) rows per rank), or pad to even "
                           f"and claim {placements_str(placements[i])} on the padded size")
        shapes[i][d] = total
    return shapes


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
    return tuple(0 if s == 0 and n != 1 else d for s, n, d in zip(stride, shape, dense))


def avg_ranks(placements: Sequence[Placement], mesh: DeviceMesh) -> int:
    """Ranks averaged by Partial('avg') placements: a value that is the mean of n local values passes 1/n of
    its gradient to each of them."""
    from torch.distributed.tensor.placement_types import Partial

    n = 1
    for m, p in enumerate(placements):
        if isinstance(p, Partial) and p.reduce_op == "avg":
            n *= mesh.size(m)
    return n
