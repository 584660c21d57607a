"""The eager front end: ``local_map`` on DTensors.

Per call, a region (1) flattens its arguments and matches them with their leaf specs (cached per argument
structure and mesh), (2) checks each DTensor input's mesh and placements, redistributing when asked, (3) takes
the local tensors of all inputs through one autograd node (``_ToLocal``), (4) runs the user's function on
them, and (5) wraps the local outputs as DTensors through one autograd node (``_FromLocal``).

PyTorch's local_map spends one autograd node per input and per output and recomputes every output's global
metadata on each call; here both directions are batched and output specs are cached, which is where the
eager overhead goes. Under ``torch.compile`` the same checks run at trace time and the conversion uses
DTensor's public ``to_local``/``from_local``, which Dynamo understands.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from localmap.compat import DTensorSpec, fast_apply, local_tensor_of, make_dtensor, make_spec, pytree, spec_of
from localmap.compat import global_shape_and_stride, is_simulated, redistribute_local, simulated_local
from localmap.context import in_region, pop_region_mesh, push_region_mesh, recorder
from localmap.errors import LocalMapError, body_error, fail
from localmap.placements.shapes import avg_ranks, dense_stride, gather_global_shapes, is_uneven, shard_dims
from localmap.placements.specs import (
    LeafSpec, check_spec_for_mesh, extreme_grad_error, leaf_path, normalize_shard_dims, placements_str,
    resolve_input_specs, resolve_output_specs, validate_spec_argument,
)


_grad_defaults: dict[tuple[Placement, ...], tuple[Placement, ...]] = {}


def _grad_default(placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """Gradient placements of an input by default: its own, with Partial read as Replicate (as DTensor does)."""
    grad = _grad_defaults.get(placements)
    if grad is None:
        grad = tuple(Replicate() if isinstance(p, Partial) else p for p in placements)
        if len(_grad_defaults) < 1024:
            _grad_defaults[placements] = grad
    return grad


def _plain_stride(t: torch.Tensor) -> tuple[int, ...]:
    """The local stride as plain ints. On the simulated mesh ranks holding different sizes (an empty shard
    next to a full one) report per-rank strides; rank 0's orders the dims as every rank does."""
    if is_simulated(t):
        return simulated_local(t)[0].stride()
    return t.stride()


from localmap.compat import wait_local as _wait


_has_avg: dict[tuple, bool] = {}


def _any_avg(placements: tuple) -> bool:
    hit = _has_avg.get(placements)
    if hit is None:
        hit = _has_avg[placements] = any(isinstance(p, Partial) and p.reduce_op == "avg" for p in placements)
    return hit


_has_minmax: dict[tuple, bool] = {}


def _any_minmax(placements: tuple) -> bool:
    hit = _has_minmax.get(placements)
    if hit is None:
        hit = _has_minmax[placements] = any(
            isinstance(p, Partial) and p.reduce_op in ("max", "min") for p in placements)
    return hit


def _avg_input_grad(g: torch.Tensor, spec: DTensorSpec, grad_placements: Sequence[Placement]) -> torch.Tensor:
    """The gradient of an input held as Partial('avg') is n times its local gradient where it is given as
    Replicate (each local piece carries 1/n of the value)."""
    if not _any_avg(spec.placements):
        return g
    n = 1
    for m, (p, q) in enumerate(zip(spec.placements, grad_placements)):
        if isinstance(p, Partial) and p.reduce_op == "avg" and isinstance(q, Replicate):
            n *= spec.mesh.size(m)
    return g * n if n != 1 else g


