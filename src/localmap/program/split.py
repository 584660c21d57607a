"""A global value's per-rank pieces by placements, and the global value from every rank's piece.

Shard: DTensor's torch.chunk slices (and concatenation back); Replicate: the value (rank 0's back, the others
checked equal); Partial: unequal pieces that reduce to the value (so a mistaken reduction shows), reduced back.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import torch
from torch.distributed.tensor.placement_types import Partial, Placement, Shard

from localmap import compat as _compat
from localmap.errors import fail
from localmap.placements.shapes import chunk_sizes


def coordinates(mesh_shape: Sequence[int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*[range(n) for n in mesh_shape]))


def _partial_piece(value: torch.Tensor, p: Partial, n: int, c: int) -> torch.Tensor:
    """Rank c's piece of a Partial value: unequal shares that reduce back to the value."""
    op = p.reduce_op
    if op in ("sum", "avg"):
        share = (c + 1) / (n * (n + 1) / 2) * (n if op == "avg" else 1)
        return value * share
    if op == "max":
        return value if c == 0 else value - 1 - c
    if op == "min":
        return value if c == 0 else value + 1 + c
    raise fail("run", f"Partial({op!r}) inputs are not supported by run", fix="use sum, avg, max or min")


def split(value: Any, placements: Sequence[Placement] | None, mesh_shape: Sequence[int],
          coord: Sequence[int]) -> Any:
    """Rank `coord`'s local piece of a global value."""
    if not isinstance(value, torch.Tensor) or placements is None:
        return value
    for m, p in enumerate(placements):
        if isinstance(p, Shard):
            sizes = chunk_sizes(value.shape[p.dim], mesh_shape[m])
            value = value.narrow(p.dim, sum(sizes[:coord[m]]), sizes[coord[m]])
        elif isinstance(p, Partial):
            value = _partial_piece(value, p, mesh_shape[m], coord[m])
    return value


def join(values: dict[tuple, Any], placements: Sequence[Placement] | None, mesh_shape: Sequence[int],
         note: Callable[[str], None]) -> Any:
    """The global value from every rank's local value, innermost mesh dim first."""
    if placements is None:
        return values[tuple(0 for _ in mesh_shape)]
    for m in reversed(range(len(mesh_shape))):
        p = placements[m]
        grouped: dict[tuple, list] = {}
        for coord in sorted(values):
            grouped.setdefault(coord[:m] + coord[m + 1:], []).append(values[coord])
        joined = {}
        for rest, parts in grouped.items():
            joined[rest[:m] + (0,) + rest[m:]] = _join_dim(parts, p, m, note)
        values = joined
    return next(iter(values.values()))


def _join_dim(parts: list, p: Placement, m: int, note: Callable[[str], None]) -> Any:
    if not isinstance(parts[0], torch.Tensor):
        return parts[0]
    if isinstance(p, Shard):
        return torch.cat(parts, dim=p.dim)
    if isinstance(p, Partial):
        stacked = torch.stack(parts)
        return {"sum": stacked.sum(0), "avg": stacked.mean(0), "max": stacked.amax(0),
                "min": stacked.amin(0)}[p.reduce_op]
    first = parts[0]
    if any(not torch.allclose(first, q, rtol=1e-4, atol=1e-5) for q in parts[1:]):
        note(f"claimed Replicate on mesh dim {m} but ranks hold different values")
    return first




def global_value(d: Any) -> torch.Tensor:
    """A DTensor's global value as one plain tensor: on the simulated mesh put together from every rank's local
    tensor by its placements (DTensor's own redistribution fails there for a dim sharded on several mesh dims
    with empty shards; a Replicate value must agree on every rank), else DTensor's full_tensor()."""
    local = _compat.local_tensor_of(d)
    if not _compat.is_simulated(local):
        return _compat.reconcile(d.full_tensor())
    problems: list[str] = []
    per_rank = _compat.simulated_local(local)
    ranks = d.device_mesh.mesh
    with _compat.outside_simulation():
        values = {c: per_rank[int(ranks[c])].detach().clone() for c in coordinates(tuple(ranks.shape))}
        out = join(values, d.placements, tuple(ranks.shape), problems.append)
    if problems:
        raise fail("a DTensor's global value", "has Replicate ranks that hold different values", given=problems[0],
                   fix="make every rank hold the same value on its Replicate mesh dims")
    return out
