"""The default placement rule: DTensor's own sharding propagation.

An op without a rule of its own (``localmap.check.rules``) is asked about through DTensor's registered
strategies (elementwise, matmul, reductions, views, ...): run on shards of these placements, does the op compute
the shard of the global op, and with which placements? A strategy that would redistribute an input means "no"
on that mesh dim. Ops DTensor knows nothing about get the conservative default: Varying where any input is not
Replicate, and an error for a Partial input (the op's linearity is unknown).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from localmap import compat
from localmap.caches import register_cache
from localmap.compat import pytree
from localmap.placements.shapes import dense_stride, view_group
from localmap.placements.types import AGREED, OPAQUE, PER_RANK_COPY, UNKNOWN_WHY, VARYING, RuleError, Type, \
    same_on_ranks

aten = torch.ops.aten


def replicated(mesh: Any) -> Type:
    """The type of a value that is the same on every rank (a factory's result, a constant)."""
    return tuple(Replicate() for _ in range(mesh.ndim))


def _global_shape(local_shape: Sequence[Any], t: Type, mesh_shape: Sequence[int]) -> list:
    shape = list(local_shape)
    for m, p in enumerate(t):
        d = compat.sharded_dim(p)
        if d is not None:
            shape[d] = shape[d] * mesh_shape[m]
    return shape


# Ops whose arguments hold sizes, written in the body in local terms: DTensor propagation is given the local
# shape as the tensor's shape, so sizes and shape agree and only the dim mapping matters.
_SIZE_ARG_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
    aten.view.dtype,
}


_SPECS_LIMIT = 4096  # specs remembered (cleared when full)
# (mesh id, type, shape, stride, dtype, local) -> (mesh, spec): a body asks about the same few values at every op
_specs: dict = register_cache("check_specs", {}, limit=_SPECS_LIMIT, eviction="clear when full")


def _as_spec(val: torch.Tensor, t: Type, mesh: Any, local: bool = False) -> Any:
    """A DTensor spec for a value of type `t` (Varying asked about as Replicate; sizes global unless `local`).
    A size-0 dim is asked about as the mesh's size: every redistribution of an empty tensor costs nothing, so
    DTensor's cost-based choice could pick one that redistributes, which would read as "the local op is not
    the shard of the global op"; sizes do not change which placements a strategy accepts. Remembered per
    value metadata (symbolic sizes are not)."""
    shape, stride = tuple(val.shape), val.stride()
    key = (id(mesh), t, shape, stride, val.dtype, local)
    try:
        hit = _specs.get(key)
    except TypeError:  # symbolic sizes
        return _new_spec(shape, stride, val.dtype, t, mesh, local)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    spec = _new_spec(shape, stride, val.dtype, t, mesh, local)
    if len(_specs) >= _SPECS_LIMIT:
        _specs.clear()
    _specs[key] = (mesh, spec)
    return spec


def _new_spec(val_shape: tuple, stride: Sequence[Any], dtype: torch.dtype, t: Type, mesh: Any,
              local: bool) -> Any:
    placements = tuple(Replicate() if p is VARYING or p is PER_RANK_COPY or p is AGREED else p for p in t)
    shape = list(val_shape) if local else _global_shape(val_shape, t, tuple(mesh.shape))
    shape = [s if s != 0 else math.prod(mesh.shape) for s in shape]
    return compat.make_spec(mesh, placements, shape, dense_stride(shape, stride), dtype)


