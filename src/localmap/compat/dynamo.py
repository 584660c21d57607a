"""Dynamo and the planner's capture pipeline: PyTorch's local_map operator as Dynamo knows it, its deferral and
wrapping switches, trace-time calls, and the capture pipeline itself (Dynamo export, then the joint export).

The pipeline is meta-pytorch/autoparallel's: ``_dynamo_graph_capture_for_export`` with local_map wrapping on
(``LocalMapWrappedHigherOrderVariable.enable()``), then ``aot_export_joint_with_descriptors`` under
``torch._higher_order_ops.local_map.defer_inlining()``. Dynamo makes a region node only for calls of PyTorch's
own ``_local_map_wrapped`` (an identity check), so localmap hands its regions to that function there.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Any, Callable, Iterator

import torch

from localmap.compat.compiling import surfacing
from localmap.compat.versions import TORCH_AT_LEAST_2_14


def local_map_wrapping() -> bool:
    """Whether Dynamo turns calls of PyTorch's ``_local_map_wrapped`` into region nodes (the planner's capture)."""
    from torch._dynamo.variables.higher_order_ops import LocalMapWrappedHigherOrderVariable

    return bool(LocalMapWrappedHigherOrderVariable._enabled)


def torch_deferring() -> bool:
    """Whether PyTorch's local_map operator is deferred (``torch._higher_order_ops.local_map.defer_inlining``)."""
    from torch._higher_order_ops import local_map as torch_local_map

    return bool(torch_local_map._DEFER_INLINING)


def call_torch_local_map(fn: Callable, out_placements: tuple, in_placements: tuple, mesh: Any, *args: Any) -> Any:
    """PyTorch's ``_local_map_wrapped`` on flat arguments (one placement tuple per argument, no gradient
    placements: PyTorch's operator refuses them); under wrapping, Dynamo makes it one region node."""
    from torch.distributed.tensor.experimental._func_map import _local_map_wrapped

    if TORCH_AT_LEAST_2_14:  # 2.14 added enable_spmd_types after redistribute_inputs
        return _local_map_wrapped(fn, out_placements, in_placements, None, mesh, False, False, *args)
    return _local_map_wrapped(fn, out_placements, in_placements, None, mesh, False, *args)


def at_trace_time(fn: Callable) -> Callable:
    """`fn` run by Dynamo while it traces (on real Python values: objects, constants, no tensors), its result a
    constant of the trace; called normally outside Dynamo. An exception it raises reaches the caller as itself
    (``compiling.surfacing``), not wrapped in Dynamo's InternalTorchDynamoError."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise surfacing(e).with_traceback(e.__traceback__) from e.__cause__

    return torch._dynamo.assume_constant_result(run)


def object_handle(obj: Any) -> int:
    """A constant Dynamo can hand to an ``at_trace_time`` function for an object it cannot (an nn.Module): its
    id, read back by ``object_from_handle`` while the traced call (which holds the object) is running."""
    return id(obj)


def object_from_handle(handle: int) -> Any:
    """The object of ``object_handle``; only at trace time, while the call that passed the object is traced."""
    return ctypes.cast(handle, ctypes.py_object).value


def opaque_to_dynamo(fn: Callable) -> Callable:
    """`fn` recorded by Dynamo as one call, traced later by the joint export (make_fx) instead."""
    return torch._dynamo.nonstrict_trace(fn)


def torch_region_target_names() -> tuple[str, ...]:
    """What ``str(node.target)`` of PyTorch's region nodes contains in a joint graph (2.13: a closure named
    call_local_map; 2.14: the operator local_map_hop)."""
    return ("call_local_map", "local_map_hop")


def torch_region_call(target: Any, args: tuple) -> tuple[torch.fx.GraphModule, tuple, dict, dict] | None:
    """A call of PyTorch's own region node in a joint graph (``region_operator("torch")``), as an interpreter sees
    it: (the region graph, its tensor arguments, its placements with the real mesh, its role: "forward" or
    "backward" and the number of activations a backward takes first); None for any other call. 2.13's node is a
    closure named call_local_map holding its graph; 2.14's is the operator local_map_hop, the graph first."""
    from torch._higher_order_ops import local_map as torch_local_map

    if target is getattr(torch_local_map, "local_map_hop", None):
        graph, tensors = args[0], tuple(args[1:])
    elif getattr(target, "__module__", None) == torch_local_map.__name__ and \
            getattr(target, "__name__", None) == "call_local_map":
        cells = [c.cell_contents for c in target.__closure__ or ()]
        graph, tensors = next(c for c in cells if isinstance(c, torch.fx.GraphModule)), tuple(args)
    else:
        return None
    kwargs = dict(graph.meta["local_map_kwargs"])
    kwargs["device_mesh"] = getattr(kwargs["device_mesh"], "real_obj", kwargs["device_mesh"])  # a FakeScriptObject
    role = {"role": "backward" if graph.meta.get("is_backward") else "forward",
            "num_activations": int(graph.meta.get("num_activations") or 0) if graph.meta.get("is_backward") else 0}
    return graph, tensors, kwargs, role


