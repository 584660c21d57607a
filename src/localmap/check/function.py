"""Checking a Python function: its body traced once per input metadata on fake local tensors (softmax, layer
norm and RMS norm decomposed so the reductions inside them get types), then typed by ``check_graph``.

Verdicts are cached per (function, input metadata, placements), so steady-state calls pay a dictionary lookup.
A body the tracer cannot follow still runs: it is reported unchecked (with a warning), never "ok".
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Replicate, Shard

from localmap.caches import register_cache, register_counter
from localmap import compat
from localmap.check.checker import SITE, check_graph
from localmap.check.closure import closed_over_dtensors
from localmap.check.state import state_key, value_key
from localmap.check.verdict import Verdict, unchecked_verdict
from localmap.check.mutation import check_no_input_mutation
from localmap.check.offsets import rank_facts_are_withheld
from localmap.check.routing import SPLITS_PASSED
from localmap.check.tested import rank_routing_reads, shard_position_reads
from localmap.collectives.primitives import splits_logged
from localmap.compat import pytree
from localmap.context import in_region
from localmap.errors import LocalMapError, fail, region_name
from localmap.placements.specs import leaf_path, resolve_output_specs
from localmap.sites import register_body, traced_frame

_decompositions_built: dict[str, dict] = register_cache("decompositions", {}, limit=1, eviction="keep first")


class Lifted(Protocol):
    """Tensors a body closes over, checked as inputs (traced.closure): their names, and a context in which the
    body reads the given local values for them."""

    paths: Sequence[str]

    def bind(self, values: Sequence[Any]) -> ContextManager[None]: ...


def _decompositions() -> dict:
    table = _decompositions_built.get("check")
    if table is None:
        table = _decompositions_built["check"] = compat.check_decompositions()
    return table


_lock = threading.Lock()
VERDICT_CACHE_LIMIT = 1024  # verdicts remembered (cleared when full)
_cache: dict[Any, tuple[Any, Verdict]] = register_cache("verdicts", {}, limit=VERDICT_CACHE_LIMIT,
                                                        eviction="clear when full", lock=_lock)
_checked = 0  # bodies actually traced and checked (not served from the cache)
register_counter("bodies_checked", lambda: _checked)
# DTensor's answers to the checker's propagation questions (kept in the fence, compat.dtensor)
register_cache("propagation", None, limit=8192, eviction="clear when full", size=compat.propagation_cache_size,
               clear=compat.clear_propagation_cache)
# this thread's FakeTensorMode for DTensor's output-metadata probes where they run on fake tensors (compat.dtensor)
register_cache("probe_modes", None, limit=1, eviction="clear when full", size=compat.probe_modes_held,
               clear=compat.drop_probe_mode)
# output metadata of the ops the light trace ran (compat.recording: an op repeated on the same shapes is a lookup)
register_cache("op_shapes", None, limit=16384, eviction="clear when full", size=compat.shape_cache_size,
               clear=compat.clear_shape_cache)
# what the light trace reads of each op's schema, once per op (compat.recording)
register_cache("op_facts", None, limit=4096, eviction="clear when full", size=compat.facts_cache_size,
               clear=compat.clear_facts_cache)


def check_function(fn: Callable, local_args: Sequence[Any], leaf_specs: Sequence[Any], out_placements: Any,
                   given_grads: Sequence[Any] | None, mesh: Any, treespec: Any, kwargs: dict,
                   uneven: frozenset = frozenset(), lifted: Lifted | None = None) -> Verdict:
    """Trace `fn` on fake copies of `local_args` (flat leaves) and check it; cached. With `lifted`, the leaves
    past the treespec's are tensors the body closes over: `lifted.bind(values)` makes the body read them."""
    key = None
    fn_key, fn_objects = function_identity(fn)
    fn_objects = (*fn_objects, mesh)  # held by the entry and compared by identity: an id is reused after GC
    try:
        key = (fn_key, tuple(value_key(a) for a in local_args), repr(leaf_specs), repr(out_placements),
               repr(given_grads), id(mesh), treespec, tuple((k, value_key(v)) for k, v in sorted(kwargs.items())),
               uneven, tuple(lifted.paths) if lifted is not None else (), state_key(fn), rank_facts_are_withheld())
        hash(key)
    except TypeError:
        key = None
    if key is not None:
        with _lock:
            hit = _cache.get(key)
        if hit is not None and len(hit[0]) == len(fn_objects) and all(
                a is b for a, b in zip(hit[0], fn_objects)):
            if not hit[1].per_call:
                return hit[1]
            # a body whose branch depends on values: known, so checked on this call's values at once
            return _check_on_values(fn, local_args, leaf_specs, out_placements, given_grads, mesh, treespec, kwargs,
                                    uneven)
    verdict = _check_fresh(fn, local_args, leaf_specs, out_placements, given_grads, mesh, treespec, kwargs, uneven,
                           lifted)
    if key is not None:
        with _lock:
            if len(_cache) >= VERDICT_CACHE_LIMIT:
                _cache.clear()
            _cache[key] = (fn_objects, verdict)
    return verdict