def propagate(node: fx.Node, in_types: list, mesh: Any, types: dict) -> Any:
    """Output type(s) of `node` from DTensor's sharding strategies; None when DTensor has no strategy."""
    asked = _ask_dtensor(node, mesh, types)
    if asked is None:
        return None
    sharding, given = asked
    wanted = given
    if sharding.needs_redistribute and sharding.redistribute_schema is not None:
        wanted = [s for s in pytree.tree_leaves(sharding.redistribute_schema.args_schema)
                  if isinstance(s, compat.DTensorSpec)]
    # Mesh dims where every input is Replicate (in value): ranks along them hold the same inputs, so the (deterministic)
    # op gives the same result there, whatever strategy DTensor picks (it may pick a free Replicate -> Shard
    # chunk on such a dim, as torch 2.14's cat does, which is no sign that the local op is wrong).
    whole = {m for m in range(mesh.ndim) if all(same_on_ranks(t[m]) for t in in_types if t is not None)}
    broken: set[int] = set()  # mesh dims where the local op is not the shard of the global op
    for g, w in zip(given, wanted):
        broken.update(m for m, (a, b) in enumerate(zip(g.placements, w.placements, strict=True))
                      if a != b and m not in whole)
    for m in sorted(broken):
        _refuse_partial(node, [g.placements[m] for g in given], m)
    if broken:
        node.meta[UNKNOWN_WHY] = (f"DTensor's rule for {op_name(node)} would redistribute an input first: the "
                                  "local op is not the shard of the global op (a scan or a reduction over a "
                                  "sharded dim, a shape that only fits locally)")
    out = sharding.output_spec
    results = [None if s is None else tuple(Replicate() if m in whole else VARYING if m in broken else p
                                            for m, p in enumerate(s.placements))
               for s in (out if isinstance(out, (tuple, list)) else (out,))]
    return results if isinstance(out, (tuple, list)) else results[0]


def _refuse_partial(node: fx.Node, column: list, m: int) -> None:
    """An op that is not the shard of the global op on mesh dim m, given a Partial there: a partial sum used
    non-linearly is refused (its local result is never a piece of the global one); a per-rank max or min is a
    stabilizer (a log-sum-exp merge subtracts it before combining ranks), so the result is only Varying."""
    partials = [p for p in column if isinstance(p, Partial)]
    if partials and not all(p.reduce_op in ("max", "min") for p in partials):
        raise RuleError(
            f"{op_name(node)} cannot take a Partial value as it is (it is not linear in it, or mixes it "
            f"with a value that is not a partial sum)",
            "all_reduce the partial value first, or keep the computation linear", m)


_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _kept_placements(sharding: Any, given: list) -> bool:
    """Whether DTensor's decision takes the inputs as they are (a redistribution it asks for may change only
    their metadata, not their placements)."""
    if not sharding.needs_redistribute or sharding.redistribute_schema is None:
        return True
    wanted = [s for s in pytree.tree_leaves(sharding.redistribute_schema.args_schema)
              if isinstance(s, compat.DTensorSpec)]
    return all(g.placements == w.placements for g, w in zip(given, wanted))


def _static(node: fx.Node) -> bool:
    """Whether a view's input and output sizes are plain ints (symbolic sizes are asked about locally)."""
    vals = [node.meta.get("val"), node.args[0].meta.get("val")]
    return all(isinstance(v, torch.Tensor) and all(isinstance(s, int) for s in v.shape) for v in vals)


def _ask_view_globally(node: fx.Node, mesh: Any, types: dict) -> tuple[Any, list] | None:
    """A view written with local sizes, asked about in the global view: each sharded mesh dim's shard lands on
    some output dim; the output dims that DTensor's view rule itself maps the shards to, given global sizes,
    are the answer (so a heads split of a sharded feature dim keeps its shard exact). None when no choice
    is consistent: the view only fits the local shape."""
    src, t = node.args[0], types.get(node.args[0])
    out_val = node.meta["val"]
    if t is None:
        return None
    in_spec = _as_spec(src.meta["val"], t, mesh)
    sharded = [(m, p) for m, p in enumerate(t) if compat.sharded_dim(p) is not None]
    # A plain Shard first (a heads split keeps its shard); else a strided shard, where the view merges the
    # sharded dim with a dim before it (tokens flattened over batch and a sharded sequence): each rank then
    # holds a fixed, interleaved set of the merged dim's rows, which a sum or a row-wise op may use as they are.
    choices = _landings_in_order(tuple(src.meta["val"].shape), tuple(out_val.shape),
                                 [compat.sharded_dim(p) for _, p in sharded])
    for strided in (False, True):
        for choice in choices:
            sharding = _view_landing(node, in_spec, out_val, mesh, sharded, choice, strided)
            if sharding is not None:
                return sharding, [in_spec]
    node.meta[UNKNOWN_WHY] = f"{op_name(node)} gives a shape that only fits the local shard (no global view)"
    return None


