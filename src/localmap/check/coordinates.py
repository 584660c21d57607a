"""Values made from this rank's coordinate: a body that reads the mesh on purpose.

``axis_index(m)`` is the rank's coordinate on mesh dim m. A value computed from it and from values the same on
every rank of m alone (``1 + axis_index(m)``, a static table looked up at it, a comparison of it) is a *coordinate
value*: it differs per rank, typed Varying, but it is a known function of the coordinate. Two uses of one give a
shard of a stated global value:

* **a per-rank scalar meeting a shard** (``coordinate_scaled``): a pointwise op of Shard(d) data on m and a
  one-element coordinate value c. Rank r computes f(block r, c(r)), which is block r of f(X, C) where C holds c(r)
  along every row of block r: Shard(d) of that value. Met with data the same on every rank (or a partial sum), the
  result has no global form and stays Varying.
* **this rank's positions** (``coordinate_positions``): ``arange(k) + k * axis_index(m)`` holds positions r*k ..
  r*k+k-1 on rank r: Shard(0) of ``arange(n * k)``, the positions of the rows a shard of k rows holds, which is
  the one-rank run's ``arange`` too (a causal mask from them compares global positions: no meaning that follows
  the mesh here).
* **a block picked by coordinate** (``coordinate_picked``): ``all_gather(y.unsqueeze(0), m).index_select(0, c)``
  (how ``ppermute`` and ``shift`` are made). Every rank gathers the ranks' y in rank order and keeps y of rank
  c(r): for y Shard(d) on m that is block c(r) of y's global value, so the result is Shard(d) of that value with
  its blocks in the order c(0), c(1), ...; for y Replicate it is y itself.

NOTE: meaning that follows the mesh. These values, like ``x * axis_size(m)``, mean different things on meshes of
different sizes: the one-rank run (every collective the identity) is another program. The proof states the
meaning on the call's mesh and proves the claim against it; it does not know whether the rearrangement is what
the author meant (JAX's ``check_vma`` accepts such claims on the same grounds). A value read from the rank any
other way (a local reduction, a process group's rank as a literal, data) is no coordinate value: the proof stops
there as before.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Replicate, Shard

from localmap import compat
from localmap.check.offsets import coordinates, peel, rows_of_rank
from localmap.collectives.registry import mesh_dim_of
from localmap.check.propagation import op_name
from localmap.placements.types import FOLLOWS_MESH, UNKNOWN_WHY, VARYING, RuleError

aten = torch.ops.aten
_PASS = {aten.select.int, compat.FUNCTIONAL_OPS.wait_tensor.default}
_LOOKUPS = {aten.index_select.default, aten.index.Tensor, aten.embedding.default, aten.gather.default}


def coordinate_value(node: Any, m: int, mesh: Any, types: dict, seen: dict | None = None) -> bool:
    """Whether `node` is computed from the coordinate on mesh dim m and values the same on every rank of m
    alone, deterministically (at least one coordinate among its sources)."""
    seen = {} if seen is None else seen
    if not isinstance(node, fx.Node):
        return False
    if node in seen:
        return seen[node]
    seen[node] = False  # a cycle is no proof
    found = _made_of_coordinate(peel(node), m, mesh, types, seen)
    seen[node] = found
    return found


def _made_of_coordinate(node: Any, m: int, mesh: Any, types: dict, seen: dict) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is compat.FUNCTIONAL_OPS.all_to_all_single.default:
        return coordinates(node, m, mesh)
    if node.target in _PASS:
        return coordinate_value(node.args[0], m, mesh, types, seen)
    pointwise = isinstance(node.target, compat.OpOverload) and torch.Tag.pointwise in node.target.tags
    if not (pointwise or node.target in _LOOKUPS) or compat.draws_random(node.target, node.args, node.kwargs):
        return False
    made = False
    for a in node.all_input_nodes:
        t = types.get(a)
        if isinstance(t, tuple) and isinstance(t[m], Replicate):
            continue
        if not coordinate_value(a, m, mesh, types, seen):
            return False
        made = True
    return made


def _scalar(node: Any) -> bool:
    """One element per rank (static sizes: a data-dependent size is never guarded on)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and all(type(s) is int and s == 1 for s in val.shape)


def _asked_whole(node: fx.Node, dims: set, types: dict, mesh: Any, default: Callable,
                 which: Callable[[Any], bool] = lambda p: True) -> Any:
    """The default rule's type for `node` with its inputs' entries on `dims` (those `which` picks) asked about as
    Replicate: what the op does on the other mesh dims, and its answer on `dims` before the caller's own; None
    where it gives no single type."""
    inputs = [a for a in node.all_input_nodes if isinstance(types.get(a), tuple)]
    plain = {a: tuple(Replicate() if m in dims and which(p) else p for m, p in enumerate(types[a])) for a in inputs}
    out = default(node, [plain[a] for a in inputs], mesh, plain)
    return out if isinstance(out, tuple) else None


