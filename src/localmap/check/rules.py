"""The placement rules as data: each op's output type from its inputs' types, one rule per row.

Types are those of ``localmap.placements.types`` (Replicate, Shard(d), Partial(op), PER_RANK_COPY, AGREED or
VARYING per mesh dim). An op's rule is, in order: its row in ``RULES`` (ops whose meaning DTensor does not say: copies,
statistics over sharded dims, linear reductions and views of Partial values, attention kernels); random numbers
(every op ATen tags as random: a shard's piece of a global draw when shaped like one, else Varying); the
collective's own rule (``localmap.collectives.registry``); else DTensor's sharding propagation
(``localmap.check.propagation``).
``register_rule(op, rule)`` adds or replaces a row.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

import localmap.collectives  # noqa: F401  (registers the collectives' facts)
from localmap import compat
from localmap.check.coordinates import coordinate_picked, coordinate_positions, coordinate_scaled
from localmap.check.merges import merged_attention
from localmap.check.offsets import ROW_LOOKUPS, is_zero, partial_where_masked, rank_rows
from localmap.check.propagation import default_types, op_name, replicated
from localmap.collectives.primitives import all_to_all_type
from localmap.collectives.registry import collective
from localmap.placements.types import AGREED, PER_RANK_COPY, UNKNOWN_WHY, VARYING, RuleError, same_on_ranks


Rule = Callable[[fx.Node, list, Any], Any]
RULES: dict[Any, Rule] = {}


def register_rule(op: Any, rule: Rule) -> None:
    """Give `op` (an OpOverload, OpOverloadPacket or Python callable as it appears in traced graphs) a type rule.

    ``rule(node, in_types, mesh)`` gets the fx node, the types of its tensor arguments in order (a tuple with one
    entry per mesh dim: Replicate(), Shard(d), Partial(op) or localmap.VARYING) and the mesh; it returns the
    output's type (or a list of types for an op with several tensor outputs), or raises
    ``localmap.RuleError(problem, fix)``.
    """
    RULES[op] = rule


def rule_for(target: Any) -> Rule | None:
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    return RULES.get(packet) if packet is not None else None


# ---- rules as data ----------------------------------------------------------------------------------------------

def _same_as_input(node: fx.Node, in_types: list, mesh: Any) -> Any:
    # No typed input: a copy of a constant (e.g. a torch.tensor literal), the same on every rank.
    return next((t for t in in_types if t is not None), None) or replicated(mesh)


def _random(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """Random numbers are drawn per rank. Shaped like a shard (``bernoulli_`` on ``empty_like(x)``, ``rand_like``
    of a shard), the draws are this rank's piece of one global draw; otherwise they differ per rank."""
    template = next((t for t in in_types if t is not None), None)
    node.meta[UNKNOWN_WHY] = f"{op_name(node)} draws random numbers on each rank"
    return tuple(template[m] if template is not None and isinstance(template[m], Shard) else VARYING
                 for m in range(mesh.ndim))


def _getitem(node: fx.Node, in_types: list, mesh: Any) -> Any:
    return None  # handled by the checker (it indexes the producer's output types)


aten = torch.ops.aten
for _op in (aten.detach.default, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default,
            aten._to_copy.default):
    register_rule(_op, _same_as_input)
register_rule(operator.getitem, _getitem)


