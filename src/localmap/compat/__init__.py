"""Every use of a PyTorch-private API in localmap goes through this module.

A new PyTorch release should need changes here and nowhere else. Each name below says what it is for; the
public modules import these, never ``torch.distributed.tensor._*`` directly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.placement_types import Placement
from torch.utils import _pytree as pytree

__all__ = [
    "AsyncCollectiveTensor",
    "DTensorSpec",
    "TensorMeta",
    "pytree",
    "make_dtensor",
    "make_spec",
    "global_shape_and_stride",
    "redistribute_local",
    "simulated_rank_map",
    "simulated_local",
    "is_simulated",
]


def make_spec(mesh: DeviceMesh, placements: tuple[Placement, ...], shape: Sequence[Any],
              stride: Sequence[Any], dtype: torch.dtype) -> DTensorSpec:
    """A DTensor's spec: mesh, placements and global metadata."""
    return DTensorSpec(mesh, placements, tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), dtype))


def make_dtensor(local: torch.Tensor, spec: DTensorSpec, requires_grad: bool) -> DTensor:
    """Wrap a local tensor as a DTensor without any checks or communication (the caller computed the spec).

    Calls DTensor's C++ constructor directly: ``DTensor(...)`` adds a dynamo-disabled ``__init__`` that does
    nothing but costs microseconds on every region call.
    """
    return torch.Tensor._dtensor__new__(DTensor, local, spec, requires_grad=requires_grad)


def fast_apply(fn: type[torch.autograd.Function]) -> Any:
    """``fn.apply`` without the Python-level checks for functorch transforms, used when none is active.

    Falls back to ``fn.apply`` inside vmap/grad transforms, which need the full path.
    """
    c_apply = super(torch.autograd.Function, fn).apply  # type: ignore[misc]
    full_apply = fn.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args: Any) -> Any:
        return full_apply(*args) if transforms_active() else c_apply(*args)

    return apply


def global_shape_and_stride(local: torch.Tensor, mesh: DeviceMesh,
                            placements: Sequence[Placement]) -> tuple[list[Any], list[Any]]:
    """DTensor's own rule for a global shape and stride from an evenly sharded local tensor (C++, fast)."""
    from torch.distributed.tensor._utils import compute_global_tensor_info

    return compute_global_tensor_info(local, mesh, placements)


def redistribute_local(local: torch.Tensor, current: DTensorSpec, target: DTensorSpec) -> torch.Tensor:
    """Redistribute a local tensor between two specs (used on gradients inside backward)."""
    from torch.distributed.tensor._redistribute import redistribute_local_tensor

    return redistribute_local_tensor(local, current, target)


# The simulated mesh (LocalTensorMode) stores one tensor per rank inside a LocalTensor and gives per-rank sizes
# as symbolic ints. These helpers let the shape logic read per-rank sizes without a collective on real ints.

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


def local_tensor_mode(world_size: int | frozenset) -> Any:
    """A LocalTensorMode simulating `world_size` ranks (or the given rank set) in this process."""
    from torch.distributed._local_tensor import LocalTensorMode

    return LocalTensorMode(world_size)


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


def reconcile(t: torch.Tensor) -> torch.Tensor:
    """The single plain tensor of a LocalTensor whose ranks all hold the same value (plain tensors pass)."""
    return t.reconcile() if is_simulated(t) else t


def all_gather_stack(t: torch.Tensor, mesh: DeviceMesh, mesh_dim: int) -> torch.Tensor:
    """Every rank of `mesh_dim` gets all ranks' `t`, stacked along a new dim 0 (functional collective)."""
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_single(t.unsqueeze(0), 0, (mesh, mesh_dim)))


def outside_simulation() -> Any:
    """A context in which the active LocalTensorMode (if any) is off, so tensors are plain single-device ones."""
    import contextlib

    from torch.distributed._local_tensor import local_tensor_mode

    mode = local_tensor_mode()
    return mode.disable() if mode is not None else contextlib.nullcontext()


