"""The DTensors a region's body closes over: module parameters and buffers (``self.w1``), closure cells,
defaults, partial arguments and the module globals its code names, and what those hold (``held_tensors``: lists,
tuples and dicts, plain objects such as a config namespace, submodules, the globals of the code they run). The
check types their shards by their placements (``compat.to_local_substituted`` hands the trace a stand-in for each
``to_local()``); anything else closed over is a constant, the same on every rank.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Iterator

import torch
from torch.distributed.tensor import DTensor

from localmap.sites import is_library

# Where a tensor is held, so that it can be rebound in place: (holder, key, inner). holder is a closure cell (key
# None), a module (key: its parameter, buffer or attribute name), a dict (a module's or plain object's __dict__,
# a dict attribute, a function's globals) or a list; inner: indices into the tuples held there (rebuilt when
# rebound, being immutable). None where it cannot be rebound (a partial's argument, a default).
Site = tuple

WALK_DEPTH = 8  # attribute, item and function levels walked below a root
WALK_LIMIT = 20_000  # objects visited at most per walk
_MODULE_SLOTS = frozenset(vars(torch.nn.Module()))  # nn.Module's own bookkeeping (hooks, parameter dicts, flags)


def closed_over_dtensors(fn: Callable) -> list[tuple[str, DTensor]]:
    """(name as the body reads it, DTensor) for each DTensor `fn` can reach without being passed it."""
    found: dict[int, tuple[str, DTensor]] = {}
    for name, t, _ in held_tensors(fn):
        if isinstance(t, DTensor):
            found.setdefault(id(t), (name, t))
    return list(found.values())


def reachable(fn: Any, *, through_globals: bool = True) -> Iterator[tuple[str, Any, Any]]:
    """(path, object, closure cell or None) for what `fn` can read without arguments: a partial's function and
    arguments, the object a method is bound to (or `fn` itself when a module), closure cells, defaults and
    (with `through_globals`) the module globals its code names. One walk for the check and for capture
    (``traced.closure``), which rebinds cells."""
    for path, obj, site in _reached(fn, through_globals):
        yield path, obj, site[0] if site is not None and site[1] is None else None


def _reached(fn: Any, through_globals: bool) -> Iterator[tuple[str, Any, Site | None]]:
    """reachable's walk, with the Site of each object that can be rebound (a cell's, a global's)."""
    if isinstance(fn, functools.partial):
        yield from _reached(fn.func, through_globals)
        yield from ((f"partial[{k!r}]", a, None) for k, a in [*enumerate(fn.args), *fn.keywords.items()])
        return
    bound_to = getattr(fn, "__self__", None)
    if bound_to is not None and hasattr(fn, "__func__"):
        yield "self", bound_to, None
        fn = fn.__func__
    if isinstance(fn, torch.nn.Module):
        yield type(fn).__name__, fn, None
        return
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            yield name, cell.cell_contents, (cell, None, ())
        except ValueError:  # an empty cell
            continue
    if not through_globals:
        return
    yield from ((f"default {k}", d, None) for k, d in enumerate(fn.__defaults__ or ()))
    yield from ((k, v, None) for k, v in (fn.__kwdefaults__ or {}).items())
    for name in _global_names(code):
        if name in fn.__globals__:
            yield name, fn.__globals__[name], (fn.__globals__, name, ())


def code_owner(fn: Any) -> Any:
    """The plain function whose code runs when `fn` is called (through partials, a bound method, a module's
    forward)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, torch.nn.Module):
        fn = type(fn).forward
    return getattr(fn, "__func__", fn)


def code_names(fn: Any) -> set[str]:
    """Names `fn`'s code reads as globals or attributes (functions defined inside it included)."""
    code = getattr(code_owner(fn), "__code__", None)
    return _global_names(code) if code is not None else set()


def _global_names(code: Any) -> set[str]:
    """Names the code (and the functions and lambdas defined in it) may read from its globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


def own_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own tensors (not its submodules'): parameters, buffers, and tensors held as plain attributes
    (``self.w = distribute_tensor(...)``: a body reads a DTensor there like a parameter). A parameter or buffer
    shadowed by an instance attribute of its name (a stand-in put there while a program is captured) is what
    ``module.name`` reads: the attribute."""
    attrs = vars(module)
    yield from ((n, t) for n, t in module.named_parameters(recurse=False) if n not in attrs)
    yield from ((n, t) for n, t in module.named_buffers(recurse=False) if n not in attrs)
    for attr, value in attrs.items():
        if isinstance(value, torch.Tensor):
            yield attr, value


def module_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """own_tensors of `module` and its submodules, by qualified name (each tensor once, in named_modules order)."""
    seen: set[int] = set()
    for prefix, mod in module.named_modules():
        for attr, t in own_tensors(mod):
            if id(t) not in seen:
                seen.add(id(t))
                yield (f"{prefix}.{attr}" if prefix else attr), t


