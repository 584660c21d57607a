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
import os
import sys
import threading
from typing import Iterator

from torch.distributed.device_mesh import DeviceMesh

_local = threading.local()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def use_mesh(mesh: DeviceMesh) -> Iterator[DeviceMesh]:
    """Set the default mesh for regions that give no ``device_mesh`` (nestable, per thread)."""
    if not isinstance(mesh, DeviceMesh):
        from ._errors import fail

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


def call_site() -> str:
    """file:line of the innermost caller outside localmap's machinery and torch (where the user called the
    region). localmap's own models and demo count as user code."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        internal = path.startswith(_PACKAGE_DIR) and (
            os.path.basename(path).startswith("_") or os.path.basename(path) == "hop.py")
        if not internal and f"{os.sep}torch{os.sep}" not in path and "contextlib" not in path:
            rel = os.path.relpath(path)
            return f"{path if rel.startswith('..') else rel}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


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
