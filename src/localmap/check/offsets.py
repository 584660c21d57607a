"""Arithmetic on rank offsets: integer values of the form base + scale * (this rank's coordinate on a mesh dim),
with a base that is the same on every rank of that dim, and the masked lookup they serve.

``axis_index(m)`` is such a value (scale 1); sums, differences and products by a number keep the form. The value
itself differs per rank (typed Varying), but a lookup into a table sharded along the looked-up dim, by indices
shifted down by this rank's offset (scale = minus the shard's length), clamped into the shard and multiplied by
the "index falls in my shard" mask of the same shifted indices, holds on each rank the rows it owns and zeros
elsewhere: summed over the ranks, that is the one-device lookup, a ``Partial`` sum (Megatron's vocab-parallel
embedding, and the target logit of its vocab-parallel cross-entropy).

Code that reads its rank from a process group (torchtitan's ``offset = dist.get_rank(tp_group) * chunk``) traces
with the offset as a literal int: the lookup ``clamp(ids - c, 0, n - 1)`` masked by ``(ids >= c) & (ids < c + n)``
holds this rank's rows only when ``c`` is this rank's shard start. That is a fact of this process, so it is
proven only where this process is one real rank of the mesh dim (a real process group, each rank checking its
own trace); on a simulated or fake mesh every rank would share one trace, and the literal proves nothing. While
torch.compile traces without a way for the ranks to agree on their outcomes (``rank_facts_withheld``), the
literal proves nothing either: one rank proving it and another not would act apart at trace time.

The same lookup may instead be zeroed where the ids fall outside the rank's rows (``local[outside] = 0`` on the
shifted ids, or a clamp, then ``picked[outside] = 0`` on the looked-up values, with ``outside`` the complement of
the mask: torchtitan's vocab-parallel cross-entropy), ``zeroed_lookup``. And a table whole on every rank looked
up at ``arange(k) + k * axis_index(m)`` gives each rank its own k rows: a shard of the looked-up dim
(``rank_rows``: a learned position table under context parallelism).

Either way the shard start is the coordinate times the local length only where the table's dim is cut evenly and
by that one mesh dim: a lookup on a mesh dim with uneven shards, or into a dim another mesh dim also cuts, is not
proven. The mask must also meet the lookup element by element (the ids' shape, broadcast over the looked-up rows'
other dims), not along some other dim.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.distributed as dist
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from localmap.collectives.registry import mesh_dim_of
from localmap.compat import FUNCTIONAL_OPS, known_equal, sharded_dim
from localmap.placements.types import PER_RANK_COPY, RuleError

aten = torch.ops.aten
_SAME_VALUE = {aten.clone.default, aten._to_copy.default, aten.detach.default, aten.alias.default,
               aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.view.default,
               aten.expand.default, aten._unsafe_view.default, aten.reshape.default}
_withheld = threading.local()
_LOOKUPS = {aten.embedding.default: (0, 1, None), aten.gather.default: (0, 2, 1),
            aten.index_select.default: (0, 2, 1)}  # table arg, index arg, dim arg (None: dim 0)


@contextlib.contextmanager
def rank_facts_withheld() -> Iterator[list]:
    """No proof in this block reads this process's rank (a literal offset proves nothing): every rank then
    reaches the verdict of the trace they share, with no exchange (check.tested.agree_while_tracing). Yields a
    list that receives True where a masked lookup by a literal offset went unproven for that reason."""
    before, seen = rank_facts_are_withheld(), getattr(_withheld, "seen", None)
    _withheld.on, _withheld.seen = True, []
    try:
        yield _withheld.seen
    finally:
        _withheld.on, _withheld.seen = before, seen


def rank_facts_are_withheld() -> bool:
    """Whether proofs are kept from this process's rank now (part of the verdict cache's key)."""
    return getattr(_withheld, "on", False)


def peel(node: Any) -> Any:
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
        return 1 if coordinates(node, m, mesh) else None
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


def coordinates(node: fx.Node, m: int, mesh: Any) -> bool:
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


def masked_lookup(node: fx.Node, mesh: Any, types: dict, uneven: frozenset = frozenset()) -> set[int]:
    """Mesh dims on which `node` (a mul) is a masked lookup of this rank's rows: a partial sum there. `uneven`:
    mesh dims with unevenly sharded inputs (a shard start there is not coordinate * local length)."""
    found = set()
    if node.target is not aten.mul.Tensor or len(node.args) < 2:
        return found
    for looked, masked in (node.args[:2], node.args[1::-1]):
        lookup = peel(looked)
        spec = _LOOKUPS.get(getattr(lookup, "target", None))
        if spec is None:
            continue
        table, index = lookup.args[spec[0]], peel(lookup.args[spec[1]])
        clamped = _clamped(index)
        if clamped is None or not isinstance(table, fx.Node) or not isinstance(types.get(table), tuple):
            continue
        ids, high = clamped
        dim, n = _looked_dim(lookup, spec)
        if high != n - 1 or not _aligned(node, looked, masked, lookup, spec, dim):
            continue
        in_range = functools.partial(_in_range_mask, peel(masked))
        found |= _own_rows_dims(ids, table, dim, n, in_range, mesh, types, uneven)
    return found


def _looked_dim(lookup: fx.Node, spec: tuple) -> tuple[int, int]:
    """(dim, its length) of the table a lookup reads rows along (embedding: dim 0)."""
    tval = lookup.args[spec[0]].meta["val"]
    dim = (lookup.args[spec[2]] if spec[2] is not None else 0) % tval.ndim
    return dim, tval.shape[dim]


def _own_rows_dims(ids: Any, table: fx.Node, dim: int, n: int, selects: Callable, mesh: Any, types: dict,
                   uneven: frozenset) -> set[int]:
    """Mesh dims m where the table is Shard(dim) on m alone (evenly) and `selects(ids', low, high)` holds for
    this rank's rows: ids' = ids shifted by the rank's shard start (rank_scale -n) over [0, n), or ids less a
    literal that is this real rank's shard start over [c, c + n)."""
    found = set()
    literal = _literal_shift(ids)
    cuts = [m for m, p in enumerate(types[table]) if sharded_dim(p) == dim]
    for m, p in enumerate(types[table]):
        if p != Shard(dim) or m in uneven or cuts != [m]:
            continue
        if selects(ids, 0, n) and rank_scale(ids, m, mesh, types) == -n:
            found.add(m)
        elif literal is not None and _literal_offset_holds(literal, selects, n, m, mesh, types):
            found.add(m)
    return found