def _landings_in_order(local_in: tuple, local_out: tuple, dims: list) -> list[tuple[int, ...]]:
    """Where each sharded input dim's shard may land (one output dim per sharded mesh dim), the view's own reading
    first. More than one landing can fit the local shapes where dims of size 1 stand beside the sharded one: a
    flatten(0, 1) of a (1, 1, k) shard of dim 2 fits (1, n*k), sharded on dim 1, and (n, k), sharded on dim 0,
    alike; only the first is the flatten's meaning on the global tensor, and taking the second refused the right
    claim. So landings inside the output dims the local view makes of the sharded dim (shapes.view_group) come
    first; the rest keep their order. Inside that group the first dim that fits wins, DTensor's convention for a
    split: a heads split with one head per rank, (b, s, d) -> (b, s, 1, d), keeps the shard on the heads dim."""
    groups = [view_group(local_in, local_out, d) for d in dims]
    return sorted(itertools.product(range(len(local_out)), repeat=len(dims)),
                  key=lambda choice: sum(j not in g for j, g in zip(choice, groups)))


def _view_landing(node: fx.Node, in_spec: Any, out_val: torch.Tensor, mesh: Any, sharded: list,
                  choice: tuple, strided: bool) -> Any:
    """DTensor's decision for the view when each sharded mesh dim's shard lands on output dim `choice[k]`
    (that dim's size scaled by the mesh dim's), if it takes the input as it is and puts each shard there (as a
    Shard, or as a strided shard where `strided`); else None."""
    sizes = list(out_val.shape)
    for (m, _), j in zip(sharded, choice):
        sizes[j] *= mesh.shape[m]
    if math.prod(sizes) != math.prod(in_spec.shape):
        return None
    try:
        sharding = compat.propagate_sharding(node.target, (in_spec, sizes), {})
    except Exception:
        return None
    out = sharding.output_spec
    lands = all(compat.sharded_dim(p) == j and (strided or not compat.is_strided_shard(p))
                for p, j in zip((out.placements[m] for m, _ in sharded), choice))
    return sharding if lands and _kept_placements(sharding, [in_spec]) else None


def _ask_dtensor(node: fx.Node, mesh: Any, types: dict) -> tuple[Any, list] | None:
    """DTensor's sharding decision for `node` on specs of its inputs' types, and those specs; None when DTensor
    cannot be asked (data-dependent sizes, a view of an empty tensor) or has no strategy."""
    local = node.target in _SIZE_ARG_OPS
    metas = [(v.shape, v.stride()) for v in (a.meta.get("val") for a in node.all_input_nodes)
             if isinstance(v, torch.Tensor)]
    symbolic = not all(type(n) is int for shape, stride in metas for n in (*shape, *stride))
    if symbolic and compat.has_free_unbacked_symbols(metas):
        node.meta[UNKNOWN_WHY] = f"{op_name(node)} has sizes that depend on data (DTensor's rules need them)"
        return None  # data-dependent sizes (tokens routed by an all_to_all): DTensor's strategies need real ones
    if compat.view_rule_hangs(node.target, [shape for shape, _ in metas]):
        return None
    if node.target in _VIEWS and _static(node):
        return _ask_view_globally(node, mesh, types)

    def as_schema(a: Any) -> Any:  # an argument with each tensor node as a spec of its type
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor) and types.get(a) is not None:
                return _as_spec(val, types[a], mesh, local)
            return val
        if isinstance(a, (list, tuple)):
            return type(a)(as_schema(x) for x in a) if type(a) in (list, tuple) else [as_schema(x) for x in a]
        return a

    args = tuple(as_schema(a) for a in node.args)
    kwargs = {k: as_schema(v) for k, v in node.kwargs.items()}
    try:
        sharding = compat.propagate_sharding(node.target, args, kwargs)
    except Exception:  # no strategy for this op (or one that cannot take these inputs)
        node.meta.setdefault(UNKNOWN_WHY, f"{op_name(node)} has no placement rule for these inputs (DTensor's "
                             "sharding propagation has none, or refuses their global shapes)")
        return None
    return sharding, [s for s in pytree.tree_leaves(args) if isinstance(s, compat.DTensorSpec)]


