"""The simulated mesh: PyTorch's LocalTensorMode (every rank in one process) over the fake process group.

The simulation stores one tensor per rank inside a LocalTensor and gives per-rank sizes as symbolic ints; these
helpers let localmap read per-rank values without a collective on real ints.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch

from localmap.compat.dynamo import at_trace_time


def is_simulated(t: Any) -> bool:
    from torch.distributed._local_tensor import LocalTensor

    return isinstance(t, LocalTensor)

def simulated_local(t: Any) -> dict[int, torch.Tensor]:
    """rank -> that rank's plain tensor, for a LocalTensor."""
    return t._local_tensors

def simulation_active() -> bool:
    """Whether a LocalTensorMode is simulating ranks right now."""
    from torch.distributed._local_tensor import local_tensor_mode

    return local_tensor_mode() is not None


@at_trace_time
def _simulating_at_trace_time() -> bool:
    from torch.distributed._local_tensor import local_tensor_mode

    mode = local_tensor_mode()
    return mode is not None and not simulation_set_aside(mode)  # (on_one_device sets it aside)


def compiling_simulated() -> bool:
    """Whether Dynamo is tracing on a simulated mesh (symbolically: not trace-time code it runs, such as the
    check). There LocalTensorMode is set aside (it ignores compile internals), so AOT autograd sees a factory's
    tensor (torch.arange) as one plain FunctionalTensor, which LocalTensor refuses to meet; and at run time the
    mode makes that graph node a LocalTensor among the per-rank plain tensors. A tensor there must be made from
    a simulated one (``x.new_full``), never by a factory."""
    return torch.compiler.is_dynamo_compiling() and _simulating_at_trace_time()


def simulated_rank_map(fn: Any) -> torch.Tensor:
    """A LocalTensor whose rank r value is fn(r), under the active LocalTensorMode."""
    from torch.distributed._local_tensor import local_tensor_mode

    mode = local_tensor_mode()
    assert mode is not None, "simulated_rank_map needs an active LocalTensorMode"
    return mode.rank_map(fn)

def fake_process_group(world_size: int) -> None:
    """Initialize the fake (no-communication) process group that the simulated mesh runs over."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)

def forget_ended_world() -> None:
    """Drop DTensor's sharding-propagation caches (its Python and C++ fast-path caches) when a simulated or fake
    world ends. They key op schemas by mesh equality, and a new mesh of the same shape equals the old one, so the
    next world would be handed output specs holding the ended world's mesh: compiling a Partial output in a
    second simulated world then asked the simulator for that dead mesh's coordinates under FakeTensorMode and
    failed (docs/compile.md)."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()


@contextlib.contextmanager
def local_tensor_mode(world_size: int | frozenset) -> Iterator[Any]:
    """A LocalTensorMode simulating `world_size` ranks (or the given rank set) in this process, entered, with
    views brought up to date while AOT autograd traces (``_views_synced_while_traced``)."""
    from torch.distributed._local_tensor import LocalTensorMode

    _give_per_rank_ints_no_hint()
    with _views_synced_while_traced(), LocalTensorMode(world_size) as mode:
        yield mode


_synced_depth = [0]  # simulated worlds open now (program.run opens one inside a simulated mesh's)


@contextlib.contextmanager
def _views_synced_while_traced() -> Iterator[None]:
    """PyTorch's simulator under AOT autograd, mended while a simulated world is open: a view taken of a tensor
    after an in-place op on it (std's backward: ``masked_fill_`` then ``unsqueeze``; the simulator's all_reduce
    writes its result in place, then a sum's backward expands it) is left out of date by functionalization
    until its next use. LocalTensor's aliasing fix-up asks each new view's sizes first, and FunctionalTensorMode
    answers size questions with proxy tracing off, so the view is regenerated there, untraced, and enters the
    graph as a constant: AOT autograd then fails with "Unexpected fake buffer _tensor_constant0" (or a forward
    returns a fake tensor). Bringing each rank's new FunctionalTensor up to date while tracing is on records
    the regeneration where it belongs. Plain tensors (eager simulation) pass untouched."""
    import torch.distributed._local_tensor as simulator

    if _synced_depth[0] == 0:
        simulator.return_and_correct_aliasing = functools.partial(_synced_then_aliased,
                                                                  simulator.return_and_correct_aliasing)
    _synced_depth[0] += 1
    try:
        yield
    finally:
        _synced_depth[0] -= 1
        if _synced_depth[0] == 0:
            simulator.return_and_correct_aliasing = simulator.return_and_correct_aliasing.args[0]


