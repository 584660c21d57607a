"""Placement types of values inside a region's body, and the rules that give each op's output type.

For each mesh dim a value's type is one of:

* ``Replicate()``: the same on every rank of that dim;
* ``Shard(d)``: this rank's piece of dim d of one global tensor;
* ``Partial(op)``: the true value is the reduction (op) of every rank's value;
* ``VARYING``: differs across ranks with no global meaning that localmap can derive.

A value's type is a tuple with one entry per mesh dim. Rules live in a table keyed by op (``RULES``); an op
without an entry uses DTensor's own sharding propagation (its registered strategies: elementwise, matmul,
reductions, views, ...), which says what the op computes when run on shards, and whether that is the shard of
the global op. ``register_rule(op, rule)`` adds or replaces a rule. Ops DTensor knows nothing about get the
conservative default: Varying where any input is not Replicate, and an error for a Partial input.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard
from torch.utils import _pytree as pytree

from localmap import compat as _compat


class Varying:
    """Differs across the ranks of a mesh dim, with no shard or partial structure that localmap can derive."""

    _instance = None

    def __new__(cls) -> "Varying":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "Varying"


VARYING = Varying()
Type = tuple  # one entry per mesh dim: Replicate | Shard | Partial | Varying


class RuleError(Exception):
    """Raised by a rule when an op is applied to values of types it cannot combine."""

    def __init__(self, problem: str, fix: str, mesh_dim: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.fix, self.mesh_dim = problem, fix, mesh_dim


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


def is_replicate(t: Any) -> bool:
    return isinstance(t, Replicate)


# ---- rules as data ----------------------------------------------------------------------------------------------

def _same_as_input(node: fx.Node, in_types: list, mesh: Any) -> Any:
    # No typed input: a copy of a constant (e.g. a torch.tensor literal), the same on every rank.
    return next((t for t in in_types if t is not None), None) or _factory(node, in_types, mesh)


def _factory(node: fx.Node, in_types: list, mesh: Any) -> Any:
    return tuple(Replicate() for _ in range(mesh.ndim))


def _random(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """Random numbers are drawn per rank: treat them as differing across ranks."""
    return tuple(VARYING for _ in range(mesh.ndim))


def _getitem(node: fx.Node, in_types: list, mesh: Any) -> Any:
    return None  # handled by the checker (it indexes the producer's output types)


aten = torch.ops.aten
for _op in (aten.detach.default, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default,
            aten._to_copy.default):
    register_rule(_op, _same_as_input)
for _op in (aten.rand.default, aten.randn.default, aten.rand_like.default, aten.randn_like.default,
            aten.randint.low, aten.bernoulli.default, aten.bernoulli.p, aten.native_dropout.default,
            aten.randperm.default, aten.normal.Tensor_float, aten.uniform.default):
    register_rule(_op, _random)
register_rule(operator.getitem, _getitem)


def _statistic(node: fx.Node, in_types: list, mesh: Any) -> Any:
    """var / std / var_mean: over a sharded dim the local statistic is neither the shard nor a partial of the
    global one (it is a bug in a normalization over sharded features)."""
    t = in_types[0]
    val = node.args[0].meta["val"]
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else node.kwargs.get("dim")
    dims = list(range(val.dim())) if dims is None else [d % max(val.dim(), 1) for d in dims]
    for m, p in enumerate(t):
        if isinstance(p, Shard) and p.dim in dims:
            raise RuleError(f"{_op_name(node)} reduces over dim {p.dim}, which is sharded: the local statistic is "
                            "not a piece of the global one",
                            "all_reduce sums of x and x*x (or all_gather the dim) before the statistic", m)
        if isinstance(p, Partial):
            raise RuleError(f"{_op_name(node)} of a Partial value is not linear", "all_reduce it first", m)
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
    t = in_types[0]
    keep = {m for m, p in enumerate(t) if isinstance(p, Partial) and p.reduce_op in ops}
    if not keep:
        return _default_types(node, in_types, mesh, {node.args[0]: t})
    plain = tuple(Replicate() if m in keep else p for m, p in enumerate(t))
    out = _default_types(node, [plain], mesh, {node.args[0]: plain})
    return tuple(t[m] if m in keep else p for m, p in enumerate(out))


for _op in (aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default):
    register_rule(_op, _linear_reduction)
for _op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
    register_rule(_op, _view)


# ---- collectives (functional collectives, as localmap.collectives traces them) ---------------------------------

_c10d = torch.ops._c10d_functional


def collective_mesh_dim(node: fx.Node, mesh: Any) -> int:
    """The mesh dim whose process group a functional collective node runs over (its last argument)."""
    name = node.args[-1]
    for m in range(mesh.ndim):
        if mesh.get_group(m).group_name == name:
            return m
    raise RuleError(f"{_op_name(node)} runs over process group {name!r}, which is no dim of the region's mesh",
                    "run collectives over the region's own mesh dims (localmap.collectives by dim name)")


def collective_rule(to: Callable[[Any], Any]) -> Rule:
    """A rule for a collective over one mesh dim: that dim's entry becomes to(input entry); others pass (the
    collectives are linear, so a value partial over another dim stays partial there). A Partial input over the
    collective's own dim is read as per-rank data (per-rank token counts sent by an all_to_all, say)."""

    def rule(node: fx.Node, in_types: list, mesh: Any) -> Any:
        m = collective_mesh_dim(node, mesh)
        return tuple(to(p) if k == m else p for k, p in enumerate(in_types[0]))

    return rule


