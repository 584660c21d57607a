"""Tracing internals: the operator's base class and dispatch keys, fake modes, make_fx isolation, the
partitioners, selective checkpointing, saved-tensor hooks, decompositions and the flop counter's formulas."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator, OpOverload
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode, track_tensor_tree

__all__ = ["DispatchKey", "HigherOrderOperator", "OpOverload", "FakeTensor", "FakeTensorMode",
           "ProxyTorchDispatchMode", "track_tensor_tree"]


def fast_apply(fn: type[torch.autograd.Function]) -> Any:
    """``fn.apply`` without the Python-level checks for functorch transforms, used when none is active.

    Falls back to ``fn.apply`` inside vmap/grad transforms, which need the full path.
    """
    c_apply = super(torch.autograd.Function, fn).apply  # type: ignore[misc]
    full_apply = fn.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args: Any) -> Any:
        return full_apply(*args) if transforms_active() else c_apply(*args)

    _direct_backward(fn)
    return apply


def _direct_backward(fn: type[torch.autograd.Function]) -> None:
    """Let the autograd engine call `fn.backward` directly. The engine calls the node's ``apply``, which for
    every custom Function is ``BackwardCFunction.apply``: it looks up whether the class defines ``backward`` or
    ``vjp`` and whether it boxes gradients, on every backward call (two Python frames). For a Function that
    defines ``backward`` only and does not box, that lookup always picks ``backward``, so the node's class calls
    it straight away. Left as it is where the class differs (then the lookup's own errors stand)."""
    node_cls = getattr(fn, "_backward_cls", None)
    base = torch.autograd.function.BackwardCFunction
    if (node_cls is None or node_cls.apply is not base.apply or fn.vjp is not torch.autograd.Function.vjp
            or fn.backward is torch.autograd.Function.backward or getattr(fn, "boxed_grads_call", False)
            or not isinstance(inspect.getattr_static(fn, "backward"), staticmethod)):
        return
    node_cls.apply = fn.backward  # a plain function on the node's class: called with the node as ctx


def make_fx(fn: Any, **kwargs: Any) -> Any:
    """torch's make_fx, keeping ``detach`` as ``aten.detach`` in the graph.

    From torch 2.14, make_fx called without a decomposition table rewrites ``detach`` to ``alias``, so a graph
    that is differentiated again (a region's body, replayed under autograd to build its backward) loses the
    user's gradient cuts; an explicit table, even an empty one, keeps them (torch 2.13 always kept them)."""
    from torch.fx.experimental.proxy_tensor import make_fx as torch_make_fx

    kwargs.setdefault("decomposition_table", {})
    return torch_make_fx(fn, **kwargs)


def lazy_graph_modules() -> Any:
    """A context in which make_fx's GraphModules generate their Python code only when first called: a graph that
    is only read (the placement check's) never pays for it."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    return _use_lazy_graph_module(True)


def make_fx_on_values(fn: Any, **kwargs: Any) -> Any:
    """make_fx on real tensors that lets a value decide Python control flow (``if x.sum() > 0``): the branch
    this call's values take is traced, its scalars burned in (the graph holds for these values only)."""
    return make_fx(fn, tracing_mode="real", _error_on_data_dependent_ops=False, **kwargs)


def is_data_dependent_error(e: BaseException) -> bool:
    """Whether a trace stopped because a value decided control flow or a size (``if x.sum() > 0``, ``.item()``,
    ``nonzero``): the errors fake tensors raise for that."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return isinstance(e, (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException))


def untraceable_why(e: BaseException) -> str | None:
    """Why no trace on fake tensors (torch.compile's Dynamo included) can follow a body whose trace raised `e`, or
    None for another failure: Python that depends on tensor values, or an op with no fake implementation (a
    ``torch.library.custom_op`` without ``register_fake`` says so only in its message, which torch.export reads
    the same way; an op with no meta kernel raises UnsupportedOperatorException)."""
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    seen = e
    while seen is not None:
        if is_data_dependent_error(seen):
            return ("it reads tensor values into Python (a branch on a value, .item(), or a size that depends on "
                    "values)")
        if isinstance(seen, UnsupportedOperatorException) or "no fake impl registered" in str(seen):
            return "it calls an op that has no fake implementation (every op is run on fake tensors to be traced)"
        seen = seen.__cause__
    return None


def compiling_one_graph() -> bool:
    """Whether the torch.compile tracing now refuses graph breaks (fullgraph=True, or error_on_graph_break):
    Dynamo's current translator, read at trace time."""
    from localmap.compat.dynamo import current_translator

    tx = current_translator()
    return bool(tx is not None and (tx.one_graph or getattr(tx, "error_on_graph_break", False)))


@contextlib.contextmanager
def own_node_meta() -> Any:
    """fx.traceback's current node meta restored after a trace: a selective checkpoint traced by make_fx writes
    its recompute tags there (torch.utils.checkpoint), and they must not tag the nodes of a later trace."""
    import torch.fx.traceback as fx_traceback

    saved = dict(fx_traceback.current_meta)
    try:
        yield
    finally:
        fx_traceback.current_meta = saved


def is_random_op(target: Any) -> bool:
    """Whether an op draws random numbers: ATen tags them nondeterministic_seeded (rand*, randint, randperm,
    bernoulli and bernoulli_, dropout variants, normal, uniform_, multinomial, ...)."""
    return isinstance(target, OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def call_argument(target: Any, args: Sequence[Any], kwargs: dict, name: str, default: Any = None) -> Any:
    """The value a call of an op passes for its argument `name` (by the op's schema), or `default`."""
    schema = op_schema(target)
    for k, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name == name:
            return args[k] if k < len(args) else kwargs.get(name, arg.default_value)
    return default


def draws_random(target: Any, args: Sequence[Any], kwargs: dict) -> bool:
    """Whether this call of an op draws random numbers: a random op, unless its only randomness is a dropout
    probability given as 0 (attention kernels take ``dropout_p`` and are tagged random for it)."""
    if not is_random_op(target):
        return False
    p = call_argument(target, args, kwargs, "dropout_p", default=1)
    return not (isinstance(p, (int, float)) and p == 0)


def has_random_ops(gm: fx.GraphModule) -> bool:
    """Whether a graph draws random numbers."""
    return any(is_random_op(n.target) for n in gm.graph.nodes if n.op == "call_function")


def version_counter(t: torch.Tensor) -> int:
    """A tensor's in-place version counter (bumped by every in-place write to it or a view of it)."""
    return t._version


def in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (a checkpoint recomputes its forward
    there)."""
    return torch._C._current_graph_task_id() != -1


def op_schema(target: Any) -> Any:
    """The schema of an aten op (its arguments' alias and mutation facts); None for other targets."""
    return target._schema if isinstance(target, OpOverload) else None


def is_fake(t: Any) -> bool:
    return isinstance(t, FakeTensor)


def plain_signature(gm: fx.GraphModule) -> None:
    """Give a GraphModule a plain positional signature (make_fx's pytree codegen takes one list)."""
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()


# torch.fx's tracer (under make_fx) patches functions through one process-wide patcher, so two threads tracing
# at once break each other ("CURRENT_PATCHER is None"). localmap's traces (capture, region bodies, the placement
# check, region graphs) take this re-entrant lock; steady-state eager calls trace nothing and never take it.
_TRACE_LOCK = threading.RLock()

def trace_lock() -> Any:
    return _TRACE_LOCK

def isolated_tracing() -> Any:
    """A context for tracing a region's own graphs from inside another trace: functionalization suspended and
    the outer proxy modes off, so the inner make_fx sees plain fake tensors and records into its own graph."""
    from torch._dispatch.python import suspend_functionalization
    from torch._subclasses.functional_tensor import disable_functional_mode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    from torch.utils._python_dispatch import _disable_current_modes

    stack = contextlib.ExitStack()
    stack.enter_context(_TRACE_LOCK)  # one trace at a time per process (see trace_lock)
    # PyTorch's fake-tensor logger prints an op's failure with a traceback before the error reaches the caller;
    # while localmap traces, the error itself is what the user gets (named by region and line).
    from localmap.compat.dtensor import quiet_fake_tensor_errors

    stack.enter_context(quiet_fake_tensor_errors())
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
    env = getattr(fake_mode, "shape_env", None)
    return env.ignore_fresh_unbacked_symbols() if env is not None else contextlib.nullcontext()

def known_equal(a: Any, b: Any) -> bool:
    """Whether two sizes (ints or symbolic, e.g. a row count from ``.tolist()`` split sizes) are equal for every
    value their symbols may take; False when unknown. Never guards (no data-dependent error)."""
    if a is None or b is None:
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))

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


def sac_active() -> bool:
    """Whether a selective-checkpoint dispatch mode is on the current mode stack."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = sac_modes()
    return any(isinstance(m, modes) for m in _get_current_dispatch_mode_stack())


def storage_key(t: torch.Tensor) -> Any:
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage())

def current_trace_graph() -> Any:
    """The fx.Graph that the active make_fx trace is recording into (None outside one)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    return None if mode is None else mode.tracer.graph

class _NodeSites(torch.overrides.TorchFunctionMode):
    """Tags the nodes one torch call adds to `graph` (an op, a functional, a higher-order op, with everything
    it decomposes into) with ``meta[key] = where()``, asked once per call that added any."""

    def __init__(self, graph: fx.Graph, key: str, where: Any) -> None:
        super().__init__()
        self.graph, self.key, self.where = graph, key, where

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        before = len(self.graph.nodes)
        out = func(*args, **(kwargs or {}))
        added = len(self.graph.nodes) - before
        if added > 0:
            found = self.where()
            for node in itertools.islice(reversed(self.graph.nodes), added):
                node.meta.setdefault(self.key, found)
        return out


@contextlib.contextmanager
def node_sites(key: str, where: Any) -> Any:
    """Inside a function make_fx traces: each node a torch call adds to the trace's graph gets
    ``meta[key] = where()`` (called from within that call, so it can read the caller's frames). The cheap
    stand-in for make_fx's ``record_stack_traces``, which formats a full stack trace per node."""
    graph = current_trace_graph()
    if graph is None:
        yield
        return
    with _NodeSites(graph, key, where):
        yield


def without_saved_tensor_hooks() -> Any:
    """Set aside the default saved-tensor hooks (e.g. an activation checkpoint around the region) while a
    region's joint graph is traced: its own autograd.grad must not trigger the user's recomputation."""
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


def check_decompositions() -> dict:
    """Decompositions the placement check traces with: normalizations (softmax, log-softmax, layer norm, RMS
    norm) written with aten reductions, so the reductions inside them get placement types. Means and variances
    stay whole: DTensor types them. Read overload by overload from PyTorch's table (get_decompositions walks
    the whole table, milliseconds)."""
    from torch._decomp import global_decomposition_table

    aten = torch.ops.aten
    table = global_decomposition_table["post_autograd"]
    overloads = (getattr(packet, name) for packet in (aten._softmax, aten._log_softmax, aten.native_layer_norm,
                                                      aten._fused_rms_norm, aten.rms_norm)
                 for name in packet.overloads())
    return {op: table[op] for op in overloads if op in table}


def reparametrized(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Any:
    """A context in which `module` holds `tensors` as its parameters and buffers (by qualified name), tied
    weights kept tied: torch.func.functional_call's swap, held open for as long as the caller needs it (a
    checkpoint's recomputation reads the module again during the backward)."""
    from torch.nn.utils.stateless import _reparametrize_module

    return _reparametrize_module(module, tensors, tie_weights=True)