def _aligned(node: fx.Node, looked: Any, masked: Any, lookup: fx.Node, spec: tuple, dim: int) -> bool:
    """The mul gives each looked-up element the mask of its own index: `looked` (the lookup under reshapes that
    only add or drop size-1 dims) is not broadcast, and `masked`, broadcast against it, varies exactly along the
    index's dims (a mask along a row's own dims, or moved by a view, is refused)."""
    out, got, found, index, mask = (_shape(v) for v in (node, looked, lookup, lookup.args[spec[1]], masked))
    if None in (out, got, found, index, mask) or got != out or len(mask) > len(out):
        return False
    if lookup.target is aten.index_select.default:  # the index runs along `dim` of the result
        along = [k == dim for k in range(len(found))]
    else:  # embedding: the index's dims, then the row's; gather: the index's own shape
        along = [k < len(index) for k in range(len(found))]
    kept = [(size, flag) for size, flag in zip(found, along) if size != 1]
    at = [k for k, size in enumerate(out) if size != 1]
    if [out[k] for k in at] != [size for size, _ in kept]:
        return False
    mask = [1] * (len(out) - len(mask)) + mask
    return all(mask[k] == (size if flag else 1) for k, (size, flag) in zip(at, kept)) and all(
        mask[k] == 1 for k, size in enumerate(out) if size == 1)


