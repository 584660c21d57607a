"""Per-thread context that regions read while a program is traced or checked.

- ``use_mesh(mesh)``: the default mesh of regions that give none (traced regions; eager regions take the mesh
  of their DTensor arguments).
- a *recorder* (set by ``capture``): the operator appends one record per region call it builds, so the
  captured program can name each region's call site and graphs.
- a *reference recorder* (set by ``verify``): regions running inlined on one device record their outputs and
  their inputs' gradients, to compare region by region with the captured program's ``run``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from torch.distributed.device_mesh import DeviceMesh

_local = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: DeviceMesh) -> Iterator[DeviceMesh]:
    """Set the default mesh for regions that give no ``device_mesh`` (nestable, per thread)."""
    if not isinstance(mesh, DeviceMesh):
        from localmap.errors import fail

        raise fail("use_mesh", "needs a DeviceMesh", given=type(mesh).__name__, fix="pass init_device_mesh(...)")
    stack = _stack("meshes")
    stack.append(mesh)
    try:
        yield mesh
    finally:
        stack.pop()


def default_mesh() -> DeviceMesh | None:
    stack = _stack("meshes")
    return stack[-1] if stack else None


def _stack(name: str) -> list:
    stack = getattr(_local, name, None)
    if stack is None:
        stack = []
        setattr(_local, name, stack)
    return stack


@contextlib.contextmanager
def recording(kind: str) -> Iterator[list]:
    """Collect region records of `kind` ("capture" or "reference") made on this thread inside the block."""
    records: list = []
    stack = _stack(kind)
    stack.append(records)
    try:
        yield records
    finally:
        stack.pop()


def recorder(kind: str) -> list | None:
    stack = _stack(kind)
    return stack[-1] if stack else None


# The mesh of the region whose body is running (or being traced), for localmap.collectives.
def push_region_mesh(mesh: DeviceMesh) -> None:
    _stack("region_meshes").append(mesh)


def pop_region_mesh() -> None:
    _stack("region_meshes").pop()


def enclosing_region_mesh() -> DeviceMesh | None:
    """The mesh of the region whose body is being run or traced on this thread (None outside bodies)."""
    stack = _stack("region_meshes")
    return stack[-1] if stack else None


def region_mesh() -> DeviceMesh | None:
    """The enclosing region's mesh, else the default mesh (use_mesh)."""
    return enclosing_region_mesh() or default_mesh()


@contextlib.contextmanager
def in_region(mesh: DeviceMesh) -> Iterator[None]:
    push_region_mesh(mesh)
    try:
        yield
    finally:
        pop_region_mesh()