def conservative(node: fx.Node, in_types: list, mesh: Any) -> Type:
    """Replicate where every input is (a deterministic op of equal inputs), else Varying: what the op does with
    shards or partial sums is unknown, so a claim resting on it is unproven (not refused)."""
    out = []
    for m in range(mesh.ndim):
        column = [t[m] for t in in_types if t is not None]
        if all(isinstance(p, Replicate) for p in column):
            out.append(Replicate())
        elif all(same_on_ranks(p) for p in column):
            out.append(AGREED if AGREED in column else PER_RANK_COPY)
        else:
            out.append(VARYING)
            node.meta[OPAQUE] = True
            node.meta.setdefault(UNKNOWN_WHY, f"{op_name(node)} has no placement rule (DTensor's sharding "
                                 f"propagation has none for it; localmap.register_rule({op_name(node)}, ...) "
                                 "adds one)")
    return tuple(out)


_TYPED_LIMIT = 8192  # answers remembered (cleared when full)
# (op, argument signature, ...) -> (mesh, result, node notes, RuleError or None): a body repeats the same op on
# values of the same types and metadata (a layer stack), and the answer depends on nothing else
_typed: dict = register_cache("check_default_types", {}, limit=_TYPED_LIMIT, eviction="clear when full")
_NOTES = (OPAQUE, UNKNOWN_WHY)  # what the default rule may write on the node, for the message


def _signature(a: Any, types: dict) -> Any:
    """An argument as the default rule reads it: a node by its type and its value's metadata, a list by its
    items, a plain value by type and value. Raises TypeError for what cannot be a key (symbolic sizes)."""
    if isinstance(a, fx.Node):
        val = a.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise TypeError("not a tensor")
        return ("N", types.get(a), tuple(val.shape), val.stride(), val.dtype)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *(_signature(x, types) for x in a))
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Tensor)):
        raise TypeError("symbolic")
    hash(a)
    return (type(a), a)


def default_types(node: fx.Node, in_types: list, mesh: Any, types: dict) -> Any:
    """The type by DTensor's propagation (or the conservative default), remembered per op and argument
    signature: the same question in a layer stack is a lookup (the notes it left on the node replayed)."""
    notes = tuple((k, node.meta[k]) for k in _NOTES if k in node.meta)
    try:
        key = (node.target, id(mesh), tuple(in_types), _signature(node.args, types),
               _signature(tuple(sorted(node.kwargs.items())), types), _signature((node,), {}), notes)
        hit = _typed.get(key)
    except TypeError:
        return _default_types(node, in_types, mesh, types)
    if hit is None or hit[0] is not mesh:
        try:
            result, error = _default_types(node, in_types, mesh, types), None
        except RuleError as e:
            result, error = None, e
        if len(_typed) >= _TYPED_LIMIT:
            _typed.clear()
        hit = _typed[key] = (mesh, result, {k: node.meta[k] for k in _NOTES if k in node.meta}, error)
    node.meta.update(hit[2])
    if hit[3] is not None:
        raise hit[3]
    return list(hit[1]) if isinstance(hit[1], list) else hit[1]  # a caller may change its own list


def _default_types(node: fx.Node, in_types: list, mesh: Any, types: dict) -> Any:
    tensors = [t for t in in_types if t is not None]
    if not tensors:
        return replicated(mesh)
    if isinstance(node.meta.get("val"), torch.Tensor) and all(
            p is PER_RANK_COPY or isinstance(p, Replicate) for t in tensors for p in t):
        # Inputs the same on every rank (or per-rank copies of such): the op gives the same result on every
        # rank, and propagate() keeps Replicate on such mesh dims whatever DTensor answers (or conservative()
        # when it has no answer), so DTensor is not asked.
        return tuple(PER_RANK_COPY if any(t[m] is PER_RANK_COPY for t in tensors) else Replicate()
                     for m in range(mesh.ndim))
    varying = {m for t in tensors for m, p in enumerate(t) if p is VARYING}
    agreed = {m for t in tensors for m, p in enumerate(t) if p is AGREED} - varying
    copies = {m for t in tensors for m, p in enumerate(t) if p is PER_RANK_COPY} - varying - agreed
    for m in varying:
        _refuse_partial(node, [t[m] for t in tensors], m)
    result = propagate(node, in_types, mesh, types)
    if result is None and varying:
        result = _propagate_collapsed(node, in_types, mesh, types, varying)
    if result is None:
        _refuse_local_sized(node, mesh, types)
        return conservative(node, in_types, mesh)

    def mark(t: Any) -> Any:  # varying inputs make the result varying; per-rank copies keep their kind; an
        # agreed input keeps a result the same on every rank agreed, and makes a shard or partial one varying
        return None if t is None else tuple(
            VARYING if m in varying else _agreed(node, p) if m in agreed else
            PER_RANK_COPY if m in copies and isinstance(p, Replicate) else p for m, p in enumerate(t))

    return [mark(t) for t in result] if isinstance(result, list) else mark(result)