@contextlib.contextmanager
def local_map_wrapping_on() -> Iterator[None]:
    """PyTorch's local_map wrapping on (Dynamo) without deferring its operator, as PyTorch's own operator
    tests compile: region nodes in Dynamo's graph, inlined by the joint trace."""
    from torch._dynamo.variables.higher_order_ops import LocalMapWrappedHigherOrderVariable

    with LocalMapWrappedHigherOrderVariable.enable():
        yield


@contextlib.contextmanager
def planner_capture_context() -> Iterator[None]:
    """Local_map wrapping on (Dynamo) and PyTorch's operator deferred, as the planner captures."""
    from torch._dynamo.variables.higher_order_ops import LocalMapWrappedHigherOrderVariable
    from torch._higher_order_ops import local_map as torch_local_map

    with LocalMapWrappedHigherOrderVariable.enable(), torch_local_map.defer_inlining():
        yield


def planner_capture(model: torch.nn.Module, args: tuple) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The planner's capture of `model` on (fake) `args`: (Dynamo's graph, the joint forward+backward graph)."""
    from torch._dynamo.functional_export import _dynamo_graph_capture_for_export
    from torch._functorch.aot_autograd import aot_export_joint_with_descriptors

    with planner_capture_context():
        dynamo_gm = _dynamo_graph_capture_for_export(model)(*args)
        with contextlib.ExitStack() as stack:
            joint = aot_export_joint_with_descriptors(stack, dynamo_gm, args)
            return dynamo_gm, joint.graph_module


def current_translator() -> Any:
    """Dynamo's instruction translator tracing now in this thread, else None (also where none has run in this
    thread yet: Dynamo's thread-local then has no slot)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        return InstructionTranslator.current_tx()
    except AttributeError:
        return None


def _dynamo_graph() -> Any:
    """The fx.Graph Dynamo is recording into (at trace time), else None."""
    tx = current_translator()
    return None if tx is None else tx.output.graph


def dynamo_graph_mark() -> str | None:
    """At trace time: the name of the last node of the graph Dynamo is recording (None for none)."""
    nodes = list(getattr(_dynamo_graph(), "nodes", ()))
    return nodes[-1].name if nodes else None


def factory_calls_since(mark: str | None) -> list[tuple[str, str]]:
    """At trace time: (the call, the user's source line) for each call Dynamo recorded after node `mark` that
    makes a tensor from no tensor: a factory (torch.arange, torch.tensor, torch.zeros, torch.randn, ...)."""
    graph = _dynamo_graph()
    nodes = [] if graph is None else list(graph.nodes)
    names = [n.name for n in nodes]
    after = nodes[names.index(mark) + 1:] if mark in names else nodes
    return [(_call_name(n), _last_source_line(n)) for n in after
            if n.op in ("call_function", "call_method") and _holds_tensor(n)
            and not any(_holds_tensor(a) for a in n.all_input_nodes)]


def _holds_tensor(node: torch.fx.Node) -> bool:
    """Whether a node's value is or holds a tensor (a tuple of chunks, say)."""
    from torch.utils._pytree import tree_leaves

    return any(isinstance(v, torch.Tensor) for v in tree_leaves(node.meta.get("example_value")))


def _call_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else f"{getattr(target, '__module__', '') or ''}.{target.__name__}" \
        if hasattr(target, "__name__") else str(target)


def _last_source_line(node: torch.fx.Node) -> str:
    """'File "...", line N, in f: the code' of the innermost frame of a node's stack trace."""
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    frames = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
    if not frames:
        return "(no source line recorded)"
    code = lines[frames[-1] + 1] if frames[-1] + 1 < len(lines) else ""
    return f"{lines[frames[-1]]}: {code}"