class _ToLocal(torch.autograd.Function):
    """DTensor inputs -> their local tensors, in one node. Backward wraps each local gradient as a DTensor
    with the input's global metadata and its gradient placements."""

    @staticmethod
    def forward(ctx: Any, grad_placements: tuple, *dtensors: DTensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        views = []
        saved = []
        for d, placements in zip(dtensors, grad_placements):
            t = _wait(local_tensor_of(d))
            views.append(t.view_as(t))
            saved.append((spec_of(d), placements, t.stride()))
        ctx.saved = saved
        return tuple(views)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:  # type: ignore[override]
        out: list[Any] = [None]
        for g, (spec, placements, local_stride) in zip(grads, ctx.saved):
            if g is None:
                out.append(None)
                continue
            g = _avg_input_grad(g, spec, placements)
            if g.stride() == local_stride:
                if placements == spec.placements:
                    out.append(make_dtensor(g, spec, requires_grad=False))
                    continue
                stride = spec.stride
            else:
                stride = dense_stride(spec.shape, _plain_stride(g))
            grad_spec = make_spec(spec.mesh, placements, spec.shape, stride, spec.tensor_meta.dtype)
            out.append(make_dtensor(g, grad_spec, requires_grad=False))
        return tuple(out)


class _FromLocal(torch.autograd.Function):
    """Local outputs -> DTensors, in one node. Backward brings each DTensor gradient to the placements the
    local output had (Partial read as Replicate) and returns its local tensor."""

    @staticmethod
    def forward(ctx: Any, specs: Sequence[DTensorSpec], *locals_: torch.Tensor) -> tuple[DTensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.specs = specs
        return tuple(make_dtensor(t.view_as(t), s, requires_grad=t.requires_grad) for t, s in zip(locals_, specs))

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:  # type: ignore[override]
        out: list[Any] = [None]
        for g, spec in zip(grads, ctx.specs):
            if not isinstance(g, DTensor):
                out.append(g)
                continue
            target = _grad_default(spec.placements)
            if spec_of(g).placements != target:
                target_spec = DTensorSpec(spec.mesh, target, tensor_meta=spec_of(g).tensor_meta)
                local = _wait(redistribute_local(local_tensor_of(g), spec_of(g), target_spec))
            elif torch.is_grad_enabled():  # create_graph=True: keep the conversion differentiable
                local = g.to_local()
            else:
                local = _wait(local_tensor_of(g))
            out.append(local / avg_ranks(spec.placements, spec.mesh) if _any_avg(spec.placements) else local)
        return tuple(out)


class _InputPlan:
    """Resolved leaf specs for one argument structure on one mesh."""

    __slots__ = ("mesh", "specs", "grad_specs", "fast_grad_specs", "verdict")

    def __init__(self, mesh: DeviceMesh, specs: tuple[LeafSpec, ...] | None,
                 grad_specs: tuple[LeafSpec, ...] | None) -> None:
        self.mesh = mesh
        self.specs = specs
        self.grad_specs = grad_specs
        self.verdict: tuple | None = None  # (DTensor specs, Verdict) of the last checked call on this plan
        # Grad specs usable without per-call checks; None where a negative Shard dim needs the tensor's ndim.
        self.fast_grad_specs = None if grad_specs is None else tuple(
            None if s is None or any(isinstance(p, Shard) and p.dim < 0 for p in s) else s
            for s in grad_specs)


class _OutputPlan:
    """Resolved leaf specs for one output structure on one mesh, and a cache of output DTensorSpecs."""

    __slots__ = ("mesh", "specs", "dtensor_specs")

    def __init__(self, mesh: DeviceMesh, specs: tuple[LeafSpec, ...]) -> None:
        self.mesh = mesh
        self.specs = specs
        self.dtensor_specs: dict[Any, DTensorSpec] = {}


_to_local = fast_apply(_ToLocal)
_from_local = fast_apply(_FromLocal)
_uneven_by_spec: dict[int, tuple[DTensorSpec, bool]] = {}


def _uneven(spec: DTensorSpec) -> bool:
    """is_uneven, remembered per spec object (DTensor specs are shared and immutable)."""
    hit = _uneven_by_spec.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    result = is_uneven(spec.shape, spec.placements, spec.mesh)
    if len(_uneven_by_spec) > 4096:
        _uneven_by_spec.clear()
    _uneven_by_spec[id(spec)] = (spec, result)
    return result


class MappedFunction:
    """One ``local_map``-wrapped function: its specs, options and caches. Called with (args, kwargs)."""

    def __init__(self, func: Callable, out_placements: Any, in_placements: Any, in_grad_placements: Any,
                 device_mesh: DeviceMesh | None, redistribute_inputs: bool, check: bool | str = True) -> None:
        if not callable(func):
            raise fail("func", "is not callable", expected="a function (or module) to run on local shards",
                       given=type(func).__name__, fix="pass the function first: local_map(fn, out_placements, ...)")
        if check not in (True, False, "warn"):
            raise fail("check", "must be True, False or 'warn'", given=repr(check),
                       fix="check=True raises PlacementError, 'warn' warns, False skips the check")
        validate_spec_argument(in_placements, "in_placements")
        validate_spec_argument(in_grad_placements, "in_grad_placements")
        validate_spec_argument(out_placements, "out_placements")
        if device_mesh is not None and not isinstance(device_mesh, DeviceMesh):
            raise fail("device_mesh", "is not a DeviceMesh", given=type(device_mesh).__name__,
                       fix="pass a torch.distributed.device_mesh.DeviceMesh (init_device_mesh)")
        self.func = func
        self.out_placements = out_placements
        self.in_placements = in_placements
        self.in_grad_placements = in_grad_placements
        self.device_mesh = device_mesh
        self.redistribute_inputs = redistribute_inputs
        self.check = check
        self._verdicts: dict[Any, tuple] = {}
        self._input_plans: dict[Any, _InputPlan] = {}
        self._output_plans: dict[Any, _OutputPlan] = {}

    # -- inputs -------------------------------------------------------------------------------------------

    def _plan(self, key: Any, mesh: DeviceMesh, args: tuple, flat: Sequence[Any]) -> _InputPlan:
        plan = self._input_plans.get(key)
        if plan is not None and plan.mesh is mesh:
            return plan
        specs = grad_specs = None
        if self.in_placements is not None:
            specs = resolve_input_specs(self.in_placements, args, len(flat))
        if self.in_grad_placements is not None:
            grad_specs = resolve_input_specs(self.in_grad_placements, args, len(flat), "in_grad_placements")
        for name, resolved in (("in_placements", specs), ("in_grad_placements", grad_specs)):
            for i, s in enumerate(resolved or ()):
                if s is not None:
                    check_spec_for_mesh(s, mesh, leaf_path("args", args, i), name)
        plan = _InputPlan(mesh, specs, grad_specs)
        _check_grad_ranges(plan, args, flat, mesh)
        if len(self._input_plans) < 64:
            self._input_plans[key] = plan
        return plan

    def _check_leaf(self, plan: _InputPlan, args: tuple, flat: Sequence[Any], i: int, mesh: DeviceMesh,
                    ) -> tuple[DTensor, tuple[Placement, ...]]:
        """Check one input leaf; returns the DTensor to unwrap (maybe redistributed) and its grad placements."""
        a = flat[i]
        if a.device_mesh is not mesh and a.device_mesh != mesh:
            raise fail(leaf_path("args", args, i), "is a DTensor on a different mesh than the region's",
                       expected=mesh, given=a.device_mesh,
                       fix="redistribute it onto the region's mesh, or pass the matching device_mesh")
        if plan.specs is None:
            spec = a.placements
        else:
            spec = plan.specs[i]
            if spec is None:
                raise fail(leaf_path("args", args, i), "is a DTensor but its in_placements spec is None",
                           expected="a list of placements", given=None,
                           fix=f"give its placements, e.g. {placements_str(a.placements)}")
            if a.placements != spec:
                path = leaf_path("args", args, i)
                spec = normalize_shard_dims(spec, a.ndim, path, "in_placements", mesh)
                if a.placements != spec:
                    if not self.redistribute_inputs:
                        dim = next(m for m, (p, q) in enumerate(zip(a.placements, spec)) if p != q)
                        raise fail(path, "has placements that differ from in_placements", mesh=mesh,
                                   mesh_dim=dim, expected=placements_str(spec),
                                   given=placements_str(a.placements),
                                   fix="pass redistribute_inputs=True, or call .redistribute(...) first")
                    a = a.redistribute(mesh, spec)
        if plan.grad_specs is None:
            return a, _grad_default(spec)
        grad = plan.grad_specs[i]
        if grad is None:
            raise fail(leaf_path("args", args, i), "is a DTensor but its in_grad_placements spec is None",
                       expected="a list of placements", given=None,
                       fix=f"give its gradient placements, e.g. {placements_str(_grad_default(spec))}")
        return a, normalize_shard_dims(grad, a.ndim, leaf_path("args", args, i), "in_grad_placements", mesh)

    # -- outputs ------------------------------------------------------------------------------------------

    def _out_plan(self, out: Any, flat_out: Sequence[Any], out_key: Any, mesh: DeviceMesh) -> _OutputPlan:
        plan = self._output_plans.get(out_key)
        if plan is not None and plan.mesh is mesh:
            return plan
        specs = resolve_output_specs(self.out_placements, out, len(flat_out))
        for i, spec in enumerate(specs):
            if spec is not None:
                check_spec_for_mesh(spec, mesh, leaf_path("outputs", out, i), "out_placements")
        plan = _OutputPlan(mesh, specs)
        if len(self._output_plans) < 64:
            self._output_plans[out_key] = plan
        return plan

    def _check_output(self, out: Any, i: int, t: Any, spec: LeafSpec, mesh: DeviceMesh) -> LeafSpec:
        """Check one output leaf against its spec; returns the spec with Shard dims normalized."""
        if isinstance(t, torch.Tensor):
            if spec is None:
                raise fail(leaf_path("outputs", out, i), "is a Tensor but its out_placements spec is None",
                           expected="a list of placements", given=None,
                           fix="give its placements, e.g. [Replicate()] or [Shard(0)]")
            return normalize_shard_dims(spec, t.ndim, leaf_path("outputs", out, i), "out_placements", mesh)
        if spec is not None:
            raise fail(leaf_path("outputs", out, i), "is not a Tensor but has a placement spec",
                       expected=None, given=placements_str(spec), fix="use None for non-tensor outputs")
        return None

    def _output_dtensor_specs(self, out: Any, flat_out: Sequence[Any], plan: _OutputPlan, mesh: DeviceMesh,
                              uneven: bool) -> list[DTensorSpec | None]:
        """One DTensorSpec per tensor output (None for other leaves), from the cache when shapes repeat."""
        dspecs: list[DTensorSpec | None] = []
        cache = plan.dtensor_specs
        for i, t in enumerate(flat_out):
            if not isinstance(t, torch.Tensor):
                self._check_output(out, i, t, plan.specs[i], mesh)
                dspecs.append(None)
                continue
            if isinstance(t, DTensor):
                raise fail(leaf_path("outputs", out, i), "the function returned a DTensor",
                           expected="a local torch.Tensor", given="DTensor",
                           fix="return .to_local() of it, or compute on the local inputs only")
            key: Any = None
            if not uneven:
                try:
                    key = (i, t.shape, t.stride(), t.dtype)
                    spec = cache.get(key)
                    if spec is not None:
                        dspecs.append(spec)
                        continue
                except TypeError:  # symbolic sizes (simulated mesh, uneven shards): not cacheable
                    key = None
            placements = self._check_output(out, i, t, plan.specs[i], mesh)
            if uneven:
                dspecs.append(placements)  # type: ignore[arg-type]  # completed below
                continue
            shape, stride = global_shape_and_stride(t, mesh, placements)  # type: ignore[arg-type]
            spec = make_spec(mesh, placements, shape, stride, t.dtype)  # type: ignore[arg-type]
            if key is not None and len(cache) < 256:
                cache[key] = spec
            dspecs.append(spec)
        if uneven:
            idx = [i for i, t in enumerate(flat_out) if isinstance(t, torch.Tensor)]
            tensors = [flat_out[i] for i in idx]
            shapes = gather_global_shapes(tensors, [dspecs[i] for i in idx], mesh,  # type: ignore[misc]
                                          [leaf_path("outputs", out, i) for i in idx])
            for i, t, shape in zip(idx, tensors, shapes):
                dspecs[i] = make_spec(mesh, dspecs[i], shape, dense_stride(shape, _plain_stride(t)), t.dtype)  # type: ignore[arg-type]
        return dspecs

    # -- call ---------------------------------------------------------------------------------------------

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if kwargs:
            _check_kwargs(kwargs)
        if torch.compiler.is_compiling():
            return self._call_compiling(args, kwargs)
        treespec = None
        flat: Sequence[Any] = args
        for a in args:
            if not isinstance(a, torch.Tensor):
                flat, treespec = pytree.tree_flatten(args)
                break
        dtensor_idx = [i for i, a in enumerate(flat) if isinstance(a, DTensor)]
        if not dtensor_idx:
            if _tracing_regions():
                from localmap.traced.frontend import call_traced

                return call_traced(self, args, kwargs)
            references = recorder("reference")
            if references is not None:
                from localmap.traced.frontend import call_reference

                return call_reference(self, args, kwargs, references)
            if self.in_placements is not None:  # still catch a wrong spec count
                resolve_input_specs(self.in_placements, args, len(flat))
            return self.func(*args, **kwargs)
        mesh = self.device_mesh
        if mesh is None:
            mesh = _common_mesh(args, flat, dtensor_idx)
        plan = self._plan(len(args) if treespec is None else treespec, mesh, args, flat)
        if treespec is not None and plan.specs is not None:
            self._check_non_dtensor_leaves(plan, args, flat)

        locals_ = list(flat)
        uneven = False
        track_grad = torch.is_grad_enabled()
        specs, grad_specs = plan.specs, plan.fast_grad_specs
        checked: list[tuple[int, DTensor, tuple[Placement, ...]]] = []
        for i in dtensor_idx:
            a = flat[i]
            spec = spec_of(a)
            # Fast path: same mesh object and placements as given; anything else gets the full check.
            if spec.mesh is mesh and specs is not None and spec.placements == specs[i]:
                gp = _grad_default(spec.placements) if grad_specs is None else grad_specs[i]
                if gp is None:
                    a, gp = self._check_leaf(plan, args, flat, i, mesh)
            else:
                a, gp = self._check_leaf(plan, args, flat, i, mesh)
            if not uneven:
                uneven = _uneven(spec_of(a))
            checked.append((i, a, gp))
        # in_grad_placements=None: the gradient placements the body implies (from the cached check)
        inferred = self._verdict(plan, flat, treespec, checked, mesh, kwargs) if self.check is not False else None
        grad_idx: list[int] = []
        grad_inputs: list[DTensor] = []
        grad_placements: list[tuple[Placement, ...]] = []
        for i, a, gp in checked:
            if track_grad and a.requires_grad:
                grad_idx.append(i)
                grad_inputs.append(a)
                grad_placements.append(inferred[i] or gp if inferred is not None else gp)
            else:
                locals_[i] = _wait(local_tensor_of(a))
        if grad_inputs:
            for i, t in zip(grad_idx, _to_local(tuple(grad_placements), *grad_inputs)):
                locals_[i] = t
        push_region_mesh(mesh)  # for localmap.collectives inside the body
        try:
            out = self.func(*(locals_ if treespec is None else pytree.tree_unflatten(locals_, treespec)), **kwargs)
        except Exception as e:  # only on the error path: name the region and the line that raised
            raise body_error(self.func, e) from e
        finally:
            pop_region_mesh()

        if isinstance(out, torch.Tensor):
            flat_out: Sequence[Any] = (out,)
            out_tree: Any = None
        else:
            flat_out, out_tree = pytree.tree_flatten(out)
        out_plan = self._out_plan(out, flat_out, out_tree, mesh)
        dspecs = self._output_dtensor_specs(out, flat_out, out_plan, mesh, uneven)
        results = list(flat_out)
        grad_out = [i for i, s in enumerate(dspecs) if s is not None and track_grad and flat_out[i].requires_grad]
        if grad_out:
            for i in grad_out:
                if _any_minmax(dspecs[i].placements):
                    raise extreme_grad_error(leaf_path("outputs", out, i), dspecs[i].placements, mesh)
            wrapped = _from_local(tuple(dspecs[i] for i in grad_out), *(flat_out[i] for i in grad_out))
            for i, d in zip(grad_out, wrapped):
                results[i] = d
        for i, s in enumerate(dspecs):
            if s is not None and results[i] is flat_out[i]:
                results[i] = make_dtensor(flat_out[i], s, requires_grad=False)
        return results[0] if out_tree is None else pytree.tree_unflatten(results, out_tree)

    def _verdict(self, plan: _InputPlan, flat: Sequence[Any], treespec: Any, checked: list, mesh: DeviceMesh,
                 kwargs: dict) -> tuple | None:
        """The body's placement check for these inputs (cached: steady-state calls pay one lookup); returns
        the inferred gradient placements per leaf when in_grad_placements is None."""
        hit = plan.verdict  # steady state: the same DTensor specs as last time on this plan
        if hit is not None and len(hit[0]) == len(checked):
            for s, (_, a, _) in zip(hit[0], checked):
                if s is not spec_of(a):
                    hit = None
                    break
        else:
            hit = None
        if hit is None:
            key = (id(plan), tuple(id(spec_of(a)) for _, a, _ in checked))
            hit = self._verdicts.get(key)
            if hit is not None and any(s is not spec_of(a) for s, (_, a, _) in zip(hit[0], checked)):
                hit = None
        if hit is None:
            from localmap.check.checker import check_function

            _check_grad_ranges(plan, tuple(flat) if treespec is None else pytree.tree_unflatten(list(flat), treespec),
                               flat, mesh)
            leaves = list(flat)
            leaf_specs: list[Any] = [None] * len(leaves)
            for i, a in enumerate(leaves):
                if isinstance(a, torch.Tensor) and not isinstance(a, DTensor):
                    leaf_specs[i] = (plan.specs[i] if plan.specs is not None and plan.specs[i] is not None
                                     else tuple(Replicate() for _ in range(mesh.ndim)))
            for i, a, _ in checked:
                leaves[i], leaf_specs[i] = local_tensor_of(a), tuple(a.placements)
            verdict = check_function(self.func, leaves, leaf_specs, self.out_placements, plan.grad_specs, mesh,
                                     treespec if treespec is not None else pytree.tree_flatten(tuple(flat))[1],
                                     kwargs, _uneven_mesh_dims([a for _, a, _ in checked]))
            hit = (tuple(spec_of(a) for _, a, _ in checked), verdict)
            if len(self._verdicts) < 256:
                self._verdicts[key] = hit
        plan.verdict = hit
        verdict = hit[1]
        if not verdict.ok:
            from localmap.check.checker import enforce

            enforce(verdict, self.check)
        return verdict.grad_placements if self.in_grad_placements is None else None  # None when unchecked

    def _check_non_dtensor_leaves(self, plan: _InputPlan, args: tuple, flat: Sequence[Any]) -> None:
        for i, (a, spec) in enumerate(zip(flat, plan.specs)):  # type: ignore[arg-type]
            if spec is not None and not isinstance(a, torch.Tensor):
                raise fail(leaf_path("args", args, i), "is not a tensor but has a placement spec",
                           expected=None, given=placements_str(spec),
                           fix="use None in in_placements for non-tensor arguments")
        for i, (a, spec) in enumerate(zip(flat, plan.grad_specs or ())):
            if spec is not None and not isinstance(a, torch.Tensor):
                raise fail(leaf_path("args", args, i), "is not a tensor but has an in_grad_placements spec",
                           expected=None, given=placements_str(spec),
                           fix="use None in in_grad_placements for non-tensor arguments")

    def _call_compiling(self, args: tuple, kwargs: dict) -> Any:
        """Trace-friendly path for torch.compile: same checks, DTensor's public conversions."""
        flat, treespec = pytree.tree_flatten(args)
        dtensor_idx = [i for i, a in enumerate(flat) if isinstance(a, DTensor)]
        if not dtensor_idx:
            return self.func(*args, **kwargs)
        mesh = self.device_mesh if self.device_mesh is not None else _common_mesh(args, flat, dtensor_idx)
        plan = _InputPlan(mesh, None, None)
        if self.in_placements is not None:
            plan.specs = resolve_input_specs(self.in_placements, args, len(flat))
            self._check_non_dtensor_leaves(plan, args, flat)
        if self.in_grad_placements is not None:
            plan.grad_specs = resolve_input_specs(self.in_grad_placements, args, len(flat), "in_grad_placements")
        locals_ = list(flat)
        for i in dtensor_idx:
            a, gp = self._check_leaf(plan, args, flat, i, mesh)
            if is_uneven(a.shape, a.placements, mesh):
                raise fail(leaf_path("args", args, i), "is unevenly sharded, which local_map does not support "
                           "under torch.compile", given=tuple(a.shape),
                           fix="pad the sharded dim to a multiple of the mesh size, or run this region eagerly")
            locals_[i] = a.to_local(grad_placements=gp)
        with in_region(mesh):  # for localmap.collectives inside the body
            out = self.func(*pytree.tree_unflatten(locals_, treespec), **kwargs)
        flat_out, out_tree = pytree.tree_flatten(out)
        specs = resolve_output_specs(self.out_placements, out, len(flat_out))
        results = []
        for i, (t, spec) in enumerate(zip(flat_out, specs)):
            if isinstance(t, DTensor):
                raise fail(leaf_path("outputs", out, i), "the function returned a DTensor",
                           expected="a local torch.Tensor", given="DTensor", fix="return .to_local() of it")
            if spec is not None:
                check_spec_for_mesh(spec, mesh, leaf_path("outputs", out, i), "out_placements")
            spec = self._check_output(out, i, t, spec, mesh)
            results.append(DTensor.from_local(t, mesh, spec, run_check=False) if spec is not None else t)
        return pytree.tree_unflatten(results, out_tree)


def _check_grad_ranges(plan: _InputPlan, args: tuple, flat: Sequence[Any], mesh: DeviceMesh) -> None:
    """in_grad_placements' Shard dims against each DTensor input's ndim (on slow paths only: a new plan, a new
    input metadata; steady-state calls use the plan's specs unchecked)."""
    for i, g in enumerate(plan.fast_grad_specs or ()):
        a = flat[i]
        if g is not None and isinstance(a, DTensor):
            normalize_shard_dims(g, a.ndim, leaf_path("args", args, i), "in_grad_placements", mesh)


def _uneven_mesh_dims(dtensors: Sequence[DTensor]) -> frozenset:
    """Mesh dims on which some input's shards differ in size (read by the check: means over such dims)."""
    out: set[int] = set()
    for a in dtensors:
        for d, mesh_dims in shard_dims(a.placements).items():
            if a.shape[d] % math.prod(a.device_mesh.size(m) for m in mesh_dims):
                out.update(mesh_dims)
    return frozenset(out)


def _tracing_regions() -> bool:
    """Whether plain-tensor calls should become operator regions (inside hop.defer_inlining())."""
    from localmap.traced.operator import is_deferring

    return is_deferring()


def _common_mesh(args: tuple, flat: Sequence[Any], dtensor_idx: Sequence[int]) -> DeviceMesh:
    """The mesh of the DTensor inputs, which must all agree when no device_mesh is given."""
    mesh = flat[dtensor_idx[0]].device_mesh
    for i in dtensor_idx[1:]:
        other = flat[i].device_mesh
        if other is not mesh and other != mesh:
            raise fail(leaf_path("args", args, i), "is a DTensor on a different mesh than "
                       f"{leaf_path('args', args, dtensor_idx[0])}", expected=mesh, given=other,
                       fix="redistribute the inputs onto one mesh, or pass device_mesh= explicitly")
    return mesh


def _check_kwargs(kwargs: dict) -> None:
    for path, leaf in pytree.tree_flatten_with_path(kwargs)[0]:
        if isinstance(leaf, DTensor):
            raise fail("kwargs" + pytree.keystr(path), "is a DTensor passed by keyword",
                       expected="DTensors as positional arguments (specs are per positional argument)",
                       given="DTensor", fix="pass it positionally with a spec in in_placements")


def local_map(
    func: Callable | None = None,
    out_placements: Any = None,
    in_placements: Any = None,
    in_grad_placements: Any = None,
    device_mesh: DeviceMesh | None = None,
    *,
    redistribute_inputs: bool = False,
    check: bool | str = True,
) -> Callable:
    """Run ``func`` on the local shards of its DTensor arguments and wrap its outputs as DTensors.

    Same signature and meaning as ``torch.distributed.tensor.experimental.local_map``; specs may also be
    pytree prefixes of the arguments (see the README). Works as a decorator when ``func`` is None.
    ``check`` (True, "warn" or False) type-checks the body against the placements and, when
    ``in_grad_placements`` is None, infers the gradient placements (see the README).
    """
    if func is None:
        return functools.partial(
            local_map, out_placements=out_placements, in_placements=in_placements,
            in_grad_placements=in_grad_placements, device_mesh=device_mesh,
            redistribute_inputs=redistribute_inputs, check=check,
        )
    region = MappedFunction(func, out_placements, in_placements, in_grad_placements, device_mesh,
                            redistribute_inputs, check)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return region(args, kwargs)

    wrapper.region = region  # type: ignore[attr-defined]
    return wrapper


__all__ = ["local_map", "MappedFunction", "LocalMapError"]
