"""Checking a region's body against its placements, and inferring its gradient placements.

The body is traced once on fake local tensors (softmax / layer norm / mean decomposed, so the reductions inside
them show), and every value gets a placement type per mesh dim (``_types``). Then:

* each output's inferred type is compared with its out_placements: a claimed Replicate must be Replicate; a
  claimed Shard(d) must not be a partial sum, a replicated value or a shard of another dim; a claimed Partial
  must not be a whole (replicated) value or a shard. A value that varies with no derivable structure
  (``Varying``) may be claimed Shard or Partial: localmap cannot say it is wrong;
* each input's gradient placements are inferred as the transpose of its type: Shard stays Shard, Partial becomes
  Replicate, Replicate becomes Partial on a mesh dim where it meets data that varies (or is partial) there, else
  stays Replicate. A given in_grad_placements that differs is an error.

Verdicts are cached per (function, input metadata, placements), so steady-state calls pay a dictionary lookup.
"""

from __future__ import annotations

import operator
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard
from torch.fx.experimental.proxy_tensor import make_fx

from localmap import compat as _compat
from localmap.compat import pytree
from localmap.context import in_region
from localmap.errors import LocalMapError, fail, mesh_dim_label
from localmap.placements.specs import placements_str
from localmap.sites import stack_trace_site
from localmap.check.mutation import check_no_input_mutation
from localmap.check.rules import output_types
from localmap.collectives.registry import collective
from localmap.placements.types import VARYING, RuleError


class PlacementError(LocalMapError):
    """A region's body contradicts its placements (or its in_grad_placements)."""


@dataclass
class Verdict:
    """What checking a region found: problems (empty when the placements hold) and inferred gradients."""

    problems: list[PlacementError] = field(default_factory=list)
    grad_placements: tuple | None = ()  # per input leaf: inferred placements (None entries for non-tensors)
    output_types: list = field(default_factory=list)
    unchecked: str | None = None  # why the body could not be traced for the check (then nothing is inferred)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.unchecked:
            return f"unchecked: {self.unchecked}"
        return "ok" if self.ok else str(self.problems[0]).splitlines()[0]


_DECOMPOSE: dict | None = None


def _decompositions() -> dict:
    global _DECOMPOSE
    if _DECOMPOSE is None:
        _DECOMPOSE = _compat.check_decompositions()
    return _DECOMPOSE


def _source(node: fx.Node) -> str:
    """file:line of the user's code that made `node`, from the trace's stack."""
    return stack_trace_site(node.meta.get("stack_trace") or "") or "<unknown>"


def _op(node: fx.Node) -> str:
    facts = collective(node.target)
    if facts is not None and facts.name is not None:
        return facts.name
    return str(node.target) if isinstance(node.target, _compat.OpOverload) else \
        getattr(node.target, "__name__", str(node.target))


# ---- type-checking a graph --------------------------------------------------------------------------------------

