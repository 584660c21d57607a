"""Collectives inside regions, by mesh dim, with the gradients typed regions need.

Every function takes ``mesh_dim`` as a name or an index; the mesh is the enclosing region's (or ``mesh=``).
They are PyTorch's functional collectives (so they trace into graphs, run under gloo/NCCL and on the simulated
mesh), differentiated by their transpose:

=================================  ================================================================
forward                            backward
=================================  ================================================================
``all_reduce`` (sum/avg/max/min)   identity (avg: 1/n; max/min: where this rank held the result):
                                   the result is a replicated value, so its gradient is too
``all_gather``                     ``reduce_scatter`` (the gathered value meets per-rank data)
``reduce_scatter``                 ``all_gather``
``all_to_all`` / ``_single``       the inverse all_to_all (splits swapped)
``ppermute`` / ``shift``           the inverse permutation
``pvary`` (identity)               ``all_reduce``: a replicated value entering per-rank computation
=================================  ================================================================

``all_reduce`` and ``pvary`` are each other's converse (JAX's psum and pvary), at every order: under
``create_graph=True`` all_reduce's backward is a pvary and pvary's an all_reduce, so a double backward sums the
ranks' shares of a gradient's own gradient (docs/gradients.md). ``axis_index(mesh_dim)`` is a
0-dim int64 tensor computed by a collective, so it is right on every rank in traced graphs too.
``ppermute`` moves data with an all_gather (every rank receives every value), which is simple and traces
everywhere but sends n times the bytes of a point-to-point exchange.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from localmap import compat
from localmap.collectives.registry import Collective, mesh_dim_of, on_its_mesh_dim, register, same_as_input
from localmap.compat import collectives as compat_funcol
from localmap.context import enclosing_region_mesh, region_anchor, region_mesh
from localmap.errors import fail
from localmap.placements.types import AGREED, FOLLOWS_MESH, PER_RANK_COPY, UNKNOWN_WHY, VARYING

_OPS = ("sum", "avg", "max", "min")


class _Group(NamedTuple):
    """A mesh dim's process group as the collectives use it: plain values, so Dynamo takes them as constants."""

    name: str  # the process group's name (what the functional collectives take)
    size: int
    index: int  # the mesh dim's index
    device_type: str


def _group(mesh_dim: int | str, mesh: DeviceMesh | None) -> _Group:
    """The process group of `mesh_dim` of `mesh`, else of the running region's mesh. While Dynamo traces, it is
    resolved at trace time (the region's capture sets the region's mesh there)."""
    if torch.compiler.is_compiling() and _region_open_at_trace_time():
        if mesh is not None:  # Dynamo cannot read a mesh object's process groups inside a captured body
            raise fail("mesh", "is given to a collective inside a region body that Dynamo captures; there the "
                       "collective runs on the region's mesh", given="mesh=...",
                       fix="drop mesh= (the region's device_mesh is used)")
        return _Group(*_group_at_trace_time(mesh_dim))
    return _resolve_group(mesh_dim, mesh)


@compat.at_trace_time
def _region_open_at_trace_time() -> bool:
    return enclosing_region_mesh() is not None


@compat.at_trace_time
def _group_at_trace_time(mesh_dim: int | str) -> tuple:
    return tuple(_resolve_group(mesh_dim, None))


def _resolve_group(mesh_dim: int | str, mesh: DeviceMesh | None) -> _Group:
    mesh = mesh if mesh is not None else region_mesh()
    if mesh is None:
        raise fail("mesh", "a collective needs a mesh: none is given and no region is running",
                   fix="call it inside a local_map region, or pass mesh=")
    names = list(mesh.mesh_dim_names or ())
    if isinstance(mesh_dim, str):
        if mesh_dim not in names:
            raise fail("mesh_dim", "names no dim of the mesh", expected=names, given=mesh_dim,
                       fix="use one of the mesh's dim names, or an index")
        index = names.index(mesh_dim)
    else:
        index = int(mesh_dim)
        if not 0 <= index < mesh.ndim:
            raise fail("mesh_dim", f"is out of range for a {mesh.ndim}-d mesh", given=mesh_dim,
                       fix=f"use 0 .. {mesh.ndim - 1}")
    return _Group(mesh.get_group(index).group_name, mesh.size(index), index, mesh.device_type)


