"""The DTensors a region's body closes over: module parameters and buffers (``self.w1``), closure cells,
defaults, partial arguments and the module globals its code names. The check types their shards by their
placements (``compat.to_local_substituted`` hands the trace a stand-in for each ``to_local()``); anything else
closed over is a constant, the same on every rank.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import torch
from torch.distributed.tensor import DTensor

_MAX_DEPTH = 2  # containers walked into (a list of experts' weights, a dict of buffers)


def closed_over_dtensors(fn: Callable) -> list[tuple[str, DTensor]]:
    """(name as the body reads it, DTensor) for each DTensor `fn` can reach without being passed it."""
    found: dict[int, tuple[str, DTensor]] = {}
    for name, obj, _ in reachable(fn):
        _collect(name, obj, found, _MAX_DEPTH)
    return list(found.values())


def reachable(fn: Any, *, through_globals: bool = True) -> Iterator[tuple[str, Any, Any]]:
    """(path, object, closure cell or None) for what `fn` can read without arguments: a partial's function and
    arguments, the object a method is bound to (or `fn` itself when a module), closure cells, defaults and
    (with `through_globals`) the module globals its code names. One walk for the check and for capture
    (``traced.closure``), which rebinds cells."""
    if isinstance(fn, functools.partial):
        yield from reachable(fn.func, through_globals=through_globals)
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
            yield name, cell.cell_contents, cell
        except ValueError:  # an empty cell
            continue
    if not through_globals:
        return
    yield from ((f"default {k}", d, None) for k, d in enumerate(fn.__defaults__ or ()))
    yield from ((k, v, None) for k, v in (fn.__kwdefaults__ or {}).items())
    for name in _global_names(code):
        if name in fn.__globals__:
            yield name, fn.__globals__[name], None


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
    (``self.w = distribute_tensor(...)``: a body reads a DTensor there like a parameter)."""
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)
    for attr, value in vars(module).items():
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


def _collect(name: str, obj: Any, found: dict, depth: int) -> None:
    if isinstance(obj, DTensor):
        found.setdefault(id(obj), (name, obj))
    elif isinstance(obj, torch.nn.Module):
        for n, t in module_tensors(obj):
            if isinstance(t, DTensor):
                found.setdefault(id(t), (f"{name}.{n}", t))
    elif depth and isinstance(obj, (list, tuple)):
        for k, o in enumerate(obj):
            _collect(f"{name}[{k}]", o, found, depth - 1)
    elif depth and isinstance(obj, dict):
        for k, o in list(obj.items())[:64]:
            _collect(f"{name}[{k!r}]", o, found, depth - 1)
