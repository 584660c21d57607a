"""Tensors a region's body closes over: DTensor parameters and buffers it reads from modules, not arguments.

torchtitan's MoE body reads its expert weights as ``self.w1.to_local()``. Such a tensor is an input of the region
like an argument, with the DTensor's placements: the traced path gives the region node an extra input for it,
the check types it, and verify's reference gives the body the full tensor.

A body reaches them through the module a method is bound to, modules and tensors in its closure cells, and a
partial's function and arguments (every submodule of those modules included). While ``capture`` traces a
module (or verify's reference runs it), the module's DTensor parameters and buffers are *stand-ins*: plain
global tensors registered with ``program_params`` (their name, mesh and placements); a body that reads one sees
a DTensor again (``rebound``), whose local tensor is the region's input. A DTensor the module holds anywhere
else (a list, a plain object, a global) has no stand-in: read by ``to_local()`` during capture, it is refused,
named (``real_dtensors_refused``).
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from localmap import context
from localmap.check.closure import module_tensors, own_tensors, reachable
from localmap.compat import make_dtensor, make_spec, to_local_of_real_refused
from localmap.errors import fail
from localmap.placements.specs import placements_str


@dataclass(frozen=True)
class ParamInfo:
    """What a stand-in stands for: a DTensor parameter or buffer's name, mesh and placements."""

    name: str
    mesh: DeviceMesh
    placements: tuple


@dataclass
class Closed:
    """One tensor a body closes over, and everywhere the body reads it."""

    value: torch.Tensor  # what the body finds now: a stand-in (capture, reference) or a DTensor (eagerly)
    info: ParamInfo
    sites: list = field(default_factory=list)  # (module, attribute name) or (closure cell, None)

    @property
    def path(self) -> str:
        return self.info.name