def _statistic(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """var / std / var_mean: over a sharded dim the local statistic is neither the shard nor a partial of the
    global one (it is a bug in a normalization over sharded features)."""
    t = in_types[0]
    val = node.args[0].meta["val"]
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else node.kwargs.get("dim")
    dims = list(range(val.dim())) if dims is None else [d % max(val.dim(), 1) for d in dims]
    for m, p in enumerate(t):
        if compat.sharded_dim(p) in dims:
            raise RuleError(f"{op_name(node)} reduces over dim {p.dim}, which is sharded: the local statistic is "
                            "not a piece of the global one",
                            "all_reduce sums of x and x*x (or all_gather the dim) before the statistic", m)
        if isinstance(p, Partial):
            raise RuleError(f"{op_name(node)} of a Partial value is not linear", "all_reduce it first", m)
    kept = tuple(Replicate() if isinstance(p, Replicate) else VARYING if p is VARYING else p for p in t)
    return [kept, kept] if node.target is aten.var_mean.correction else kept


for _op in (aten.var.correction, aten.std.correction, aten.var_mean.correction):
    register_rule(_op, _statistic)


def _linear_reduction(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """A sum or mean is linear in its input: on a mesh dim where the input is Partial(sum/avg) the output is the
    same Partial (DTensor's strategies ask for a redistribution for some of them); other mesh dims as DTensor
    propagates them."""
    return _keeping_partial(node, in_types, mesh, ("sum", "avg"))


def _view(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """A view rearranges elements without combining them: any Partial input (sum, avg, max, min) gives the same
    Partial output. DTensor's view rule, asked about local sizes, refuses some shardings (a dim of 1 row)."""
    return _keeping_partial(node, in_types, mesh, ("sum", "avg", "max", "min"))


def _keeping_partial(node: fx.Node, in_types: list, mesh: Any, ops: tuple) -> Any:
    if not in_types:  # a view of a constant (no typed input): as any op on constants
        return default_types(node, in_types, mesh, {})
    t = in_types[0]
    keep = {m for m, p in enumerate(t) if isinstance(p, Partial) and p.reduce_op in ops}
    if not keep:
        return default_types(node, in_types, mesh, {node.args[0]: t})
    plain = tuple(Replicate() if m in keep else p for m, p in enumerate(t))
    out = default_types(node, [plain], mesh, {node.args[0]: plain})
    return tuple(t[m] if m in keep else p for m, p in enumerate(out))


for _op in (aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default):
    register_rule(_op, _linear_reduction)
for _op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
    register_rule(_op, _view)


def _within_rows(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """topk / sort along a dim no mesh dim shards: each slice along it is whole on its rank, so the values and the
    indices (positions along that unsharded dim) keep the input's placements, a strided shard's too (DTensor's
    strategies redistribute one: MoE routing of tokens flattened from batch and sequence shards). Along a
    sharded dim, or of a Partial value, as DTensor propagates them."""
    t = in_types[0] if in_types else None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    at = {aten.topk.default: 2, aten.sort.default: 1}.get(node.target)  # sort.stable: dim is keyword-only
    dim = node.args[at] if at is not None and len(node.args) > at else node.kwargs.get("dim", -1)
    if t is None or not isinstance(val, torch.Tensor) or val.ndim == 0 or \
            any(isinstance(p, Partial) or p is VARYING or compat.sharded_dim(p) == dim % val.ndim for p in t):
        return default_types(node, in_types, mesh, {node.args[0]: t} if t is not None else {})
    return [tuple(t), tuple(t)]


for _op in (aten.topk.default, aten.sort.default, aten.sort.stable):
    register_rule(_op, _within_rows)


def _local_pieces(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """split / split_with_sizes / chunk / unbind / narrow / slice / select. Along an unsharded dim, as DTensor
    propagates them. Along a sharded dim the sizes are local: each rank's piece comes out of its own shard (a
    Shard(1) sequence cut into chunks gives every rank's chunk c, interleaved: not the one-device chunk c), so
    the pieces differ across ranks (a Replicate claim is wrong) with no global meaning the check derives."""
    t = in_types[0] if in_types else None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if t is None or not isinstance(val, torch.Tensor) or val.ndim == 0:
        return default_types(node, in_types, mesh, {})
    dim = compat.call_argument(node.target, node.args, node.kwargs, "dim", 0) % val.ndim
    cut = {m for m, p in enumerate(t) if compat.sharded_dim(p) == dim}
    if not cut:
        return default_types(node, in_types, mesh, {node.args[0]: t})
    out_val = node.meta.get("val")
    if node.target in (aten.slice.Tensor, aten.narrow.default) and out_val.shape == val.shape:
        return t  # the whole dim (x[:, :]): the value itself
    whole = tuple(Replicate() if m in cut else p for m, p in enumerate(t))
    out = default_types(node, [whole], mesh, {node.args[0]: whole})
    node.meta[UNKNOWN_WHY] = (f"{op_name(node)} cuts dim {dim}, which is sharded, by local sizes: each rank's "
                              "piece comes out of its own shard, not the one-device piece")

    def varying(t_out: Any) -> Any:
        return None if t_out is None else tuple(VARYING if m in cut else p for m, p in enumerate(t_out))

    return [varying(o) for o in out] if isinstance(out, list) else varying(out)


for _op in (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.narrow.default,
            aten.slice.Tensor, aten.select.int):
    register_rule(_op, _local_pieces)


def _cat(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """cat along a dim that its inputs shard: rank r holds [a_r, b_r, ...], which is piece r of each block of
    the one-device cat(a, b, ...): DTensor's strided shard when the blocks have equal sizes (a claim of Shard is
    then refused as interleaved; a sum over the dim is a partial sum). Otherwise, or with a block whole on every
    rank, the pieces differ per rank with no global meaning derived. Other dims: DTensor's propagation."""
    pieces = node.args[0]
    inputs = list(node.all_input_nodes)
    val = node.meta.get("val")
    if len(inputs) != len(in_types) or not isinstance(val, torch.Tensor) or not all(
            isinstance(a, fx.Node) and a in inputs for a in pieces):
        return default_types(node, in_types, mesh, {})
    typed = dict(zip(inputs, in_types))
    dim = compat.call_argument(node.target, node.args, node.kwargs, "dim", 0) % max(val.ndim, 1)
    cut = {m for m in range(mesh.ndim) if any(compat.sharded_dim(typed[a][m]) == dim for a in pieces)}
    if not cut:
        return default_types(node, in_types, mesh, typed)
    whole = [tuple(Replicate() if m in cut else p for m, p in enumerate(t)) for t in in_types]
    out = default_types(node, whole, mesh, dict(zip(inputs, whole)))
    sizes = {a.meta["val"].shape[dim] for a in pieces}
    interleaved = len(cut) == 1 and len(sizes) == 1
    placed = {}
    for m in cut:
        if interleaved and all(typed[a][m] == Shard(dim) for a in pieces):
            placed[m] = Shard(dim) if len(pieces) == 1 else compat.strided_shard(dim, len(pieces))
        else:
            placed[m] = VARYING
            node.meta[UNKNOWN_WHY] = (f"{op_name(node)} joins pieces along dim {dim}, which is sharded, that are "
                                      "not equal shards: each rank's result is its own mix")
    return tuple(placed.get(m, p) for m, p in enumerate(out))


register_rule(aten.cat.default, _cat)

_INTERPOLATING = [getattr(aten, n) for n in ("upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
                                             "upsample_trilinear3d")]
_NEAREST = [getattr(aten, n) for n in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d")]


def _upsample(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """Resizing along a sharded spatial dim: nearest by a whole factor repeats each row within its shard (the
    shard of the global resize); linear, bilinear, bicubic and trilinear mix each shard's edge rows with rows
    that sit on the neighbouring rank (wrong); a dim kept at its size is untouched."""
    t = in_types[0] if in_types else None
    src, out_val = node.args[0], node.meta.get("val")
    if t is None or not isinstance(out_val, torch.Tensor):
        return default_types(node, in_types, mesh, {})
    in_shape = src.meta["val"].shape
    nearest = node.target.overloadpacket in _NEAREST
    out = []
    for m, p in enumerate(t):
        d = compat.sharded_dim(p)
        if d is None or d < 2 or out_val.shape[d] == in_shape[d]:
            out.append(p)
            continue
        if nearest and out_val.shape[d] % in_shape[d] == 0 and not compat.is_strided_shard(p):
            out.append(p)
            continue
        if nearest:
            node.meta[UNKNOWN_WHY] = f"{op_name(node)} resizes sharded dim {d} by a factor that is not whole"
            out.append(VARYING)
            continue
        raise RuleError(f"{op_name(node)} interpolates along dim {d}, which is sharded: each shard's edge rows "
                        "are mixed without the neighbouring rank's rows, so the result is not the shard of the "
                        "global resize", "all_gather the dim first (or exchange a halo row with "
                        "localmap.collectives.shift), or resize outside the region", m)
    return tuple(out)  # a Partial stays Partial: resizing is linear


for _packet in _INTERPOLATING + _NEAREST:
    for _name in ("default", "vec"):
        register_rule(getattr(_packet, _name), _upsample)


# ---- gathers and scatter-adds with whole indices ----------------------------------------------------------------
# Given indices that are the same on every rank, a gather, index or index_select is linear in its values, and a
# scatter_add, index_add or accumulating index_put is linear in (base, values): the local op on partial sums is
# a partial sum of the global op. The base must be a partial sum too, or zero (torchtitan's combine scatters
# expert outputs into zeros_like(x)). DTensor's strategies take no Partial here; other mesh dims are theirs.

def linear_in(values: tuple[str, ...], indices: tuple[str, ...], base: str | None = None,
              when: Callable[[fx.Node], bool] = lambda node: True) -> Rule:
    """A rule for an op linear in its arguments named `values` (and `base`, which may instead be zero) given
    arguments named `indices` that are whole (Replicate) on a mesh dim: a partial sum there gives a partial sum.
    Otherwise, and where `when(node)` is false, DTensor's propagation decides."""

    def rule(node: fx.Node, in_types: list, mesh: Any) -> Any:
        inputs = list(node.all_input_nodes)
        if len(inputs) != len(in_types) or not when(node):
            return default_types(node, in_types, mesh, dict(zip(inputs, in_types)))
        typed = dict(zip(inputs, in_types))

        def arg_nodes(names: tuple) -> list:
            got = [compat.call_argument(node.target, node.args, node.kwargs, n) for n in names]
            return [a for g in got for a in (g if isinstance(g, (list, tuple)) else [g]) if a in typed]

        vals, idx = arg_nodes(values), arg_nodes(indices)
        base_node = arg_nodes((base,))[0] if base else None
        partial = {}
        for m in range(mesh.ndim):
            column = {typed[v][m] for v in vals}
            if len(column) != 1 or not isinstance(p := next(iter(column)), Partial) or p.reduce_op not in (
                    "sum", "avg") or not all(isinstance(typed[i][m], Replicate) or typed[i][m] is PER_RANK_COPY
                                             for i in idx):
                continue
            if base_node is None or typed[base_node][m] == p or is_zero(base_node):
                partial[m] = p
        plain = [tuple(Replicate() if m in partial else q for m, q in enumerate(t)) for t in in_types]
        out = default_types(node, plain, mesh, dict(zip(inputs, plain)))
        return tuple(partial.get(m, q) for m, q in enumerate(out))

    return rule


register_rule(aten.gather.default, linear_in(("self",), ("index",)))
register_rule(aten.index_select.default, linear_in(("self",), ("index",)))
register_rule(aten.index.Tensor, linear_in(("self",), ("indices",)))
register_rule(aten.embedding.default, linear_in(("weight",), ("indices",)))
register_rule(aten.scatter_add.default, linear_in(("src",), ("index",), base="self"))
register_rule(aten.index_add.default, linear_in(("source",), ("index",), base="self"))
for _op in (aten.index_put.default, aten.index_put_.default):
    register_rule(_op, linear_in(("values",), ("indices",), base="self",
                                 when=lambda node: bool(compat.call_argument(node.target, node.args, node.kwargs,
                                                                             "accumulate"))))


_MASKINGS = {aten.mul.Tensor, aten.index_put.default, aten.index_put_.default}


def output_types(node: fx.Node, in_types: list, mesh: Any, types: dict, uneven: frozenset = frozenset()) -> Any:
    """Type(s) of a node's output(s): its rule, else DTensor propagation (Varying inputs kept Varying), else
    the conservative default. `uneven`: the mesh dims where some input is sharded unevenly."""
    if node.target in _MASKINGS:  # a lookup masked to this rank's rows (vocab-parallel): check.offsets
        masked = partial_where_masked(node, in_types, mesh, types, default_types, uneven)
        if masked is not None:
            return masked
    if node.target in ROW_LOOKUPS:  # this rank's rows of a whole table, by its coordinate: check.offsets
        rows = rank_rows(node, in_types, mesh, types, default_types)
        if rows is not None:
            return rows
    if node.target is aten.cat.default:  # the last step of localmap's all_to_all
        routed = all_to_all_type(node, types, mesh)
        if routed is not None:
            return routed
    if node.target is aten.div.Tensor:  # a log-sum-exp merge of attention blocks: check.merges
        merged = merged_attention(node, in_types, mesh, types, uneven)
        if merged is not None:
            return merged
    # values made from the rank's coordinate (axis_index, ppermute, shift): check.coordinates
    by_coordinate = any(isinstance(types.get(a), tuple) and VARYING in types[a] for a in node.all_input_nodes)
    picked = coordinate_picked(node, in_types, mesh, types, default_types) if by_coordinate else None
    if picked is not None:
        return picked
    rule = rule_for(node.target)
    if rule is not None:
        return rule(node, in_types, mesh)
    if compat.draws_random(node.target, node.args, node.kwargs):  # ops ATen tags random (dropout_p=0 is not)
        return _random(node, in_types, mesh)
    if by_coordinate:
        read = coordinate_positions(node, in_types, mesh, types, default_types) or \
            coordinate_scaled(node, in_types, mesh, types, default_types)
        if read is not None:
            return read
    facts = collective(node.target)
    if facts is not None:
        return facts.type_rule(node, in_types, mesh)
    return default_types(node, in_types, mesh, types)


# ---- attention kernels ------------------------------------------------------------------------------------------
# DTensor has no sharding strategy for some fused attention ops (the CPU flash kernel), and the check never
# decomposes them: attention is typed here, on q [..., Lq, E], k and v [..., Lk, E]: batch and head dims sharded
# alike stay sharded; queries sharded along their sequence attend whole keys; keys sharded along their sequence
# give a per-rank partial attention (merged by log-sum-exp outside: Varying). A mask (attn_mask) must follow the
# queries: sharded along the queries' sharded dim (a causal mask from global positions: check.coordinates), or
# whole and of size 1 there; causality with sequence-sharded queries uses local positions, and a mask of another
# making is unknown (Varying: unproven, not refused).

def _attention(node: fx.Node, in_types: list, mesh: Any) -> Any:
    q, k, v = node.args[:3]
    inputs = list(node.all_input_nodes)
    if len(in_types) != len(inputs) or not all(a in inputs for a in (q, k, v)):
        return [default_types(node, in_types, mesh, {})]
    types = dict(zip(inputs, in_types))
    ndim = q.meta["val"].ndim
    causal = bool(compat.call_argument(node.target, node.args, node.kwargs, "is_causal"))
    masks = [a for a in inputs if a not in (q, k, v)]
    out = tuple(_attention_dim(node, [types[q][m], types[k][m], types[v][m]], ndim, causal, m,
                               [(types[a][m], a.meta["val"].shape) for a in masks])
                for m in range(mesh.ndim))
    n = len(node.meta["val"]) if isinstance(node.meta.get("val"), (tuple, list)) else 1
    return [out, out] + [replicated(mesh)] * (n - 2) if n > 1 else out


def _masks_follow(masks: list, ndim: int, d: int) -> bool:
    """Whether every mask (type on the mesh dim, shape) meets the queries' dim d as they are cut: Shard of its
    own dim aligned with d (broadcast from the right), or whole with size 1 there (or no such dim)."""
    for p, shape in masks:
        j = d - (ndim - len(shape))
        if isinstance(p, Replicate):
            if j >= 0 and shape[j] != 1:
                return False
        elif not (isinstance(p, Shard) and not compat.is_strided_shard(p) and j >= 0 and p.dim == j):
            return False
    return True


def _attention_dim(node: fx.Node, column: list, ndim: int, causal: bool, m: int, masks: list) -> Any:
    q, k, v = column
    if any(isinstance(p, Partial) for p in column):
        raise RuleError(f"{op_name(node)} gets a Partial query, key or value: attention is not linear in them",
                        "all_reduce it first", m)
    if AGREED in column:  # attention with a value of unknown meaning: the same on every rank or not
        return AGREED if all(same_on_ranks(p) for p, _ in masks) and all(same_on_ranks(p) for p in column) \
            else _unknown(node)
    kv_whole = all(isinstance(p, Replicate) or p is PER_RANK_COPY for p in (k, v))
    masks_whole = all(isinstance(p, Replicate) for p, _ in masks)
    if all(isinstance(p, Replicate) for p in column) and masks_whole:
        return Replicate()
    if kv_whole and isinstance(q, Replicate) and masks_whole:
        return PER_RANK_COPY
    if isinstance(q, Shard) and q == k == v and q.dim < ndim - 2 and _masks_follow(masks, ndim, q.dim):
        return q  # batch or heads
    if kv_whole and isinstance(q, Shard) and q.dim == ndim - 2 and not causal and _masks_follow(masks, ndim, q.dim):
        return q  # this rank's queries against every key, with their own rows of any mask
    return _unknown(node)


def _unknown(node: fx.Node) -> Any:
    node.meta[UNKNOWN_WHY] = (
        f"{op_name(node)} with these shardings (keys sharded along the sequence give a per-rank partial "
        "attention; a mask or causality with sharded queries uses local positions; a value of unknown meaning)")
    return VARYING


for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(aten, _name):
        register_rule(getattr(aten, _name).default, _attention)