def check_graph(gm: fx.GraphModule, in_types: Sequence[Any], out_claims: Sequence[Any], mesh: Any,
                given_grads: Sequence[Any] | None, out_paths: Sequence[str], in_paths: Sequence[str],
                uneven: frozenset = frozenset()) -> Verdict:
    """Type `gm`'s values from `in_types` (one per placeholder: placements or None), compare outputs with
    `out_claims` (one per tensor output) and infer or check gradient placements."""
    ndim = mesh.ndim
    verdict = Verdict()
    types: dict[fx.Node, Any] = {}
    origin: dict[fx.Node, list] = {}  # per mesh dim: the node that gave the value its type there
    lineage: dict[fx.Node, list[set]] = {}  # per mesh dim: inputs whose Replicate value reached here unchanged
    meets = [[False] * ndim for _ in in_types]
    reported: set = set()  # (collective node, mesh dim) already reported as needing pvary

    for i, (node, t) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), in_types)):
        types[node] = None if t is None else tuple(t)
        origin[node] = [node] * ndim
        lineage[node] = [({i} if t is not None and isinstance(t[m], Replicate) else set()) for m in range(ndim)]

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        inputs = [a for a in node.all_input_nodes if types.get(a) is not None and not isinstance(types[a], list)]
        if node.target is operator.getitem:
            src, idx = node.args
            t = types.get(src)
            types[node] = t[idx] if isinstance(t, list) and idx < len(t) else None
            origin[node] = origin.get(src, [node] * ndim)
            lineage[node] = lineage.get(src, [set() for _ in range(ndim)])
            continue
        if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):
            types[node] = None  # sizes and scalars
            continue
        try:
            if uneven and node.target in _MEANS:
                _check_uneven_mean(node, [types[a] for a in inputs], uneven)
            out = output_types(node, [types[a] for a in inputs], mesh, types)
        except RuleError as e:
            verdict.problems.append(fail(
                f"op {_op(node)} at {_source(node)}", e.problem, mesh=mesh, mesh_dim=e.mesh_dim,
                fix=e.fix, error=PlacementError))
            out = tuple(VARYING for _ in range(ndim))
        types[node] = out
        first = out[0] if isinstance(out, list) else out
        origin[node], lineage[node] = [], []
        for m in range(ndim):
            here = first[m] if first is not None else None
            same = [a for a in inputs if types[a][m] == here]
            origin[node].append(origin[same[0]][m] if same else node)
            reaching = set().union(*(lineage[a][m] for a in inputs if isinstance(types[a][m], Replicate)))
            gradient = getattr(collective(node.target), "gradient", None)
            if gradient == "summing":  # its backward sums the per-rank gradients itself
                lineage[node].append(set())
            elif isinstance(here, Replicate):
                starts = gradient == "unsummed" and _differentiable(node)
                lineage[node].append({node} if starts else reaching)
            else:
                for j in reaching:
                    if isinstance(j, fx.Node):  # a collective's replicated result meets per-rank data
                        _needs_pvary(verdict, reported, j, node, mesh, m)
                    else:
                        meets[j][m] = True
                lineage[node].append(set())

    outputs = [o for o in pytree.tree_leaves(gm.graph.find_nodes(op="output")[0].args[0])
               if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)]
    for k, (node, claim) in enumerate(zip(outputs, out_claims)):
        t = types.get(node)
        verdict.output_types.append(t)
        if t is None or claim is None:
            continue
        for m, (c, got) in enumerate(zip(claim, t)):
            problem = _compare(c, got, mesh, m)
            if problem is not None:
                made = origin[node][m]
                where = f"made so by {_op(made)} at {_source(made)}" if made.op == "call_function" else \
                    "passed through from an input"
                verdict.problems.append(fail(
                    out_paths[k] if k < len(out_paths) else f"outputs[{k}]",
                    f"{problem[0]} ({where})", mesh=mesh, mesh_dim=m, expected=f"claimed {c!r}",
                    given=f"inferred {got!r}", fix=problem[1], error=PlacementError))

    grads = []
    for i, t in enumerate(in_types):
        if t is None:
            grads.append(None)
            continue
        grads.append(tuple(
            p if isinstance(p, Shard) else Replicate() if isinstance(p, Partial) else
            (Partial() if meets[i][m] else Replicate()) for m, p in enumerate(t)))
    verdict.grad_placements = tuple(grads)
    for i, (given, inferred) in enumerate(zip(given_grads or (), grads)):
        if given is None or inferred is None or tuple(given) == inferred:
            continue
        m = next(m for m, (a, b) in enumerate(zip(given, inferred)) if a != b)
        why = "it meets data that varies across those ranks, so each rank holds a partial sum" \
            if isinstance(inferred[m], Partial) else "every rank computes the same gradient"
        verdict.problems.append(fail(
            f"in_grad_placements for {in_paths[i] if i < len(in_paths) else f'inputs[{i}]'}",
            f"contradicts the body: the gradient is {inferred[m]!r} ({why})", mesh=mesh, mesh_dim=m,
            expected=placements_str(inferred), given=placements_str(tuple(given)),
            fix=f"use {placements_str(inferred)}, or leave in_grad_placements=None to have it inferred",
            error=PlacementError))
    return verdict


def _differentiable(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())


def _needs_pvary(verdict: Verdict, reported: set, made: fx.Node, used: fx.Node, mesh: Any, m: int) -> None:
    """A replicated collective result used with per-rank data: its gradient there is per rank, but the
    collective's backward passes this rank's share on as if it were the whole gradient."""
    if (made, m) in reported:
        return
    reported.add((made, m))
    name = repr(mesh.mesh_dim_names[m]) if mesh.mesh_dim_names else str(m)
    path = f"op {_op(made)} at {_source(made)}"
    verdict.problems.append(fail(
        path, f"its result is the same on every rank but meets per-rank data in {_op(used)} at {_source(used)}, "
        "so its gradient differs per rank and the collective's backward would keep only this rank's share",
        mesh=mesh, mesh_dim=m, fix=f"pass the result through localmap.collectives.pvary(y, {name}) where it "
        "meets per-rank data (identity forward, all_reduce backward)", error=PlacementError))


