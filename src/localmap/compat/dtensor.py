"""DTensor internals: specs, the C++ constructor, local tensors, redistribution, sharding propagation."""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.placement_types import Placement, Shard

# A DTensor's spec and its local tensor, read in the eager hot path: attrgetters are C-level (no Python frame).
spec_of = operator.attrgetter("_spec")
local_tensor_of = operator.attrgetter("_local_tensor")


def make_spec(mesh: DeviceMesh, placements: tuple[Placement, ...], shape: Sequence[Any],
              stride: Sequence[Any], dtype: torch.dtype) -> DTensorSpec:
    """A DTensor's spec: mesh, placements and global metadata."""
    return DTensorSpec(mesh, placements, tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), dtype))

# make_dtensor(local, spec, requires_grad=...): wrap a local tensor as a DTensor without any checks or
# communication (the caller computed the spec). DTensor's C++ constructor, bound to the class: ``DTensor(...)``
# adds a dynamo-disabled ``__init__`` that does nothing but costs microseconds on every region call, and a Python
# wrapper function around the constructor costs a frame (three a step on the eager path).
make_dtensor = functools.partial(torch.Tensor._dtensor__new__, DTensor)

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


def grad_placements_default(placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """PyTorch's gradient placements for a value held with `placements` (Partial read as Replicate: the
    gradient DTensor delivers to a Partial value is the same on every rank)."""
    from torch.distributed.tensor._api import _normalize_placements_for_grad

    return tuple(_normalize_placements_for_grad(tuple(placements)))


_VIEW_OPS = {torch.ops.aten.view, torch.ops.aten.reshape, torch.ops.aten._unsafe_view, torch.ops.aten.flatten,
             torch.ops.aten.unflatten, torch.ops.aten._reshape_alias}


def view_rule_hangs(op: Any, shapes: Sequence[Sequence[Any]]) -> bool:
    """DTensor's view rule loops forever on a size-0 dim (torch 2.13): such a question must not be asked."""
    return getattr(op, "overloadpacket", None) in _VIEW_OPS and any(0 in tuple(s) for s in shapes)


_propagated: dict = {}  # (op, argument key) -> (meshes named, DTensor's decision or the exception it raised)
_PROPAGATED_LIMIT = 8192


def clear_propagation_cache() -> None:
    _propagated.clear()


def propagation_cache_size() -> int:
    return len(_propagated)


def _spec_key(a: Any, meshes: list) -> Any:
    """An argument of a propagation question as a key: a spec by mesh, placements, shape, stride and dtype;
    a list by its items; a plain value by type and value. Symbolic sizes make the question unkeyable."""
    if isinstance(a, DTensorSpec):
        meshes.append(a.mesh)
        meta = a.tensor_meta
        if meta is None:
            raise TypeError("unkeyable")
        return ("S", id(a.mesh), a.placements, tuple(meta.shape), tuple(meta.stride), meta.dtype)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *(_spec_key(x, meshes) for x in a))
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)):
        raise TypeError("unkeyable")
    hash(a)
    return (type(a).__name__, a)


def propagate_sharding(op: Any, args: Any, kwargs: dict) -> Any:
    """DTensor's sharding propagation for one op on input specs: output specs and whether inputs would have
    to be redistributed (i.e. whether running the op on the shards computes the shard of the global op).
    Remembered per question (a body repeats the same op on the same shapes: a layer stack), which keeps the
    check's cost per op small."""
    meshes: list = []
    try:
        key = (op, _spec_key(tuple(args), meshes), _spec_key(tuple(sorted(kwargs.items())), meshes))
    except TypeError:
        key = None
    hit = _propagated.get(key) if key is not None else None
    if hit is not None and all(a is b for a, b in zip(hit[0], meshes)):
        if isinstance(hit[1], Exception):
            raise hit[1]
        return hit[1]
    try:
        with quiet_fake_tensor_errors():  # a probe may fail, by design
            result = _propagate_uncached(op, args, kwargs)
    except Exception as e:
        result = e
    if key is not None:
        if len(_propagated) >= _PROPAGATED_LIMIT:
            _propagated.clear()
        _propagated[key] = (meshes, result)
    if isinstance(result, Exception):
        raise result
    return result