def held_tensors(root: Any, path: str | None = None) -> Iterator[tuple[str, torch.Tensor, Site | None]]:
    """(path, tensor, Site or None) for every tensor `root` holds, once per place it is held: a function's
    reachable objects (``reachable``: its bound module, cells, globals it names, ...) or `root` itself (a module,
    a container, a plain object), and walked into from there: a module's own tensors, submodules and other
    attributes, and the code of its class (the globals its methods name); the items of lists, tuples and dicts;
    a plain object's attributes; the user functions held or named there. Paths read as the code reads them
    (``self.ws[0]``, ``cfg.w``, ``_WEIGHTS['w']``; a global by its name). Without `path`, `root` is a body (what
    ``reachable`` names it is walked); with it, `root` is walked from `path` (a captured module from "").
    Bounded: WALK_DEPTH levels (a module's submodules are no level), WALK_LIMIT objects."""
    walk = _Walk()
    if path is None:
        for name, obj, site in _reached(root, True):
            yield from walk.visit(obj, name, site, 1)
    else:
        yield from walk.visit(root, path, None, 0)


class _Walk:
    """One held_tensors walk: each module, dict, list, plain object and function visited once."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def visit(self, obj: Any, path: str, site: Site | None, depth: int) -> Iterator[tuple[str, Any, Any]]:
        if isinstance(obj, torch.Tensor):
            yield path, obj, site
            return
        if depth > WALK_DEPTH or len(self.seen) >= WALK_LIMIT or isinstance(obj, (str, bytes, int, float)):
            return
        if isinstance(obj, tuple):  # no identity of its own to rebind: its items are rebound through its site
            yield from self._items(obj, path, site, depth)
            return
        if id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            yield from self._module(obj, path, depth)
        elif isinstance(obj, (dict, list)):
            for k, v in list(obj.items() if isinstance(obj, dict) else enumerate(obj)):
                yield from self.visit(v, f"{path}[{k!r}]", (obj, k, ()), depth + 1)
        elif _is_code(obj):
            fn = _unwrapped(obj)
            code = getattr(code_owner(fn), "__code__", None)
            if code is not None and not is_library(code.co_filename):  # torch's and localmap's code: not walked
                for name, value, at in _reached(fn, True):
                    yield from self.visit(value, name, at, depth + 1)
        elif plain_object(obj):
            for k, v in list(vars(obj).items()):
                yield from self.visit(v, _at(path, k), (vars(obj), k, ()), depth + 1)

    def _items(self, obj: tuple, path: str, site: Site | None, depth: int) -> Iterator[tuple[str, Any, Any]]:
        rebuildable = type(obj) is tuple or hasattr(type(obj), "_make")  # a plain tuple or a namedtuple
        for k, v in enumerate(obj):
            at = (site[0], site[1], (*site[2], k)) if site is not None and rebuildable else None
            yield from self.visit(v, f"{path}[{k}]", at, depth + 1)

    def _module(self, module: torch.nn.Module, path: str, depth: int) -> Iterator[tuple[str, Any, Any]]:
        for attr, t in own_tensors(module):
            yield _at(path, attr), t, (module, attr, ())
        for name, value in list(vars(module).items()):
            if name not in _MODULE_SLOTS and not isinstance(value, torch.Tensor):
                yield from self.visit(value, _at(path, name), (vars(module), name, ()), depth + 1)
        for name, sub in module.named_children():
            yield from self.visit(sub, _at(path, name), None, depth)
        for fn in _class_code(type(module)):
            yield from self.visit(fn, path, None, depth + 1)


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_code(obj: Any) -> bool:
    """A function, bound method, partial or wrapper (``__wrapped__``): code whose closure and globals are walked."""
    return isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)) or (
        callable(obj) and hasattr(obj, "__wrapped__") and not isinstance(obj, (torch.nn.Module, type)))


def _unwrapped(fn: Any) -> Any:
    """The function a wrapper (local_map's, functools.wraps') wraps, through every layer."""
    for _ in range(WALK_DEPTH):
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            break
        fn = inner
    return fn


def _class_code(cls: type) -> Iterator[Any]:
    """The functions a module's class (and its bases written outside torch and localmap) defines: the code that
    runs when the module is called, whose globals a body may read."""
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("torch", "builtins"):  # nn.Module and object: no user code
            continue
        for value in vars(klass).values():
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(fn, types.FunctionType) and not is_library(fn.__code__.co_filename):
                yield fn


def plain_object(obj: Any) -> bool:
    """An instance of a Python class that holds its state in its __dict__ (a config namespace, a dataclass, a
    helper such as a token dispatcher): not a type, a Python module, code (a function, method or partial), an
    nn.Module, or an object of torch's or localmap's own (tensors, meshes, process groups, regions' caches)."""
    if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType, functools.partial,
                        torch.nn.Module)) or not hasattr(obj, "__dict__"):
        return False
    owner = type(obj).__module__ or ""
    return owner.split(".")[0] not in ("torch", "localmap")
