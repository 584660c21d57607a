"""Running localmap's own Python while Dynamo traces (``torch.compile``), and what comes out of it.

Dynamo cannot trace the placement check (it traces the body with make_fx on fakes) nor construct localmap's
errors. ``trace_time(fn)`` marks `fn` with Dynamo's ``assume_constant_result``: a call met while Dynamo traces
runs `fn` for real, once, on the Python values of its arguments (hashable metadata, no tensors), and its result
enters the graph as a constant, so the compiled program pays nothing for it per call. Two things around it:

* the trace's TracingContext is set aside while `fn` runs, so tracing done inside (the check's make_fx) uses a
  fake mode of its own, not Dynamo's (no symbols or guards leak into the program being compiled);
* the result is a fresh copy (no object in it is one the program holds, which Dynamo would guard through the
  constant and fail to evaluate), so `fn` must return plain data: ints, tuples, placements;
* an exception `fn` raises reaches the caller as itself. Dynamo rewraps any exception raised while it traces
  (``InternalTorchDynamoError``) except a few kinds it re-raises unchanged, AssertionError among them; the error
  is re-raised as an instance of a subclass of its own class and AssertionError, with the same name, attributes
  and message (``except LocalMapError``/``PlacementError`` and ``pytest.raises`` see it as the eager error).

``compiler_collectives_on`` says whether the user turned on Dynamo's compiler collectives, under which every
rank compiles the same frames together (PyTorch's own trace-time collectives require it).

``size_hint`` reads a size Dynamo made symbolic (automatic dynamic shapes) as its example value, without
adding a guard: the check then runs on the size Dynamo traced with.
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any, Callable

import torch
# A size (an int, or a SymInt Dynamo made symbolic) as an int: its example value, no guard added. Called as is
# (no wrapper) in code Dynamo traces, which has a rule for it.
from torch.fx.experimental.symbolic_shapes import optimization_hint

_SURFACING: dict[type, type] = {}  # exception class -> its surfacing class (one per class: unbounded)


def surfacing_types() -> dict[type, type]:
    """The memo of surfacing classes (registered with localmap's caches by the compiled path)."""
    return _SURFACING


def trace_time(fn: Callable) -> Callable:
    """`fn`, run by Dynamo at trace time with its result baked into the graph (see the module's docstring)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from torch._guards import tracing

        try:
            with tracing(None):
                # A fresh copy: an object of the result that the program also holds (a placement from the
                # user's specs) would get a guard through the constant's name, which Dynamo cannot evaluate.
                return copy.deepcopy(fn(*args, **kwargs))
        except Exception as e:
            raise surfacing(e).with_traceback(e.__traceback__) from e.__cause__

    # What torch._dynamo.assume_constant_result(run) does (2.13, 2.14; tests/unit/test_compiling.py holds it to
    # that), without importing torch._dynamo, which costs about a second at `import localmap`.
    run._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return run


def surfacing(e: Exception) -> Exception:
    """`e` as an exception Dynamo re-raises unchanged: same class name, attributes and message, and an
    AssertionError (Dynamo's pass-through list). Returns `e` itself when its class cannot take the mix-in."""
    cls = type(e)
    if isinstance(e, AssertionError):
        return e
    sub = _SURFACING.get(cls)
    if sub is None:
        try:
            sub = type(cls.__name__, (cls, AssertionError), {
                "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__str__": _surfaced_message})
        except TypeError:  # a class with its own C layout (OSError, ...)
            return e
        _SURFACING[cls] = sub
    out = BaseException.__new__(sub, *e.args)
    out.__dict__.update(e.__dict__)
    out.__dict__["_surfaced_message"] = str(e)
    return out


def _surfaced_message(self: BaseException) -> str:
    # Dynamo appends its "from user code" trace to the message arguments; the message stays the eager one.
    return self.__dict__["_surfaced_message"]


def compiler_collectives_on() -> bool:
    """``torch._dynamo.config.enable_compiler_collectives`` (``TORCH_COMPILER_COLLECTIVES=1``): Dynamo then runs
    collectives while it traces, so every rank must compile the same frames in the same order (the flag's own
    contract). False where Dynamo was never imported (nothing traces)."""
    config = sys.modules.get("torch._dynamo.config")
    return bool(getattr(config, "enable_compiler_collectives", False))


def size_hint(n: Any) -> Any:
    """An int for a size or integer Dynamo made symbolic (its example value, no guard); anything else as is."""
    # isinstance(n, torch.SymInt) is False in code Dynamo traces (it answers for the int the SymInt stands for)
    if isinstance(n, int) and not isinstance(n, bool):
        return optimization_hint(n)
    return n


def traced_local(d: Any) -> torch.Tensor:
    """A DTensor's local tensor in code Dynamo traces (plain attribute access, which Dynamo follows; the eager
    path's ``local_tensor_of`` is an ``operator.attrgetter``, which it does not). Read for metadata only."""
    return d._local_tensor
