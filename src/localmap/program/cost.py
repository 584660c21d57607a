"""What a region costs each rank: FLOPs, saved activation bytes, and communication bytes.

Communication uses standard ring costs per mesh dim of size n, on the bytes B a rank holds before the
collective (rules as data in ``RESHARD_COST``):

    Shard -> Replicate      all-gather       (n - 1) * B
    Partial -> Replicate    all-reduce       2 (n - 1) / n * B
    Partial -> Shard        reduce-scatter   (n - 1) / n * B
    Shard(a) -> Shard(b)    all-to-all       (n - 1) / n * B
    anything else           local            0   (Replicate -> Shard slices; Replicate -> Partial keeps a share)

Collectives inside a region's graphs are counted by each collective's own cost rule
(``localmap.collectives.registry``, written next to the collective): all_gather (n - 1) * input, reduce_scatter
(n - 1) / n * input, all_reduce 2 (n - 1) / n * input, all_to_all (n - 1) / n * input.

Sizes that depend on data (tokens routed to experts by an all_to_all with ``.tolist()`` splits) are unknown at
capture: FLOPs and bytes count them as 0, so those numbers are lower bounds.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Placement, Shard

from localmap.caches import register_cache
from localmap import compat
from localmap.collectives.registry import collective
from localmap.placements.shapes import local_shape
from localmap.traced.meta import register_cost_measure, role_of


def _kind(p: Placement) -> str:
    return "S" if isinstance(p, Shard) else "P" if isinstance(p, Partial) else "R"


RESHARD_COST: dict[tuple[str, str], Callable[[float, int], float]] = {
    ("S", "R"): lambda b, n: (n - 1) * b,
    ("P", "R"): lambda b, n: 2 * (n - 1) / n * b,
    ("P", "S"): lambda b, n: (n - 1) / n * b,
    ("S", "S"): lambda b, n: (n - 1) / n * b,  # only when the dims differ (checked by the caller)
}

def at_least(value: Any) -> int:
    """An int for a size or count; one that depends on data (an unbacked symbol, e.g. tokens routed to an
    expert) is counted at its lower bound, with every data-dependent size taken as 0."""
    if isinstance(value, int):
        return value
    expr = value.node.expr if isinstance(value, torch.SymInt) else value
    free = getattr(expr, "free_symbols", None)
    if free is None:
        return int(value)
    return int(expr.subs({sym: 0 for sym in free}))


def tensor_bytes(shape: Sequence[Any], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= at_least(s)
    return n * dtype.itemsize


def reshard_bytes(global_shape: Sequence[int], dtype: torch.dtype, src: Sequence[Placement],
                  dst: Sequence[Placement], mesh_shape: Sequence[int]) -> float:
    """Bytes one rank sends to bring a tensor from placements `src` to `dst`, mesh dim by mesh dim."""
    local = local_shape(global_shape, src, mesh_shape, [0] * len(mesh_shape))
    held = tensor_bytes(local, dtype)
    total = 0.0
    for m, (a, b) in enumerate(zip(src, dst)):
        if a == b:
            continue
        rule = RESHARD_COST.get((_kind(a), _kind(b)))
        if rule is not None:
            total += rule(held, mesh_shape[m])
    return total


def collective_bytes(gm: fx.GraphModule | None) -> float:
    """Bytes one rank sends in the functional collectives of a region graph."""
    if gm is None:
        return 0.0
    total = 0.0
    for node in gm.graph.nodes:
        facts = collective(node.target) if node.op == "call_function" else None
        if facts is None or facts.cost is None:
            continue
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        group = compat.group_size(node.args[-1])
        if isinstance(val, torch.Tensor) and group:
            total += facts.cost(tensor_bytes(val.shape, val.dtype), group)
    return total


_flops_cache: "weakref.WeakKeyDictionary[fx.GraphModule, int]" = register_cache(
    "flops", weakref.WeakKeyDictionary(), limit=None, eviction="weak keys")
compat.register_cpu_attention_flops()


def graph_flops(gm: fx.GraphModule | None) -> int:
    """FLOPs of one run of a region graph on its traced (local) shapes, by PyTorch's flop counter."""
    if gm is None:
        return 0
    if gm in _flops_cache:
        return _flops_cache[gm]
    from torch.utils.flop_counter import FlopCounterMode

    holders = list(gm.graph.find_nodes(op="placeholder"))
    vals = [h.meta.get("val") for h in holders]
    with compat.isolated_tracing():
        mode = compat.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]) or compat.new_fake_mode()
        with mode:
            args = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                    if isinstance(v, torch.Tensor) else v for v in vals]
            counter = FlopCounterMode(display=False)
            with counter, compat.ignore_fresh_unbacked(mode):
                gm(*args)
    flops = at_least(counter.get_total_flops())
    _flops_cache[gm] = flops
    return flops


def activation_bytes(forward: fx.GraphModule | None, num_outputs: int) -> int:
    """Bytes of the tensors a region's forward saves for its backward, per rank."""
    if forward is None:
        return 0
    saved = forward.graph.find_nodes(op="output")[0].args[0][num_outputs:]
    total = 0
    for node in saved:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor):
            total += tensor_bytes(val.shape, val.dtype)
    return total



def region_cost(graph: fx.GraphModule) -> dict:
    """A region graph's costs per rank as a planner-form region node carries them (traced.meta.RegionCost)."""
    role = role_of(graph)
    saved = activation_bytes(graph, role["num_outputs"]) if role["role"] == "forward" else 0
    return {"flops": graph_flops(graph), "saved_bytes": saved, "comm_bytes": collective_bytes(graph)}


register_cost_measure(region_cost)