_MEANS = {torch.ops.aten.mean.dim, torch.ops.aten.mean.default}


def _check_uneven_mean(node: fx.Node, in_types: list, uneven: frozenset) -> None:
    """A mean over a dim sharded on a mesh dim where shards differ in size: the local means are not pieces of
    a Partial(avg) (each rank divides by its own count). `uneven`: mesh dims on which some input is unevenly
    sharded (conservative: the value reduced may descend from it)."""
    t = in_types[0] if in_types else None
    if t is None:
        return
    ndim = node.args[0].meta["val"].ndim
    dims = node.args[1] if node.target is torch.ops.aten.mean.dim and node.args[1] else range(ndim)
    dims = {d % ndim for d in dims} if ndim else set()
    for m, p in enumerate(t):
        if m in uneven and isinstance(p, Shard) and p.dim in dims:
            raise RuleError(f"takes a mean over dim {p.dim}, which is sharded unevenly (shards of different "
                            "sizes): the local means are not a Partial(avg) of the global mean",
                            "sum locally and divide by the global size, or shard that dim evenly", mesh_dim=m)


def _compare(claim: Placement, got: Any, mesh: Any, m: int) -> tuple[str, str] | None:
    """(problem, fix) when a claimed placement contradicts the inferred type on one mesh dim."""
    dim = mesh_dim_label(mesh, m).split(" ", 2)[-1]
    name = repr(mesh.mesh_dim_names[m]) if mesh.mesh_dim_names else f"mesh dim {m}"
    if got is VARYING:
        if isinstance(claim, Replicate):
            return ("differs across ranks but is claimed Replicate", "return a value that is the same on every "
                    f"rank (all_gather / all_reduce over {name}), or claim the placement it has")
        return None
    if claim == got:
        return None
    if isinstance(got, Partial):
        if isinstance(claim, Replicate):
            return ("is a partial sum over the ranks but is claimed Replicate",
                    f"all_reduce over {name} before returning, or claim {got!r}")
        if isinstance(claim, Shard):
            return (f"is a partial sum over the ranks but is claimed {claim!r}",
                    f"reduce_scatter over {name} on dim {claim.dim} before returning, or claim {got!r}")
        return (f"is {got!r} but is claimed {claim!r}", f"claim {got!r}")
    if isinstance(got, Replicate):
        if isinstance(claim, Shard):
            return (f"is the same on every rank but is claimed {claim!r} (the global value would repeat it)",
                    "claim Replicate()")
        return ("is already whole on every rank but is claimed Partial (the global value would be a multiple "
                "of it)", "claim Replicate()")
    if isinstance(got, Shard):
        if isinstance(claim, Replicate):
            return (f"is a shard of dim {got.dim} (differs across ranks) but is claimed Replicate",
                    f"all_gather over {name} on dim {got.dim} before returning, or claim {got!r}")
        return (f"is a shard of dim {got.dim} but is claimed {claim!r}", f"claim {got!r}")
    del dim
    return None


# ---- checking a function (traced once per metadata, cached) ------------------------------------------------------

_cache: dict[Any, tuple[Any, Verdict]] = {}
_lock = threading.Lock()
VERDICT_CACHE_LIMIT = 1024  # verdicts remembered (cleared when full)
_checked = 0  # bodies actually traced and checked (not served from the cache)


def cache_info() -> dict[str, int]:
    """Bodies traced and checked since the process started, and verdicts cached now."""
    with _lock:
        return {"bodies_checked": _checked, "verdicts_cached": len(_cache)}


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(int(s) for s in _plain(value).shape), value.dtype)
    if isinstance(value, (int, float, bool, str, type(None))):
        return ("V", value)
    return ("O", id(value))


