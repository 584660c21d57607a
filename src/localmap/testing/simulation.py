"""The simulated mesh (every rank in this process) and DTensors of global values on it."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, distribute_tensor

from localmap import compat as _compat
from localmap.compat import local_tensor_of
from localmap.errors import LocalMapError



@contextlib.contextmanager
def simulated_mesh(shape: int | Sequence[int], names: Sequence[str] | None = None) -> Iterator[DeviceMesh]:
    """A CPU DeviceMesh of `shape` simulated in this process. Leaves no process group behind, nor DTensor
    sharding-propagation cache entries holding its mesh."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    world = math.prod(shape)
    if dist.is_initialized():
        raise RuntimeError("simulated_mesh needs no process group to be initialized; destroy it first")
    _compat.fake_process_group(world)
    try:
        with _compat.local_tensor_mode(world):
            yield init_device_mesh("cpu", shape, mesh_dim_names=tuple(names) if names else None)
    finally:
        dist.destroy_process_group()
        _compat.forget_ended_world()


@contextlib.contextmanager
def fake_mesh(shape: int | Sequence[int], names: Sequence[str] | None = None) -> Iterator[DeviceMesh]:
    """A DeviceMesh over the fake process group, for tracing only (no values): any size, e.g. 2048 ranks as
    (8, 8, 4, 8). This process is rank 0. Leaves no process group behind."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dist.is_initialized():
        raise RuntimeError("fake_mesh needs no process group to be initialized; destroy it first")
    _compat.fake_process_group(math.prod(shape))
    try:
        yield init_device_mesh("cpu", shape, mesh_dim_names=tuple(names) if names else None)
    finally:
        dist.destroy_process_group()
        _compat.forget_ended_world()


def on_one_device() -> contextlib.AbstractContextManager:
    """Plain single-device execution inside a simulated mesh (a no-op outside one)."""
    return _compat.outside_simulation()


def _mesh_coordinates(mesh: DeviceMesh) -> dict[int, tuple[int, ...]]:
    ranks = mesh.mesh
    return {int(ranks[idx]): idx for idx in
            (tuple(int(i) for i in c) for c in torch.cartesian_prod(
                *[torch.arange(n) for n in ranks.shape]).reshape(-1, ranks.ndim))}


def _partial_weights(mesh: DeviceMesh, placements: Sequence[Placement]) -> dict[int, float]:
    """rank -> factor, with factors over each Partial mesh dim unequal and reducing to 1 (sum) or n (avg)."""
    coords = _mesh_coordinates(mesh)
    weights = {}
    for rank, coord in coords.items():
        w = 1.0
        for m, p in enumerate(placements):
            if isinstance(p, Partial):
                n = mesh.size(m)
                raw = [float(k + 1) for k in range(n)]
                scale = (n if p.reduce_op == "avg" else 1) / sum(raw)
                w *= raw[coord[m]] * scale
        weights[rank] = w
    return weights


def distribute(t: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Placement],
               requires_grad: bool = False) -> DTensor:
    """A DTensor holding global tensor `t` with `placements` (Shard, Replicate, Partial 'sum' or 'avg')."""
    placements = tuple(placements)
    partial = [m for m, p in enumerate(placements) if isinstance(p, Partial)]
    for m in partial:
        if placements[m].reduce_op not in ("sum", "avg"):
            raise ValueError(f"distribute: Partial({placements[m].reduce_op!r}) is not supported here")
    base = tuple(Replicate() if isinstance(p, Partial) else p for p in placements)
    d = distribute_tensor(t.detach(), mesh, base)
    if _compat.simulation_active() and not _compat.is_simulated(local_tensor_of(d)):
        # Give every simulated rank its own copy, so collectives on it (a Partial reduction) count every rank.
        local = local_tensor_of(d)
        d = DTensor.from_local(_compat.simulated_rank_map(lambda r: local.clone()), mesh, base, run_check=False,
                               shape=d.shape, stride=d.stride())
    if partial:
        local = local_tensor_of(d)
        weights = _partial_weights(mesh, placements)
        if _compat.simulation_active():
            def piece(r: int) -> torch.Tensor:
                mine = _compat.simulated_local(local)[r] if _compat.is_simulated(local) else local
                return mine * weights[r]

            pieces = _compat.simulated_rank_map(piece)
        else:
            pieces = local * weights[dist.get_rank()]
        d = DTensor.from_local(pieces, mesh, placements, run_check=False, shape=d.shape, stride=d.stride())
    return d.requires_grad_(requires_grad)


def full(x: torch.Tensor) -> torch.Tensor:
    """The global value of a DTensor (or a simulated tensor that is the same on every rank), plain.

    On the simulated mesh a DTensor is put together from every rank's local tensor by its placements (Shard:
    concatenated in mesh order, Partial: reduced, Replicate: every rank must agree), without DTensor's own
    redistribution, which fails in the simulation for a dim sharded on several mesh dims with empty shards."""
    if isinstance(x, DTensor):
        from localmap.program.split import global_value

        try:
            x = global_value(x)
        except LocalMapError as e:
            raise AssertionError(f"full: a Replicate value must be the same on every rank: {e}") from e
    x = _compat.reconcile(x)
    with on_one_device():
        return x.detach().clone()
