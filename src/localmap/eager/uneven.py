"""Uneven shards in eager regions: the true global shapes of a region's outputs, gathered from every rank.

A region's output only has local shapes. When every DTensor input is evenly sharded, outputs are taken to be
even too (global = local x mesh size; no communication, the same assumption as PyTorch's local_map). When any
input is unevenly sharded, the true global sizes are found by gathering every rank's local sizes of the sharded
output dims (one small all_gather per mesh dim, innermost first, so every rank holds the whole table and reaches
the same verdict), and the gathered layout is checked against DTensor's.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any, Sequence

import torch
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor.placement_types import Placement

from localmap.caches import register_cache
from localmap import compat
from localmap.errors import PEER_FIX, CollectiveError, fail
from localmap.placements.shapes import chunk_sizes, is_uneven, shard_dims
from localmap.placements.specs import placements_str

SPEC_MEMO_LIMIT = 4096  # DTensor specs whose evenness is remembered (cleared when full)
_uneven_by_spec: dict[int, tuple[Any, bool]] = register_cache("uneven_specs", {}, limit=SPEC_MEMO_LIMIT,
                                                               eviction="clear when full")


def is_uneven_spec(spec: Any) -> bool:
    """is_uneven of a DTensor spec, remembered per spec object (DTensor specs are shared and immutable)."""
    hit = _uneven_by_spec.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    result = is_uneven(spec.shape, spec.placements, spec.mesh)
    if len(_uneven_by_spec) > SPEC_MEMO_LIMIT:
        _uneven_by_spec.clear()
    _uneven_by_spec[id(spec)] = (spec, result)
    return result


def plain_stride(t: torch.Tensor) -> tuple[int, ...]:
    """The local stride as plain ints. On the simulated mesh ranks holding different sizes (an empty shard
    next to a full one) report per-rank strides; rank 0's orders the dims as every rank does."""
    if compat.is_simulated(t):
        return compat.simulated_local(t)[0].stride()
    return t.stride()


def uneven_mesh_dims(dtensors: Sequence[DTensor]) -> frozenset:
    """Mesh dims on which some input's shards differ in size (read by the check: means over such dims)."""
    out: set[int] = set()
    for a in dtensors:
        for d, mesh_dims in shard_dims(a.placements).items():
            if a.shape[d] % math.prod(a.device_mesh.size(m) for m in mesh_dims):
                out.update(mesh_dims)
    return frozenset(out)


def _local_size_matrix(tensors: Sequence[torch.Tensor], entries: Sequence[tuple[int, int]],
                       mesh: DeviceMesh) -> list:
    """Every rank's local sizes for (tensor index, dim) entries, as nested lists indexed [c0][c1]...[entry].

    One all_gather per mesh dim, innermost first, so that every rank ends with the whole table and so reaches
    the same conclusion (no rank can raise while the others go on).
    """
    device = tensors[0].device
    if any(compat.is_simulated(t) for t in tensors):
        def sizes_on(rank: int) -> torch.Tensor:
            return torch.tensor([_size_on(tensors[i], rank, d) for i, d in entries], device=device)

        table = compat.simulated_rank_map(sizes_on)
    else:
        table = torch.tensor([int(tensors[i].shape[d]) for i, d in entries], dtype=torch.int64, device=device)
        limit = collective_timeout()
        if limit is not None and not torch.compiler.is_compiling():  # a real process group: bounded waits
            for mesh_dim in reversed(range(mesh.ndim)):
                table = _all_gather_bounded(table, mesh, mesh_dim, limit)
            return table.tolist()
    for mesh_dim in reversed(range(mesh.ndim)):
        table = compat.all_gather_stack(table, mesh, mesh_dim)
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
    return int(compat.simulated_local(t)[rank].shape[dim]) if compat.is_simulated(t) else int(t.shape[dim])


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
            fix=PEER_FIX, error=CollectiveError) from e
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
