"""Plans of the eager path: a region's specs resolved once per argument (or output) structure and mesh.

A plan holds one leaf spec per pytree leaf, checked against the mesh when it is made; steady-state calls with
the same structure reuse it and compare placements only (the fast path). The per-leaf checks below run when a
leaf does not match its plan (the slow path) and raise the errors that name the argument.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from localmap.check.verdict import Verdict
from localmap.check.function import check_function
from localmap.compat import (DTensorSpec, global_shape_and_stride, local_tensor_of, make_dtensor, make_spec, pytree,
                             spec_of)
from localmap.eager.autograd import from_local_shards, output_grad_rules
from localmap.eager.uneven import gather_global_shapes, plain_stride, uneven_mesh_dims
from localmap.errors import fail
from localmap.placements.algebra import grad_default, has_extreme
from localmap.placements.shapes import dense_stride
from localmap.placements.specs import (
    LeafSpec, check_non_tensor_leaf, check_output_leaf, fit_spec_to_mesh, leaf_path, normalize_shard_dims,
    placements_str, resolve_input_specs, resolve_output_specs,
)

OUTPUT_SPEC_CACHE_LIMIT = 256  # output DTensorSpecs remembered per output plan, by (index, shape, stride, dtype)


class InputPlan:
    """Resolved leaf specs for one argument structure on one mesh."""

    __slots__ = ("mesh", "specs", "grad_specs", "fast_grad_specs", "verdict", "even_specs")

    def __init__(self, mesh: DeviceMesh, specs: tuple[LeafSpec, ...] | None,
                 grad_specs: tuple[LeafSpec, ...] | None) -> None:
        self.mesh = mesh
        self.specs = specs  # in_placements per leaf (None: take each DTensor's own)
        self.grad_specs = grad_specs  # in_grad_placements per leaf (None: inferred or the default)
        self.verdict: tuple | None = None  # (DTensor specs, Verdict) of the last checked call on this plan
        self.even_specs: tuple = ()  # the DTensor specs (objects) of the last call whose inputs were all even
        # Grad specs usable without per-call checks; None where a negative Shard dim needs the tensor's ndim.
        self.fast_grad_specs = None if grad_specs is None else tuple(
            None if s is None or any(isinstance(p, Shard) and p.dim < 0 for p in s) else s
            for s in grad_specs)


class HotCall:
    """NOTE: the steady-state fast path (``RegionCallable._call_hot``). What a call on positional DTensor
    arguments only (no pytree, no keyword arguments) derived from its inputs' specs: their mesh, plan checks,
    verdict and gradient placements. A later call whose arguments are DTensors with the same spec objects derives
    all of it again, so it skips to the local tensors. Safe because a DTensorSpec is immutable and shared (the
    same object: the same mesh, placements, global shape, stride and dtype, which is all the skipped steps read);
    the verdict's other key, the state the body reads, is compared on every call; what varies per call (grad mode,
    requires_grad, the local tensors, the outputs) is read per call. Made only where nothing was redistributed,
    no input is uneven and the verdict holds beyond this call's values (not per_call)."""

    __slots__ = ("specs", "mesh", "verdict", "state", "grad_placements", "settled", "guess_check", "out")

    def __init__(self, specs: tuple[DTensorSpec, ...], mesh: DeviceMesh, verdict: Verdict | None, state: Any,
                 grad_placements: tuple[tuple[Placement, ...], ...], guess_check: bool) -> None:
        self.specs = specs
        self.mesh = mesh
        self.verdict = verdict  # None: unchecked (check=False)
        self.state = state  # the body state's key the verdict was found for
        self.grad_placements = grad_placements  # per argument (core.grads.leaf_grad_placements)
        self.settled = verdict is None or verdict.settled  # else enforced on every call, as on the full path
        self.guess_check = guess_check  # whether the call asks refuse_guessed after the body
        # A single plain-tensor output, remembered: (local shape, stride, dtype, (its DTensorSpec,), its gradient
        # rule from the verdict or None), one tuple so that threads sharing the region see one call's facts.
        self.out: tuple | None = None

    def match(self, args: tuple, state: Any) -> bool | None:
        """None unless `args` are DTensors with these spec objects (a subclass takes the full path) and the body
        reads the same state (`state`: the region's BodyState, None for a plain function); else whether every
        argument requires a gradient."""
        specs = self.specs
        if len(args) != len(specs):
            return None
        grad_all = True
        for a, s in zip(args, specs):
            if type(a) is not DTensor or spec_of(a) is not s:
                return None
            if not a.requires_grad:
                grad_all = False
        if self.verdict is not None and (None if state is None else state.key()) != self.state:
            return None
        return grad_all

    def output(self, out: Any) -> DTensor | None:
        """The body's output as a DTensor when it is one plain tensor with the local metadata remembered (so the
        same spec as the output plan's cache holds for it); None otherwise: the full path."""
        known = self.out
        if known is None or type(out) is not torch.Tensor or out.shape != known[0] or out.stride() != known[1] \
                or out.dtype is not known[2]:
            return None
        if out.requires_grad and torch.is_grad_enabled():
            return from_local_shards(known[3], known[4], out)[0]
        return make_dtensor(out, known[3][0], requires_grad=False)

    def remember_output(self, out: Any, result: Any) -> None:
        """After the full path wrapped `out` as `result`: remember a single plain-tensor output's spec (not a
        Partial(max/min) one, whose gradient the full path refuses)."""
        if type(out) is not torch.Tensor or not isinstance(result, DTensor) or has_extreme(result.placements):
            return
        rules = None if self.verdict is None else output_grad_rules(self.verdict, (out,), (0,))
        self.out = (out.shape, out.stride(), out.dtype, (spec_of(result),), rules)