def _check_fresh(fn: Callable, local_args: Sequence[Any], leaf_specs: Sequence[Any], out_placements: Any,
                 given_grads: Sequence[Any] | None, mesh: Any, treespec: Any, kwargs: dict, uneven: frozenset,
                 lifted: Lifted | None) -> Verdict:
    """The body traced on fakes; where a value decides a branch, on this call's real values instead."""
    global _checked
    inputs = [i for i, a in enumerate(local_args) if isinstance(a, torch.Tensor)]
    try:
        gm, out, closed = _trace(fn, local_args, inputs, mesh, treespec, kwargs, lifted)
        verdict = _check_traced(gm, out, closed, local_args, inputs, leaf_specs, out_placements, given_grads, mesh,
                                treespec, uneven, lifted.paths if lifted is not None else ())
    except LocalMapError:
        raise  # the body's own errors, and input mutation
    except Exception as e:  # a body the tracer cannot follow, or a failure of the checker: the program runs
        if lifted is None and compat.is_data_dependent_error(e) and _has_real_values(local_args):
            return _check_on_values(fn, local_args, leaf_specs, out_placements, given_grads, mesh, treespec,
                                    kwargs, uneven)
        return _unchecked(fn, e, local_args, leaf_specs, given_grads, treespec)
    _checked += 1
    verdict.function = region_name(fn)
    verdict.definition = definition_of(fn)
    return verdict


def _check_on_values(fn: Callable, local_args: Sequence[Any], leaf_specs: Sequence[Any], out_placements: Any,
                     given_grads: Sequence[Any] | None, mesh: Any, treespec: Any, kwargs: dict,
                     uneven: frozenset) -> Verdict:
    """A body whose Python branches on tensor values, checked on this call's values (the branch each rank takes:
    every simulated rank's, or this process's). The verdict holds for this call only (``per_call``); ranks that
    take branches with different verdicts are refused."""
    global _checked
    inputs = [i for i, a in enumerate(local_args) if isinstance(a, torch.Tensor)]
    name = region_name(fn)
    verdicts: dict[Any, Verdict] = {}
    try:
        for rank in _ranks(local_args, closed_over_dtensors(fn)):
            gm, out, closed = _trace(fn, local_args, inputs, mesh, treespec, kwargs, None, real=True, rank=rank)
            verdicts[rank] = _check_traced(gm, out, closed, local_args, inputs, leaf_specs, out_placements,
                                           given_grads, mesh, treespec, uneven, ())
    except LocalMapError:
        raise
    except Exception as e:  # not even the branch taken can be traced
        return _unchecked(fn, e, local_args, leaf_specs, given_grads, treespec)
    _checked += 1
    found = {(v.summary(), repr(v.grad_placements)): r for r, v in verdicts.items()}
    if len(found) > 1:
        raise fail(f"region {name!r}", "branches on tensor values, and its ranks take branches the check judges "
                   "differently", given="; ".join(f"rank {r}: {k[0]}, gradient placements {k[1]}"
                                                 for k, r in found.items()),
                   fix="make the branch the same on every rank (decide it from a replicated value), or split the "
                       "region so each branch is its own region")
    verdict = next(iter(verdicts.values()))
    verdict.function = name
    verdict.definition = definition_of(fn)
    verdict.per_call = True
    return verdict


