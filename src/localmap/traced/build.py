"""Building a region: its forward and backward graphs from its body graph (cached).

A region's graphs all work in *local* (per-shard) shapes:

* **body**: ``(*inputs) -> (*outputs)``, traced from the user's function on local fake tensors;
* **forward**: ``(*inputs) -> (*outputs, *activations)``;
* **backward**: ``(*activations, *tangents) -> (*input_grads)``, one gradient (or None) per input and one tangent
  per output that requires grad, activations in the order the forward returns them (tensors, then SymInts).

Forward and backward come from one joint trace of the body (``torch.autograd.grad`` under ``make_fx``) cut by
PyTorch's partitioner (min-cut rematerialization by default). Identical regions (same body code, constants,
placements, mesh and input metadata) are built once: a model of 32 identical layers builds its graphs once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback

from localmap.caches import register_cache, register_counter
from localmap import compat as _compat
from localmap.errors import fail
from localmap.placements.algebra import avg_grad_scale, avg_ranks, extreme_grad_error, grad_default, has_extreme
from localmap.check.mutation import check_no_input_mutation
from localmap.traced.graphs import run_graph, to_local_fake
from localmap.traced.meta import grad_placements, kwargs_of, region_kwargs, set_region_meta


@dataclass(frozen=True)
class RegionGraphs:
    """A region's partitioned graphs and what it takes to run them."""

    forward: fx.GraphModule
    backward: fx.GraphModule | None  # None when no output requires grad
    num_outputs: int
    num_activations: int
    tangent_outputs: tuple[int, ...]  # outputs that receive a tangent, in backward input order
    tangent_strides: tuple[tuple[Any, ...], ...]  # local strides the backward graph was traced with
    grad_inputs: tuple[int, ...]  # inputs that get a gradient
    stats: dict = field(default_factory=dict, compare=False)

# ---- building forward and backward ------------------------------------------------------------------------------

_cache_lock = threading.Lock()
REGION_CACHE_LIMIT = 512  # built regions remembered (cleared when full)
_cache: dict[Any, RegionGraphs] = register_cache("regions", {}, limit=REGION_CACHE_LIMIT,
                                                 eviction="clear when full", lock=_cache_lock)
_built = 0  # regions actually built (not served from the cache)
register_counter("regions_built", lambda: _built)


def _meta_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type,
                value.requires_grad)
    if isinstance(value, torch.SymInt):
        raise TypeError("symbolic")
    return ("V", value if isinstance(value, (int, float, bool, str, type(None))) else id(value))


def _cache_key(body: fx.GraphModule, args: Sequence[Any], partition: str) -> Any:
    """Identity of a region for the cache; None when it cannot be keyed (symbolic sizes)."""
    try:
        kwargs = kwargs_of(body)
        nodes = tuple(
            (n.meta.get("custom") and repr(n.meta.get("custom")), repr(n.meta.get("recompute")))
            for n in body.graph.nodes)
        constants = tuple(id(getattr(body, n.target)) for n in body.graph.nodes if n.op == "get_attr")
        placements = (repr(kwargs["in_placements"]), repr(kwargs["out_placements"]),
                      repr(kwargs.get("in_grad_placements")))
        key = (body.code, nodes, constants, placements, id(kwargs["device_mesh"]), partition,
               tuple(_meta_key(a) for a in args), _compat.sac_active())
        hash(key)
        return key
    except TypeError:
        return None


def build_region(body: fx.GraphModule, args: Sequence[Any], partition: str = "min_cut") -> RegionGraphs:
    """Forward and backward graphs of `body` for global arguments `args` (cached)."""
    global _built
    kwargs = region_kwargs(body, len(args))
    check_no_input_mutation(body)
    key = _cache_key(body, args, partition)
    if key is not None:
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
    graphs = _build(body, args, kwargs, partition)
    _built += 1
    if key is not None:
        with _cache_lock:
            if len(_cache) >= REGION_CACHE_LIMIT:
                _cache.clear()
            _cache[key] = graphs
    return graphs