# all_reduce: the result is the same on every rank (its gradient, the same on every rank, passes through).
register_rule(_c10d.all_reduce.default, collective_rule(lambda p: Replicate()))
# all_gather / all_to_all / reduce_scatter: per-rank results whose gradients are per rank (JAX's typing of
# all_gather: a value that meets per-rank data; its transpose reduce-scatters).
register_rule(_c10d.all_gather_into_tensor.default, collective_rule(lambda p: VARYING))
register_rule(_c10d.all_to_all_single.default, collective_rule(lambda p: VARYING))
register_rule(_c10d.reduce_scatter_tensor.default, collective_rule(lambda p: VARYING))
register_rule(_c10d.wait_tensor.default, _same_as_input)
# Ops whose replicated result passes its gradient back unsummed (localmap.collectives.all_reduce): where such a
# result meets per-rank data, the checker demands pvary. And identity-forward ops whose backward sums (pvary).
UNSUMMED_GRADIENT: set = set()
GRADIENT_SUMMING: set = set()
DISPLAY_NAMES: dict = {}  # op -> the name users wrote (error messages)  # identity-forward ops whose backward all-reduces (collectives.pvary)


# ---- the default rule: DTensor's sharding propagation -----------------------------------------------------------

def _global_shape(val: torch.Tensor, t: Type, mesh_shape: Sequence[int]) -> list:
    shape = list(val.shape)
    for m, p in enumerate(t):
        if isinstance(p, Shard):
            shape[p.dim] = shape[p.dim] * mesh_shape[m]
    return shape


# Ops whose arguments hold sizes, written in the body in local terms: DTensor propagation is given the local
# shape as the tensor's shape, so sizes and shape agree and only the dim mapping matters.
_SIZE_ARG_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
    aten.view.dtype,
}


def _spec(val: torch.Tensor, t: Type, mesh: Any, local: bool = False) -> Any:
    placements = tuple(Replicate() if p is VARYING else p for p in t)
    shape = list(val.shape) if local else _global_shape(val, t, tuple(mesh.shape))
    from localmap.placements.shapes import dense_stride

    return _compat.make_spec(mesh, placements, shape, dense_stride(shape, val.stride()), val.dtype)