def _unchecked(fn: Callable, e: Exception, local_args: Sequence[Any], leaf_specs: Sequence[Any],
               given_grads: Sequence[Any] | None, treespec: Any) -> Verdict:
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    verdict = unchecked_verdict(fn, reason, _guessed_grads(local_args, leaf_specs, given_grads, treespec))
    verdict.definition = definition_of(fn)
    verdict.untraceable = compat.untraceable_why(e)
    return verdict


def _has_real_values(local_args: Sequence[Any]) -> bool:
    """Whether the call's tensors hold values (not fakes or meta tensors: the traced and compiled paths)."""
    tensors = [a for a in local_args if isinstance(a, torch.Tensor)]
    return compat.detect_fake_mode(tensors) is None and not any(_plain(t).is_meta for t in tensors)


def _ranks(local_args: Sequence[Any], closed: list) -> list[int | None]:
    """The simulated ranks whose values the body is checked on, or [None]: this process's values."""
    for t in (*local_args, *(compat.local_tensor_of(d) for _, d in closed)):
        if isinstance(t, torch.Tensor) and compat.is_simulated(t):
            return sorted(compat.simulated_local(t))
    return [None]


def _guessed_grads(local_args: Sequence[Any], leaf_specs: Sequence[Any], given_grads: Sequence[Any] | None,
                   treespec: Any) -> list[str]:
    """Paths of the inputs whose gradient placements an unchecked region must guess: floating-point inputs
    that are Replicate on some mesh dim (Partial if they meet sharded data), when none were given."""
    if given_grads is not None:
        return []
    n = treespec.num_leaves
    tree = pytree.tree_unflatten(list(local_args[:n]), treespec)
    return [leaf_path("args", tree, i) for i, (a, spec) in enumerate(zip(local_args[:n], leaf_specs))
            if isinstance(a, torch.Tensor) and a.is_floating_point() and spec is not None
            and any(isinstance(p, Replicate) for p in spec)]