def check_function(fn: Callable, local_args: Sequence[Any], leaf_specs: Sequence[Any], out_placements: Any,
                   given_grads: Sequence[Any] | None, mesh: Any, treespec: Any, kwargs: dict,
                   uneven: frozenset = frozenset()) -> Verdict:
    """Trace `fn` on fake copies of `local_args` (flat leaves) and check it; cached."""
    global _checked
    from localmap.placements.specs import leaf_path, resolve_output_specs

    key = None
    try:
        key = (id(fn), tuple(_meta(a) for a in local_args), repr(leaf_specs), repr(out_placements),
               repr(given_grads), id(mesh), treespec, repr(sorted(kwargs.items())) if kwargs else "", uneven)
        hash(key)
    except TypeError:
        key = None
    if key is not None:
        with _lock:
            hit = _cache.get(key)
        if hit is not None and hit[0] is fn:
            return hit[1]

    leaves = list(local_args)
    inputs = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
    traced: dict[str, Any] = {}

    def body(*tensors: Any) -> tuple:
        for i, t in zip(inputs, tensors):
            leaves[i] = t
        with in_region(mesh):
            out = fn(*pytree.tree_unflatten(leaves, treespec), **kwargs)
        traced["out"] = out
        return tuple(o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor))

    _compat.register_trace_anchor(fn)
    tensors = [local_args[i] for i in inputs]
    fake_mode = _compat.detect_fake_mode(tensors) or _compat.new_fake_mode()
    try:
        with _compat.isolated_tracing():
            with fake_mode:
                fakes = [torch.empty_strided(tuple(int(s) for s in _plain(a).shape), _plain(a).stride(),
                                             dtype=a.dtype, device="meta" if a.is_meta else "cpu")
                         for a in (local_args[i] for i in inputs)]
            with _compat.ignore_fresh_unbacked(fake_mode):
                gm = make_fx(body, decomposition_table=_decompositions(), tracing_mode="fake",
                             record_stack_traces=True)(*fakes)
    except LocalMapError:
        raise
    except Exception as e:  # a body the tracer cannot follow still runs; it just is not checked
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        warnings.warn(f"local_map: the body of {getattr(fn, '__name__', fn)!r} could not be traced for the "
                      f"placement check ({reason}); it runs unchecked and its gradient placements are not "
                      "inferred. Pass check=False to silence this.", stacklevel=4)
        verdict = Verdict(grad_placements=None, unchecked=reason)
        if key is not None:
            with _lock:
                _cache[key] = (fn, verdict)
        return verdict
    out = traced["out"]
    tree = pytree.tree_unflatten(list(local_args), treespec)
    in_paths = [leaf_path("args", tree, i) for i in inputs]
    check_no_input_mutation(gm, in_paths)  # before the body runs for real: its inputs are the caller's shards
    flat_out = pytree.tree_leaves(out)
    specs = resolve_output_specs(out_placements, out, len(flat_out))
    # Malformed claims (wrong length, Shard dim out of range) are left to the spec checks, which name them.
    claims = [_normalized(s, o.ndim, mesh.ndim) for o, s in zip(flat_out, specs) if isinstance(o, torch.Tensor)]
    out_paths = [leaf_path("outputs", out, k) for k, o in enumerate(flat_out) if isinstance(o, torch.Tensor)]
    given = None if given_grads is None else [
        _normalized(given_grads[i], local_args[i].ndim, mesh.ndim) for i in inputs]
    with _compat.isolated_tracing():  # symbolic size arithmetic must not reach an outer trace
        verdict = check_graph(gm, [leaf_specs[i] for i in inputs], claims, mesh, given, out_paths, in_paths,
                              uneven)
    grads: list[Any] = [None] * len(leaves)
    for i, g in zip(inputs, verdict.grad_placements):
        grads[i] = g
    verdict.grad_placements = tuple(grads)
    _checked += 1
    if key is not None:
        with _lock:
            if len(_cache) >= VERDICT_CACHE_LIMIT:
                _cache.clear()
            _cache[key] = (fn, verdict)
    return verdict


def _normalized(claim: Any, ndim: int, mesh_ndim: int) -> Any:
    if claim is None or len(claim) != mesh_ndim:
        return None
    out = []
    for p in claim:
        if isinstance(p, Shard):
            if not -ndim <= p.dim < ndim:
                return None
            p = Shard(p.dim % ndim) if ndim else p
        out.append(p)
    return tuple(out)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor of a simulated (LocalTensor) value; the tensor itself otherwise."""
    return _compat.simulated_local(t)[0] if _compat.is_simulated(t) else t


def enforce(verdict: Verdict, mode: Any) -> None:
    """Raise the first problem (check=True) or warn once per verdict (check='warn')."""
    if verdict.ok or mode is False or verdict.unchecked:
        return
    if mode == "warn":
        if not getattr(verdict, "_warned", False):
            verdict._warned = True  # type: ignore[attr-defined]
            for p in verdict.problems:
                warnings.warn(str(p), stacklevel=4)
        return
    raise verdict.problems[0]


__all__ = ["PlacementError", "Verdict", "check_graph", "check_function", "enforce"]