def _synced_then_aliased(aliasing: Callable, func: Any, args: Any, kwargs: Any, out: Any) -> Any:
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.distributed._local_tensor import LocalTensor

    for result in (out,) if isinstance(out, LocalTensor) else torch.utils._pytree.tree_leaves(out):
        if isinstance(result, LocalTensor):
            for rank_value in result._local_tensors.values():
                if isinstance(rank_value, FunctionalTensor):
                    torch._sync(rank_value)
    return aliasing(func, args, kwargs, out)


def _give_per_rank_ints_no_hint() -> None:
    """A per-rank int (LocalIntNode: ``t.tolist()`` of a tensor that differs across ranks) lacks ``has_hint``,
    which indexing asks of a size (``out[idx, :] = rows`` on a tensor sized by one: torchtitan's expert-parallel
    un-permute fails with AttributeError on torch 2.13 and 2.14). It has no single value to hint: False."""
    from torch.distributed._local_tensor import LocalIntNode

    if not hasattr(LocalIntNode, "has_hint"):
        LocalIntNode.has_hint = lambda self: False

def simulated_value(per_rank: dict[int, Any]) -> Any:
    """One simulated value from rank -> value: a LocalTensor for tensors, a per-rank SymInt for differing ints."""
    from torch.distributed._local_tensor import LocalIntNode, LocalTensor

    first = next(iter(per_rank.values()))
    if isinstance(first, torch.Tensor):
        return LocalTensor(per_rank)
    if isinstance(first, int) and not isinstance(first, bool) and len(set(per_rank.values())) > 1:
        return torch.SymInt(LocalIntNode(per_rank))
    return first

def value_on_rank(value: Any, rank: int) -> Any:
    """Rank `rank`'s part of a simulated value (LocalTensor or per-rank SymInt); other values as they are."""
    from torch.distributed._local_tensor import LocalIntNode, LocalTensor

    if isinstance(value, LocalTensor):
        return value._local_tensors[rank]
    if isinstance(value, torch.SymInt) and isinstance(value.node, LocalIntNode):
        return value.node._local_ints[rank]
    return value


def mesh_ranks(mesh: Any) -> list[int]:
    """The mesh's ranks in coordinate order (``mesh.mesh`` flattened); call it outside the simulation. A
    simulated world's rank map is a LocalTensor holding the same ranks on every rank, on which DeviceMesh.mesh
    runs its ops once per rank through the simulation (milliseconds); they run once on a plain copy instead."""
    rank_map, layout = getattr(mesh, "_rank_map", None), getattr(mesh, "_layout", None)
    from_full = getattr(type(mesh), "_get_mesh_tensor_from_full_mesh", None)
    if rank_map is None or layout is None or from_full is None or not is_simulated(rank_map):
        return mesh.mesh.reshape(-1).tolist()
    copies = list(simulated_local(rank_map).values())
    if any(not torch.equal(copies[0], c) for c in copies[1:]):
        return mesh.mesh.reshape(-1).tolist()
    return from_full(layout.remap_to_tensor(copies[0])).reshape(-1).tolist()


def reconcile(t: torch.Tensor) -> torch.Tensor:
    """The single plain tensor of a LocalTensor whose ranks all hold the same value (plain tensors pass)."""
    return t.reconcile() if is_simulated(t) else t

def outside_simulation() -> Any:
    """A context in which the active LocalTensorMode (if any) is off, so tensors are plain single-device ones."""
    from torch.distributed._local_tensor import local_tensor_mode

    mode = local_tensor_mode()
    return mode.disable() if mode is not None else contextlib.nullcontext()


@contextlib.contextmanager
def simulation_off_the_stack() -> Iterator[None]:
    """The active LocalTensorMode (if any) set aside and taken off the dispatch mode stack (put back on exit, in
    its place). Set aside alone (``outside_simulation``), the mode still sees every op first and answers
    NotImplemented for a tensor subclass it does not know, so AOT autograd's FunctionalTensors fail ("Attempting
    to use FunctionalTensor on its own") on any op outside a region during a joint export."""
    from torch.distributed._local_tensor import local_tensor_mode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode, _push_mode

    mode = local_tensor_mode()
    if mode is None:
        yield
        return
    with mode.disable():
        stack = _get_current_dispatch_mode_stack()
        above = stack[stack.index(mode) + 1:] if any(m is mode for m in stack) else None
        if above is None:
            yield
            return
        for _ in range(len(above) + 1):
            _pop_mode()
        for m in above:
            _push_mode(m)
        try:
            yield
        finally:
            for _ in above:
                _pop_mode()
            for m in (mode, *above):
                _push_mode(m)


def simulation_mode_type() -> type:
    """The simulated mesh's dispatch mode class (the operator registers an implementation for it)."""
    from torch.distributed._local_tensor import LocalTensorMode

    return LocalTensorMode


def simulation_set_aside(mode: Any) -> bool:
    """Whether a LocalTensorMode is disabled (outside_simulation): tensors are plain single-device ones."""
    return bool(mode._disable)