def coordinate_scaled(node: fx.Node, in_types: list, mesh: Any, types: dict, default: Callable) -> Any:
    """The type of a pointwise op where one-element coordinate values meet shards (the module docstring):
    Shard(d) on the mesh dims where the op with those values taken as Replicate gives Shard(d), Varying on the
    others; None where no input is such a value."""
    if not isinstance(node.target, compat.OpOverload) or torch.Tag.pointwise not in node.target.tags:
        return None
    inputs = [a for a in node.all_input_nodes if isinstance(types.get(a), tuple)]
    dims = set()  # mesh dims where every varying input is a one-element coordinate value
    for m in range(mesh.ndim):
        varying = [a for a in inputs if types[a][m] is VARYING]
        if varying and all(_scalar(a) and coordinate_value(a, m, mesh, types) for a in varying):
            dims.add(m)
    if not dims:
        return None
    out = _asked_whole(node, dims, types, mesh, default, lambda p: p is VARYING)
    if out is None:
        return None
    for m in dims:  # a result the same on every rank beside the coordinate is itself a coordinate value
        if isinstance(out[m], Shard):
            node.meta[FOLLOWS_MESH] = (f"{op_name(node)} of a shard of dim {out[m].dim} and a value of the rank's "
                                       f"coordinate on mesh dim {m}: each block met by its own rank's value")
        elif not isinstance(out[m], Replicate):
            node.meta[UNKNOWN_WHY] = (f"{op_name(node)} combines a value made from the rank's coordinate on mesh dim "
                                      f"{m} with values that are not a shard there: it differs per rank with no "
                                      "global form")
    return tuple(VARYING if m in dims and not isinstance(p, Shard) else p for m, p in enumerate(out))


def coordinate_positions(node: fx.Node, in_types: list, mesh: Any, types: dict, default: Callable) -> Any:
    """The type of ``arange(k) + k * axis_index(m)`` (either order): Shard(0) on those mesh dims m (the module
    docstring); None where it is not of that form on any."""
    val = node.meta.get("val")
    if node.target is not aten.add.Tensor or not isinstance(val, torch.Tensor) or val.ndim != 1 or \
            type(val.shape[0]) is not int:
        return None
    dims = {m for m in range(mesh.ndim) if rows_of_rank(node, m, mesh, val.shape[0])}
    out = _asked_whole(node, dims, types, mesh, default) if dims else None
    return None if out is None else tuple(Shard(0) if m in dims else p for m, p in enumerate(out))


def coordinate_picked(node: fx.Node, in_types: list, mesh: Any, types: dict, default: Callable) -> Any:
    """The type of ``gathered.index_select(0, c)`` with `gathered` the ranks' y (size 1 along dim 0) all-gathered
    along dim 0 over mesh dim m and c a one-element coordinate value on m: y's type there (the module
    docstring); None where the node is not of that form."""
    if node.target is not aten.index_select.default or node.args[1] != 0:
        return None
    gathered, index = node.args[0], node.args[2]
    source = peel(gathered)
    while isinstance(source, fx.Node) and source.target is compat.FUNCTIONAL_OPS.wait_tensor.default:
        source = source.args[0]
    if getattr(source, "target", None) is not compat.FUNCTIONAL_OPS.all_gather_into_tensor.default:
        return None
    y = source.args[0]
    try:
        m = mesh_dim_of(source, mesh)
    except RuleError:
        return None
    shape = y.meta["val"].shape if isinstance(y, fx.Node) and "val" in y.meta else None
    t = types.get(y)
    if not shape or type(shape[0]) is not int or shape[0] != 1 or not isinstance(t, tuple) or not _scalar(index) or \
            not coordinate_value(index, m, mesh, types):
        return None
    picked = t[m] if isinstance(t[m], Replicate) or (isinstance(t[m], Shard) and t[m].dim > 0) else None
    if picked is None:
        return None
    out = _asked_whole(node, {m}, types, mesh, default)
    if out is None:
        return None
    if isinstance(picked, Shard):
        node.meta[FOLLOWS_MESH] = (f"a block picked by the rank's coordinate on mesh dim {m} (ppermute, shift): "
                                   "the global value's blocks in another order")
    return tuple(picked if k == m else p for k, p in enumerate(out))
