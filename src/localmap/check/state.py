"""What a region's body reads besides its arguments that can change between calls: the key under which its
check verdict may be reused.

A verdict is a fact about the body *as it reads its state now*: ``if self.training: y = all_reduce(y)`` is right
in training mode and a partial sum claimed Replicate after ``model.eval()``. The probes, chosen once per body
because each one is cheap to read on every call:

* the ``training`` flag of every module the body reaches (the module a method is bound to, modules in closure
  cells and a partial's arguments, and all their submodules: dropout and norms read their own);
* the attributes the body's code names (``self.scale``, ``self.experts.w1``) on those modules: a plain value by
  value, a tensor by its placements, shape and dtype, a list, tuple or dict (``self.ws[0]``) and a plain object's
  attributes (``self.cfg.table``) by what they hold, two levels deep and up to ``CONTAINER_LIMIT`` items (a
  DTensor swapped in a list re-checks the body), any other object by identity;
* the module globals its code names that hold plain values (a global flag) or such containers (a dict of
  weights), and its closure cells.

A body with none of these (a plain function of its arguments, ``torch.mm``) has no probe and costs nothing.
Functions the body calls are not followed: state they read on their own is not keyed (docs/check-state.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from localmap import compat
from localmap.check.closure import code_names, code_owner, plain_object, reachable

_PLAIN = (int, float, bool, str, type(None))
_CONTAINERS = (list, tuple, dict)
MODULE_LIMIT = 4096  # modules whose training flag is probed per body (a whole model bound to a method)
CONTAINER_LIMIT = 64  # items of a list, tuple, dict or plain object keyed by what they hold (more: by identity)
_DEPTH = 2  # container levels keyed by what they hold (``self.ws[0]['w']``)


class BodyState:
    """The probes of one body; ``key()`` reads them (a hashable tuple, equal while nothing the body reads
    changed)."""

    __slots__ = ("modules", "attrs", "globals", "global_names", "cells")

    def __init__(self, modules: list, attrs: list, globals_: dict, global_names: list, cells: list) -> None:
        self.modules = tuple(modules)
        self.attrs = tuple(attrs)
        self.globals = globals_
        self.global_names = tuple(global_names)
        self.cells = tuple(cells)

    def key(self) -> tuple:
        g = self.globals
        return (tuple([m.training for m in self.modules]),
                tuple([state_value(getattr(owner, name, None)) for owner, name in self.attrs]),
                tuple([state_value(g.get(name)) for name in self.global_names]),
                tuple([state_value(_cell_contents(c)) for c in self.cells]))


def body_state(fn: Callable) -> BodyState | None:
    """The probes of `fn`'s state, or None when it reads none (see the module docstring)."""
    names = code_names(fn)
    roots: list[torch.nn.Module] = []
    cells: list[Any] = []
    for _, value, cell in reachable(fn, through_globals=False):
        if isinstance(value, torch.nn.Module):
            roots.append(value)
        elif cell is not None and not callable(value):
            cells.append(cell)
    modules = _modules(roots)
    attrs = [(m, n) for m in modules for n in names if _is_state_attribute(m, n)]
    globals_ = getattr(code_owner(fn), "__globals__", None) or {}
    global_names = sorted(n for n in names if n in globals_ and isinstance(globals_[n], (*_PLAIN, *_CONTAINERS)))
    if not (modules or attrs or global_names or cells):
        return None
    return BodyState(modules, attrs, globals_, global_names, cells)


def state_key(fn: Callable) -> tuple | None:
    """`fn`'s state now (None when it reads none): for a cache that sees the function rarely (the check's)."""
    state = body_state(fn)
    return state.key() if state is not None else None


def value_key(value: Any) -> Any:
    """A value as a cache key of what decides a verdict: a tensor by its local shape and dtype, a plain value by
    value (with its type: True and 1 differ), any other object by identity."""
    if isinstance(value, torch.Tensor):
        local = compat.simulated_local(value)[0] if compat.is_simulated(value) else value
        return ("T", tuple(int(s) for s in local.shape), value.dtype)
    if isinstance(value, _PLAIN):
        return ("V", type(value).__name__, value)
    return ("O", id(value))


def state_value(value: Any, depth: int = 0) -> Any:
    """value_key of a value the body reads from its state; a DTensor also by its placements, a module not at
    all (its own flags are probed), a container or plain object by what it holds (see the module docstring)."""
    if isinstance(value, DTensor):
        return ("D", tuple(value.placements), tuple(value.shape), value.dtype)
    if isinstance(value, torch.nn.Module):
        return "module"
    held = _held_items(value) if depth < _DEPTH else None
    if held is not None:
        return (type(value).__name__, tuple((k, state_value(v, depth + 1)) for k, v in held))
    return value_key(value)


def _held_items(value: Any) -> list[tuple[Any, Any]] | None:
    """(key, item) of a small list, tuple or dict, or of a plain object's attributes; None for anything else."""
    if isinstance(value, _CONTAINERS):
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
    elif plain_object(value) and not callable(value):
        items = list(vars(value).items())
    else:
        return None
    if len(items) > CONTAINER_LIMIT:
        return None
    return [(k if isinstance(k, _PLAIN) else id(k), v) for k, v in items]


def _modules(roots: list[torch.nn.Module]) -> list[torch.nn.Module]:
    seen: dict[int, torch.nn.Module] = {}
    for root in roots:
        for m in root.modules():
            seen.setdefault(id(m), m)
            if len(seen) >= MODULE_LIMIT:
                return list(seen.values())
    return list(seen.values())


def _is_state_attribute(module: torch.nn.Module, name: str) -> bool:
    """Whether `name` on `module` is data the body may read (not a method, not a submodule: those are code or
    probed on their own)."""
    if name.startswith("__"):
        return False
    try:
        value = getattr(module, name)
    except Exception:  # a property that raises, or no such attribute
        return False
    return not callable(value) or isinstance(value, torch.Tensor)


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # emptied since
        return None
