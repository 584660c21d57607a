"""Arithmetic on rank offsets: integer values of the form base + scale * (this rank's coordinate on a mesh dim),
with a base that is the same on every rank of that dim, and the masked lookup they serve.

``axis_index(m)`` is such a value (scale 1); sums, differences and products by a number keep the form. The value
itself differs per rank (typed Varying), but a lookup into a table sharded along the looked-up dim, by indices
shifted down by this rank's offset (scale = minus the shard's length), clamped into the shard and multiplied by
the "index falls in my shard" mask of the same shifted indices, holds on each rank the rows it owns and zeros
elsewhere: summed over the ranks, that is the one-device lookup, a ``Partial`` sum (Megatron's vocab-parallel
embedding, and the target logit of its vocab-parallel cross-entropy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from localmap.collectives.registry import mesh_dim_of
from localmap.compat import FUNCTIONAL_OPS
from localmap.placements.types import PER_RANK_COPY, RuleError

aten = torch.ops.aten
_SAME_VALUE = {aten.clone.default, aten._to_copy.default, aten.detach.default, aten.alias.default,
               aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.view.default,
               aten.expand.default, aten._unsafe_view.default, aten.reshape.default}
_LOOKUPS = {aten.embedding.default: (0, 1, None), aten.gather.default: (0, 2, 1),
            aten.index_select.default: (0, 2, 1)}  # table arg, index arg, dim arg (None: dim 0)


def _peel(node: Any) -> Any:
    """The value under copies, casts and reshapes that keep each element (or broadcast it)."""
    while isinstance(node, fx.Node) and node.target in _SAME_VALUE:
        node = node.args[0]
    return node


def rank_scale(node: Any, m: int, mesh: Any, types: dict) -> int | None:
    """`scale` when `node` is base + scale * (coordinate on mesh dim m) with a base the same on every rank of
    m; None when it is not of that form (or not known to be)."""
    if isinstance(node, (int, bool)):
        return 0
    if not isinstance(node, fx.Node):
        return None
    t = types.get(node)
    if isinstance(t, tuple) and (isinstance(t[m], Replicate) or t[m] is PER_RANK_COPY):
        return 0
    target = node.target
    if target in _SAME_VALUE or target is aten.select.int or target is FUNCTIONAL_OPS.wait_tensor.default:
        return rank_scale(node.args[0], m, mesh, types)
    if target is FUNCTIONAL_OPS.all_to_all_single.default:
        return 1 if _coordinates(node, m, mesh) else None
    if target is aten.neg.default:
        s = rank_scale(node.args[0], m, mesh, types)
        return None if s is None else -s
    if target is aten.mul.Tensor:
        a, b = node.args[:2]
        if isinstance(b, int):
            s = rank_scale(a, m, mesh, types)
            return None if s is None else s * b
        return None
    if target in (aten.add.Tensor, aten.sub.Tensor):
        alpha = node.kwargs.get("alpha", 1)
        sa, sb = (rank_scale(a, m, mesh, types) for a in node.args[:2])
        if sa is None or sb is None or not isinstance(alpha, int):
            return None
        return sa + alpha * sb if target is aten.add.Tensor else sa - alpha * sb
    return None


def _coordinates(node: fx.Node, m: int, mesh: Any) -> bool:
    """An all_to_all of arange(n) in equal splits over mesh dim m (axis_index): every element is this rank's
    coordinate."""
    try:
        if mesh_dim_of(node, mesh) != m:
            return False
    except RuleError:
        return False
    src = node.args[0]
    n = mesh.shape[m]
    if not isinstance(src, fx.Node) or src.target not in (aten.arange.default, aten.arange.start):
        return False
    bounds = list(src.args)
    if bounds not in ([n], [0, n]):
        return False
    return all(s is None or list(s) == [1] * n for s in node.args[1:3])


def masked_lookup(node: fx.Node, mesh: Any, types: dict) -> set[int]:
    """Mesh dims on which `node` (a mul) is a masked lookup of this rank's rows: a partial sum there."""
    found = set()
    if node.target is not aten.mul.Tensor or len(node.args) < 2:
        return found
    for looked, masked in (node.args[:2], node.args[1::-1]):
        lookup = _peel(looked)
        spec = _LOOKUPS.get(getattr(lookup, "target", None))
        if spec is None:
            continue
        table, index = lookup.args[spec[0]], _peel(lookup.args[spec[1]])
        clamped = _clamped(index)
        if clamped is None or not isinstance(table, fx.Node) or not isinstance(types.get(table), tuple):
            continue
        ids, high = clamped
        tval = table.meta["val"]
        dim = (lookup.args[spec[2]] if spec[2] is not None else 0) % tval.ndim
        n = tval.shape[dim]
        if high != n - 1 or not _in_range_mask(_peel(masked), ids, n):
            continue
        for m, p in enumerate(types[table]):
            if p == Shard(dim) and rank_scale(ids, m, mesh, types) == -n:
                found.add(m)
    return found


def _clamped(index: Any) -> tuple[Any, int] | None:
    """(ids, upper bound) of clamp(ids, 0, upper)."""
    if not isinstance(index, fx.Node) or index.target is not aten.clamp.default or len(index.args) < 3:
        return None
    ids, low, high = index.args[:3]
    return (ids, high) if low == 0 and isinstance(high, int) else None


def _in_range_mask(mask: Any, ids: Any, n: int) -> bool:
    """mask == (ids >= 0) & (ids < n) (or ids <= n - 1), in either order."""
    if not isinstance(mask, fx.Node) or mask.target not in (aten.bitwise_and.Tensor, aten.logical_and.default):
        return False
    tests = {(_peel(a).target, _peel(a).args[1]) for a in mask.args[:2]
             if isinstance(_peel(a), fx.Node) and _peel(a).args and _peel(a).args[0] is ids}
    return len(tests) == 2 and (aten.ge.Scalar, 0) in tests and (
        (aten.lt.Scalar, n) in tests or (aten.le.Scalar, n - 1) in tests)


def partial_where_masked(node: fx.Node, in_types: list, mesh: Any, types: dict, default: Any) -> Any:
    """The mul's type: Partial(sum) on the mesh dims where it is a masked lookup, else `default`'s answer."""
    dims = masked_lookup(node, mesh, types)
    if not dims:
        return None
    plain = [tuple(Replicate() if m in dims else p for m, p in enumerate(t)) for t in in_types]
    inputs = [a for a in node.all_input_nodes if types.get(a) is not None]
    out = default(node, plain, mesh, dict(zip(inputs, plain)))
    return tuple(Partial() if m in dims else p for m, p in enumerate(out))