@contextlib.contextmanager
def program_params(table: dict[int, tuple[torch.Tensor, ParamInfo]]) -> Iterator[dict]:
    """Register stand-ins (by id; the table keeps them alive) while a program is traced or its reference runs.
    The table may be filled after entering (capture learns its stand-ins inside the trace)."""
    with context.pushed("program_params", table):
        yield table


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a captured module's program takes before its arguments, by qualified name: its parameters, its
    buffers, and the DTensors it holds as plain attributes (a body reads them like parameters: each rank must
    get its own shard, not one rank's shard frozen into the graph). One order for capture, run and verify."""
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    state.update((n, t) for n, t in module_tensors(module) if n not in state and isinstance(t, DTensor))
    return state


@contextlib.contextmanager
def real_dtensors_refused(fn: Any) -> Iterator[None]:
    """While `fn` is captured: a ``to_local()`` of a DTensor that is no program input is refused, named by where
    `fn` holds it. Traced on fake tensors, its real shard (this process's, or a simulated mesh's per-rank ones)
    would be a constant of the program, so every rank's body would read the same frozen shard."""
    def refuse(d: DTensor) -> None:
        path = held_at(fn, d)
        raise fail(path or "a DTensor", "is a DTensor read by to_local() while capturing that is no input of the "
                   "captured program: its shard would be frozen into the program as a constant, the same on every "
                   "rank", given=f"{tuple(d.shape)} {placements_str(d.placements)} on mesh {tuple(d.device_mesh.shape)}"
                   + ("" if path else " (held where capture does not look)"),
                   fix="register it as a parameter or buffer of the captured module (nn.Parameter, register_buffer) "
                       "or hold it as a plain attribute of one of its modules (those are program inputs, each rank "
                       "reading its own shard); or pass it to the region as an argument")

    with to_local_of_real_refused(refuse):
        yield


_SEARCH_DEPTH = 6  # attributes and container levels walked to name a DTensor
_SEARCH_LIMIT = 20_000  # objects visited at most


def held_at(root: Any, target: Any) -> str | None:
    """Where `root` holds `target`: a path of attributes, container keys and names a function closes over
    (``ws[0]``, ``cfg.w``, ``G['w']``), reached from a module's attributes or a function's closure; None when
    not found."""
    todo = [(path, value) for path, value in _held_by(root, "")]
    seen: set[int] = {id(root)}
    depth = 0
    while todo and depth < _SEARCH_DEPTH and len(seen) < _SEARCH_LIMIT:
        found = next((path for path, value in todo if value is target), None)
        if found is not None:
            return found
        fresh = [(p, v) for p, v in todo if id(v) not in seen and not isinstance(v, torch.Tensor)]
        seen.update(id(v) for _, v in fresh)
        todo = [(q, w) for p, v in fresh for q, w in _held_by(v, p)]
        depth += 1
    return None


def _held_by(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of what `obj` holds: a container's items, an object's attributes (a module's parameters,
    buffers and submodules by their names), what a function reads (check.closure.reachable)."""
    def at(name: str) -> str:
        return f"{path}.{name}" if path else name

    if isinstance(obj, dict):
        yield from ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        yield from ((f"{path}[{k}]", v) for k, v in enumerate(obj))
    elif callable(obj) and not isinstance(obj, (torch.nn.Module, type)) and _reads_code(obj):
        yield from ((name, value) for name, value, _ in reachable(obj))
    elif not isinstance(obj, (type, types.ModuleType)) and hasattr(obj, "__dict__"):
        attrs = dict(vars(obj))
        if isinstance(obj, torch.nn.Module):
            for slot in ("_parameters", "_buffers", "_modules"):
                attrs.update(attrs.pop(slot, {}))
        yield from ((at(k), v) for k, v in attrs.items() if v is not None)


def _reads_code(obj: Any) -> bool:
    return hasattr(obj, "__code__") or hasattr(obj, "__func__") or isinstance(obj, functools.partial)


def stand_in(value: Any) -> ParamInfo | None:
    """What `value` stands for, when it is a registered stand-in on this thread."""
    for table in reversed(context.stack("program_params")):
        hit = table.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
    return None


def closed_over(func: Callable, dtensors: bool = False) -> list[Closed]:
    """The stand-ins `func` closes over (and, with `dtensors`, the DTensors too: the eager check), once each,
    in the order first reached."""
    found: dict[int, Closed] = {}
    for owner, attr, value, path in _reachable(func):
        info = stand_in(value)
        if info is None and dtensors and isinstance(value, DTensor):
            info = ParamInfo(path, value.device_mesh, tuple(value.placements))
        if info is None:
            continue
        found.setdefault(id(value), Closed(value, info)).sites.append((owner, attr))
    return list(found.values())


def unregistered_dtensors(func: Callable) -> list[str]:
    """Paths of DTensors `func` closes over that are no program input (capture cannot give them values)."""
    return [path for _, _, value, path in _reachable(func) if isinstance(value, DTensor)]


def _reachable(func: Any) -> Iterator[tuple[Any, str | None, torch.Tensor, str]]:
    """(owner, attribute, tensor, path) for every tensor reachable from func without arguments."""
    modules: list[tuple[torch.nn.Module, str]] = []
    for root, prefix in _roots(func):
        if isinstance(root, torch.nn.Module):
            modules.append((root, prefix))
        elif isinstance(root, tuple):  # (cell, name): a tensor in a closure cell
            yield root[0], None, root[0].cell_contents, root[1]
    seen: set[int] = set()
    for root, prefix in modules:
        for name, mod in root.named_modules(remove_duplicate=False):
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            here = f"{prefix}.{name}" if name else prefix
            for attr, t in own_tensors(mod):
                yield mod, attr, t, f"{here}.{attr}"


def _roots(func: Any) -> Iterator[tuple[Any, str]]:
    """The modules `func` reaches without arguments, and its closure cells holding a tensor as ((cell, name), "")
    (``check.closure.reachable``; module globals and defaults are not program inputs)."""
    for path, value, cell in reachable(func, through_globals=False):
        if isinstance(value, torch.nn.Module):
            yield value, path
        elif cell is not None and isinstance(value, torch.Tensor):
            yield (cell, path), ""


@contextlib.contextmanager
def rebound(closed: Sequence[Closed], values: Sequence[Any]) -> Iterator[None]:
    """While the body runs, every site of each closed-over tensor reads the matching value. A module attribute
    is shadowed through the instance dict (read before nn.Module's parameter lookup), a cell is rewritten."""
    undo: list[Callable[[], None]] = []
    try:
        for c, v in zip(closed, values, strict=True):
            for owner, attr in c.sites:
                undo.append(_rebind(owner, attr, v))
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _rebind(owner: Any, attr: str | None, value: Any) -> Callable[[], None]:
    if attr is None:
        old = owner.cell_contents
        owner.cell_contents = value
        return lambda: setattr(owner, "cell_contents", old)
    slots = vars(owner)
    missing = object()
    old = slots.get(attr, missing)
    slots[attr] = value

    def restore() -> None:
        if old is missing:
            slots.pop(attr, None)
        else:
            slots[attr] = old

    return restore


def as_dtensor(local: torch.Tensor, info: ParamInfo, shape: Sequence[Any], stride: Sequence[Any]) -> DTensor:
    """The DTensor a body reads for a closed-over tensor while it is traced: `local` is its local tensor (a
    region input). Wrapped directly: from_local asks the mesh for this rank's coordinate, which a simulated mesh
    computes from tensor values a trace cannot read."""
    spec = make_spec(info.mesh, tuple(info.placements), shape, stride, local.dtype)
    return make_dtensor(local, spec, requires_grad=False)


def as_full_dtensor(full: torch.Tensor, info: ParamInfo) -> DTensor:
    """On one device (verify's reference) the body's ``.to_local()`` is the full tensor: replicated."""
    return DTensor.from_local(full, info.mesh, tuple(Replicate() for _ in range(info.mesh.ndim)), run_check=False)


def region_placements(info: ParamInfo, mesh: DeviceMesh) -> tuple:
    """The closed-over tensor's placements on the region's mesh: its own mesh's, or, on a sub-mesh (dims by
    name), its placements on those dims and Replicate on the others."""
    if info.mesh is mesh or info.mesh == mesh:
        return tuple(info.placements)
    names, own = mesh.mesh_dim_names or (), info.mesh.mesh_dim_names or ()
    if own and set(own) <= set(names):
        by_name = dict(zip(own, info.placements))
        return tuple(by_name.get(n, Replicate()) for n in names)
    raise fail(info.name, "is a DTensor a region's body reads on a mesh the region's mesh does not contain",
               expected=f"the region's mesh {tuple(mesh.shape)} {names} or a sub-mesh of it by dim names",
               given=f"mesh {tuple(info.mesh.shape)} {own} with {placements_str(info.placements)}",
               fix="put the parameter on the region's mesh (or a named sub-mesh), or pass it as an argument")


class Lifted:
    """Closed-over tensors as extra region inputs: names for messages, and `bind(locals)`, in which the body
    reads a DTensor over each given local tensor (the check's and the body trace's fakes)."""

    def __init__(self, closed: Sequence[Closed]) -> None:
        self.closed = list(closed)
        self.paths = [c.path for c in self.closed]

    def bind(self, values: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
        return rebound(self.closed, [as_dtensor(v, c.info, c.value.shape, c.value.stride())
                                     for v, c in zip(values, self.closed, strict=True)])
