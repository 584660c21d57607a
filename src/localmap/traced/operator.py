"""The local_map operator: each region one graph node carrying its placements.

``local_map_hop(body, *args)`` is a HigherOrderOperator. ``body`` is an ``fx.GraphModule`` written in local
(per-shard) shapes whose ``meta["local_map_kwargs"]`` holds ``in_placements``, ``out_placements``,
``in_grad_placements`` (may be None) and ``device_mesh``; ``args`` are global-shaped. By default a region is
inlined: its body runs on the arguments as given. Under ``defer_inlining()`` it stays a region:

* Autograd: the region's forward and backward graphs are built (``_region.build_region``) and run through one
  autograd Function, the forward below autograd with its activations saved for the backward.
* FakeTensorMode: global inputs become local fakes (this rank's shard; rank 0 on a fake process group), the
  graph runs, outputs become global again; saved activations stay local.
* ProxyTorchDispatchMode: one ``call_function`` node targeting this operator, the graph installed as a
  submodule of the traced module, ``meta["local_map_kwargs"]`` and global-shaped ``meta["val"]`` on the node.

One function per dispatch key below, registered next to each other.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch
import torch.fx as fx
from localmap.caches import register_cache
from localmap import compat as _compat
from localmap.compat import dynamo as compat_dynamo
from localmap.compat import (
    DispatchKey, FakeTensorMode, HigherOrderOperator, ProxyTorchDispatchMode, pytree, track_tensor_tree,
)
from localmap.check.mutation import check_no_input_mutation
from localmap import context
from localmap.context import recorder
from localmap.errors import fail
from localmap.placements.shapes import dense_stride
from localmap.traced.build import RegionGraphs, build_region
from localmap.traced.graphs import check_shard_shapes, run_graph, to_global_fake, to_local_fake
from localmap.traced.meta import (
    COST, KWARGS, ROLE, RegionCost, kwargs_of, planner_kwargs, region_kwargs, role_of,
)


# ---- defer_inlining: per thread, nestable -------------------------------------------------------------------

PARTITIONERS = ("min_cut", "default")


def is_deferring() -> bool:
    """Whether regions stay regions (inside ``defer_inlining()``) on this thread."""
    return bool(context.stack("partitioners"))


def current_partitioner() -> str:
    return context.innermost("partitioners", "min_cut")


@contextlib.contextmanager
def defer_inlining(partitioner: str = "min_cut") -> Iterator[None]:
    """Keep local_map regions as regions (one node each, local-shaped graphs) instead of inlining them.

    `partitioner` picks how each region's joint graph is cut: "min_cut" (PyTorch's min-cut
    rematerialization: recomputes cheap ops instead of saving them) or "default" (saves what the backward
    uses). Nestable; the innermost choice applies; restored on exit, also on error. Per thread.
    """
    if partitioner not in PARTITIONERS:
        raise fail("defer_inlining", "partitioner is not one PyTorch has", expected=PARTITIONERS,
                   given=repr(partitioner), fix="use 'min_cut' (recomputes cheap ops) or 'default' (saves them)")
    with context.pushed("partitioners", partitioner):
        yield


# ---- the operator -----------------------------------------------------------------------------------------------

class LocalMapHOP(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("localmap_region")

    def __call__(self, body: fx.GraphModule, *args: Any) -> tuple:
        return super().__call__(body, *args)


local_map_hop = LocalMapHOP()


@local_map_hop.py_impl(DispatchKey.CompositeExplicitAutograd)
def _run_real(body: fx.GraphModule, *args: Any) -> tuple:
    """Real tensors: run the graph."""
    return run_graph(body, args)


@local_map_hop.py_impl(DispatchKey.Autograd)
def _autograd(body: fx.GraphModule, *args: Any) -> tuple:
    """Inline under ordinary autograd by default; under defer_inlining, build the region's forward and
    backward graphs and run them through one autograd Function."""
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if not is_deferring():
        return run_graph(body, args)
    if role_of(body)["role"] != "body":
        with _compat.below_autograd():
            return local_map_hop(body, *args)
    graphs = build_region(body, args, current_partitioner()) if needs_grad else None
    records = recorder("capture")
    if records is not None and not _compat.in_backward():  # a checkpoint's recomputation is no new call
        records.append({"body": body, "graphs": graphs, "args": args})
    if graphs is None:
        with _compat.below_autograd():
            return local_map_hop(body, *args)
    return RegionGraphsFunction.apply(graphs, *args)


@local_map_hop.py_functionalize_impl
def _functionalize(ctx: Any, body: fx.GraphModule, *args: Any) -> tuple:
    """Unwrap, redispatch, rewrap. A body that writes to its inputs is rejected (LocalMapError naming the op)."""
    check_no_input_mutation(body)
    unwrapped = ctx.unwrap_tensors(args)
    with ctx.redispatch_to_next():
        return ctx.wrap_tensors(local_map_hop(body, *unwrapped))


@local_map_hop.py_impl(FakeTensorMode)
def _fake(mode: FakeTensorMode, body: fx.GraphModule, *args: Any) -> tuple:
    """Run the graph on fake tensors; under defer_inlining, in local shapes (see module docstring). A region's
    forward and backward graphs are local-shaped wherever they run (a backward traced after the deferral ended)."""
    with mode:
        if not is_deferring() and role_of(body)["role"] == "body":
            return run_graph(body, args)
        return _run_local(body, args, mode)


@local_map_hop.py_impl(ProxyTorchDispatchMode)
def _proxy(mode: ProxyTorchDispatchMode, body: fx.GraphModule, *args: Any) -> tuple:
    """One call_function node targeting the operator; the graph becomes a submodule of the traced root. Inside
    PyTorch's local_map deferral (a planner's capture) the node takes the form planners read instead (see
    planner_node_target)."""
    example = local_map_hop(body, *args)
    tracer = mode.tracer
    proxy_args = pytree.tree_map(tracer.unwrap_proxy, args)
    if compat_dynamo.torch_deferring():
        out_proxy = tracer.create_proxy("call_function", planner_node_target(body), proxy_args, {})
        out_proxy.node.meta[KWARGS] = planner_kwargs(kwargs_of(body))
        out_proxy.node.meta[COST] = RegionCost(body)
    else:
        body_proxy = tracer.create_proxy("get_attr", _install(tracer.root, body), (), {})
        out_proxy = tracer.create_proxy("call_function", local_map_hop, (body_proxy, *proxy_args), {})
        out_proxy.node.meta[KWARGS] = kwargs_of(body)
    out_proxy.node.meta[ROLE] = role_of(body)
    return track_tensor_tree(example, out_proxy, constant=None, tracer=tracer)


def planner_node_target(graph: fx.GraphModule) -> Any:
    """The target of a region node in a planner's capture: a function over the region's graph named
    ``call_local_map`` (``call_local_map_backward`` for a backward), the form meta-pytorch/autoparallel finds
    regions by (``"call_local_map" in str(node.target)``) on every PyTorch release, with the tensors as its only
    arguments (activations first). Called inside either deferral (the capture, a planner re-running the
    captured graph) it is the operator on global tensors; outside them (a planner running its plan on each
    rank's shards) the graph runs on the arguments as they are."""
    def call_local_map(*args: Any) -> Any:
        check_shard_shapes(graph, args, call_local_map.__name__)
        if is_deferring() or compat_dynamo.torch_deferring():
            with defer_inlining():
                return local_map_hop(graph, *args)
        return run_graph(graph, args)

    if role_of(graph)["role"] == "backward":
        call_local_map.__name__ = call_local_map.__qualname__ = "call_local_map_backward"
    setattr(call_local_map, _REGION_GRAPH, graph)  # the graph, for readers of the node (region_graph_of)
    return call_local_map


_REGION_GRAPH = "region_graph"


def region_graph_of(target: Any) -> fx.GraphModule | None:
    """The region graph a planner-form node's target runs (planner_node_target), else None."""
    return getattr(target, _REGION_GRAPH, None)


@local_map_hop.py_impl(_compat.simulation_mode_type())
def _simulated(mode: Any, body: fx.GraphModule, *args: Any) -> tuple:
    """The simulated mesh (LocalTensorMode): set aside (capture, run and verify trace and run globally), the
    region dispatches on without it; on simulated per-rank values the graph runs once per rank."""
    if not _compat.simulation_set_aside(mode) and any(_compat.is_simulated(a) for a in args):
        with mode:
            return run_graph(body, args)
    return local_map_hop(body, *args)


for _mode in _compat.sac_modes():  # selective activation checkpointing sees a region as one op
    @local_map_hop.py_impl(_mode)
    def _sac(mode: Any, body: fx.GraphModule, *args: Any) -> tuple:
        return mode.__torch_dispatch__(local_map_hop, [], (body, *args), {})


# ---- helpers ----------------------------------------------------------------------------------------------------

def _install(root: torch.nn.Module, gm: fx.GraphModule) -> str:
    """Register `gm` on the traced root once; the same graph (a cached region) keeps its name."""
    for name, child in root.named_children():
        if child is gm:
            return name
    prefix = {"body": "local_map_body", "forward": "local_map_fw", "backward": "local_map_bw"}[role_of(gm)["role"]]
    i = 0
    while hasattr(root, f"{prefix}_{i}"):
        i += 1
    root.register_module(f"{prefix}_{i}", gm)
    return f"{prefix}_{i}"


def _run_local(gm: fx.GraphModule, args: tuple, mode: FakeTensorMode) -> tuple:
    """Global fake args -> local fakes -> run -> global fake outputs (activations stay local)."""
    role = role_of(gm)
    kwargs = kwargs_of(gm)
    mesh = kwargs["device_mesh"]
    skip = role["num_activations"] if role["role"] == "backward" else 0
    region_kwargs(gm, len(args) - skip)
    local_args = list(args[:skip]) + [
        to_local_fake(a, p, mesh) for a, p in zip(args[skip:], kwargs["in_placements"], strict=True)]
    outs = _outputs_from_cache(gm, local_args)
    if outs is None:
        with _compat.ignore_fresh_unbacked(mode):
            outs = run_graph(gm, local_args)
        _remember_outputs(gm, local_args, outs)
    n = len(kwargs["out_placements"])
    shapes = role.get("grad_shapes") or (None,) * n
    results = [to_global_fake(o, p, mesh, s) for o, p, s in zip(outs[:n], kwargs["out_placements"], shapes)]
    return (*results, *outs[n:])


# Output metadata of region graphs per input metadata: a model of many identical layers runs each graph on
# fake tensors once, then makes fresh fakes of the remembered shapes. Only concrete (non-symbolic) shapes.
_fake_outputs: "weakref.WeakKeyDictionary[fx.GraphModule, dict]" = register_cache(
    "fake_outputs", weakref.WeakKeyDictionary(), limit=None, eviction="weak keys")


def _meta_key(values: Any) -> Any:
    key = []
    for v in values:
        if isinstance(v, torch.Tensor):
            key.append((tuple(v.shape), v.stride(), v.dtype, v.device))
        elif isinstance(v, (int, float, bool, type(None))) and not isinstance(v, torch.SymInt):
            key.append(v)
        else:
            raise TypeError("not cacheable")
    out = tuple(key)
    hash(out)
    return out


def _outputs_from_cache(gm: fx.GraphModule, args: list) -> tuple | None:
    try:
        metas = _fake_outputs.get(gm, {}).get(_meta_key(args))
    except TypeError:
        return None
    if metas is None:
        return None
    return tuple(torch.empty_strided(m[0], m[1], dtype=m[2], device=m[3]) if isinstance(m, tuple) else m
                 for m in metas)


def _remember_outputs(gm: fx.GraphModule, args: list, outs: tuple) -> None:
    try:
        key = _meta_key(args)
        metas = [(tuple(o.shape), o.stride(), o.dtype, o.device) if isinstance(o, torch.Tensor) else o
                 for o in outs]
        _meta_key([o for o in outs])  # symbolic outputs (data-dependent sizes) are not remembered
    except TypeError:
        return
    _fake_outputs.setdefault(gm, {})[key] = metas


def _coerce(grad: torch.Tensor, local_stride: tuple) -> torch.Tensor:
    """Give an incoming gradient the dim order (memory format) the backward graph was traced with."""
    want = dense_stride(grad.shape, local_stride)
    if tuple(grad.stride()) == tuple(want) or grad.numel() <= 1:
        return grad
    return grad.new_empty_strided(grad.shape, want).copy_(grad)


class RegionGraphsFunction(torch.autograd.Function):
    """Runs a region's forward graph below autograd and its backward graph on the saved activations."""

    @staticmethod
    def forward(ctx: Any, graphs: RegionGraphs, *args: Any) -> tuple:  # type: ignore[override]
        with _compat.below_autograd():
            outs = local_map_hop(graphs.forward, *args)
        n = graphs.num_outputs
        saved = outs[n:]
        ctx.graphs = graphs
        ctx.layout = [isinstance(a, torch.Tensor) for a in saved]
        ctx.save_for_backward(*(a for a in saved if isinstance(a, torch.Tensor)))
        ctx.symbols = [a for a in saved if not isinstance(a, torch.Tensor)]
        results = tuple(outs[:n])
        ctx.mark_non_differentiable(*(r for i, r in enumerate(results)
                                      if isinstance(r, torch.Tensor) and i not in graphs.tangent_outputs))
        return results

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the backward graph would have to be differentiable
            raise fail("create_graph", "asks for a differentiable backward of a region in a traced program "
                       "(double backward, e.g. a gradient penalty), which traced regions do not support yet",
                       fix="run that step eagerly on DTensors (double backward through eager regions matches one "
                           "device), or compute the gradient penalty outside the region")
        graphs: RegionGraphs = ctx.graphs
        tensors, symbols = iter(ctx.saved_tensors), iter(ctx.symbols)
        saved = [next(tensors) if is_tensor else next(symbols) for is_tensor in ctx.layout]
        tangents = [_coerce(grads[i], s) for i, s in zip(graphs.tangent_outputs, graphs.tangent_strides, strict=True)]
        with _compat.below_autograd():
            input_grads = local_map_hop(graphs.backward, *saved, *tangents)
        return (None, *input_grads)
