"""The test where the proof stops: an unproven claim settled by running the region (verdict "tested").

A region's global meaning is its body run on a one-rank mesh over the global tensors: every collective is then
the identity and ``axis_index`` is 0. Where the check's proof stops, ``settle_by_test`` runs the body twice on
the call's own inputs, without a trace:

* on the call's simulated mesh (LocalTensorMode: every rank in this process), from detached copies of each
  input's shards and of the DTensors it closes over; the outputs are put together by their claimed placements
  (Shard: concatenated in mesh order, Partial: reduced, Replicate: every rank must agree) and the inputs'
  gradients by their gradient placements, for a fixed random cotangent;
* on a one-rank mesh of the same dim names, from the global values of those inputs, with the same cotangent;
  device meshes the body reads from module state are rebound to one-rank meshes for that run.

Values and gradients within tolerance: "tested" (the record names the inputs and the largest difference). A
difference: "wrong", with the numbers, unless the body may mean another program on one rank, which is then
reported unproven with the numbers and the reason (``dependence``): an output whose global value has another
shape than the one-rank run's (shapes that depend on the mesh's size: an all_reduce of per-rank values one shard
long, which the proof cannot type), an integer input
that holds one value per rank (rank ids passed as data), a Python integer the body closes over that equals a mesh dim's size (module
state such as ``self.ep_size``), a device mesh it closes over, or a fixed position taken in a shard's sharded dim (``w[0]`` as "this rank's
expert": ``mesh_reads``, found in the traced graph).

The test leaves no trace: tensors the body can reach (module parameters and buffers, closed-over tensors) are
restored when it wrote to them, so are the module globals its code names and the random generators; gradients
are taken with ``torch.autograd.grad``, so no ``.grad`` changes. A body that draws random numbers is left to
the proof (unproven). It runs by itself when the inputs are small (``TEST_BUDGET_ELEMENTS``) and always with
``check="test"``. Under a real process group (gloo, NCCL) every rank of the world takes part, as they all
call the region: the inputs' shards, the outputs and the gradients are gathered to every rank, the one-rank run
runs on each rank over its own one-member group, and each step's outcome (a failure on any rank included) is
shared by all, so they reach one verdict and none waits for another (``_run_and_compare_on_ranks``).
Before that, the ranks agree on whether to test at all: each proves the region on its own trace and may
reach another outcome (a literal rank offset right on one rank only), so their outcomes are gathered once on a
verdict cache miss and all act alike (``agree_on_ranks``). While torch.compile traces, that exchange runs only
where Dynamo's compiler collectives are on; otherwise no proof reads the rank (``agree_while_tracing``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from localmap import compat
from localmap.caches import register_cache
from localmap.check.closure import closed_over_dtensors, plain_object, reachable
from localmap.check.offsets import rank_facts_withheld
from localmap.check.verdict import PlacementError, TestRecord, Verdict
from localmap.compat import pytree
from localmap.context import in_region
from localmap.errors import PEER_FIX, CollectiveError, LocalMapError, fail
from localmap.placements.algebra import grad_default
from localmap.placements.specs import is_leaf_spec, leaf_path, resolve_output_specs

TEST_BUDGET_ELEMENTS = 1 << 16  # global elements over a region's DTensor inputs (and closed-over DTensors) that
#                                the default check tests by itself; check="test" tests any size
_COTANGENT_SEED = 20  # the test's own generator: the global random state is never drawn from
_INT_MAX = 1 << 62


def settle_by_test(verdict: Verdict, fn: Callable, leaves: Sequence[Any], treespec: Any, kwargs: dict,
                   out_placements: Any, grad_placements: Sequence[Any], mesh: DeviceMesh, force: bool) -> None:
    """Test an unproven verdict on the call's inputs (`leaves`: flat arguments, DTensors for the sharded ones;
    `grad_placements`: per leaf, the gradient placements the region gives it) and record the result in
    `verdict`: its ``test``, and a PlacementError in ``problems`` where the test refutes a claim."""
    if verdict.test is not None and not (force and verdict.test.not_run):
        return
    closed = closed_over_dtensors(fn)
    why = _why_not_run(verdict, leaves, closed, mesh, force)
    if why is not None:
        if why != "over budget":  # over budget stays untested (no record): check="test" may run it later
            verdict.test = TestRecord(inputs="", mesh="", not_run=why)
        return
    record = TestRecord(inputs=_describe_inputs(leaves, treespec), mesh=_describe_mesh(mesh))
    _rank_queries.seen = []
    state = _State(fn)
    route = _run_and_compare if compat.simulation_active() else _run_and_compare_on_ranks
    shards: dict[int, dict[int, torch.Tensor]] = {}
    try:
        found = route(fn, leaves, treespec, kwargs, out_placements, grad_placements, closed, mesh,
                      verdict.low_precision, shards)
        if not found[2]:
            found = _as_a_whole(route, fn, leaves, treespec, kwargs, out_placements, grad_placements, closed, mesh,
                                verdict.low_precision) or found
    except Exception as e:  # a body that cannot run on one rank (shapes that only fit a shard): left unproven
        record.not_run = f"the body failed on its one-rank run or the test's: {type(e).__name__}: {e}"[:240]
        found = None
    finally:
        drew = state.restore()
    if drew:
        record.not_run = "the body draws random numbers (left to the proof)"
    elif found is not None:
        record.largest, record.where, record.same = found
        if not record.same:
            shapes = [f"{record.where}: the body's shapes depend on the mesh's size"] if _OTHER_SHAPE in \
                record.where else []
            record.dependence = [*shapes, *verdict.mesh_reads, *_mesh_dependence(fn, leaves, treespec, mesh, shards),
                                 *dict.fromkeys(_rank_queries.seen)]
    verdict.test = record
    if not record.not_run and not record.same and not record.dependence:
        verdict.problems.append(_refuted(verdict, record))


# NOTE: pieces settled as a whole. A body that cuts its shard of a sharded dim into pieces by local sizes and
# returns every piece, each claimed as that shard (torchtitan's ChunkedLossWrapper: ``split`` of the local
# sequence, ``(p,) * num_chunks``), differs from its one-rank run piece by piece: the region's piece c holds each
# rank's c-th piece, the one-rank run's the c-th piece of the whole dim. It is right exactly when its caller
# treats the pieces alike and recombines them all (row-wise work on each, the losses summed), which happens
# outside the region. What the region itself can be held to is its pieces joined in order: that concatenation
# must be the one-rank run's, values and gradients. Where it is, the verdict is "tested" and the record says
# "as a whole"; a single piece (one output) or pieces returned out of order is never settled this way, and
# strict mode (proven only) still refuses it. See docs/check-verdicts.md.
_WHOLE = "its {n} outputs joined in order along dim {dim}"


def _whole_claim(out_placements: Any) -> tuple[tuple, int, int] | None:
    """(the claim, the dim, how many outputs) where every output is claimed the same shard of one tensor dim and
    there are several, else None."""
    if not isinstance(out_placements, (list, tuple)) or len(out_placements) < 2 or is_leaf_spec(out_placements):
        return None
    if any(s is None or not is_leaf_spec(s) for s in out_placements) or len({tuple(s) for s in out_placements}) > 1:
        return None
    claim = tuple(out_placements[0])
    dims = {p.dim for p in claim if isinstance(p, Shard)}
    if len(dims) != 1 or any(isinstance(p, Partial) for p in claim):
        return None
    return claim, dims.pop(), len(out_placements)


def _as_a_whole(route: Callable, fn: Callable, leaves: Sequence[Any], treespec: Any, kwargs: dict,
                out_placements: Any, grad_placements: Sequence[Any], closed: list, mesh: DeviceMesh,
                low_precision: bool) -> tuple[float, str, bool] | None:
    """Where the pieces differ from the one-rank run's: the comparison of them joined in order, when it holds
    (see the note above), else None."""
    whole = _whole_claim(out_placements)
    if whole is None:
        return None
    claim, dim, n = whole
    try:
        found = route(fn, leaves, treespec, kwargs, claim, grad_placements, closed, mesh, low_precision, {},
                      joined=dim)
    except Exception:  # pieces that cannot be joined (other shapes): the pieces' own difference stands
        return None
    return (found[0], _WHOLE.format(n=n, dim=dim), True) if found[2] else None


def agree_on_ranks(check: Callable[[], Verdict], mesh: DeviceMesh) -> Verdict:
    """`check()`'s verdict, agreed by every rank under a real process group whose world the mesh covers: ranks
    may reach different proof outcomes for one call (a literal rank offset proven on one rank only, uneven
    shards), and one acting alone (raising, or entering the test's collectives) leaves the others waiting. Each
    rank's outcome is gathered once, on a verdict cache miss; then all act alike (``_acted_alike``). On a
    simulated mesh, one trace stands for every rank: `check()` as it is."""
    if compat.simulation_active() or _why_not_on_ranks(mesh) is not None:
        return check()
    verdict, error = None, None
    try:
        verdict = check()
    except LocalMapError as e:  # the check refused the call here: every rank learns of it before raising
        error = e
    if error is not None:
        mine = ("error", str(error).splitlines()[0][:400], False, False, [], [])
    else:
        mine = (verdict.status, verdict.summary()[:400], verdict.draws_random, verdict.low_precision,
                verdict.mesh_reads, verdict.guessed)
    everyone: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(everyone, mine)
    except Exception as e:  # another rank failed before its check, exited, or is in a different collective
        raise fail("check", "could not gather every rank's placement-check outcome", mesh=mesh,
                   given=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300], fix=PEER_FIX,
                   error=CollectiveError) from e
    if error is not None:
        raise error
    return _acted_alike(verdict, everyone)


def agree_while_tracing(check: Callable[[], Verdict], mesh: DeviceMesh) -> Verdict:
    """`check()`'s verdict at torch.compile's trace time, the same on every rank. An exchange there is safe only
    where every rank traces the same frames in the same order; Dynamo may recompile on some ranks only (a guard
    on a per-rank value, automatic dynamic shapes), and a gather met by some ranks only would hang. So the
    ranks exchange outcomes (``agree_on_ranks``, eager's rule) only under Dynamo's compiler collectives, whose
    contract is that lockstep; otherwise no proof reads this process's rank (``rank_facts_withheld``), and every
    rank reaches the verdict of the trace they share, with no exchange."""
    if compat.compiler_collectives_on():
        return agree_on_ranks(check, mesh)
    with rank_facts_withheld() as withheld:
        verdict = check()
    # the same words on every rank (each met the literal); kept in the cached verdict, which only this path reads
    if withheld and verdict.status == "unproven" and _WITHHELD not in verdict.unproven[0]:
        verdict.unproven[0] += _WITHHELD
    return verdict


_WITHHELD = ("; a literal rank offset (from dist.get_rank) proves nothing while torch.compile traces, as the ranks "
             "cannot agree on it there without Dynamo's compiler collectives (eagerly they exchange outcomes, and a "
             "right offset is proven)")


def _acted_alike(verdict: Verdict, everyone: list[tuple]) -> Verdict:
    """This rank's verdict made to act as every rank's will (`everyone`: (status, summary, draws random, low
    precision, mesh reads, guessed) by rank): a refusal or a proven contradiction anywhere is one everywhere; an
    unchecked body anywhere is unchecked everywhere; a claim unproven anywhere is tested by all together."""
    me = dist.get_rank()
    others = [(r, o) for r, o in enumerate(everyone) if r != me]
    for status, error in (("error", LocalMapError), ("wrong", PlacementError)):
        found = [(r, o[1]) for r, o in others if o[0] == status]
        if found and verdict.status != status:
            r, said = found[0]
            refusal = fail(f"region {verdict.function!r}", f"rank {r}'s check refuses it, so every rank does "
                           "(ranks acting alone would wait for each other)", given=f"rank {r}: {said}",
                           fix=f"see rank {r}'s message", error=error)
            if status == "error":
                raise refusal
            return dataclasses.replace(verdict, problems=[refusal], warned=False)
    if verdict.status == "wrong":
        return verdict
    unchecked = [(r, o) for r, o in enumerate(everyone) if o[0] == "unchecked"]
    if unchecked:
        r, o = unchecked[0]
        return dataclasses.replace(verdict, unproven=[], test=None, grad_placements=None, guessed=list(o[5]),
                                   unchecked=verdict.unchecked or f"rank {r}: {o[1]}", warned=False)
    unproven = [(r, o) for r, o in enumerate(everyone) if o[0] != "ok"]
    if not unproven:
        return verdict
    if verdict.status == "ok":  # a copy: this rank's own (cached) proof stays proven
        r, o = unproven[0]
        verdict = dataclasses.replace(verdict, problems=[], unproven=[f"proven on rank {me}, but on rank {r}: {o[1]}"],
                                      warned=False)
    verdict.test = None  # the test decides, on every rank (one rank may hold an earlier test's record)
    verdict.draws_random = any(x[2] for x in everyone)
    verdict.low_precision = any(x[3] for x in everyone)
    verdict.mesh_reads = list(dict.fromkeys(m for x in everyone for m in x[4]))
    return verdict


def _why_not_run(verdict: Verdict, leaves: Sequence[Any], closed: list, mesh: DeviceMesh, force: bool) -> str | None:
    if verdict.draws_random:
        return "the body draws random numbers (left to the proof)"
    if not compat.simulation_active():
        why = _why_not_on_ranks(mesh)
        if why is not None:
            return why
    dtensors = [a for a in leaves if isinstance(a, DTensor)] + [d for _, d in closed]
    if any(compat.is_strided_shard(p) for d in dtensors for p in d.placements):
        return "an input is an interleaved (strided) shard, which the test does not put together"
    if not force and sum(d.numel() for d in dtensors) > TEST_BUDGET_ELEMENTS:
        return "over budget"
    return None


def _refuted(verdict: Verdict, record: TestRecord) -> PlacementError:
    stopped = verdict.unproven[0].replace(" is unproven: the proof stopped at ", ", where the proof stopped at ") \
        if verdict.unproven else f"the body could not be checked: {verdict.unchecked}"
    return fail(f"region {verdict.function!r}", f"its test refutes a claim the proof could not settle ({stopped}): "
                f"on the call's simulated mesh the region differs from its one-rank run (its global meaning) by "
                f"{record.largest:.3g} in {record.where}", given=f"{record.inputs}; {record.mesh}",
                fix="claim the placements the body computes, or add the collective that makes the claim hold; "
                    "if the body is meant to differ on one rank (it reads the mesh's size from data or module "
                    "state), pass check='allow_unproven'", error=PlacementError)


# ---- the two runs -------------------------------------------------------------------------------------------

def _run_and_compare(fn: Callable, leaves: Sequence[Any], treespec: Any, kwargs: dict, out_placements: Any,
                     grad_placements: Sequence[Any], closed: list, mesh: DeviceMesh, low_precision: bool,
                     shards_out: dict, joined: int | None = None) -> tuple[float, str, bool]:
    """(largest difference, where, all within tolerance) between the region run on `mesh` and on one rank:
    the outputs, then (when they agree) the gradients of the inputs for a fixed random cotangent. `shards_out`
    receives input index -> its shards by rank; `joined`: a dim to join the outputs along first (the note on
    pieces settled as a whole)."""
    layout = _Layout(mesh)
    inputs = [i for i, a in enumerate(leaves) if isinstance(a, DTensor)]
    sharded = [leaves[i] for i in inputs] + [d for _, d in closed]
    with compat.outside_simulation():
        shards = [layout.per_rank(compat.local_tensor_of(d)) for d in sharded]
        globals_ = [layout.assemble(s, d.placements)[0] for s, d in zip(shards, sharded)]
        copies = [{r: t.detach().clone() for r, t in s.items()} for s in shards]
        shards_out.update(zip(inputs, shards))
    many = _join(_run(fn, leaves, treespec, kwargs, inputs, closed, mesh,
                      [compat.simulated_value(c) for c in copies]), joined)
    with compat.outside_simulation():
        with one_rank_world(fn, mesh) as one_mesh:
            one = _join(_run(fn, _plain_leaves(leaves, inputs, globals_), treespec, kwargs, inputs, closed,
                             one_mesh, [g.detach().clone() for g in globals_]), joined)
        out_specs = resolve_output_specs(out_placements, one[0], len(pytree.tree_leaves(one[0])))
        diffs = _compare_outputs(layout, many[0], one[0], out_specs, low_precision)
    if all(d[2] for d in diffs):
        diffs += _compare_grads(layout, many, one, out_specs, _grad_specs(leaves, inputs, closed, grad_placements),
                                _input_names(leaves, treespec, inputs, closed), low_precision)
    largest = max(diffs, key=lambda d: d[1], default=("", 0.0, True))
    return largest[1], largest[0], all(d[2] for d in diffs)


def _compare_grads(layout: _Layout, many: tuple, one: tuple, out_specs: Sequence[Any], specs: list,
                   names: list[str], low_precision: bool) -> list[tuple[str, float, bool]]:
    """The inputs' gradients of both runs for one random cotangent per differentiable output (cut into each
    rank's piece by the output's placements), compared by the inputs' gradient placements."""
    with compat.outside_simulation():
        gen = torch.Generator().manual_seed(_COTANGENT_SEED)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in _differentiable(one[0])]
        wanted = _grads(one, cotangents)
        pieces = [layout.pieces(g, s) for g, s in zip(cotangents, _differentiable_specs(many[0], out_specs))]
    got = _grads(many, [compat.simulated_value(p) for p in pieces])
    with compat.outside_simulation():
        return [(f"the gradient of {name}", *_difference(layout, g, w, spec, low_precision))
                for name, g, w, spec in zip(names, got, wanted, specs)]