def definition_of(fn: Callable) -> Any:
    """Where a region's body is defined, for warnings once per definition: its code object (the same for every
    wrapper rebuilt around it, whatever it closes over), or the callable's class."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__code__", None) or type(fn)


def function_identity(fn: Callable) -> tuple[Any, tuple]:
    """What decides a function's behaviour, as (a hashable key, the objects it names by id): its code, the
    contents of its closure cells, its defaults, the object a method is bound to, a partial's arguments. Two
    wrappers of the same code over the same objects (torchtitan builds a local_map wrapper in every forward)
    are the same function to the check. The cache entry keeps the objects, so an id cannot be reused by another
    object while the entry stands."""
    if isinstance(fn, functools.partial):
        key, objects = function_identity(fn.func)
        extra = (*fn.args, *fn.keywords.values())
        return ("partial", key, tuple(id(o) for o in extra), tuple(fn.keywords)), (*objects, *extra)
    bound_to = getattr(fn, "__self__", None)
    if bound_to is not None and hasattr(fn, "__func__"):
        key, objects = function_identity(fn.__func__)
        return ("method", key, id(bound_to)), (*objects, bound_to)
    code = getattr(fn, "__code__", None)
    if code is None:  # a module or another callable object: itself
        return ("object", id(fn)), (fn,)
    try:
        cells = tuple(c.cell_contents for c in fn.__closure__ or ())
    except ValueError:  # an empty cell (a name assigned later): the function itself
        return ("object", id(fn)), (fn,)
    objects = (*cells, *(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values(), fn.__globals__)
    return ("function", code, tuple(id(o) for o in objects)), objects


def _trace(fn: Callable, local_args: Sequence[Any], inputs: list[int], mesh: Any, treespec: Any,
           kwargs: dict, lifted: Lifted | None, real: bool = False,
           rank: int | None = None) -> tuple[fx.GraphModule, Any, list]:
    """The body traced on fresh stand-ins of the tensor leaves (decomposed, each node's source frame kept), its
    output, and the closed-over DTensors (name, DTensor, grad_placements its to_local calls declared) traced as
    extra inputs; its GraphModule is only read, so its Python code is never generated.
    With `lifted` (the traced path), the leaves past the treespec's are tensors the body closes over. With
    `real`, on the tensors' real values instead (a simulated tensor's at `rank`): Python branches on values
    take the branch this call takes. Otherwise the light trace (compat.record, on meta tensors) where it
    follows the body, else make_fx on fake tensors: the same graph either way (NOTE: the check's light trace)."""
    register_body(fn)
    closed_dtensors = closed_over_dtensors(fn)
    tensors = [local_args[i] for i in inputs] + [compat.local_tensor_of(d) for _, d in closed_dtensors]
    if real:
        body, traced, closed = _traceable(fn, local_args, inputs, mesh, treespec, kwargs, lifted, closed_dtensors)
        values = [_plain(t, rank).detach() for t in tensors]
        with compat.isolated_tracing(), compat.lazy_graph_modules(), splits_logged() as splits:
            gm = compat.make_fx_on_values(body, decomposition_table=_decompositions())(*values)
        gm.meta[SPLITS_PASSED] = splits
        # What only decided the branch (x.sum() > 0, read into Python) reaches no output: the check types the
        # branch taken, not the per-rank decision.
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm, traced["out"], closed
    fake_mode = compat.detect_fake_mode(tensors)
    if fake_mode is None:
        body, traced, closed = _traceable(fn, local_args, inputs, mesh, treespec, kwargs, lifted, closed_dtensors)
        try:
            with compat.isolated_tracing(), compat.lazy_graph_modules(), splits_logged() as splits:
                gm = compat.record(body, [_plain(t) for t in tensors], _decompositions())
            gm.meta[SPLITS_PASSED] = splits
            return gm, traced["out"], closed
        except Exception:  # what only make_fx follows (a value read into Python, a subclass), or the body's
            pass  # own error: traced again below, which raises it as before
    body, traced, closed = _traceable(fn, local_args, inputs, mesh, treespec, kwargs, lifted, closed_dtensors)
    fake_mode = fake_mode or compat.new_fake_mode()
    with compat.isolated_tracing():
        with fake_mode:
            fakes = [torch.empty_strided(tuple(int(s) for s in _plain(a).shape), _plain(a).stride(),
                                         dtype=a.dtype, device="cpu") for a in tensors]
        with compat.ignore_fresh_unbacked(fake_mode), compat.lazy_graph_modules(), splits_logged() as splits:
            gm = compat.make_fx(body, decomposition_table=_decompositions(), tracing_mode="fake")(*fakes)
    gm.meta[SPLITS_PASSED] = splits
    return gm, traced["out"], closed


def _traceable(fn: Callable, local_args: Sequence[Any], inputs: list[int], mesh: Any, treespec: Any,
               kwargs: dict, lifted: Lifted | None, closed_dtensors: list) -> tuple[Callable, dict, list]:
    """The body as a function of its tensor leaves (then the closed-over DTensors' local tensors), with the
    dict its output lands in and the closed-over DTensors' records (fresh for each trace: a trace that is
    given up must leave nothing in them)."""
    leaves = list(local_args)
    traced: dict[str, Any] = {}
    n = treespec.num_leaves
    closed = [(name, d, []) for name, d in closed_dtensors]

    def body(*tensors: Any) -> tuple:
        for i, t in zip(inputs, tensors, strict=False):
            leaves[i] = t
        table = {id(d): (t, declared) for (_, d, declared), t in zip(closed, tensors[len(inputs):], strict=True)}
        bound = lifted.bind(leaves[n:]) if lifted is not None else contextlib.nullcontext()
        with compat.node_sites(SITE, traced_frame), in_region(mesh), compat.to_local_substituted(table), bound:
            out = fn(*pytree.tree_unflatten(leaves[:n], treespec), **kwargs)
        traced["out"] = out
        return tuple(o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor))

    return body, traced, closed