def _propagate_uncached(op: Any, args: Any, kwargs: dict) -> Any:
    from torch.distributed.tensor._op_schema import OpSchema

    prop = DTensor._op_dispatcher.sharding_propagator
    # Uncached: DTensor's cache keys on the arguments its runtime schema info marks static, which a schema
    # built here would not carry (a sum over dim 0 and over dim 1 would share an entry).
    schema = OpSchema(op, tuple(args), dict(kwargs), schema_info=_schema_info(prop, op))
    return type(prop).propagate_op_sharding_non_cached(_ProbedOnMeta(prop), schema)


class _ProbedOnMeta:
    """DTensor's sharding propagator with its probe of the global output's metadata run on meta tensors, as the
    check's light trace runs ops (compat.recording.run_on_meta), instead of on fake tensors: the same metadata
    for a fraction of the cost (a fake tensor's dispatch, its cache key, its construction, per argument and
    output), which was about half of each question. Where only fake tensors follow the op (it reads a value,
    makes a tensor on a given device; symbolic sizes; a dispatch mode active; an op the meta run refuses),
    DTensor's own probe runs, so a question it refuses is refused as before. Everything else is DTensor's."""

    def __init__(self, prop: Any) -> None:
        self._prop = prop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._prop, name)

    def _propagate_tensor_meta_non_cached(self, schema: Any) -> Any:
        from localmap.compat.recording import meta_runnable, run_on_meta

        if meta_runnable(schema.op) and not torch._C._len_torch_dispatch_stack():
            try:
                args = _on_meta(schema.args_schema)
                kwargs = {k: _on_meta(v) for k, v in schema.kwargs_schema.items()}
                return _tensor_meta(run_on_meta(schema.op, args, kwargs))
            except Exception:  # refused on meta (or symbolic sizes): DTensor's probe decides, as before
                pass
        with _shared_probe_mode():
            return self._prop._propagate_tensor_meta_non_cached(schema)