def _build(body: fx.GraphModule, args: Sequence[Any], kwargs: dict, partition: str) -> RegionGraphs:
    mesh = kwargs["device_mesh"]
    in_placements = kwargs["in_placements"]
    with _compat.isolated_tracing(), _compat.without_saved_tensor_hooks():
        fake_mode = _compat.detect_fake_mode(args) or _compat.new_fake_mode()
        with fake_mode:
            fakes = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) and not _compat.is_fake(a) else a
                     for a in args]
            primals = [to_local_fake(a, p, mesh) for a, p in zip(fakes, in_placements, strict=True)]
            with _compat.ignore_fresh_unbacked(fake_mode), torch.enable_grad():
                probe = run_graph(body, primals)
            tangent_idx = tuple(i for i, o in enumerate(probe) if isinstance(o, torch.Tensor) and o.requires_grad)
            grad_idx = tuple(i for i, p in enumerate(primals) if isinstance(p, torch.Tensor) and p.requires_grad)
            for i in tangent_idx:
                out_pl = kwargs["out_placements"][i] or ()
                if has_extreme(tuple(out_pl)):
                    raise extreme_grad_error(f"outputs[{i}]", out_pl, kwargs["device_mesh"])
            if _compat.has_free_unbacked_symbols([probe[i] for i in tangent_idx]):
                raise fail("outputs", "have data-dependent sizes that would leak out of the region",
                           fix="make every output's size depend only on input sizes (pad or combine inside)")
            tangents = [torch.empty_strided(probe[i].shape, probe[i].stride(), dtype=probe[i].dtype,
                                            device=probe[i].device) for i in tangent_idx]
        num_outputs = len(probe)

        def joint(primals: list, tangents: list) -> tuple:
            outs = run_graph(body, primals, keep_meta=True)
            tag_phase(_compat.current_trace_graph())  # what exists now is forward (as AOTAutograd tags)
            grads: list[Any] = [None] * len(primals)
            if tangent_idx and grad_idx:
                found = torch.autograd.grad([outs[i] for i in tangent_idx], [primals[i] for i in grad_idx],
                                            tangents, allow_unused=True)
                for i, g in zip(grad_idx, found, strict=True):
                    grads[i] = g
            inputs = {_compat.storage_key(p) for p in primals if isinstance(p, torch.Tensor)}
            outs = tuple(o.clone() if isinstance(o, torch.Tensor) and _compat.storage_key(o) in inputs else o
                         for o in outs)
            tag_phase(_compat.current_trace_graph())  # and what autograd added since is backward
            return (*outs, *grads)

        with fx_traceback.preserve_node_meta(), _compat.ignore_fresh_unbacked(fake_mode):
            joint_gm = _compat.make_fx(joint, tracing_mode="fake")(primals, tangents)
        _compat.copy_forward_meta_to_backward(joint_gm)
        clean_checkpoint_tags(joint_gm, num_outputs)
        forward, backward = _partition(joint_gm, primals, tangents, num_outputs, partition, fake_mode)
    num_activations = len(_outputs(forward)) - num_outputs
    if backward is not None:
        _activations_first(backward, forward, num_outputs)
    graphs = RegionGraphs(
        forward=forward, backward=backward, num_outputs=num_outputs, num_activations=num_activations,
        tangent_outputs=tangent_idx,
        tangent_strides=tuple(tuple(t.stride()) for t in tangents), grad_inputs=grad_idx,
    )
    _check_counts(graphs, kwargs, len(args))
    _annotate(graphs, kwargs, args)
    return graphs


def _partition(joint_gm: fx.GraphModule, primals: list, tangents: list, num_outputs: int, partition: str,
               fake_mode: Any) -> tuple[fx.GraphModule, fx.GraphModule | None]:
    """Forward and backward graphs cut from the joint one (the forward alone when nothing takes a tangent)."""
    if not tangents:
        return _forward_only(joint_gm, num_outputs), None
    if partition == "min_cut" and _compat.has_random_ops(joint_gm):
        partition = "default"  # recomputing a random op would draw other numbers: save what it made
    with fake_mode:  # the partitioner makes fake values too, in the mode the graph was traced in
        return _compat.partitioner(partition)(joint_gm, [primals, tangents], num_fwd_outputs=num_outputs)


def tag_phase(graph: fx.Graph | None) -> None:
    """Tag untagged nodes as forward until the first call, backward after; tangents are backward. Lets
    PyTorch copy forward annotations onto the backward nodes derived from them."""
    if graph is None:
        return
    tagged_forward = any(n.meta.get("partitioner_tag") for n in graph.nodes)
    for node in graph.nodes:
        if "partitioner_tag" not in node.meta:
            backward = tagged_forward or (node.op == "placeholder" and node.name.startswith("tangents"))
            node.meta["partitioner_tag"] = "is_backward" if backward else "is_forward"


def clean_checkpoint_tags(joint: fx.GraphModule, num_outputs: int) -> None:
    """Keep selective-checkpoint tags (meta 'recompute') only on the forward ops of the body, where the
    partitioner reads them; tracing leaves the last tag on placeholders and backward ops too. Tags made
    outside Dynamo have no checkpoint graph id: give them one."""
    outputs = joint.graph.find_nodes(op="output")[0].args[0][:num_outputs]
    forward: set[fx.Node] = set()
    stack = [o for o in outputs if isinstance(o, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in forward:
            forward.add(node)
            stack.extend(node.all_input_nodes)
    for node in joint.graph.nodes:
        if node.op != "call_function" or node not in forward:
            node.meta.pop("recompute", None)
            node.meta.pop("ac_graph_id", None)
        elif "recompute" in node.meta and node.meta.get("ac_graph_id") is None:
            node.meta["ac_graph_id"] = 0


def _outputs(gm: fx.GraphModule) -> tuple:
    return tuple(gm.graph.find_nodes(op="output")[0].args[0])


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="placeholder"))