class OutputPlan:
    """Resolved leaf specs for one output structure on one mesh, and a cache of output DTensorSpecs."""

    __slots__ = ("mesh", "specs", "dtensor_specs")

    def __init__(self, mesh: DeviceMesh, specs: tuple[LeafSpec, ...]) -> None:
        self.mesh = mesh
        self.specs = specs
        self.dtensor_specs: dict[Any, DTensorSpec] = {}


def make_input_plan(in_placements: Any, in_grad_placements: Any, mesh: DeviceMesh, args: tuple,
                    flat: Sequence[Any]) -> InputPlan:
    """Resolve and check the input specs for this argument structure (a new structure or mesh)."""
    specs = grad_specs = None
    if in_placements is not None:
        specs = _fitted(resolve_input_specs(in_placements, args, len(flat)), mesh, args, "in_placements")
    if in_grad_placements is not None:
        grad_specs = _fitted(resolve_input_specs(in_grad_placements, args, len(flat), "in_grad_placements"),
                             mesh, args, "in_grad_placements")
    plan = InputPlan(mesh, specs, grad_specs)
    check_grad_ranges(plan, args, flat, mesh)
    return plan


def _fitted(specs: tuple[LeafSpec, ...], mesh: DeviceMesh, args: tuple, name: str) -> tuple[LeafSpec, ...]:
    """Each leaf spec with one placement per mesh dim (trailing mesh dims Replicate)."""
    return tuple(None if s is None else fit_spec_to_mesh(s, mesh, leaf_path("args", args, i), name)
                 for i, s in enumerate(specs))


def check_grad_ranges(plan: InputPlan, args: tuple, flat: Sequence[Any], mesh: DeviceMesh) -> None:
    """in_grad_placements' Shard dims against each DTensor input's ndim (on slow paths only: a new plan, a new
    input metadata; steady-state calls use the plan's specs unchecked)."""
    for i, g in enumerate(plan.fast_grad_specs or ()):
        a = flat[i]
        if g is not None and isinstance(a, DTensor):
            normalize_shard_dims(g, a.ndim, leaf_path("args", args, i), "in_grad_placements", mesh)