def _shape(node: Any) -> list[int] | None:
    """A traced value's sizes; None where one is symbolic (compared, it could guard): not proven then."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
        return None
    return list(val.shape)


def _literal_shift(index: Any) -> tuple[Any, int] | None:
    """(ids, c) of ids - c (or ids + (-c)) with c a literal int."""
    if not isinstance(index, fx.Node) or index.target not in (aten.sub.Tensor, aten.add.Tensor):
        return None
    ids, c = index.args[:2]
    if not isinstance(c, int) or isinstance(c, bool) or index.kwargs.get("alpha", 1) != 1:
        return None
    return ids, (c if index.target is aten.sub.Tensor else -c)


def _literal_offset_holds(literal: tuple[Any, int], selects: Callable, n: int, m: int, mesh: Any,
                          types: dict) -> bool:
    """ids - c selecting ids in [c, c + n): this rank's rows, when c is this real rank's shard start on mesh dim
    m and the ids are the same on every rank of m."""
    ids, c = literal
    start = _real_shard_start(mesh, m, n)
    return start is not None and c == start and rank_scale(ids, m, mesh, types) == 0 and selects(ids, c, c + n)


def _real_shard_start(mesh: Any, m: int, n: int) -> int | None:
    """This process's shard start (coordinate * n) on mesh dim m, where this process is a real rank of it:
    None on a fake process group (the simulated and tracing meshes, where one trace stands for every rank), and
    while rank facts are withheld."""
    if rank_facts_are_withheld():
        _withheld.seen.append(True)
        return None
    try:
        if dist.get_backend(mesh.get_group(m)) == "fake":
            return None
        coord = mesh.get_coordinate()
    except Exception:  # no process group, or a mesh without this rank: nothing to anchor the literal to
        return None
    return None if coord is None else int(coord[m]) * n


def _clamped(index: Any) -> tuple[Any, int] | None:
    """(ids, upper bound) of clamp(ids, 0, upper)."""
    if not isinstance(index, fx.Node) or index.target is not aten.clamp.default or len(index.args) < 3:
        return None
    ids, low, high = index.args[:3]
    return (ids, high) if low == 0 and isinstance(high, int) else None


def _in_range_mask(mask: Any, ids: Any, low: int, high: int) -> bool:
    """mask == (ids >= low) & (ids < high) (or ids <= high - 1), in either order."""
    return _bounds_mask(mask, ids, (aten.bitwise_and.Tensor, aten.logical_and.default), (aten.ge.Scalar, low),
                        ((aten.lt.Scalar, high), (aten.le.Scalar, high - 1)))


def _outside_mask(mask: Any, ids: Any, low: int, high: int) -> bool:
    """mask == (ids < low) | (ids >= high) (or ids > high - 1), in either order."""
    return _bounds_mask(mask, ids, (aten.bitwise_or.Tensor, aten.logical_or.default), (aten.lt.Scalar, low),
                        ((aten.ge.Scalar, high), (aten.gt.Scalar, high - 1)))


def _bounds_mask(mask: Any, ids: Any, joins: tuple, low_test: tuple, high_tests: tuple) -> bool:
    """mask == join(low test, one of the high tests) of `ids`, in either order."""
    if not isinstance(mask, fx.Node) or mask.target not in joins:
        return False
    tests = {(peel(a).target, peel(a).args[1]) for a in mask.args[:2]
             if isinstance(peel(a), fx.Node) and len(peel(a).args) > 1 and peel(a).args[0] is ids}
    return len(tests) == 2 and low_test in tests and any(t in tests for t in high_tests)


# ---- the same lookup zeroed by index_put: ``local[out_of_range] = 0; rows = gather(...); rows[out_of_range] = 0``
# (torchtitan's vocab-parallel cross-entropy): the index set to row 0 where the ids fall outside this rank's rows
# (or clamped), and the looked-up values set to zeros there, by the same "outside" mask.

_INDEX_PUTS = {aten.index_put.default, aten.index_put_.default}


def zeroed_lookup(node: fx.Node, mesh: Any, types: dict, uneven: frozenset = frozenset()) -> set[int]:
    """Mesh dims on which `node` (an index_put of zeros) zeroes a gather or embedding where its ids fall outside
    this rank's rows: a partial sum there (as ``masked_lookup``, with the mask's complement)."""
    found: set[int] = set()
    outside = _zeroing_mask(node)
    lookup = peel(node.args[0]) if outside is not None else None
    spec = _LOOKUPS.get(getattr(lookup, "target", None))
    if spec is None or lookup.target is aten.index_select.default:
        return found
    table, index = lookup.args[spec[0]], lookup.args[spec[1]]
    if not isinstance(table, fx.Node) or not isinstance(types.get(table), tuple) or \
            _shape(outside) is None or _shape(outside) != _shape(index) or _chain(outside) != _chain(index):
        return found
    mask, ids = peel(outside), _zeroed_index(peel(index), peel(outside), lookup, spec)
    if ids is None:
        return found
    dim, n = _looked_dim(lookup, spec)
    return _own_rows_dims(ids, table, dim, n, functools.partial(_outside_mask, mask), mesh, types, uneven)


def _zeroing_mask(node: fx.Node) -> Any:
    """The one boolean mask of ``x[mask] = 0`` (index_put of a zero, not accumulating), or None."""
    if node.target not in _INDEX_PUTS or len(node.args) < 3 or \
            (node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)):
        return None
    indices, value = node.args[1], node.args[2]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or not _zero_constant(value):
        return None
    val = indices[0].meta.get("val")
    return indices[0] if isinstance(val, torch.Tensor) and val.dtype is torch.bool else None


def _zero_constant(node: Any) -> bool:
    """A literal zero: zeros by construction (``is_zero``: the ``scalar_tensor(0)`` of ``x[mask] = 0`` in the
    light trace, whose tensors are on the meta device), or a constant tensor the graph holds (under
    lift_fresh_copy) whose one element is 0."""
    if is_zero(node):
        return True
    node = peel(node) if not (isinstance(node, fx.Node) and node.target is aten.lift_fresh_copy.default) \
        else node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    value = getattr(node.graph.owning_module, node.target, None)
    return isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta and value.item() == 0


_ZERO_MAKERS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
_FILL_MAKERS = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2,
                aten.fill.Scalar: 1, aten.fill_.Scalar: 1, aten.scalar_tensor.default: 0}


def is_zero(node: Any) -> bool:
    """Whether `node` is a tensor of zeros by construction (zeros, zeros_like, a fill with 0)."""
    if not isinstance(node, fx.Node):
        return False
    if node.target in _ZERO_MAKERS:
        return True
    k = _FILL_MAKERS.get(node.target)
    return k is not None and len(node.args) > k and isinstance(node.args[k], (int, float)) and node.args[k] == 0


def _zeroed_index(index: Any, outside: fx.Node, lookup: fx.Node, spec: tuple) -> Any:
    """The shifted ids under the lookup's index: ``clamp(ids, 0, n - 1)``, or ``ids`` with the `outside` rows set
    to 0 (``ids[outside] = 0``); None otherwise."""
    n = _looked_dim(lookup, spec)[1]
    clamped = _clamped(index)
    if clamped is not None:
        return clamped[0] if clamped[1] == n - 1 else None
    mask = _zeroing_mask(index) if isinstance(index, fx.Node) else None
    if mask is None or peel(mask) is not outside or _shape(mask) != _shape(index.args[0]):
        return None
    return index.args[0]


def _chain(node: Any) -> list:
    """The copies and reshapes from `node` down to the value under them (``peel``), with their arguments."""
    steps = []
    while isinstance(node, fx.Node) and node.target in _SAME_VALUE:
        steps.append((node.target, tuple(node.args[1:])))
        node = node.args[0]
    return steps


# ---- rows offset by the rank's coordinate: ``table.index_select(0, axis_index(m) * k + arange(k))`` ------------
# A table whole on every rank, looked up at this rank's k consecutive rows (a learned position table under
# context parallelism): rank r holds rows r*k .. r*k+k-1, chunk r of the one-rank lookup of every row (where the
# table has exactly k * n rows): a shard of the looked-up dim.

ROW_LOOKUPS = {aten.index_select.default: (0, 2, 1), aten.embedding.default: (0, 1, None),
                aten.index.Tensor: (0, 1, None)}  # table arg, index arg, dim arg (None: dim 0)


def rank_rows(node: fx.Node, in_types: list, mesh: Any, types: dict, default: Any) -> Any:
    """The type of a lookup of this rank's rows by ``arange(k) + k * axis_index(m)`` in a table whole on m:
    Shard(the looked-up dim) there; None where the lookup is not of that form on any mesh dim."""
    spec = ROW_LOOKUPS.get(node.target)
    table = node.args[spec[0]] if spec is not None else None
    index = node.args[spec[1]] if spec is not None else None
    if node.target is aten.index.Tensor:
        index = index[0] if isinstance(index, (list, tuple)) and len(index) == 1 else None
    if not isinstance(table, fx.Node) or not isinstance(types.get(table), tuple) or _shape(index) is None or \
            len(_shape(index)) != 1:
        return None
    tval = table.meta["val"]
    dim = (node.args[spec[2]] if spec[2] is not None else 0) % tval.ndim
    k = _shape(index)[0]
    if type(k) is not int:  # a data-dependent row count (MoE routing): not this form, and never guarded on
        return None
    rows = {m for m in range(mesh.ndim) if isinstance(types[table][m], Replicate) and
            known_equal(tval.shape[dim], k * mesh.shape[m]) and rows_of_rank(index, m, mesh, k)}
    if not rows:
        return None
    inputs = [a for a in node.all_input_nodes if types.get(a) is not None]
    plain = [tuple(Replicate() if m in rows else p for m, p in enumerate(types[a])) for a in inputs]
    out = default(node, plain, mesh, dict(zip(inputs, plain)))
    at = dim if node.target is aten.index_select.default else 0  # the looked-up dim in the result
    return tuple(Shard(at) if m in rows else p for m, p in enumerate(out))


def rows_of_rank(index: Any, m: int, mesh: Any, k: int) -> bool:
    """index == arange(k) + k * (coordinate on mesh dim m), in either order."""
    if not isinstance(index, fx.Node) or index.target is not aten.add.Tensor or index.kwargs.get("alpha", 1) != 1:
        return False
    a, b = index.args[:2]
    return any(_arange_of(p, k) and _coordinate_times(q, m, mesh, k) for p, q in ((a, b), (b, a)))


def _arange_of(node: Any, k: int) -> bool:
    node = peel(node)
    if not isinstance(node, fx.Node) or node.target not in (aten.arange.default, aten.arange.start):
        return False
    return list(node.args) in ([k], [0, k]) and node.kwargs.get("dtype") in (None, torch.int64, torch.int32)


def _coordinate_times(node: Any, m: int, mesh: Any, k: int) -> bool:
    """node == k * (the coordinate on mesh dim m), with no base added."""
    node = peel(node)
    if not isinstance(node, fx.Node) or node.target is not aten.mul.Tensor:
        return False
    for c, factor in (node.args[:2], node.args[1::-1]):
        if factor == k and type(factor) is int:
            c = peel(c)
            while isinstance(c, fx.Node) and c.target in (aten.select.int, FUNCTIONAL_OPS.wait_tensor.default):
                c = peel(c.args[0])
            if isinstance(c, fx.Node) and c.target is FUNCTIONAL_OPS.all_to_all_single.default and \
                    coordinates(c, m, mesh):
                return True
    return False


def partial_where_masked(node: fx.Node, in_types: list, mesh: Any, types: dict, default: Any,
                         uneven: frozenset = frozenset()) -> Any:
    """The type of a mul or an index_put of zeros: Partial(sum) on the mesh dims where it is a masked (or zeroed)
    lookup, else None."""
    find = masked_lookup if node.target is aten.mul.Tensor else zeroed_lookup
    dims = find(node, mesh, types, uneven)
    if not dims:
        return None
    plain = [tuple(Replicate() if m in dims else p for m, p in enumerate(t)) for t in in_types]
    inputs = [a for a in node.all_input_nodes if types.get(a) is not None]
    out = default(node, plain, mesh, dict(zip(inputs, plain)))
    return tuple(Partial() if m in dims else p for m, p in enumerate(out))