def _forward_only(joint_gm: fx.GraphModule, num_outputs: int) -> fx.GraphModule:
    """When nothing needs a gradient the joint is the forward: drop its (all None) gradient outputs and
    tangent placeholders."""
    graph = joint_gm.graph
    out = graph.find_nodes(op="output")[0]
    out.args = (tuple(out.args[0][:num_outputs]),)
    for node in _placeholders(joint_gm):
        if node.name.startswith("tangents") and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm = fx.GraphModule(joint_gm, graph)
    _compat.plain_signature(gm)
    return gm


def _activations_first(backward: fx.GraphModule, forward: fx.GraphModule, num_outputs: int) -> None:
    """Order the backward's placeholders as the forward returns activations (tensors, then SymInts), then
    tangents. PyTorch's partitioner puts SymInt activations first."""
    saved = _outputs(forward)[num_outputs:]
    names = [n.name for n in saved]
    holders = {n.name: n for n in _placeholders(backward)}
    ordered = [holders[name] for name in names if name in holders]
    rest = [n for n in _placeholders(backward) if n.name not in set(names)]
    first_op = next(n for n in backward.graph.nodes if n.op != "placeholder")
    for node in ordered + rest:
        first_op.prepend(node)
    backward.recompile()


def _check_counts(graphs: RegionGraphs, kwargs: dict, num_args: int) -> None:
    """The partitioned graphs' inputs and outputs must match the placements (else the caller gets an error,
    not a silently misaligned graph)."""
    n_in, n_out = len(_placeholders(graphs.forward)), len(_outputs(graphs.forward))
    want_out = len(kwargs["out_placements"])
    if n_in != num_args:
        raise fail("forward graph", f"has {n_in} inputs for {num_args} in_placements", expected=num_args,
                   given=n_in, fix="report this: the partitioner dropped or added an input")
    if graphs.num_outputs != want_out:
        raise fail("outputs", f"the body returns {graphs.num_outputs} outputs but out_placements has {want_out}",
                   expected=want_out, given=graphs.num_outputs,
                   fix="give one out placement per output of the body")
    if n_out != graphs.num_outputs + graphs.num_activations:
        raise fail("forward graph", "output count disagrees with outputs plus activations",
                   expected=graphs.num_outputs + graphs.num_activations, given=n_out, fix="report this")
    if graphs.backward is not None:
        b_in, b_out = len(_placeholders(graphs.backward)), len(_outputs(graphs.backward))
        if b_in != graphs.num_activations + len(graphs.tangent_outputs):
            raise fail("backward graph", "input count disagrees with activations plus tangents",
                       expected=graphs.num_activations + len(graphs.tangent_outputs), given=b_in, fix="report this")
        if b_out != num_args:
            raise fail("backward graph", f"has {b_out} outputs for {num_args} inputs", expected=num_args,
                       given=b_out, fix="report this")


def _annotate(graphs: RegionGraphs, kwargs: dict, args: Sequence[Any]) -> None:
    """Placements and roles on the graphs, as a planner reads them. Backward metadata is derived: its inputs
    are the tangents of the outputs that get one (placements of a gradient flowing into those outputs), its
    outputs the inputs' gradient placements."""
    forward, backward = graphs.forward, graphs.backward
    set_region_meta(forward, dict(kwargs), {"role": "forward", "num_activations": graphs.num_activations,
                                            "num_outputs": graphs.num_outputs})
    if backward is None:
        return
    outs = kwargs["out_placements"]
    set_region_meta(backward, {
        "in_placements": tuple(grad_default(tuple(outs[i])) for i in graphs.tangent_outputs),
        "out_placements": grad_placements(kwargs),
        "in_grad_placements": None,
        "device_mesh": kwargs["device_mesh"],
    }, {
        "role": "backward", "num_activations": graphs.num_activations,
        "grad_shapes": tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args),
        # A Partial('avg') output passes 1/n of its gradient to each rank's local output.
        "tangent_scales": tuple(avg_ranks(outs[i], kwargs["device_mesh"]) for i in graphs.tangent_outputs),
        # An input held as Partial('avg') whose gradient is Replicate there: each local piece carries 1/n of
        # the value, so its gradient is n times the local one (as the eager path scales it).
        "grad_scales": tuple(avg_grad_scale(p, g, kwargs["device_mesh"])
                             for p, g in zip(kwargs["in_placements"], grad_placements(kwargs), strict=True)),
    })