def _propagate_collapsed(node: fx.Node, in_types: list, mesh: Any, types: dict, varying: set) -> Any:
    """DTensor's answer for the mesh dims where no input varies, asked with every input whole on the varying
    ones (the caller marks those Varying).

    NOTE: why a varying mesh dim may be collapsed. A Varying value has no global shape on its mesh dim, so
    DTensor, asked with it Replicate beside a shard of the same dim (a local softmax over a key block meeting
    the value rows of that block), sees global shapes that do not fit and gives no answer for any mesh dim.
    Fix the coordinate on the varying dims: the ranks that share it form a smaller mesh over the other dims,
    on which each input's local tensors along the varying dims are whole tensors (Replicate there). DTensor's
    answer on that smaller mesh is what the op does along the other dims, at every such coordinate."""
    def collapsed(t: Any) -> Any:
        return None if t is None else tuple(Replicate() if m in varying else p for m, p in enumerate(t))

    whole = {a: collapsed(types[a]) for a in node.all_input_nodes if isinstance(types.get(a), tuple)}
    return propagate(node, [collapsed(t) for t in in_types], mesh, whole)


def _agreed(node: fx.Node, p: Any) -> Any:
    """An op's result on a mesh dim where an input is AGREED: the same on every rank (AGREED) where DTensor
    places it Replicate, else VARYING (a shard or partial sum built from a value of unknown meaning)."""
    if isinstance(p, Replicate):
        return AGREED
    node.meta.setdefault(UNKNOWN_WHY, f"{op_name(node)} combines a value that is the same on every rank with no "
                         "global meaning derived (an all_reduce of values that are not partial results) with "
                         "shards or partial sums")
    return VARYING


def _refuse_local_sized(node: fx.Node, mesh: Any, types: dict) -> None:
    """An elementwise op between a shard of dim d and a value the same on every rank whose matching dim has the
    shard's local length (a position table sliced by the local length, positions from arange(local length)):
    every rank uses the first rows where it should use its own, and the one-device program (full length) would
    not. DTensor cannot place it (the global shapes do not broadcast); it is refused."""
    if not isinstance(node.target, compat.OpOverload) or torch.Tag.pointwise not in node.target.tags:
        return
    val = node.meta.get("val")
    operands = [a for a in node.all_input_nodes if isinstance(types.get(a), tuple)]
    for a in operands:
        for m, p in enumerate(types[a]):
            if not isinstance(p, Shard) or mesh.shape[m] == 1:
                continue
            offset = val.ndim - a.meta["val"].ndim
            local = a.meta["val"].shape[p.dim]
            for b in operands:
                tb, vb = types[b], b.meta["val"]
                k = p.dim + offset - (val.ndim - vb.ndim)
                if isinstance(tb[m], Replicate) and 0 <= k < vb.ndim and vb.shape[k] == local != 1:
                    raise RuleError(
                        f"{op_name(node)} combines a shard of dim {p.dim} with a value that is the same on every "
                        f"rank and has the shard's local length ({local}) there (a table sliced by the local "
                        "length, positions from arange of it): every rank uses the first rows instead of its own",
                        f"offset the rows by localmap.collectives.axis_index({m}) * {local}, or pass the table "
                        "sharded like the data", m)


def op_name(node: fx.Node) -> str:
    return str(node.target) if not callable(node.target) or isinstance(node.target, compat.OpOverload) \
        else getattr(node.target, "__name__", str(node.target))