def _grad_specs(leaves: Sequence[Any], inputs: list[int], closed: list, grad_placements: Sequence[Any]) -> list:
    return [grad_placements[i] or grad_default(tuple(leaves[i].placements)) for i in inputs] + [
        grad_default(tuple(d.placements)) for _, d in closed]


def _input_names(leaves: Sequence[Any], treespec: Any, inputs: list[int], closed: list) -> list[str]:
    tree = pytree.tree_unflatten(list(leaves), treespec)
    return [leaf_path("args", tree, i) for i in inputs] + [f"closed-over {n}" for n, _ in closed]


ONE_RANK_MESH_LIMIT = 16  # one-rank meshes remembered (by the region mesh they stand for; cleared when full)
_one_rank_meshes: dict[int, tuple[DeviceMesh, DeviceMesh]] = register_cache(
    "one_rank_meshes", {}, limit=ONE_RANK_MESH_LIMIT, eviction="clear when full")


def _one_rank_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A mesh of the same dim names and one rank (this process's rank 0 of the simulated world), made once per
    region mesh: its process groups have one member, so every collective on it is the identity."""
    hit = _one_rank_meshes.get(id(mesh))
    if hit is not None and hit[0] is mesh:
        return hit[1]
    if compat.simulation_active() or not dist.is_initialized():
        one = DeviceMesh(mesh.device_type, torch.zeros((1,) * mesh.ndim, dtype=torch.int),
                         mesh_dim_names=mesh.mesh_dim_names)
    else:  # real ranks: this rank alone, over its own one-member group (made beforehand, collectively)
        group = _own_group()
        names = mesh.mesh_dim_names or tuple(f"dim{m}" for m in range(mesh.ndim))
        one = DeviceMesh.from_group(group if mesh.ndim == 1 else [group] * mesh.ndim, mesh.device_type,
                                    mesh=torch.full((1,) * mesh.ndim, dist.get_rank(), dtype=torch.int),
                                    mesh_dim_names=names)
    if len(_one_rank_meshes) >= ONE_RANK_MESH_LIMIT:
        _one_rank_meshes.clear()
    _one_rank_meshes[id(mesh)] = (mesh, one)
    return one


@contextlib.contextmanager
def one_rank_world(fn: Callable, mesh: DeviceMesh) -> Iterator[DeviceMesh]:
    """Where a region's body means what it means globally (its one-rank run): the one-rank mesh standing for
    `mesh` (every collective on it the identity, axis_index 0), with the meshes `fn` reads from module state
    rebound to one-rank meshes alike. The test's one-rank run and verify's one-device reference both run here."""
    one = _one_rank_mesh(mesh)
    with _meshes_of_one_rank(fn):
        yield one


@contextlib.contextmanager
def _meshes_of_one_rank(fn: Callable) -> Iterator[None]:
    """The device meshes the body reads from module state (torchtitan's token dispatcher holds the ep mesh and
    sends rows over it) rebound to one-rank meshes of the same dim names while the one-rank run runs: on one
    rank every mesh has one rank, so their collectives too are the identity."""
    real = not compat.simulation_active() and dist.is_initialized()
    stack = contextlib.ExitStack()
    found = [(owner, key, held) for name, obj, _ in reachable(fn)
             for _, owner, key, held in _module_attributes(name, obj, into_objects=True)
             if isinstance(held, DeviceMesh) or (real and isinstance(held, dist.ProcessGroup))]
    rebound = []
    try:
        stack.enter_context(_rank_queries_watched())
        for owner, key, held in found:  # (a frozen owner refuses: the one-rank run fails, left unproven)
            # a process group held as state (torchtitan's vocab-parallel embedding keeps its tp group and asks
            # it for rank and size): on real ranks, this rank's own one-member group
            setattr(owner, key, _one_rank_mesh(held) if isinstance(held, DeviceMesh) else _own_group())
            rebound.append((owner, key, held))
        yield
    finally:
        for owner, key, held in rebound:
            setattr(owner, key, held)
        stack.close()


# NOTE [rank queries in the one-rank run]: a body that asks a process group for its rank or size
# (`dist.get_rank(dist.group.WORLD) * chunk`) gets the real world's answer in its one-rank run unless that group
# is one the run rebinds (module state): that run is then another program, so a difference it shows is a
# dependence (unproven), never a refutation. Every rank records the same question, so all ranks decide alike.
_rank_queries = threading.local()


@contextlib.contextmanager
def _rank_queries_watched() -> Iterator[None]:
    """While the one-rank run runs, record each `dist.get_rank` / `dist.get_world_size` call the body's own code
    makes over a group of more than one rank (in `_rank_queries.seen`, which settle_by_test reads)."""
    real_rank, real_size = dist.get_rank, dist.get_world_size

    def watch(query: Callable) -> Callable:
        def asked(group: Any = None, *args: Any, **kwargs: Any) -> Any:
            seen = getattr(_rank_queries, "seen", None)
            caller = inspect.currentframe().f_back.f_globals.get("__name__", "")  # the body's code, not torch's or ours
            if seen is not None and not caller.startswith(("torch.", "localmap.")) and real_size(group) > 1:
                seen.append(f"the body asks a process group of {real_size(group)} ranks for its "
                                          f"{'rank' if query is real_rank else 'size'} (dist.{query.__name__})")
            return query(group, *args, **kwargs)
        return asked

    dist.get_rank, dist.get_world_size = watch(real_rank), watch(real_size)
    try:
        yield
    finally:
        dist.get_rank, dist.get_world_size = real_rank, real_size


def _run(fn: Callable, leaves: Sequence[Any], treespec: Any, kwargs: dict, inputs: list[int], closed: list,
         mesh: DeviceMesh, values: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
    """The body on `mesh` with `values` for its DTensor inputs then its closed-over DTensors (floating ones
    made leaves that require grad); returns (output, those leaves)."""
    values = [v.requires_grad_() if v.is_floating_point() else v for v in values]
    args = list(leaves)
    for i, v in zip(inputs, values):
        args[i] = v
    table = {id(d): (v, []) for (_, d), v in zip(closed, values[len(inputs):])}
    with torch.enable_grad(), in_region(mesh), compat.to_local_substituted(table):
        out = fn(*pytree.tree_unflatten(args, treespec), **kwargs)
    return out, values


def _join(run: tuple[Any, list[torch.Tensor]], dim: int | None) -> tuple[Any, list[torch.Tensor]]:
    """A run with its output leaves concatenated along `dim` (None: as it is)."""
    if dim is None:
        return run
    return torch.cat(pytree.tree_leaves(run[0]), dim=dim), run[1]


def _plain_leaves(leaves: Sequence[Any], inputs: list[int], globals_: list[torch.Tensor]) -> list[Any]:
    """The call's leaves for the one-rank run: global values for DTensors, rank 0's value of a simulated one."""
    plain = [compat.value_on_rank(a, 0) if isinstance(a, torch.Tensor) else a for a in leaves]
    for i, g in zip(inputs, globals_):
        plain[i] = g
    return plain


def _differentiable(out: Any) -> list[torch.Tensor]:
    return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]


def _differentiable_specs(out: Any, specs: Sequence[Any]) -> list[Any]:
    return [s for o, s in zip(pytree.tree_leaves(out), specs) if isinstance(o, torch.Tensor) and o.requires_grad]


def _grads(run: tuple[Any, list[torch.Tensor]], cotangents: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradients of a run's inputs for these cotangents of its differentiable outputs (None: no path)."""
    out, values = run
    outputs = _differentiable(out)
    wanting = [k for k, v in enumerate(values) if v.requires_grad]
    grads: list[Any] = [None] * len(values)
    if outputs and wanting:
        found = torch.autograd.grad(outputs, [values[k] for k in wanting], cotangents, allow_unused=True)
        for k, g in zip(wanting, found):
            grads[k] = g
    return grads


def _compare_outputs(layout: _Layout, many: Any, one: Any, specs: Sequence[Any],
                     low_precision: bool) -> list[tuple[str, float, bool]]:
    many_leaves, one_leaves = pytree.tree_leaves(many), pytree.tree_leaves(one)
    if len(many_leaves) != len(one_leaves):
        return [("the outputs' structure", math.inf, False)]
    diffs = []
    for k, (m, o, spec) in enumerate(zip(many_leaves, one_leaves, specs)):
        if isinstance(o, torch.Tensor) and spec is not None:
            diff, same, shapes = _measured(layout, m, o, spec, low_precision)
            diffs.append((f"{leaf_path('outputs', one, k)} claimed {spec}" + (f" ({shapes})" if shapes else ""),
                          diff, same))
    return diffs


# NOTE: another shape on one rank. An output whose pieces have another size than the one-rank run's output along
# a dim its claim keeps whole comes from a body whose shapes follow the mesh's size (an all_reduce of per-rank
# values one shard long, which the proof cannot type: each rank's piece is one shard long, the one-rank run's
# output the whole dim; of a shard itself the proof states it, check.coordinates): its one-rank run is another program,
# so the difference is a dependence (unproven), never a refutation. A claim that shards a dim the body keeps at
# its one-rank size (a partial sum claimed Shard) is only a wrong claim: refuted as any difference.
_OTHER_SHAPE = "shapes that follow the mesh's size"


def _shapes_follow_the_mesh(pieces: dict[int, torch.Tensor], one: torch.Tensor, spec: Any) -> str:
    """Why the ranks' pieces and the one-rank value differ in size along a dim the claim `spec` does not shard
    (see the note above), or ""."""
    cut = {compat.sharded_dim(p) for p in spec}
    for piece in pieces.values():
        if piece.ndim != one.ndim:
            return f"{_OTHER_SHAPE}: pieces of {piece.ndim} dims, {one.ndim} on one rank"
        kept = [d for d in range(one.ndim) if d not in cut and piece.shape[d] != one.shape[d]]
        if kept:
            return (f"{_OTHER_SHAPE}: dim {kept[0]} is {piece.shape[kept[0]]} long on a rank, "
                    f"{one.shape[kept[0]]} on one rank")
    return ""


def _difference(layout: _Layout, many: Any, one: Any, spec: Any, low_precision: bool) -> tuple[float, bool]:
    return _measured(layout, many, one, spec, low_precision)[:2]


def _measured(layout: _Layout, many: Any, one: Any, spec: Any, low_precision: bool) -> tuple[float, bool, str]:
    """(largest absolute difference, within tolerance, "" or why the shapes differ) between per-rank values put
    together by `spec` and the one-rank value; None on both sides (no gradient) is no difference, None on one
    side is zeros. The tolerance is relative to the largest value on either side (a Partial's pieces may be
    larger than their sum), and a half-precision one where the body computes in half precision anywhere (a bf16
    grouped matmul)."""
    if many is None and one is None:
        return 0.0, True, ""
    pieces = layout.per_rank(many) if isinstance(many, (torch.Tensor, _Gathered)) else {}
    if not isinstance(many, (torch.Tensor, _Gathered)):
        got, disagree = (torch.zeros_like(one) if many is None else torch.as_tensor(many)), 0.0
    else:
        got, disagree = layout.assemble(pieces, spec)
    one = torch.zeros_like(got) if one is None else one.to(got.device)
    if got.shape != one.shape:
        return math.inf, False, _shapes_follow_the_mesh(pieces, one, spec)
    if not got.numel():
        return disagree, disagree == 0, ""
    diff = max((got.double() - one.double()).abs().max().item(), disagree)
    scale = max([one.double().abs().max().item()] + [p.double().abs().max().item() for p in pieces.values()
                                                     if p.numel()])
    half = low_precision or one.dtype in (torch.float16, torch.bfloat16)
    atol, rtol = (1e-3, 2e-2) if half else (1e-5, 1e-4)
    return diff, diff <= atol + rtol * scale, ""


class _Layout:
    """The mesh's ranks by coordinate, to put per-rank values together by placements and to cut a global value
    into each rank's piece."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.shape = tuple(mesh.shape)
        with compat.outside_simulation():
            ranks = compat.mesh_ranks(mesh)
        coords = itertools.product(*(range(n) for n in self.shape))
        self.coords = dict(zip(ranks, coords))

    def per_rank(self, t: Any) -> dict[int, torch.Tensor]:
        if isinstance(t, _Gathered):
            return t.by_rank
        if compat.is_simulated(t):
            return dict(compat.simulated_local(t))
        return {r: t for r in self.coords}

    def assemble(self, values: dict[int, torch.Tensor], placements: Sequence[Any]) -> tuple[torch.Tensor, float]:
        """The global value of per-rank `values` held with `placements`, and how far ranks that should hold
        the same value (Replicate) differ (inf for other shapes)."""
        level = {self.coords[r]: t for r, t in values.items()}
        disagree = 0.0
        for m in reversed(range(len(self.shape))):
            grouped: dict[tuple, list] = {}
            for c, t in level.items():
                grouped.setdefault(c[:m], [None] * self.shape[m])[c[m]] = t
            level = {}
            for prefix, parts in grouped.items():
                level[prefix], apart = _combine(parts, placements[m])
                disagree = max(disagree, apart)
        return level[()], disagree

    def pieces(self, t: torch.Tensor, placements: Sequence[Any]) -> dict[int, torch.Tensor]:
        """rank -> its piece of global `t` held with `placements` (a Partial's gradient is Replicate)."""
        out = {}
        for rank, coord in self.coords.items():
            piece = t
            for m, p in enumerate(placements):
                if isinstance(p, Shard):
                    chunks = torch.chunk(piece, self.shape[m], dim=p.dim)
                    piece = chunks[coord[m]] if coord[m] < len(chunks) else piece.narrow(p.dim, 0, 0)
            out[rank] = piece.contiguous()
        return out


def _combine(parts: list[torch.Tensor], p: Any) -> tuple[torch.Tensor, float]:
    if isinstance(p, Shard):
        return torch.cat(parts, dim=p.dim), 0.0
    if isinstance(p, Partial):
        stacked = torch.stack(parts)
        op = p.reduce_op
        return (stacked.sum(0) if op == "sum" else stacked.mean(0) if op == "avg" else
                stacked.amax(0) if op == "max" else stacked.amin(0)), 0.0
    first = parts[0]
    if any(q.shape != first.shape for q in parts):
        return first, math.inf
    apart = max(((q.double() - first.double()).abs().max().item() for q in parts[1:] if q.numel()), default=0.0)
    return first, apart


# ---- the two runs under a real process group: every rank of the world takes part ----------------------------

def _why_not_on_ranks(mesh: DeviceMesh) -> str | None:
    if not dist.is_initialized() or dist.get_backend() == "fake":
        return ("it runs on a simulated mesh (LocalTensorMode) or on real ranks, not over a process group that "
                "does not communicate (fake): call the region once on localmap.testing.simulated_mesh")
    if mesh.size() != dist.get_world_size():
        return (f"its mesh holds {mesh.size()} of the world's {dist.get_world_size()} ranks: under a real process "
                "group the test gathers over every rank, so it runs on meshes of the whole world only")
    return None


class _RankFailed(RuntimeError):
    """A step of the test failed on some rank: raised on every rank, after the same collectives."""


class _Gathered:
    """One value of the region's real run, as every rank held it (rank -> plain tensor, on the CPU)."""

    def __init__(self, by_rank: dict[int, torch.Tensor]) -> None:
        self.by_rank = by_rank


def _on_every_rank(step: Callable[[], Any]) -> list[Any]:
    """`step` run here and its results from every rank (by rank). Every rank reaches the one gather whether
    its step failed or not, and a failure anywhere raises everywhere, so no rank waits for another."""
    try:
        mine: tuple[str | None, Any] = (None, step())
    except Exception as e:  # reported to every rank below
        mine = (f"{type(e).__name__}: {e}"[:200], None)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [f"rank {r}: {err}" for r, (err, _) in enumerate(everyone) if err is not None]
    if failed:
        raise _RankFailed("; ".join(failed))
    return [value for _, value in everyone]


def _by_rank(per_rank: list[list[Any]], fill: list[torch.Tensor] | None = None) -> list[Any]:
    """Lists of values by rank turned into one _Gathered per position (None where no rank has a tensor;
    a rank's missing tensor is zeros shaped like `fill`'s piece of that rank)."""
    out = []
    for k, values in enumerate(zip(*per_rank)):
        if not any(isinstance(v, torch.Tensor) for v in values):
            out.append(values[0])
            continue
        out.append(_Gathered({r: v if isinstance(v, torch.Tensor) else torch.zeros_like(fill[k].by_rank[r])
                              for r, v in enumerate(values)}))
    return out


def _on_cpu(values: Sequence[Any]) -> list[Any]:
    return [v.detach().cpu() if isinstance(v, torch.Tensor) else v for v in values]


def _agreed(per_rank: list[list[tuple[str, float, bool]]]) -> list[tuple[str, float, bool]]:
    """Every rank's differences (the one-rank run ran on each): the verdict takes the largest, on all."""
    return [d for diffs in per_rank for d in diffs]


def _run_and_compare_on_ranks(fn: Callable, leaves: Sequence[Any], treespec: Any, kwargs: dict,
                              out_placements: Any, grad_placements: Sequence[Any], closed: list, mesh: DeviceMesh,
                              low_precision: bool, shards_out: dict, joined: int | None = None
                              ) -> tuple[float, str, bool]:
    """_run_and_compare with the region run by the real ranks, all of which call it together: the inputs'
    shards, the outputs and the gradients are gathered to every rank, the one-rank run runs on each rank over
    the global values (on its own one-member group), and each step's outcome is shared by all."""
    _own_group()  # collective: made before any step may fail on one rank
    layout = _Layout(mesh)
    inputs = [i for i, a in enumerate(leaves) if isinstance(a, DTensor)]
    sharded = [leaves[i] for i in inputs] + [d for _, d in closed]
    mine = [compat.local_tensor_of(d) for d in sharded]
    shards = _by_rank(_on_every_rank(lambda: _on_cpu(mine)))
    shards_out.update((i, s.by_rank) for i, s in zip(inputs, shards))
    globals_ = [layout.assemble(s.by_rank, d.placements)[0].to(t.device) for s, d, t in zip(shards, sharded, mine)]
    runs: dict[str, Any] = {}

    def real_run() -> list[Any]:
        runs["many"] = _join(_run(fn, leaves, treespec, kwargs, inputs, closed, mesh,
                                  [t.detach().clone() for t in mine]), joined)
        return _on_cpu(pytree.tree_leaves(runs["many"][0]))

    gathered = _by_rank(_on_every_rank(real_run))
    many_out = pytree.tree_unflatten(gathered, pytree.tree_flatten(runs["many"][0])[1])

    def one_rank_run() -> list[tuple[str, float, bool]]:
        with _meshes_of_one_rank(fn):
            runs["one"] = _join(_run(fn, _plain_leaves(leaves, inputs, globals_), treespec, kwargs, inputs, closed,
                                     _one_rank_mesh(mesh), [g.detach().clone() for g in globals_]), joined)
        runs["specs"] = resolve_output_specs(out_placements, runs["one"][0], len(pytree.tree_leaves(runs["one"][0])))
        return _compare_outputs(layout, many_out, runs["one"][0], runs["specs"], low_precision)

    diffs = _agreed(_on_every_rank(one_rank_run))
    if all(d[2] for d in diffs):
        diffs += _compare_grads_on_ranks(layout, runs, shards, _grad_specs(leaves, inputs, closed, grad_placements),
                                         _input_names(leaves, treespec, inputs, closed), low_precision)
    largest = max(diffs, key=lambda d: d[1], default=("", 0.0, True))
    return largest[1], largest[0], all(d[2] for d in diffs)


def _compare_grads_on_ranks(layout: _Layout, runs: dict, shards: list[_Gathered], specs: list, names: list[str],
                            low_precision: bool) -> list[tuple[str, float, bool]]:
    """_compare_grads on real ranks: the real backward on every rank first (its collectives), for this rank's
    piece of the same seeded cotangents, then the one-rank backward here; gradients gathered and compared."""
    many, one = runs["many"], runs["one"]

    def backward() -> list[Any]:
        gen = torch.Generator().manual_seed(_COTANGENT_SEED)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in _differentiable(one[0])]
        outputs = _differentiable(many[0])
        pieces = [layout.pieces(c, s)[dist.get_rank()].to(o.device) for c, s, o in
                  zip(cotangents, _differentiable_specs(many[0], runs["specs"]), outputs)]
        got = _on_cpu(_grads(many, pieces))
        runs["wanted"] = _grads(one, [c.to(o.device) for c, o in zip(cotangents, _differentiable(one[0]))])
        return got

    got = _by_rank(_on_every_rank(backward), fill=shards)

    def compare() -> list[tuple[str, float, bool]]:
        return [(f"the gradient of {name}", *_difference(layout, g, w, spec, low_precision))
                for name, g, w, spec in zip(names, got, runs["wanted"], specs)]

    return _agreed(_on_every_rank(compare))


OWN_GROUP_LIMIT = 4  # default process groups whose one-member groups are remembered (one per init_process_group)
_own_groups: dict[int, tuple[Any, Any]] = register_cache(  # the default group's id -> (it, this rank's own group)
    "own_groups", {}, limit=OWN_GROUP_LIMIT, eviction="clear when full")


def _own_group() -> Any:
    """This rank's one-member process group, made once per default group by every rank together."""
    world = dist.group.WORLD
    hit = _own_groups.get(id(world))
    if hit is None or hit[0] is not world:
        if len(_own_groups) >= OWN_GROUP_LIMIT:
            _own_groups.clear()
        hit = _own_groups[id(world)] = (world, dist.new_subgroups(group_size=1)[0])
    return hit[1]


# ---- a one-rank run that may mean another program ----------------------------------------------------------

def _mesh_dependence(fn: Callable, leaves: Sequence[Any], treespec: Any, mesh: DeviceMesh,
                     shards: dict[int, dict[int, torch.Tensor]]) -> list[str]:
    """Why the body may read the mesh's size from data or module state (its one-rank run another program);
    `shards`: input index -> its shards by rank."""
    found = []
    tree = pytree.tree_unflatten(list(leaves), treespec)
    with compat.outside_simulation():
        for i, a in enumerate(leaves):
            if isinstance(a, DTensor) and not a.is_floating_point() and _one_value_per_rank(shards.get(i, {})):
                found.append(f"{leaf_path('args', tree, i)} holds one value per rank (rank ids or offsets as data)")
    sizes = {mesh.size(m) for m in range(mesh.ndim) if mesh.size(m) > 1}
    for name, obj, _ in reachable(fn):
        for where, value in _module_state(name, obj):
            if isinstance(value, (DeviceMesh, dist.ProcessGroup)):
                found.append(f"{where} is a device mesh or process group the body closes over (its size, its "
                             "ranks, its collectives)")
            elif value in sizes:
                found.append(f"{where} = {value} is a mesh dim's size (module state that may count ranks)")
    return found


def _one_value_per_rank(values: dict[int, torch.Tensor]) -> bool:
    held = []
    for t in values.values():
        if t.numel() == 0 or bool((t != t.reshape(-1)[0]).any()):
            return False
        held.append(int(t.reshape(-1)[0]))
    return len(set(held)) > 1


def _module_state(name: str, obj: Any) -> list[tuple[str, Any]]:
    """Python integers and device meshes a body can read: the object itself, a module's attributes (and its
    submodules')."""
    def kept(v: Any) -> bool:
        return isinstance(v, (DeviceMesh, dist.ProcessGroup)) or (isinstance(v, int) and not isinstance(v, bool))

    if kept(obj):
        return [(name, obj)]
    return [(where, v) for where, _, _, v in _module_attributes(name, obj) if kept(v)]


def _module_attributes(name: str, obj: Any, into_objects: bool = False) -> Iterator[tuple[str, Any, str, Any]]:
    """(path, owner, attribute, value) for the public attributes of a module the body reaches and of its
    submodules; with `into_objects`, of the plain objects they hold too (a helper such as a token dispatcher)."""
    if not isinstance(obj, torch.nn.Module):
        return
    for prefix, module in itertools.islice(obj.named_modules(prefix=name), 64):
        for k, v in list(vars(module).items()):
            if k.startswith("_"):
                continue
            yield f"{prefix}.{k}", module, k, v
            if into_objects and plain_object(v):
                yield from ((f"{prefix}.{k}.{k2}", v, k2, v2) for k2, v2 in list(vars(v).items())
                            if not k2.startswith("_"))


_POSITION_OPS = {torch.ops.aten.select.int: "select", torch.ops.aten.unbind.int: "unbind",
                 torch.ops.aten.squeeze.dim: "squeeze", torch.ops.aten.narrow.default: "narrow",
                 torch.ops.aten.slice.Tensor: "slice", torch.ops.aten.split.Tensor: "split",
                 torch.ops.aten.split_with_sizes.default: "split_with_sizes"}
# Cuts whose sizes are read from the shard: each rank's pieces re-partition the dim (ChunkedLossWrapper's chunks
# of a sequence shard), a program whose one-rank run cuts the whole dim instead. Their dim is the third argument.
_CUT_OPS = {torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default}
_SAME_DIMS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.clone.default,
              torch.ops.aten._to_copy.default}


