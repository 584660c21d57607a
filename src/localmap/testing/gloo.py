"""Real processes: ``run_gloo`` spawns one gloo process per rank over loopback, bounded by timeouts."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


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


# NOTE: rank processes start from a fork server that has imported torch and localmap once (per parent process),
# not from a fresh interpreter each: importing torch is most of a rank's start-up (about 3 s of CPU each), and a
# test suite starts hundreds of ranks. The server is forked before any of torch's thread pools exist, so a rank is
# as clean as a spawned one; "spawn" stays where there is no fork (LOCALMAP_GLOO_START=spawn forces it).
def _process_context() -> Any:
    method = os.environ.get("LOCALMAP_GLOO_START") or (
        "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed", "localmap"])
    return ctx


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
    ctx = _process_context()
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
    try:
        got = _collect(procs, results, time.monotonic() + timeout, timeout, wait_all)
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


def _collect(procs: list, results: Any, deadline: float, timeout: float, wait_all: bool) -> dict:
    """rank -> (ok, result or traceback) as the ranks report, until all did, one failed (unless `wait_all`),
    a rank died without reporting, or the deadline passed."""
    got: dict[int, tuple[bool, Any]] = {}
    while len(got) < len(procs):
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
    return got
