"""Per-thread context that regions read while a program is traced or checked.

- ``use_mesh(mesh)``: the default mesh of regions that give none (traced regions; eager regions take the mesh
  of their DTensor arguments).
- a *recorder* (set by ``capture``): the operator appends one record per region call it builds, so the
  captured program can name each region's call site and graphs.
- a *reference recorder* (set by ``verify``): regions running inlined on one device record their outputs and
  their inputs' gradients, to compare region by region with the captured program's ``run``.
- *program parameters* (set by ``capture`` and verify's reference): the plain global tensors standing in for a
  module's DTensor parameters and buffers, so a body that closes over one gets it as a region input.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

from torch.distributed.device_mesh import DeviceMesh

_local = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: DeviceMesh) -> Iterator[DeviceMesh]:
    """Set the default mesh for regions that give no ``device_mesh`` (nestable, per thread)."""
    if not isinstance(mesh, DeviceMesh):
        from localmap.errors import fail

        raise fail("use_mesh", "needs a DeviceMesh", given=type(mesh).__name__, fix="pass init_device_mesh(...)")
    with pushed("meshes", mesh):
        yield mesh


def default_mesh() -> DeviceMesh | None:
    return innermost("meshes")


# What a thread's context holds ("program_params": stand-ins for a captured module's DTensors, traced.closure).
# "check_modes": a check mode that overrides every region's own check= while a program is captured (inspect's
# --check).
# "region_anchors": a local input of each compiled region body on a simulated mesh (see region_anchor).
STACKS = ("meshes", "capture", "reference", "region_meshes", "partitioners", "region_operators", "program_params",
          "check_modes", "region_anchors")


def stack(name: str) -> list:
    """This thread's stack `name` (one of STACKS), innermost last; callers push and pop in try/finally."""
    found = getattr(_local, name, None)
    if found is None:
        found = []
        setattr(_local, name, found)
    return found


@contextlib.contextmanager
def pushed(name: str, value: Any) -> Iterator[Any]:
    """`value` on this thread's stack `name` for the block (popped on exit, also on error)."""
    entries = stack(name)
    entries.append(value)
    try:
        yield value
    finally:
        entries.pop()


def innermost(name: str, default: Any = None) -> Any:
    """The top of this thread's stack `name`, else `default`."""
    entries = stack(name)
    return entries[-1] if entries else default


def thread_state() -> dict[str, int]:
    """Depth of each of this thread's context stacks: default meshes (use_mesh), capture and reference
    recorders, running region bodies, defer_inlining. All 0 outside localmap's calls; tests check that
    nothing leaks after an error."""
    return {name: len(stack(name)) for name in STACKS}


@contextlib.contextmanager
def recording(kind: str) -> Iterator[list]:
    """Collect region records of `kind` ("capture" or "reference") made on this thread inside the block."""
    with pushed(kind, []) as records:
        yield records


def recorder(kind: str) -> list | None:
    return innermost(kind)


# The mesh of the region whose body is running (or being traced), for localmap.collectives.
def push_region_mesh(mesh: DeviceMesh) -> None:
    stack("region_meshes").append(mesh)


def pop_region_mesh() -> None:
    stack("region_meshes").pop()


def enclosing_region_mesh() -> DeviceMesh | None:
    """The mesh of the region whose body is being run or traced on this thread (None outside bodies)."""
    return innermost("region_meshes")


def region_mesh() -> DeviceMesh | None:
    """The enclosing region's mesh, else the default mesh (use_mesh)."""
    return enclosing_region_mesh() or default_mesh()


def region_anchor() -> Any:
    """A local input of the compiled region body being traced on a simulated mesh, else None. On that path a
    tensor a factory makes (torch.arange) is not per rank in AOT autograd's trace and cannot meet the body's
    simulated values (docs/compile.md, item 4); localmap.collectives make their index tensors from this one."""
    return innermost("region_anchors")


@contextlib.contextmanager
def in_region(mesh: DeviceMesh) -> Iterator[None]:
    with pushed("region_meshes", mesh):
        yield


@contextlib.contextmanager
def checking(mode: Any) -> Iterator[Any]:
    """Every region traced in the block is checked with `mode` (a check= value) instead of its own."""
    with pushed("check_modes", mode):
        yield mode


def check_mode(own: Any) -> Any:
    """The check mode a traced region uses: the innermost `checking(...)` override, else its own."""
    return innermost("check_modes", own)