def check_non_dtensor_leaves(plan: InputPlan, args: tuple, flat: Sequence[Any]) -> None:
    """Leaves that are not tensors carry no specs (checked for pytree arguments)."""
    for name, specs in (("in_placements", plan.specs), ("in_grad_placements", plan.grad_specs)):
        for i, (a, spec) in enumerate(zip(flat, specs or (None,) * len(flat), strict=True)):
            check_non_tensor_leaf(args, i, a, spec, name)


def check_input_leaf(plan: InputPlan, args: tuple, flat: Sequence[Any], i: int, mesh: DeviceMesh,
                     redistribute: bool) -> tuple[DTensor, tuple[Placement, ...]]:
    """The slow path for one DTensor input: its mesh, its placements against the plan (redistributing when
    asked) and its gradient placements. Returns the DTensor to unwrap and its gradient placements."""
    a = flat[i]
    spec, grad = input_leaf_target(plan, args, flat, i, mesh, redistribute)
    return (a if a.placements == spec else a.redistribute(mesh, spec)), grad


def input_leaf_target(plan: InputPlan, args: tuple, flat: Sequence[Any], i: int, mesh: DeviceMesh,
                      redistribute: bool) -> tuple[tuple[Placement, ...], tuple[Placement, ...]]:
    """Check one DTensor input against the plan: (the placements it is to be brought to, its gradient
    placements). Raises what the eager path and the compiled path both raise."""
    a = flat[i]
    if a.device_mesh is not mesh and a.device_mesh != mesh:
        raise fail(leaf_path("args", args, i), "is a DTensor on a different mesh than the region's",
                   expected=mesh, given=a.device_mesh,
                   fix="redistribute it onto the region's mesh, or pass the matching device_mesh")
    spec = a.placements if plan.specs is None else plan.specs[i]
    if spec is None:
        raise fail(leaf_path("args", args, i), "is a DTensor but its in_placements spec is None (a DTensor input expects placements)",
                   expected="a list of placements", given=None,
                   fix=f"give its placements, e.g. {placements_str(a.placements)}")
    if a.placements != spec:
        path = leaf_path("args", args, i)
        spec = normalize_shard_dims(spec, a.ndim, path, "in_placements", mesh)
        if a.placements != spec and not redistribute:
            dim = next(m for m, (p, q) in enumerate(zip(a.placements, spec, strict=True)) if p != q)
            raise fail(path, "has placements that differ from in_placements (a mismatched placements)", mesh=mesh, mesh_dim=dim,
                       expected=placements_str(spec), given=placements_str(a.placements),
                       fix="set redistribute_inputs=True to local_map, or call .redistribute(...) first")
    if plan.grad_specs is None:
        return tuple(spec), grad_default(spec)
    grad = plan.grad_specs[i]
    if grad is None:
        raise fail(leaf_path("args", args, i), "is a DTensor but its in_grad_placements spec is None (a DTensor input expects in grad placements)",
                   expected="a list of placements", given=None,
                   fix=f"give its gradient placements, e.g. {placements_str(grad_default(spec))}")
    return tuple(spec), normalize_shard_dims(grad, a.ndim, leaf_path("args", args, i), "in_grad_placements", mesh)


def common_mesh(args: tuple, flat: Any, dtensor_idx: Any) -> Any:
    """The mesh of the DTensor inputs, which must all agree when no device_mesh is given."""
    mesh = flat[dtensor_idx[0]].device_mesh
    for i in dtensor_idx[1:]:
        other = flat[i].device_mesh
        if other is not mesh and other != mesh:
            raise fail(leaf_path("args", args, i), "is a DTensor on a different mesh than "
                       f"{leaf_path('args', args, dtensor_idx[0])}", expected=mesh, given=other,
                       fix="redistribute the inputs onto one mesh, or pass device_mesh= explicitly")
    return mesh


def check_kwargs(kwargs: dict) -> None:
    """DTensors are positional only (specs are per positional argument)."""
    for path, leaf in pytree.tree_flatten_with_path(kwargs)[0]:
        if isinstance(leaf, DTensor):
            raise fail("kwargs" + pytree.keystr(path), "is a DTensor passed by keyword",
                       expected="DTensors as positional arguments (specs are per positional argument)",
                       given="DTensor", fix="pass it positionally with a spec in in_placements")