# Every functional collective returns an unwaited result; its wait is a local op of the input's type.
register(compat.FUNCTIONAL_OPS.wait_tensor.default, Collective(None, same_as_input, cost=None))


# ---- all_reduce ---------------------------------------------------------------------------------------------------
# Two custom ops (reduced here, pvary below) give the gradients that differ from the functional collectives' own (their all_reduce
# backward all-reduces again; ours is the identity, as the result's gradient is the same on every rank). Both
# are per-rank local ops (a copy), so they run unchanged on the simulated mesh and show as nodes in traced
# graphs, where the checker reads them; the communication itself stays a functional collective.
@torch.library.custom_op("localmap::reduced", mutates_args=())
def _reduced_op(x: torch.Tensor, result: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    """`result` (the sum, avg, max or min of `x` over the group's ranks, computed without autograd),
    differentiated as the reduction: the gradient passes to `x` unchanged (sum), divided by the group's size
    (avg), or where x held the result (max/min)."""
    return result.clone()


@_reduced_op.register_fake
def _(x: torch.Tensor, result: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    return torch.empty_like(result)


def _reduced_setup(ctx: Any, inputs: tuple, output: Any) -> None:
    x, result, ctx.op, ctx.group_name = inputs
    if ctx.op in ("max", "min"):
        ctx.save_for_backward(x == result)


def _reduced_backward(ctx: Any, g: torch.Tensor) -> tuple:
    if torch.is_grad_enabled():  # create_graph=True: this identity is differentiated in its turn (a double
        # backward), where the gradient's own gradient arrives per rank (a share wherever g meets per-rank
        # data); the identity's transpose sums those shares, as pvary's backward does (JAX: psum's transpose is
        # pvary, pvary's is psum). Without it each rank kept only its own share.
        g = _pvary_op(g, ctx.group_name)
    if ctx.op == "avg":
        g = g / compat.group_size(ctx.group_name)
    elif ctx.op in ("max", "min"):
        (held,) = ctx.saved_tensors
        g = g * held
    return g, None, None, None


_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup)

# The functional all_reduce's result is the same on every rank. Its global meaning:
# * of partial results of its own reduction (a sum of Partial(sum), a max of Partial(max) or of a Replicate
#   value): the one-rank run's value, Replicate;
# * of a shard of dim d (the mesh dim cuts d alone): the reduction of the global value's n blocks along d, a value
#   whose meaning follows the mesh's size, stated on the call's mesh (NOTE in ``check.coordinates``): Replicate;
# * of per-rank values with no global form, or a sum of a Replicate value (n times it, mostly a second
#   all_reduce of one value): the same on every rank with no global meaning derived, AGREED, which no claim is
#   proven on.
# avg is a sum divided by n, settled at localmap::reduced.


def _not_partial_why(op: str, p: Any) -> str:
    """Why an all_reduce's result is AGREED: its input is not a partial result of its own reduction."""
    return (f"all_reduce ({op}) of a value that is not a partial {op} over the mesh dim (it is {p!r}): the same on "
            "every rank, but not what the one-rank run computes as far as the check knows")


def _blocks_reduced(t: Any, m: int, op: str) -> bool:
    """Whether an all_reduce (op) over mesh dim m of a value of type `t` reduces the blocks of a shard: Shard(d)
    on m, and on the other mesh dims values that keep their meaning under it (whole, a shard of another dim, or
    a partial sum under a sum)."""
    p = t[m]
    if not isinstance(p, Shard) or compat.is_strided_shard(p):
        return False
    return all(isinstance(q, Replicate) or (compat.sharded_dim(q) not in (None, p.dim)
                                            and not compat.is_strided_shard(q))
               or (isinstance(q, Partial) and q.reduce_op in ("sum", "avg") and op in ("sum", "avg"))
               for k, q in enumerate(t) if k != m)


def _blocks_meaning(op: str, dim: int, n: int) -> str:
    return f"all_reduce ({op}) of a shard of dim {dim}: the {op} of the global value's {n} blocks along dim {dim}"


def _all_reduce_type(node: Any, in_types: list, mesh: Any) -> Any:
    op = node.args[1] if len(node.args) > 1 else node.kwargs.get("reduceOp")
    t, m = in_types[0], mesh_dim_of(node, mesh)

    def reduced(p: Any) -> Any:
        if isinstance(p, Partial) and p.reduce_op == op or isinstance(p, Replicate) and op in ("max", "min"):
            return Replicate()
        if _blocks_reduced(t, m, op):
            node.meta[FOLLOWS_MESH] = _blocks_meaning(op, p.dim, mesh.shape[m])
            return Replicate()
        node.meta[UNKNOWN_WHY] = _not_partial_why(op, p)
        return AGREED

    return tuple(reduced(p) if k == m else p for k, p in enumerate(t))


def _reduced_type(node: Any, in_types: list, mesh: Any) -> Any:
    """localmap::reduced(x, result, op, group_name) has the result's type, except for an avg (a sum divided by n): on
    the all_reduce's mesh dim it is Replicate for x Partial(avg) or a shard's blocks, else AGREED (a sum of
    partial sums divided by n is not their sum; where that dim is not found, every Replicate entry is AGREED)."""
    result = in_types[-1]
    if node.args[2] != "avg":
        return result
    source = _all_reduce_under(node.args[1])
    if source is None or len(in_types) < 2 or in_types[0] is None:
        return tuple(AGREED if isinstance(p, Replicate) else p for p in result)
    m = mesh_dim_of(source, mesh)
    x = in_types[0][m]
    whole = isinstance(x, Partial) and x.reduce_op == "avg" or _blocks_reduced(in_types[0], m, "avg")
    if whole and isinstance(x, Shard):  # the avg's meaning, said once: not the sum under it
        source.meta.pop(FOLLOWS_MESH, None)
        node.meta[FOLLOWS_MESH] = _blocks_meaning("avg", x.dim, mesh.shape[m])
    if not whole:
        node.meta[UNKNOWN_WHY] = _not_partial_why("avg", x)
    return tuple((Replicate() if whole else AGREED) if k == m else p for k, p in enumerate(result))


def _all_reduce_under(node: Any) -> Any:
    """The functional all_reduce under a wait and a division (how ``all_reduce`` computes an avg), or None."""
    while getattr(node, "target", None) in (compat.FUNCTIONAL_OPS.wait_tensor.default, torch.ops.aten.div.Tensor):
        node = node.args[0]
    return node if getattr(node, "target", None) is compat.FUNCTIONAL_OPS.all_reduce.default else None


register(compat.FUNCTIONAL_OPS.all_reduce.default,
         Collective(None, _all_reduce_type, cost=lambda b, n: 2 * (n - 1) / n * b))
# localmap::reduced carries the gradient rule: the result's gradient is the same on every rank, so this rank's
# passes to x unsummed.
register(torch.ops.localmap.reduced.default,
         Collective("all_reduce", _reduced_type, cost=None, gradient="unsummed"))


def all_reduce(x: torch.Tensor, mesh_dim: int | str, op: str = "sum", *, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Reduce over the ranks of `mesh_dim` (sum, avg, max, min); every rank gets the result. Its gradient is
    taken to be the same on every rank (the result is replicated), so backward passes it to `x` without
    communication; where the result meets per-rank data, pass it through `pvary` (the checker says where)."""
    if op not in _OPS:
        raise fail("op", "is not a reduction all_reduce knows", expected=_OPS, given=op, fix="use sum/avg/max/min")
    group = _group(mesh_dim, mesh)
    result = compat_funcol.all_reduce(x.detach(), "sum" if op == "avg" else op, group.name)
    if op == "avg":  # kept an avg at localmap::reduced, where its type rule tells Partial(avg) from a sum
        result = result / group.size
    return _reduced_op(x, result, op, group.name)


def _summed(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of `x` over the group's ranks, with all_reduce's gradient (localmap::reduced)."""
    return _reduced_op(x, compat_funcol.all_reduce(x.detach(), "sum", group_name), "sum", group_name)


# ---- pvary --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("localmap::pvary", mutates_args=())
def _pvary_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return x.clone()


@_pvary_op.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _pvary_setup(ctx: Any, inputs: tuple, output: Any) -> None:
    ctx.group_name = inputs[1]


def _pvary_backward(ctx: Any, g: torch.Tensor) -> tuple:
    if torch.is_grad_enabled():  # create_graph=True: the sum differentiable in its turn (its transpose: pvary)
        return _summed(g.contiguous(), ctx.group_name), None
    return compat_funcol.all_reduce(g.contiguous(), "sum", ctx.group_name), None


_pvary_op.register_autograd(_pvary_backward, setup_context=_pvary_setup)

# A replicated value made per rank; its backward sums the per-rank gradients itself.
register(torch.ops.localmap.pvary.default,
         Collective("pvary", on_its_mesh_dim(lambda p: PER_RANK_COPY if isinstance(p, Replicate) else p), cost=None,
                    gradient="summing"))


def pvary(x: torch.Tensor, mesh_dim: int | str, *, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Identity forward, all_reduce backward: a replicated value that enters per-rank computation, so its
    gradient (a different share on each rank) is summed. The converse of `all_reduce`."""
    return _pvary_op(x, _group(mesh_dim, mesh).name)


# ---- all_gather / reduce_scatter / all_to_all: per-rank results whose gradients are per rank (JAX's typing of
# all_gather: a value that meets per-rank data; its transpose reduce-scatters) -----------------------------------
# The gathered value is the same on every rank; typed per rank (its backward reduce-scatters the gradients).
register(compat.FUNCTIONAL_OPS.all_gather_into_tensor.default,
         Collective(None, on_its_mesh_dim(  # a strided shard gathers its rows out of order: Varying
             lambda p: VARYING if isinstance(p, Partial) or compat.is_strided_shard(p) else PER_RANK_COPY),
                    cost=lambda b, n: (n - 1) * b))


def all_gather(x: torch.Tensor, mesh_dim: int | str, dim: int = 0, *, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order. Backward reduce-scatters: the result is meant to
    meet per-rank data (gathered keys and values, say), so each rank's gradient is a share to be summed."""
    group = _group(mesh_dim, mesh)
    return compat_funcol.all_gather(x.contiguous(), dim % max(x.dim(), 1), group.name)


def _reduce_scatter_type(node: Any, in_types: list, mesh: Any) -> Any:
    """A partial sum reduce-scattered is this rank's shard of the scattered dim. The functional collective
    scatters dim 0; for another dim it first cuts the input into chunks along it and concatenates them on dim 0,
    which is read back from the graph (``_scattered_dim``); an input of another making gives Varying."""
    dim = _scattered_dim(node.args[0])
    return on_its_mesh_dim(lambda p: Shard(dim) if isinstance(p, Partial) and p.reduce_op in ("sum", "avg")
                           and dim is not None else VARYING)(node, in_types, mesh)


def _scattered_dim(arg: Any) -> int | None:
    """The dim a reduce_scatter's input was cut along: 0, or the chunked dim of a cat-of-chunks on dim 0."""
    aten = torch.ops.aten
    if getattr(arg, "target", None) is not aten.cat.default:
        return 0
    pieces, cat_dim = arg.args[0], (arg.args[1] if len(arg.args) > 1 else 0)
    if cat_dim != 0 or not pieces:
        return None
    sources = {p.args[0] if p.target is operator.getitem else None for p in pieces}
    if len(sources) != 1 or None in sources:
        return None
    (split,) = sources
    if split.target not in (aten.split.Tensor, aten.split_with_sizes.default):
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    return dim % split.args[0].meta["val"].ndim


register(compat.FUNCTIONAL_OPS.reduce_scatter_tensor.default,
         Collective(None, _reduce_scatter_type, cost=lambda b, n: (n - 1) / n * b))


def reduce_scatter(x: torch.Tensor, mesh_dim: int | str, dim: int = 0, op: str = "sum", *,
                   mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Reduce over the ranks of `mesh_dim`, then keep this rank's chunk of `dim` (sum or avg). Backward
    all-gathers."""
    if op not in ("sum", "avg"):
        raise fail("op", "is not a reduction reduce_scatter supports", expected=("sum", "avg"), given=op,
                   fix="use sum or avg")
    group = _group(mesh_dim, mesh)
    n = group.size
    if x.shape[dim] % n:
        raise fail("x", f"dim {dim} of size {x.shape[dim]} does not split evenly over {n} ranks",
                   mesh=mesh, mesh_dim=group.index, fix="pad that dim to a multiple of the mesh dim's size")
    x = x / n if op == "avg" else x
    return compat_funcol.reduce_scatter(x.contiguous(), "sum", dim % x.dim(), group.name)


def _equal_splits(exchange: Any, n: int) -> bool:
    """Whether an all_to_all_single node sends and receives n equal static splits (None, or filled in by the
    functional collective)."""
    return all(s is None or (len(s) == n and len({*s}) == 1 and all(type(v) is int for v in s))
               for s in exchange.args[1:3])


def _all_to_all_single_type(node: Any, in_types: list, mesh: Any) -> Any:
    """Rows sent in equal splits (static sizes) from a shard of dim 0: rank r receives sub-block r of every
    rank's block, in rank order, which is block r of the global rows in a fixed order (blocks transposed): a
    shard of dim 0 of that value, whose meaning follows the mesh's size (NOTE in ``check.coordinates``).
    Anything else (sizes from data, another input type) is Varying there: ``check.routing`` follows rows routed
    by data and brought back."""
    m = mesh_dim_of(node, mesh)
    n, t = mesh.shape[m], in_types[0]
    others = all(compat.sharded_dim(p) != 0 for k, p in enumerate(t) if k != m)
    moved = Shard(0) if _equal_splits(node, n) and others and t[m] == Shard(0) and not compat.is_strided_shard(t[m]) \
        else VARYING
    if moved is not VARYING:
        node.meta[FOLLOWS_MESH] = (f"all_to_all_single in equal splits of a shard of dim 0: the global rows with "
                                   f"their {n} x {n} sub-blocks transposed")
    return tuple(moved if k == m else p for k, p in enumerate(t))


register(compat.FUNCTIONAL_OPS.all_to_all_single.default,
         Collective(None, _all_to_all_single_type, cost=lambda b, n: (n - 1) / n * b))


def all_to_all_single(x: torch.Tensor, mesh_dim: int | str, output_split_sizes: Sequence[int] | None = None,
                      input_split_sizes: Sequence[int] | None = None, *, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Send rows of `x` (dim 0) to each rank by `input_split_sizes`, receive by `output_split_sizes` (equal
    splits when None). Sizes may be data-dependent (e.g. from ``counts.tolist()``). Backward sends the
    gradients back by the swapped sizes."""
    group = _group(mesh_dim, mesh)
    _log_splits(output_split_sizes, input_split_sizes)
    out = None if output_split_sizes is None else list(output_split_sizes)
    inp = None if input_split_sizes is None else list(input_split_sizes)
    return compat_funcol.all_to_all_single(x.contiguous(), out, inp, group.name)


# The check pairs an all_to_all's combine with its dispatch by the split-size lists the body passed (the same
# Python objects, swapped): a traced graph holds only their values, which on a traced rank need not be the real
# ones (the sizes come from other ranks' counts). While the check traces a body, every all_to_all_single call
# made here is logged in call order: (output_split_sizes, input_split_sizes, their values then).
_SPLIT_LOG: list[list] = []


class SplitsPassed(NamedTuple):
    """The split-size arguments of one all_to_all_single call, as the body passed them."""

    output: Any  # the object passed (a list, say), or None
    input: Any
    values: tuple  # (tuple(output) or None, tuple(input) or None) at the call; a symbolic size by identity


def _log_splits(output: Any, input: Any) -> None:
    if _SPLIT_LOG:
        _SPLIT_LOG[-1].append(SplitsPassed(output, input, tuple(None if s is None else tuple(
            v if type(v) is int else ("symbolic", id(v)) for v in s) for s in (output, input))))  # no guard


@contextlib.contextmanager
def splits_logged() -> Iterator[list]:
    """Log the split sizes of the all_to_all_single calls made inside (see ``_SPLIT_LOG``)."""
    log: list = []
    _SPLIT_LOG.append(log)
    try:
        yield log
    finally:
        _SPLIT_LOG.pop()


# ---- composed of the above ---------------------------------------------------------------------------------------

def all_to_all(x: torch.Tensor, mesh_dim: int | str, split_dim: int, concat_dim: int, *,
               mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Split `x` into n chunks along `split_dim`, send chunk j to rank j, concatenate what arrives along
    `concat_dim` (rank order)."""
    group = _group(mesh_dim, mesh)
    n = group.size
    if x.shape[split_dim] % n:
        raise fail("x", f"split dim {split_dim} of size {x.shape[split_dim]} does not split over {n} ranks",
                   mesh=mesh, mesh_dim=group.index, fix="pad the split dim to a multiple of the mesh dim's size")
    chunks = torch.cat(torch.chunk(x, n, dim=split_dim), dim=0) if split_dim != 0 else x
    received = all_to_all_single(chunks, mesh_dim, mesh=mesh)
    return torch.cat(torch.chunk(received, n, dim=0), dim=concat_dim)


def all_to_all_type(node: Any, types: dict, mesh: Any) -> Any:
    """The type of the last step of ``all_to_all`` (``cat(chunk(received, n, 0), concat_dim)``, read back from
    the traced graph): for an input Shard(concat_dim) on the exchange's mesh dim, each rank receives chunk r of
    every rank's piece along split_dim and joins them along concat_dim in rank order, so it holds chunk r of
    the global tensor along split_dim: Shard(split_dim). Another input type there gives Varying; other mesh
    dims keep the input's placement where it cuts neither dim (the exchange only moves pieces). None where
    `node` is not that step."""
    found = _all_to_all_steps(node, mesh)
    if found is None:
        return None
    x, m, split_dim, concat_dim = found
    t = types.get(x)
    if not isinstance(t, tuple):
        return None
    moved = (split_dim, concat_dim)
    resharded = t[m] == Shard(concat_dim) and split_dim != concat_dim
    if not resharded:
        node.meta[UNKNOWN_WHY] = (f"all_to_all of a value that is {t[m]!r} on the mesh dim, with split_dim {split_dim} "
                                  f"and concat_dim {concat_dim}: only a shard of concat_dim (another dim than "
                                  "split_dim) becomes a shard of split_dim")
    return tuple((Shard(split_dim) if resharded else VARYING) if k == m else
                 t[k] if isinstance(t[k], (Replicate, Partial, Shard)) and compat.sharded_dim(t[k]) not in moved
                 else VARYING for k in range(mesh.ndim))


def _all_to_all_steps(node: Any, mesh: Any) -> tuple | None:
    """(x, mesh dim, split_dim, concat_dim) where `node` is ``cat(chunk(all_to_all_single(pieces), n, 0),
    concat_dim)`` over n ranks in equal splits, and `pieces` is x (split_dim 0) or ``cat(chunk(x, n,
    split_dim), 0)``."""
    aten = torch.ops.aten
    if getattr(node, "target", None) is not aten.cat.default:
        return None
    received = _equal_chunks_of(node.args[0], 0)
    concat_dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    exchange = received
    while getattr(exchange, "target", None) is compat.FUNCTIONAL_OPS.wait_tensor.default:
        exchange = exchange.args[0]
    if getattr(exchange, "target", None) is not compat.FUNCTIONAL_OPS.all_to_all_single.default:
        return None
    try:
        m = mesh_dim_of(exchange, mesh)
    except Exception:
        return None
    n, pieces = mesh.shape[m], exchange.args[0]
    if len(node.args[0]) != n or not _equal_splits(exchange, n):
        return None
    sent, split_dim = pieces, 0
    if getattr(pieces, "target", None) is aten.cat.default and (pieces.args[1] if len(pieces.args) > 1 else 0) == 0:
        inner = pieces.args[0]
        source = _equal_chunks_of(inner, None)
        if source is not None and len(inner) == n:
            sent, split_dim = source
    if isinstance(sent, tuple) or not hasattr(sent, "meta"):
        return None
    ndim = sent.meta["val"].ndim
    return sent, m, split_dim % ndim, concat_dim % ndim


def _equal_chunks_of(pieces: Any, dim: int | None) -> Any:
    """The tensor `pieces` (getitems of one split in order, every piece of it, equal sizes) cut, when it is cut
    along `dim`; with `dim` None, (that tensor, the dim it is cut along). None otherwise."""
    aten = torch.ops.aten
    if not isinstance(pieces, (list, tuple)) or not pieces or \
            any(getattr(p, "target", None) is not operator.getitem for p in pieces):
        return None
    split = pieces[0].args[0]
    if getattr(split, "target", None) is not aten.split.Tensor or \
            [p.args for p in pieces] != [(split, k) for k in range(len(pieces))] or \
            len(split.meta.get("val", ())) != len(pieces):
        return None
    source = split.args[0]
    cut = (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) % source.meta["val"].ndim
    if len({p.meta["val"].shape[cut] for p in pieces}) != 1:
        return None
    if dim is None:
        return source, cut
    return source if cut == dim else None


def axis_size(mesh_dim: int | str, *, mesh: DeviceMesh | None = None) -> int:
    """The number of ranks along `mesh_dim`."""
    return _group(mesh_dim, mesh).size


def axis_index(mesh_dim: int | str, *, mesh: DeviceMesh | None = None, device: Any = None) -> torch.Tensor:
    """This rank's coordinate along `mesh_dim`, as a 0-dim int64 tensor (made by an all_to_all of
    ``arange(n)``, so it is per rank in traced graphs and on the simulated mesh alike)."""
    group = _group(mesh_dim, mesh)
    if not compat.compiling_simulated():
        return _axis_index(group, device, None)
    like = region_anchor()
    if like is None and not _region_open_at_trace_time():
        _refuse_outside_region()
    return _axis_index(group, device, like)


def _axis_index(group: _Group, device: Any, like: torch.Tensor | None) -> torch.Tensor:
    dev = device if device is not None else torch.device(group.device_type)
    ids = _index_tensor(range(group.size), dev, like)
    _log_splits(None, None)
    return compat_funcol.all_to_all_single(ids, None, None, group.name)[0]


def _index_tensor(values: range | list[int], device: Any, like: torch.Tensor | None) -> torch.Tensor:
    """`values` as an int64 tensor on `device`. Where Dynamo traces on a simulated mesh, a factory's tensor
    cannot meet the body's values (compat.compiling_simulated), so there it is made from `like` (a tensor of
    the region: one new_full per value, as many as the mesh dim has ranks)."""
    if like is not None and compat.compiling_simulated():
        return torch.stack([like.new_full((), v, dtype=torch.int64, device=device) for v in values])
    if isinstance(values, range):
        return torch.arange(values.start, values.stop, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=torch.int64, device=device)


@compat.at_trace_time
def _refuse_outside_region() -> None:
    raise fail("axis_index", "is called in a function compiled on a simulated mesh (LocalTensorMode) outside a "
               "region body: there it has no simulated tensor to make its rank ids from, and a tensor made by a "
               "factory cannot meet simulated values under AOT autograd (docs/compile.md, item 4)",
               fix="call it inside a local_map region's body, run the function eagerly, or compile it on real "
                   "process groups")


def ppermute(x: torch.Tensor, mesh_dim: int | str, perm: Sequence[tuple[int, int]], *,
             mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Send `x` from rank src to rank dst for each (src, dst) in `perm` (as JAX's ppermute); a rank that
    receives nothing gets zeros."""
    group = _group(mesh_dim, mesh)
    n = group.size
    sources = [-1] * n
    for src, dst in perm:
        if not (0 <= src < n and 0 <= dst < n) or sources[dst] != -1:
            raise fail("perm", "must be (source, destination) pairs of distinct destinations within the mesh dim",
                       expected=f"pairs in 0..{n - 1}", given=list(perm), fix="list each destination once")
        sources[dst] = src
    gathered = all_gather(x.unsqueeze(0), mesh_dim, 0, mesh=mesh)  # [n, *x.shape], rank order
    me = _axis_index(group, x.device, x)
    table = _index_tensor(sources, x.device, x)
    src = table.index_select(0, me.reshape(1))  # a tensor index: no data-dependent Python int in traces
    picked = gathered.index_select(0, src.clamp(min=0)).squeeze(0)
    return picked * (src >= 0).to(x.dtype)


def shift(x: torch.Tensor, mesh_dim: int | str, offset: int = 1, *, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Rank r sends to rank (r + offset) mod n, so it receives rank (r - offset)'s value (a ring step)."""
    n = axis_size(mesh_dim, mesh=mesh)
    return ppermute(x, mesh_dim, [(r, (r + offset) % n) for r in range(n)], mesh=mesh)