def _on_meta(a: Any) -> Any:
    """An argument of a propagation question with each spec as a meta tensor of its global metadata."""
    if isinstance(a, DTensorSpec):
        meta = a.tensor_meta
        if meta is None or not all(type(n) is int for n in (*meta.shape, *meta.stride)):
            raise TypeError("no static metadata")
        return torch.empty_strided(tuple(meta.shape), tuple(meta.stride), dtype=meta.dtype, device="meta")
    if type(a) in (list, tuple):
        return type(a)(_on_meta(x) for x in a)
    if isinstance(a, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise TypeError("not a plain argument")
    return a


def _tensor_meta(out: Any) -> Any:
    """DTensor's TensorMeta (or a list or tuple of them, None for non-tensors) of an op's output."""
    if isinstance(out, torch.Tensor):
        return TensorMeta(out.shape, out.stride(), out.dtype)
    if isinstance(out, (tuple, list)):
        metas = [_tensor_meta(o) if isinstance(o, torch.Tensor) else None for o in out]
        return tuple(metas) if isinstance(out, tuple) else metas
    return None


_probes = threading.local()  # this thread's FakeTensorMode for DTensor's output-metadata probes


def probe_modes_held() -> int:
    """1 when this thread holds its FakeTensorMode for DTensor's probes (made once per thread), else 0."""
    return int(getattr(_probes, "context", None) is not None)


def drop_probe_mode() -> None:
    """Forget this thread's probe FakeTensorMode: the next question makes a new one."""
    _probes.context = None


def _shared_probe_mode() -> Any:
    """A context in which DTensor's propagation finds one FakeTensorMode to compute the global output's metadata
    in, instead of making a new one per question (its constructor records a stack trace: about a third of a
    question's cost). Only where none is in use (a trace's own fake mode, Dynamo's context, stays the one)."""
    from torch._guards import TracingContext, detect_fake_mode, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    if TracingContext.try_get() is not None or detect_fake_mode() is not None:
        return contextlib.nullcontext()
    context = getattr(_probes, "context", None)
    if context is None:
        context = _probes.context = TracingContext(FakeTensorMode())
    return tracing(context)


def _schema_info(prop: Any, op: Any) -> Any:
    """An op's RuntimeSchemaInfo, looked up as DTensor's dispatcher does: ops registered with a whole-mesh
    strategy keep it in ``op_to_schema_info``, ops registered with a single-mesh-dim strategy (torch 2.14 moved
    aten.cat there, among others) in ``op_to_schema_info_for_single_dim_strategy``. Without it a list argument
    (cat's tensors) is not flattened and DTensor's expansion finds no input strategies."""
    info = prop.op_to_schema_info.get(op)
    if info is None:
        info = getattr(prop, "op_to_schema_info_for_single_dim_strategy", {}).get(op)
    return info


def quiet_fake_tensor_errors() -> Any:
    """Silence the fake-tensor logger while localmap traces: a probe of DTensor's propagation may fail by
    design, and a body's own error reaches the user as a BodyError (named by region and line), not as a logged
    traceback."""

    @contextlib.contextmanager
    def ctx() -> Any:
        # A filter, not setLevel: setting a level clears the level cache of every logger (torch has hundreds),
        # milliseconds on each of a check's several calls.
        logger = logging.getLogger("torch._subclasses.fake_tensor")
        quiet = _CriticalOnly()
        logger.addFilter(quiet)
        try:
            yield
        finally:
            logger.removeFilter(quiet)

    return ctx()


class _CriticalOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


def is_strided_shard(p: Any) -> bool:
    """DTensor's interleaved shard (``_StridedShard``: a reshape merged a sharded dim with one before it)."""
    return isinstance(p, Placement) and type(p).__name__ == "_StridedShard"


def strided_shard(dim: int, split_factor: int) -> Placement:
    """DTensor's interleaved shard of `dim`: the dim cut into `split_factor` equal blocks, each block sharded
    (rank r holds piece r of every block)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return _StridedShard(dim, split_factor=split_factor)


def sharded_dim(p: Any) -> int | None:
    """The tensor dim a placement splits: a Shard's, or a strided shard's (not a Shard subclass in every torch
    release); None for Replicate, Partial and localmap's markers."""
    if isinstance(p, Shard) or is_strided_shard(p):
        return p.dim
    return None


# NOTE: closed-over DTensors in a checked body. A body may call `self.w.to_local()` on a DTensor it closes over
# (torchtitan's experts do). While the check traces such a body, `to_local` of those DTensors returns a traced
# stand-in typed by their placements, and the gradient placements each call declares are recorded. The patch
# is installed only for the trace (Dynamo must never see it) and consults a per-thread table, so other threads
# calling to_local meanwhile get the original.
_substitutes = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_original_to_local = DTensor.to_local


def _to_local(self: DTensor, *, grad_placements: Any = None) -> torch.Tensor:
    table = getattr(_substitutes, "table", None)
    if table is not None and id(self) in table:
        stand_in, declared = table[id(self)]
        declared.append(grad_placements)
        return stand_in
    refuse = getattr(_substitutes, "refuse", None)
    if refuse is not None and _holds_real_shard(self):
        refuse(self)  # raises: a real DTensor's shard would become a constant of the trace
    return _original_to_local(self, grad_placements=grad_placements)


def _holds_real_shard(d: DTensor) -> bool:
    """Whether a DTensor's local tensor holds values (this process's shard, or a simulated mesh's per-rank
    shards): not a fake tensor of a trace, nor a meta tensor (the check's light trace, a model on meta)."""
    local = d._local_tensor
    return not isinstance(local, FakeTensor) and local.device.type != "meta"


@contextlib.contextmanager
def _patched(attr: str, value: Any) -> Iterator[None]:
    """DTensor.to_local patched (for every thread while any user holds it) and `attr` of this thread's state set."""
    global _patch_users
    with _patch_lock:
        _patch_users += 1
        DTensor.to_local = _to_local  # type: ignore[method-assign]
    previous = getattr(_substitutes, attr, None)
    setattr(_substitutes, attr, value)
    try:
        yield
    finally:
        setattr(_substitutes, attr, previous)
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                DTensor.to_local = _original_to_local  # type: ignore[method-assign]


def to_local_substituted(table: dict[int, tuple[torch.Tensor, list]]) -> contextlib.AbstractContextManager[None]:
    """While active on this thread: `d.to_local()` of a DTensor whose id is in `table` returns its stand-in and
    appends the call's `grad_placements` to its list."""
    return _patched("table", table)


def to_local_of_real_refused(refuse: Callable[[DTensor], None]) -> contextlib.AbstractContextManager[None]:
    """While active on this thread (a program being traced on fake tensors): `d.to_local()` of a DTensor whose
    local tensor is no fake tensor (one that holds this process's real shard, not one of the trace's) calls
    `refuse(d)`, which raises. Substituted DTensors (`to_local_substituted`) are not refused."""
    return _patched("refuse", refuse)