def check_body(func: Any, out_placements: Any, plan: InputPlan, flat: Sequence[Any], treespec: Any,
               checked: list, mesh: DeviceMesh, kwargs: dict) -> Verdict:
    """The placement check of `func` on these inputs' local metadata (`checked`: (leaf index, DTensor to
    unwrap, gradient placements, its DTensorSpec) per DTensor input)."""
    args = tuple(flat) if treespec is None else pytree.tree_unflatten(list(flat), treespec)
    check_grad_ranges(plan, args, flat, mesh)
    leaves = list(flat)
    leaf_specs: list[Any] = [None] * len(leaves)
    for i, a in enumerate(leaves):
        if isinstance(a, torch.Tensor) and not isinstance(a, DTensor):
            leaf_specs[i] = (plan.specs[i] if plan.specs is not None and plan.specs[i] is not None
                             else tuple(Replicate() for _ in range(mesh.ndim)))
    for i, a, _, _ in checked:
        leaves[i], leaf_specs[i] = local_tensor_of(a), tuple(a.placements)
    return check_function(func, leaves, leaf_specs, out_placements, plan.grad_specs, mesh,
                          treespec if treespec is not None else pytree.tree_flatten(tuple(flat))[1],
                          kwargs, uneven_mesh_dims([c[1] for c in checked]))


def make_output_plan(out_placements: Any, out: Any, flat_out: Sequence[Any], mesh: DeviceMesh) -> OutputPlan:
    """Resolve and check the output specs for this output structure (a new structure or mesh)."""
    specs = tuple(None if spec is None else fit_spec_to_mesh(spec, mesh, leaf_path("outputs", out, i), "out_placements")
                  for i, spec in enumerate(resolve_output_specs(out_placements, out, len(flat_out))))
    return OutputPlan(mesh, specs)


def output_dtensor_specs(out: Any, flat_out: Sequence[Any], plan: OutputPlan, mesh: DeviceMesh,
                         uneven: bool) -> list[DTensorSpec | None]:
    """One DTensorSpec per tensor output (None for other leaves), from the cache when shapes repeat; with
    uneven inputs, global shapes gathered from every rank."""
    dspecs: list[Any] = []
    cache = plan.dtensor_specs
    for i, t in enumerate(flat_out):
        key: Any = None
        if not uneven and isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
            try:
                key = (i, t.shape, t.stride(), t.dtype)
                spec = cache.get(key)
                if spec is not None:
                    dspecs.append(spec)
                    continue
            except TypeError:  # symbolic sizes (simulated mesh, uneven shards): not cacheable
                key = None
        placements = check_output_leaf(out, i, t, plan.specs[i], mesh)
        if placements is None or uneven:
            dspecs.append(placements)  # uneven: completed below
            continue
        shape, stride = global_shape_and_stride(t, mesh, placements)
        spec = make_spec(mesh, placements, shape, stride, t.dtype)
        if key is not None and len(cache) < OUTPUT_SPEC_CACHE_LIMIT:
            cache[key] = spec
        dspecs.append(spec)
    return _with_gathered_shapes(out, flat_out, dspecs, mesh) if uneven else dspecs


def _with_gathered_shapes(out: Any, flat_out: Sequence[Any], placements: list, mesh: DeviceMesh) -> list:
    """Output specs of uneven outputs: global shapes from every rank's local sizes."""
    idx = [i for i, p in enumerate(placements) if p is not None]
    tensors = [flat_out[i] for i in idx]
    shapes = gather_global_shapes(tensors, [placements[i] for i in idx], mesh,
                                  [leaf_path("outputs", out, i) for i in idx])
    specs = list(placements)
    for i, t, shape in zip(idx, tensors, shapes, strict=True):
        specs[i] = make_spec(mesh, placements[i], shape, dense_stride(shape, plain_stride(t)), t.dtype)
    return specs
