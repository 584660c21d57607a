"""Run code on a mesh for tests, examples and the demo: simulated in one process, or real gloo processes.

- ``simulated_mesh(shape, names)``: a context manager giving a DeviceMesh whose ranks are simulated in this
  process (PyTorch's LocalTensorMode over the fake process group). Every tensor op runs once per rank.
- ``fake_mesh(shape, names)``: a mesh of any size over the fake process group, for tracing (no values).
- ``run_gloo(fn, world_size, ...)``: spawns one process per rank over loopback, runs ``fn(mesh, *args)`` on
  each, and returns the per-rank results. Bounded by a timeout; process groups are always destroyed.
- ``distribute(t, mesh, placements)``: a DTensor of a global tensor, including Partial placements (split into
  unequal pieces that reduce to the value, so a mistaken reduction shows).
- ``full(x)``: the global value of a DTensor (or a simulated tensor) as one plain tensor.
- ``on_one_device()``: inside a simulated mesh, run plain single-device code (a reference computation, or
  making global inputs: under the simulation ``torch.randn`` draws different values on each rank).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, distribute_tensor

from localmap import compat as _compat
from localmap.compat import local_tensor_of

__all__ = ["simulated_mesh", "fake_mesh", "run_gloo", "distribute", "full", "on_one_device", "GlooError"]


@contextlib.contextmanager
def simulated_mesh(shape: int | Sequence[int], names: Sequence[str] | None = None) -> Iterator[DeviceMesh]:
    """A CPU DeviceMesh of `shape` simulated in this process. Leaves no process group behind."""
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
        if _compat.is_simulated(local_tensor_of(x)):
            return _assemble(x)
        x = x.full_tensor()
    x = _compat.reconcile(x)
    with on_one_device():
        return x.detach().clone()


def _assemble(x: DTensor) -> torch.Tensor:
    from localmap.program.split import join

    problems: list[str] = []
    locals_ = _compat.simulated_local(local_tensor_of(x))
    with on_one_device():
        values = {coord: locals_[rank].detach().clone() for rank, coord in _mesh_coordinates(x.device_mesh).items()}
        out = join(values, x.placements, tuple(x.device_mesh.shape), problems.append)
    if problems:
        raise AssertionError(f"full: a Replicate value must be the same on every rank: {problems[0]}")
    return out


# ---- real processes -----------------------------------------------------------------------------------------

class GlooError(RuntimeError):
    """A rank failed or the run timed out in run_gloo. ``outcomes``: rank -> (ok, result or traceback) of the
    ranks that reported."""

    outcomes: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, mesh_shape: tuple[int, ...], names: Any,
                 timeout: float, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCALMAP_COLLECTIVE_TIMEOUT=str(timeout))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        try:
            mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
            results.put((rank, True, fn(mesh, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))


def run_gloo(fn: Callable[..., Any], world_size: int, mesh_shape: Sequence[int] | None = None,
             mesh_dim_names: Sequence[str] | None = None, args: tuple = (), timeout: float = 120.0,
             collective_timeout: float | None = None, wait_all: bool = False) -> list[Any]:
    """Run ``fn(mesh, *args)`` in `world_size` gloo processes on loopback; return results ordered by rank.

    `fn` and its results must be picklable (a module-level function). Raises GlooError naming each failing
    rank, or when the run exceeds `timeout` seconds; every process is ended either way.

    `collective_timeout` (default: the LOCALMAP_COLLECTIVE_TIMEOUT environment variable, else `timeout`) bounds
    every collective in the ranks (the process group's timeout, and localmap's own collectives), so a rank
    waiting for a failed or departed peer fails with an error instead of hanging. With `wait_all`, the run
    waits for every rank's outcome (each bounded by that timeout) instead of stopping the others at the first
    failure; GlooError.outcomes then holds rank -> (ok, result or traceback).
    """
    if collective_timeout is None:
        env = os.environ.get("LOCALMAP_COLLECTIVE_TIMEOUT")
        collective_timeout = float(env) if env else timeout
    shape = tuple(mesh_shape) if mesh_shape else (world_size,)
    if math.prod(shape) != world_size:
        raise ValueError(f"run_gloo: mesh_shape {shape} does not hold {world_size} ranks")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_gloo_worker, daemon=True,
                    args=(r, world_size, port, shape, tuple(mesh_dim_names) if mesh_dim_names else None,
                          collective_timeout, fn, tuple(args), results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[bool, Any]] = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                err = GlooError(f"run_gloo: timed out after {timeout:.0f}s; ranks {sorted(got)} finished")
                err.outcomes = dict(got)
                raise err
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
                got[rank] = (ok, value)
                if not ok and not wait_all:  # the other ranks may now wait in a collective: stop them
                    break
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in got]
                if dead and not wait_all:
                    raise GlooError(f"run_gloo: ranks {dead} died (exit codes "
                                    f"{[procs[r].exitcode for r in dead]}) without reporting") from None
                for r in dead:
                    got[r] = (False, f"exited with code {procs[r].exitcode} without reporting")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = {r: v for r, (ok, v) in got.items() if not ok}
    if failures:
        err = GlooError("run_gloo: " + "\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failures.items())))
        err.outcomes = dict(got)
        raise err
    return [got[r][1] for r in range(world_size)]