def _check_traced(gm: fx.GraphModule, out: Any, closed: list, local_args: Sequence[Any], inputs: list[int],
                  leaf_specs: Sequence[Any], out_placements: Any, given_grads: Sequence[Any] | None, mesh: Any,
                  treespec: Any, uneven: frozenset, lifted_paths: Sequence[str]) -> Verdict:
    """The traced body's verdict; gradient placements per leaf (None for non-tensors)."""
    n = treespec.num_leaves
    tree = pytree.tree_unflatten(list(local_args[:n]), treespec)
    in_paths = [leaf_path("args", tree, i) if i < n else lifted_paths[i - n] for i in inputs]
    check_no_input_mutation(gm, in_paths)  # before the body runs for real: its inputs are the caller's shards
    flat_out = pytree.tree_leaves(out)
    specs = resolve_output_specs(out_placements, out, len(flat_out))
    # Malformed claims (wrong length, Shard dim out of range) are left to the spec checks, which name them.
    claims = [_normalized(s, o.ndim, mesh.ndim) for o, s in zip(flat_out, specs) if isinstance(o, torch.Tensor)]
    out_paths = [leaf_path("outputs", out, k) for k, o in enumerate(flat_out) if isinstance(o, torch.Tensor)]
    given = [None] * len(inputs) if given_grads is None else [
        _normalized(given_grads[i], local_args[i].ndim, mesh.ndim) for i in inputs]
    in_types = [leaf_specs[i] for i in inputs]
    for name, d, declared in closed:  # typed by their placements; gradients as their to_local calls declare
        in_types.append(tuple(d.placements) if declared else None)
        in_paths.append(f"closed-over {name}")
        stated = next((g for g in declared if g is not None), None)
        given.append(tuple(stated) if stated is not None else
                     compat.grad_placements_default(tuple(d.placements)) if d.requires_grad else None)
    with compat.isolated_tracing():  # symbolic size arithmetic must not reach an outer trace
        verdict = check_graph(gm, in_types, claims, mesh, given, out_paths, in_paths, uneven)
    if verdict.unproven:  # what the test where the proof stops needs to know about the graph (check.tested)
        verdict.draws_random = any(compat.draws_random(n.target, n.args, n.kwargs)
                                   for n in gm.graph.nodes if n.op == "call_function")
        verdict.mesh_reads = shard_position_reads(gm, in_types, in_paths) + rank_routing_reads(gm)
        verdict.low_precision = any(getattr(n.meta.get("val"), "dtype", None) in (torch.float16, torch.bfloat16)
                                    for n in gm.graph.nodes)
    grads: list[Any] = [None] * len(local_args)
    for i, g in zip(inputs, verdict.grad_placements[:len(inputs)], strict=True):
        grads[i] = g
    verdict.grad_placements = tuple(grads)
    return verdict


def _normalized(claim: Any, ndim: int, mesh_ndim: int) -> Any:
    """A claim as the check compares it: a short one padded with Replicate (as the region's output is built,
    placements.specs.fit_spec_to_mesh); None for one the spec checks refuse by name (too long, bad Shard dim)."""
    if claim is None or len(claim) > mesh_ndim:
        return None
    claim = (*claim, *(Replicate(),) * (mesh_ndim - len(claim)))
    out = []
    for p in claim:
        if isinstance(p, Shard):
            if not -ndim <= p.dim < ndim:
                return None
            p = Shard(p.dim % ndim) if ndim else p
        out.append(p)
    return tuple(out)


def _plain(t: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """A simulated (LocalTensor) value's tensor at `rank` (rank 0 by default); the tensor itself otherwise."""
    if not compat.is_simulated(t):
        return t
    per_rank = compat.simulated_local(t)
    return per_rank[rank] if rank is not None else per_rank[min(per_rank)]
