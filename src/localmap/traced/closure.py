"""Tensors a region's body closes over: DTensor parameters and buffers it reads from modules, not arguments.

torchtitan's MoE body reads its expert weights as ``self.w1.to_local()``. Such a tensor is an input of the region
like an argument, with the DTensor's placements: the traced path gives the region node an extra input for it,
the check types it, and verify's reference gives the body the full tensor.

A body reaches them as ``check.closure.held_tensors`` walks it: the module a method is bound to, closure cells,
a partial's function and arguments, the globals its code names, and what those hold (submodules, lists, tuples,
dicts, plain objects such as a config namespace). While ``capture`` traces a module (or verify's reference runs
it), the DTensors of its state (``module_state``: parameters, buffers, DTensors held as attributes, in containers
and plain objects it holds, or in the globals its classes' code names) are *stand-ins*: plain global tensors
registered with ``program_params`` (their name, mesh and placements), put wherever the module holds them
(``holding``); a body that reads one sees a DTensor again (``rebound``), whose local tensor is the region's input.
A DTensor held where that walk does not reach or cannot rebind (a generator's frame, a C object, a partial's
argument, a default) has no stand-in: read by ``to_local()`` during capture, it is refused, named
(``real_dtensors_refused``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from localmap import context
from localmap.check.closure import Site, held_tensors, module_tensors
from localmap.compat import make_dtensor, make_spec, reparametrized, to_local_of_real_refused
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
    sites: list = field(default_factory=list)  # every Site (check.closure) the body finds it at

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
    buffers, and the DTensors it holds elsewhere (a body reads them like parameters: each rank must get its own
    shard, not one rank's shard frozen into the graph). One order for capture, run and verify."""
    return {name: held.tensor for name, held in _state(module).items()}


@dataclass
class _Held:
    """One tensor of a module's state: whether it is a module's own (a parameter, buffer or attribute that
    compat.reparametrized swaps by its qualified name), and the other places it is held (rebound)."""

    tensor: torch.Tensor
    own: bool
    sites: list = field(default_factory=list)


def _state(module: torch.nn.Module) -> dict[str, _Held]:
    """module_state's tensors and where they are held: parameters, buffers and plain-attribute DTensors by
    qualified name (``moe.w1``), then the DTensors held in containers, plain objects or globals (``ws[0]``,
    ``cfg.w``, ``_WEIGHTS['w']``: held_tensors' walk), each tensor once (reached twice: one input, rebound at
    every place)."""
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    state.update((n, t) for n, t in module_tensors(module) if n not in state and isinstance(t, DTensor))
    found = {name: _Held(t, True) for name, t in state.items()}
    named = {id(t): name for name, t in state.items()}
    tree = {id(m) for m in module.modules()}
    for path, t, site in held_tensors(module, ""):
        if site is None or id(site[0]) in tree or not (id(t) in named or isinstance(t, DTensor)):
            continue  # a module's own tensor (named above), one that cannot be rebound, or a plain constant
        name = named.setdefault(id(t), _unused(path, found))
        found.setdefault(name, _Held(t, False)).sites.append(site)
    return found


def _unused(path: str, taken: dict) -> str:
    """`path`, or `path` with a number where a module attribute of that name holds another tensor."""
    name, k = path, 1
    while name in taken:
        k += 1
        name = f"{path}#{k}"
    return name


@contextlib.contextmanager
def holding(module: torch.nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`module` holds `values` (by module_state's names) instead of its state, everywhere it holds them: its
    parameters, buffers and attributes (compat.reparametrized: tied weights kept tied) and the containers,
    objects and globals found by _state. Held open as long as the caller needs (a checkpoint recomputes its
    forward during the backward)."""
    state = _state(module)
    own = {name: v for name, v in values.items() if state[name].own}
    with reparametrized(module, own), _rebound_sites([(site, values[name]) for name, held in state.items()
                                                      for site in held.sites]):
        yield


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
                   fix=HOLD_FIX)

    with to_local_of_real_refused(refuse):
        yield


HOLD_FIX = ("capture the nn.Module that holds it, holding it where capture takes its inputs from: a parameter, "
             "buffer or attribute of one of its modules, an item of a list, tuple or dict they hold, an attribute "
             "of a plain object they hold, or a global their code names (not a generator, a C object, a default "
             "or a partial's argument); or pass it to the region as an argument")


def held_at(root: Any, target: Any) -> str | None:
    """Where `root` (a captured module or function) holds `target`, as check.closure.held_tensors names it
    (``ws[0]``, ``cfg.w``, ``_WEIGHTS['w']``); None where that walk does not reach it."""
    walk = held_tensors(root, "") if isinstance(root, torch.nn.Module) else held_tensors(root)
    return next((path for path, t, _ in walk if t is target), None)


def stand_in(value: Any) -> ParamInfo | None:
    """What `value` stands for, when it is a registered stand-in on this thread."""
    for table in reversed(context.stack("program_params")):
        hit = table.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
    return None


def closed_over(func: Callable) -> list[Closed]:
    """The stand-ins `func` closes over, once each (with every site it is held at), in the order first reached."""
    found: dict[int, Closed] = {}
    for path, value, site in held_tensors(func):
        info = stand_in(value)
        if info is not None and site is not None:
            found.setdefault(id(value), Closed(value, info)).sites.append(site)
    return list(found.values())


def unregistered_dtensors(func: Callable) -> list[str]:
    """Paths of DTensors `func` closes over that are no program input (capture cannot give them values)."""
    return [path for path, value, _ in held_tensors(func) if isinstance(value, DTensor)]


def rebound(closed: Sequence[Closed], values: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
    """While the body runs, every site of each closed-over tensor reads the matching value."""
    return _rebound_sites([(site, v) for c, v in zip(closed, values, strict=True) for site in c.sites])


@contextlib.contextmanager
def _rebound_sites(pairs: Sequence[tuple[Site, Any]]) -> Iterator[None]:
    """Each (site, value): the site holds the value for the block, restored after in reverse order (two values
    in one tuple: each rebuild starts from the last, and the first restore brings back the original)."""
    undo: list[Callable[[], None]] = []
    try:
        for site, value in pairs:
            undo.append(_rebind(site, value))
        yield
    finally:
        for restore in reversed(undo):
            restore()


_MISSING = object()


def _rebind(site: Site, value: Any) -> Callable[[], None]:
    """Put `value` at `site`; return what puts back the old one. A module's parameter or buffer is shadowed
    through its instance dict (read before nn.Module's lookup), a cell rewritten, a dict's or list's item set,
    and a tuple on the way rebuilt with the value in its place."""
    holder, key, inner = site
    if key is None:
        old = holder.cell_contents
        holder.cell_contents = _replaced(old, inner, value)
        return lambda: setattr(holder, "cell_contents", old)
    slots = vars(holder) if isinstance(holder, torch.nn.Module) else holder
    old = slots.get(key, _MISSING) if isinstance(slots, dict) else slots[key]
    slots[key] = _replaced(old, inner, value)

    def restore() -> None:
        if old is _MISSING:
            slots.pop(key, None)
        else:
            slots[key] = old

    return restore


def _replaced(held: Any, inner: tuple, value: Any) -> Any:
    """`value`, or the tuple `held` rebuilt with `value` at the index path `inner` (a namedtuple by its fields)."""
    if not inner:
        return value
    items = list(held)
    items[inner[0]] = _replaced(items[inner[0]], inner[1:], value)
    return type(held)(*items) if type(held) is not tuple else tuple(items)


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