def propagate(node: fx.Node, in_types: list, mesh: Any, types: dict) -> Any:
    """Output type(s) of `node` from DTensor's sharding strategies; None when DTensor has no strategy."""
    local = node.target in _SIZE_ARG_OPS
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    if _compat.has_free_unbacked_symbols([(v.shape, v.stride()) for v in vals if isinstance(v, torch.Tensor)]):
        return None  # data-dependent sizes (tokens routed by an all_to_all): DTensor's strategies need real ones

    def as_schema(a: Any) -> Any:
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor) and types.get(a) is not None:
                return _spec(val, types[a], mesh, local)
            return val
        return a

    args = pytree.tree_map(as_schema, node.args)
    kwargs = pytree.tree_map(as_schema, dict(node.kwargs))
    try:
        with _compat.quiet_fake_tensor_errors():
            sharding = _compat.propagate_sharding(node.target, args, kwargs)
    except Exception:  # no strategy for this op (or one that cannot take these inputs)
        return None
    given = [s for s in pytree.tree_leaves(args) if isinstance(s, _compat.DTensorSpec)]
    wanted = given
    if sharding.needs_redistribute and sharding.redistribute_schema is not None:
        wanted = [s for s in pytree.tree_leaves(sharding.redistribute_schema.args_schema)
                  if isinstance(s, _compat.DTensorSpec)]
    broken: set[int] = set()  # mesh dims where the local op is not the shard of the global op
    for g, w in zip(given, wanted):
        broken.update(m for m, (a, b) in enumerate(zip(g.placements, w.placements)) if a != b)
    for m in sorted(broken):
        if any(isinstance(g.placements[m], Partial) for g in given):
            raise RuleError(
                f"{_op_name(node)} cannot take a Partial value as it is (it is not linear in it, or mixes it "
                f"with a value that is not a partial sum)",
                "all_reduce the partial value first, or keep the computation linear", m)
    out = sharding.output_spec
    specs = out if isinstance(out, (tuple, list)) else (out,)
    results = []
    for s in specs:
        if s is None:
            results.append(None)
            continue
        results.append(tuple(VARYING if m in broken else p for m, p in enumerate(s.placements)))
    return results if isinstance(out, (tuple, list)) else results[0]


def conservative(node: fx.Node, in_types: list, mesh: Any) -> Type:
    """Varying where any input is not Replicate; a Partial input is an error (the op's linearity is unknown)."""
    out = []
    for m in range(mesh.ndim):
        column = [t[m] for t in in_types if t is not None]
        if any(isinstance(p, Partial) for p in column):
            raise RuleError(f"{_op_name(node)} has no placement rule and gets a Partial value",
                            f"all_reduce first, or register a rule: localmap.register_rule({_op_name(node)}, ...)",
                            m)
        out.append(Replicate() if all(is_replicate(p) for p in column) else VARYING)
    return tuple(out)


def _op_name(node: fx.Node) -> str:
    return str(node.target) if not callable(node.target) or isinstance(node.target, torch._ops.OpOverload) \
        else getattr(node.target, "__name__", str(node.target))


def output_types(node: fx.Node, in_types: list, mesh: Any, types: dict) -> Any:
    """Type(s) of a node's output(s): its rule, else DTensor propagation (Varying inputs kept Varying), else
    the conservative default."""
    rule = rule_for(node.target)
    if rule is not None:
        return rule(node, in_types, mesh)
    return _default_types(node, in_types, mesh, types)


def _default_types(node: fx.Node, in_types: list, mesh: Any, types: dict) -> Any:
    tensors = [t for t in in_types if t is not None]
    if not tensors:
        return _factory(node, in_types, mesh)
    varying = {m for t in tensors for m, p in enumerate(t) if p is VARYING}
    for m in varying:
        if any(isinstance(t[m], Partial) for t in tensors):
            raise RuleError(f"{_op_name(node)} mixes a Partial value with one that varies across ranks",
                            "all_reduce the partial value first", m)
    result = propagate(node, in_types, mesh, types)
    if result is None:
        return conservative(node, in_types, mesh)

    def mark(t: Any) -> Any:
        return None if t is None else tuple(VARYING if m in varying else p for m, p in enumerate(t))

    return [mark(t) for t in result] if isinstance(result, list) else mark(result)


__all__ = ["VARYING", "Varying", "RuleError", "register_rule", "RULES", "output_types"]