def shard_position_reads(gm: fx.GraphModule, in_types: Sequence[Any], in_paths: Sequence[str]) -> list[str]:
    """Where the traced body takes a fixed position of an input's sharded dim (``w[0]``, ``x.unbind(0)``,
    ``w.squeeze(0)``, a slice with fixed bounds) or cuts that dim into pieces (split): the body treats its shard
    as a unit ("this rank's expert", "this rank's chunks"), which a one-rank run over the global tensor reads
    as another program."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = []
    for node, types, path in zip(placeholders, in_types, in_paths):
        sharded = {p.dim for p in types or () if isinstance(p, Shard)}
        if not sharded:
            continue
        frontier = [node]
        while frontier:
            current = frontier.pop()
            for user in current.users:
                if user.target in _SAME_DIMS:
                    frontier.append(user)
                elif user.target in _POSITION_OPS and _takes_position(user, current, sharded):
                    found.append(f"{path} is read at a fixed position of its sharded dim "
                                 f"({_POSITION_OPS[user.target]}): a shard taken as a unit")
    return found


def rank_routing_reads(gm: fx.GraphModule) -> list[str]:
    """Where the traced body moves data between ranks by their coordinates (all_to_all_single: localmap's
    all_to_all, ppermute, shift and axis_index are made of it): on one rank it is the identity, so the one-rank
    run is another program unless the body undoes the routing, which the test cannot tell from a difference."""
    routed = [n for n in gm.graph.nodes if n.op == "call_function"
              and n.target is compat.FUNCTIONAL_OPS.all_to_all_single.default]
    if not routed:
        return []
    return [f"the body routes data between ranks by their coordinates ({len(routed)} all_to_all_single: "
            "all_to_all, ppermute, shift or axis_index), the identity on one rank"]


def _takes_position(node: fx.Node, source: fx.Node, sharded: set[int]) -> bool:
    ndim = source.meta["val"].ndim if "val" in source.meta else None
    if ndim is None or node.args[0] is not source:
        return False
    at = 2 if node.target in _CUT_OPS else 1
    dim = node.args[at] if len(node.args) > at else node.kwargs.get("dim", 0)
    if not isinstance(dim, int) or dim % max(ndim, 1) not in sharded:
        return False
    if node.target is torch.ops.aten.slice.Tensor:  # a slice of the whole dim is a view, not a position
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else None
        return not (start in (0, None) and (end is None or (isinstance(end, int) and end >= _INT_MAX)
                                            or end == source.meta["val"].shape[dim]))
    return True


# ---- no trace left ------------------------------------------------------------------------------------------

class _State:
    """What a test run may change, saved before it: the tensors the body can reach (restored where written),
    the module globals its code names (rebound), the random generators (restored; a change means the body
    draws random numbers)."""

    def __init__(self, fn: Callable) -> None:
        self.tensors = []
        with compat.outside_simulation():
            for t in _reachable_tensors(fn):
                local = compat.local_tensor_of(t) if isinstance(t, DTensor) else t
                self.tensors.append((t, local, compat.version_counter(local), local.detach().clone(), t.grad))
            self.rng = torch.get_rng_state()
        code_globals = getattr(getattr(fn, "__func__", fn), "__globals__", None)
        self.globals = code_globals
        self.global_values = dict(code_globals) if code_globals is not None else {}

    def restore(self) -> bool:
        """Put everything back; whether the random generator was drawn from."""
        with compat.outside_simulation(), torch.no_grad():
            for t, local, version, saved, grad in self.tensors:
                if compat.version_counter(local) != version:
                    local.copy_(saved)
                if t.grad is not grad:
                    t.grad = grad
            drew = not torch.equal(torch.get_rng_state(), self.rng)
            torch.set_rng_state(self.rng)
        if self.globals is not None:
            for k in [k for k in self.globals if k not in self.global_values]:
                del self.globals[k]
            for k, v in self.global_values.items():
                if self.globals.get(k, _MISSING) is not v:
                    self.globals[k] = v
        return drew


_MISSING = object()


def _reachable_tensors(fn: Callable) -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    for _, obj, _ in reachable(fn):
        if isinstance(obj, torch.Tensor):
            found.setdefault(id(obj), obj)
        elif isinstance(obj, torch.nn.Module):
            for t in itertools.chain(obj.parameters(), obj.buffers()):
                found.setdefault(id(t), t)
        elif isinstance(obj, (list, tuple)):
            for o in obj[:64]:
                if isinstance(o, torch.Tensor):
                    found.setdefault(id(o), o)
    return list(found.values())


# ---- what the record says -----------------------------------------------------------------------------------

def _describe_inputs(leaves: Sequence[Any], treespec: Any) -> str:
    tree = pytree.tree_unflatten(list(leaves), treespec)
    parts = [f"{leaf_path('args', tree, i)} {str(a.dtype).replace('torch.', '')}{list(a.shape)} "
             f"{tuple(a.placements)}" for i, a in enumerate(leaves) if isinstance(a, DTensor)]
    return "the call's own inputs: " + ", ".join(parts)


def _describe_mesh(mesh: DeviceMesh) -> str:
    names = mesh.mesh_dim_names or tuple(f"dim{m}" for m in range(mesh.ndim))
    return f"{mesh.size()} ranks ({', '.join(f'{n}={s}' for n, s in zip(names, mesh.shape))}) against one"