# ---- tracing internals used by the operator (hop.py) and region building (_region.py) -------------------------

# torch.fx's tracer (under make_fx) patches functions through one process-wide patcher, so two threads tracing
# at once break each other ("CURRENT_PATCHER is None"). localmap's traces (capture, region bodies, the placement
# check, region graphs) take this re-entrant lock; steady-state eager calls trace nothing and never take it.
_TRACE_LOCK = __import__("threading").RLock()


def trace_lock() -> Any:
    return _TRACE_LOCK


def isolated_tracing() -> Any:
    """A context for tracing a region's own graphs from inside another trace: functionalization suspended and
    the outer proxy modes off, so the inner make_fx sees plain fake tensors and records into its own graph."""
    import contextlib

    from torch._dispatch.python import suspend_functionalization
    from torch._subclasses.functional_tensor import disable_functional_mode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    from torch.utils._python_dispatch import _disable_current_modes

    stack = contextlib.ExitStack()
    stack.enter_context(_TRACE_LOCK)  # one trace at a time per process (see trace_lock)
    stack.enter_context(temporarily_clear_interpreter_stack())  # torch.func transforms (functionalize, ...)
    stack.enter_context(suspend_functionalization())
    stack.enter_context(disable_functional_mode())
    stack.enter_context(disable_proxy_modes_tracing())
    # Also user dispatch modes (checkpoint policies, counters): building a region is trace-time work, not
    # ops of the program. Callers re-enter the fake mode they need.
    stack.enter_context(_disable_current_modes())
    return stack


def detect_fake_mode(values: Any) -> Any:
    """The FakeTensorMode of the fake tensors among `values` (or the active one), else None."""
    from torch._guards import detect_fake_mode as detect

    return detect(values)


def new_fake_mode() -> Any:
    """A FakeTensorMode with a ShapeEnv (so data-dependent sizes become unbacked symbols, not errors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)


def ignore_fresh_unbacked(fake_mode: Any) -> Any:
    """Allow unbacked symbols created inside a region's body (e.g. .tolist() split sizes)."""
    import contextlib

    env = getattr(fake_mode, "shape_env", None)
    return env.ignore_fresh_unbacked_symbols() if env is not None else contextlib.nullcontext()


def has_free_unbacked_symbols(values: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import has_free_unbacked_symbols as has

    return has(values)


def below_autograd() -> Any:
    """Run ops below the Autograd dispatch key (the region's forward and backward graphs run there)."""
    return torch._C._AutoDispatchBelowAutograd()


def copy_forward_meta_to_backward(joint: Any) -> None:
    """Copy annotations (fx traceback 'custom' meta and friends) of forward nodes onto the backward nodes
    autograd derived from them, as AOTAutograd does."""
    from torch._functorch._aot_autograd.utils import copy_fwd_metadata_to_bw_nodes

    copy_fwd_metadata_to_bw_nodes(joint)


def partitioner(name: str) -> Any:
    """PyTorch's joint-graph partitioners by name: 'min_cut' (rematerializing) or 'default'."""
    from torch._functorch import partitioners as p

    return {"min_cut": p.min_cut_rematerialization_partition, "default": p.default_partition}[name]


def sac_modes() -> tuple:
    """The dispatch modes of selective activation checkpointing, which must see the operator as one op."""
    from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode

    return (_CachingTorchDispatchMode, _CachedTorchDispatchMode)


def storage_key(t: torch.Tensor) -> Any:
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage())


def current_trace_graph() -> Any:
    """The fx.Graph that the active make_fx trace is recording into (None outside one)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    return None if mode is None else mode.tracer.graph


def without_saved_tensor_hooks() -> Any:
    """Set aside the default saved-tensor hooks (e.g. an activation checkpoint around the region) while a
    region's joint graph is traced: its own autograd.grad must not trigger the user's recomputation."""
    import contextlib

    @contextlib.contextmanager
    def ctx() -> Any:
        hooks = []
        while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
            hooks.append(top)
            torch._C._autograd._pop_saved_tensors_default_hooks()
        try:
            yield
        finally:
            for pack, unpack in reversed(hooks):
                torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)

    return ctx()


def group_size(group: Any) -> int | None:
    """Size of a process group given by name (as functional collectives record it in graphs)."""
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group).size() if isinstance(group, str) else None
    except Exception:  # an unknown name (a graph from another process): no size, no cost
        return None


def joint_partition(joint: Any, inputs: Any, num_forward_outputs: int) -> tuple:
    """Cut a whole program's joint graph into forward and backward, saving what the backward needs."""
    from torch._functorch.partitioners import default_partition

    return default_partition(joint, inputs, num_fwd_outputs=num_forward_outputs)


def register_cpu_attention_flops() -> None:
    """PyTorch's flop counter has formulas for the CUDA attention kernels only; count the CPU flash-attention
    kernels (what scaled_dot_product_attention runs on CPU) with the same formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = (
        (aten._scaled_dot_product_flash_attention_for_cpu,
         lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward,
         lambda g, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)),
    )
    for op, formula in pairs:
        if op not in fc.flop_registry and op.default not in fc.flop_registry:
            fc.register_flop_formula(op)(formula)


_VIEW_OPS = {torch.ops.aten.view, torch.ops.aten.reshape, torch.ops.aten._unsafe_view, torch.ops.aten.flatten,
             torch.ops.aten.unflatten, torch.ops.aten._reshape_alias}


def _non_empty(spec: DTensorSpec) -> DTensorSpec:
    meta = spec.tensor_meta
    if meta is None or 0 not in tuple(meta.shape):
        return spec
    import math

    from localmap.placements.shapes import dense_stride

    shape = [s if s != 0 else math.prod(spec.mesh.shape) for s in meta.shape]
    return make_spec(spec.mesh, spec.placements, shape, dense_stride(shape, meta.stride), meta.dtype)


def propagate_sharding(op: Any, args: Any, kwargs: dict) -> Any:
    """DTensor's sharding propagation for one op on input specs: output specs and whether inputs would have
    to be redistributed (i.e. whether running the op on the shards computes the shard of the global op)."""
    from torch.distributed.tensor._op_schema import OpSchema

    prop = DTensor._op_dispatcher.sharding_propagator
    if getattr(op, "overloadpacket", None) in _VIEW_OPS and any(
            0 in tuple(s.tensor_meta.shape) for s in args if isinstance(s, DTensorSpec) and s.tensor_meta):
        # DTensor's view rule loops forever on a size-0 dim (torch 2.13): no strategy, the caller's rule applies
        raise NotImplementedError("view of an empty tensor")
    # Other ops on empty tensors: every redistribution costs nothing there, so DTensor's cost-based choice may
    # pick a strategy that redistributes (read as "the local op is not the shard of the global op"). Sizes do
    # not change which placements an op's strategies accept, so ask about a non-empty tensor of the same
    # placements (size 0 becomes the mesh's size, which every mesh dim divides).
    args = tuple(_non_empty(a) if isinstance(a, DTensorSpec) else a for a in args)
    # Uncached: DTensor's cache keys on the arguments its runtime schema info marks static, which a schema
    # built here would not carry (a sum over dim 0 and over dim 1 would share an entry).
    schema = OpSchema(op, tuple(args), dict(kwargs), schema_info=prop.op_to_schema_info.get(op))
    return prop.propagate_op_sharding_non_cached(schema)


def quiet_fake_tensor_errors() -> Any:
    """Silence the fake-tensor logger while DTensor's propagation is probed (a probe may fail, by design)."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def ctx() -> Any:
        logger = logging.getLogger("torch._subclasses.fake_tensor")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            logger.setLevel(level)

    return ctx()


def register_trace_anchor(fn: Any) -> None:
    """Keep `fn`'s frames in the stack traces make_fx records (so a check can name the body's source line)."""
    from torch.fx.proxy import _register_stack_trace_anchor

    _register_stack_trace_anchor(getattr(fn, "__wrapped__", fn))
