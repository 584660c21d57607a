"""The front end of ``local_map``: a ``RegionCallable`` per wrapped function, and what one call does.

A call dispatches by what it is given and where it runs:

* DTensor arguments, eagerly (the main path): (1) flatten the arguments and match them with their leaf specs
  (an ``InputPlan``, cached per argument structure and mesh); (2) check each DTensor input's mesh and
  placements (fast path: the same mesh object and placements as the plan; slow path: the full check, with
  redistribution when asked); (3) the placement check's verdict (cached), which infers gradient placements;
  (4) all inputs to local tensors through one autograd node; (5) the function on the local tensors; (6) all
  outputs to DTensors through one autograd node, their specs cached per output metadata. A steady-state call
  (DTensor arguments with the last full call's spec objects: ``plans.HotCall``) reuses what (1)-(3) derived;
* DTensor arguments under ``torch.compile``: ``localmap.eager.compiled``;
* plain tensors under ``hop.defer_inlining()`` (capture): a region node (``localmap.traced.frontend``);
* plain tensors while ``verify`` records a reference: inlined and recorded;
* plain tensors under Dynamo with PyTorch's local_map wrapping on (a planner's capture): a region node
  (``localmap.traced.dynamo_capture``);
* plain tensors otherwise: the function itself (with a warning inside PyTorch's ``defer_inlining`` or
  ``torch.export``, where a region node was expected).

PyTorch's local_map spends one autograd node per input and per output and recomputes every output's global
metadata on each call; batching both directions and caching output specs is where the eager overhead goes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor.placement_types import Placement

from localmap.caches import instances, register_cache
from localmap.check.verdict import CHECK_MODES, Verdict, enforce, refuse_guessed
from localmap.check.function import function_identity
from localmap.check.state import BodyState, body_state, value_key
from localmap.check.tested import agree_on_ranks, settle_by_test
from localmap.core.grads import inferred_of, leaf_grad_placements
from localmap.compat import make_dtensor, pytree, spec_of
from localmap.context import recorder, stack
from localmap.eager.autograd import from_local_shards, local_tensors, output_grad_rules, to_local_shards
from localmap.eager.compiled import call_compiling
from localmap.eager.modes import CallMode, call_mode
from localmap.eager.plans import (
    HotCall, InputPlan, OutputPlan, check_body, check_input_leaf, check_kwargs, check_non_dtensor_leaves, common_mesh,
    make_input_plan, make_output_plan, output_dtensor_specs,
)
from localmap.eager.uneven import is_uneven_spec
from localmap.errors import body_error, fail
from localmap.placements.algebra import extreme_grad_error, grad_default, has_extreme
from localmap.placements.specs import leaf_path, resolve_input_specs, validate_spec_argument
from localmap.traced.dynamo_capture import inlining_expected_why, warn_inlined
from localmap.traced.frontend import call_reference, call_traced

PLAN_CACHE_LIMIT = 64  # argument (or output) structures remembered per region
VERDICT_CACHE_LIMIT = 256  # input metadata whose check verdict is remembered per region
# Every live region's plans, verdicts and output specs, as one registered cache (limits per region).
_live_regions = instances("region_plans", PLAN_CACHE_LIMIT, "keep first",
                          size=lambda r: sum(r.cache_info().values()), clear=lambda r: r.clear_cache())


class RegionCallable:
    """One ``local_map``-wrapped function: its specs, options and caches. Called with (args, kwargs)."""

    def __init__(self, func: Callable, out_placements: Any, in_placements: Any, in_grad_placements: Any,
                 device_mesh: DeviceMesh | None, redistribute_inputs: bool, check: bool | str = True) -> None:
        if not callable(func):
            raise fail("func", "is not callable", expected="a function (or module) to run on local shards",
                       given=type(func).__name__, fix="pass the function first: local_map(fn, out_placements, ...)")
        if check not in CHECK_MODES:
            raise fail("check", f"must be one of {CHECK_MODES}", given=repr(check),
                       fix="check=True raises PlacementError and warns on an unproven claim (testing it first "
                           "when its inputs are small), 'test' tests any unproven claim, 'warn' only warns, "
                           "False skips the check, 'strict' also refuses unproven (and tested) claims and "
                           "untraceable bodies, 'allow_unproven' accepts unproven claims silently")
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
        self._state: BodyState | None = None  # what the body reads besides its arguments (found on a miss)
        self._input_plans: dict[Any, InputPlan] = {}
        self._output_plans: dict[Any, OutputPlan] = {}
        self._hot: HotCall | None = None  # the last call's derivations, for the next one with the same specs
        if not torch.compiler.is_compiling():  # a region made inside a compiled function is Dynamo's
            _live_regions.add(self)

    def clear_cache(self) -> None:
        """Forget this region's plans, verdicts and output specs (``localmap.clear_caches()`` calls it)."""
        self._verdicts.clear()
        self._input_plans.clear()
        self._output_plans.clear()
        self._state = None
        self._hot = None

    def cache_info(self) -> dict[str, int]:
        """How many argument structures, output structures and checked input metadata this region remembers."""
        return {"input_plans": len(self._input_plans), "output_plans": len(self._output_plans),
                "verdicts": len(self._verdicts)}

    def verdicts(self) -> list:
        """The placement check's verdicts for the inputs this region has seen (one per distinct input metadata
        and argument values), for reports."""
        return [entry[1] for entry in self._verdicts.values()]

    # -- dispatch -----------------------------------------------------------------------------------------

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if torch.compiler.is_compiling():  # before anything Dynamo would have to trace (modes.call_mode there)
            return call_compiling(self, args, kwargs)
        hot = self._hot  # the steady-state fast path (plans.HotCall): DTensor arguments only, the mode EAGER
        if hot is not None and not kwargs:
            grad_all = hot.match(args, self._state)
            if grad_all is not None:
                return self._call_hot(hot, args, grad_all)
        if kwargs:
            check_kwargs(kwargs)
        treespec = None
        flat: Sequence[Any] = args
        for a in args:
            if not isinstance(a, torch.Tensor):
                flat, treespec = pytree.tree_flatten(args)
                break
        dtensor_idx = [i for i, a in enumerate(flat) if isinstance(a, DTensor)]
        mode = call_mode(bool(dtensor_idx), compiling=False)  # (asked above)
        if mode is CallMode.EAGER:
            return self._call_eager(args, kwargs, flat, treespec, dtensor_idx)
        if mode is CallMode.DEFERRED:
            return call_traced(self, args, kwargs)
        if mode is CallMode.REFERENCE:
            return call_reference(self, args, kwargs, recorder("reference"))
        return self._call_plain(args, kwargs, flat)

    def _call_plain(self, args: tuple, kwargs: dict, flat: Sequence[Any]) -> Any:
        """No DTensor argument, no region node or reference asked for: the function itself."""
        if self.in_placements is not None:  # still catch a wrong spec count
            resolve_input_specs(self.in_placements, args, len(flat))
        why = inlining_expected_why()  # PyTorch's deferral, torch.export: a region node was expected
        if why is not None:
            warn_inlined(self, why)
        return self.func(*args, **kwargs)

    # -- the eager path -----------------------------------------------------------------------------------

    def _call_eager(self, args: tuple, kwargs: dict, flat: Sequence[Any], treespec: Any,
                    dtensor_idx: list[int]) -> Any:
        mesh = self.device_mesh if self.device_mesh is not None else common_mesh(args, flat, dtensor_idx)
        plan = self._input_plan(len(args) if treespec is None else treespec, mesh, args, flat)
        if treespec is not None:
            check_non_dtensor_leaves(plan, args, flat)
        checked, uneven = self._checked_inputs(plan, args, flat, dtensor_idx, mesh)
        # in_grad_placements=None: the gradient placements the body implies (from the cached check)
        verdict = self._verdict(plan, flat, treespec, checked, mesh, kwargs) if self.check is not False else None
        inferred = inferred_of(verdict, self.in_grad_placements)
        grad_placements = self._grad_placements(checked, inferred)
        locals_ = local_tensors(flat, [c[0] for c in checked], [c[1] for c in checked], grad_placements)
        guess_check = inferred is None and self.in_grad_placements is None and self.check is not False
        if treespec is None and not kwargs and not uneven and len(checked) == len(args):
            self._remember_hot(plan, args, checked, mesh, verdict, grad_placements, guess_check)
        out = self._run_body(mesh, locals_ if treespec is None else pytree.tree_unflatten(locals_, treespec),
                             kwargs)
        if guess_check:
            refuse_guessed(verdict, self.check)  # unchecked: no gradient placement may be a guess
        return self._from_locals(out, mesh, uneven, verdict)

    def _call_hot(self, hot: HotCall, args: tuple, grad_all: bool) -> Any:
        """The steady-state fast path (plans.HotCall): what the last full call derived from these same input
        specs, reused; the body, its outputs and the per-call facts as on the full path. `grad_all`: whether
        every argument requires a gradient (then all go through one node, as local_tensors sends them)."""
        if not hot.settled:
            enforce(hot.verdict, self.check, refuse_guess=False)  # as _verdict does on every call
        if grad_all and torch.is_grad_enabled():
            locals_ = to_local_shards(hot.grad_placements, *args)
        else:
            locals_ = local_tensors(args, range(len(args)), args, hot.grad_placements)
        out = self._run_body(hot.mesh, locals_, {})
        if hot.guess_check:
            refuse_guessed(hot.verdict, self.check)
        result = hot.output(out)
        if result is None:
            result = self._from_locals(out, hot.mesh, False, hot.verdict)
            hot.remember_output(out, result)
        return result

    def _remember_hot(self, plan: InputPlan, args: tuple, checked: list, mesh: DeviceMesh, verdict: Any,
                      grad_placements: tuple, guess_check: bool) -> None:
        """Keep this call's derivations for the next call with the same input specs (plans.HotCall), where they
        hold beyond this call: nothing redistributed, a verdict not bound to this call's values."""
        if any(c[1] is not args[c[0]] for c in checked):
            return
        state = None
        if verdict is not None:
            hit = plan.verdict  # (specs, verdict, values, state key) as _verdict found it; None: per_call
            if hit is None or hit[1] is not verdict:
                return
            state = hit[3]
        self._hot = HotCall(tuple(c[3] for c in checked), mesh, verdict, state, grad_placements, guess_check)

    def _run_body(self, mesh: DeviceMesh, args: Sequence[Any], kwargs: dict) -> Any:
        """The function on the local arguments, with the region's mesh on the context stack (for
        localmap.collectives inside the body); its error named by the region and the line that raised."""
        meshes = stack("region_meshes")
        meshes.append(mesh)
        try:
            return self.func(*args, **kwargs)
        except Exception as e:  # only on the error path
            raise body_error(self.func, e) from e
        finally:
            meshes.pop()

    def _input_plan(self, key: Any, mesh: DeviceMesh, args: tuple, flat: Sequence[Any]) -> InputPlan:
        plan = self._input_plans.get(key)
        if plan is not None and plan.mesh is mesh:
            return plan
        plan = make_input_plan(self.in_placements, self.in_grad_placements, mesh, args, flat)
        if len(self._input_plans) < PLAN_CACHE_LIMIT:
            self._input_plans[key] = plan
        return plan

    def _checked_inputs(self, plan: InputPlan, args: tuple, flat: Sequence[Any], dtensor_idx: list[int],
                        mesh: DeviceMesh) -> tuple[list[tuple[int, DTensor, tuple[Placement, ...], Any]], bool]:
        """(leaf index, DTensor to unwrap, gradient placements, its DTensorSpec) per DTensor input, and whether
        any is uneven."""
        specs, grad_specs = plan.specs, plan.fast_grad_specs
        checked = []
        uneven = False
        even = plan.even_specs  # the last call's specs, all even: the same objects need no second look
        known = len(even) == len(dtensor_idx)
        for n, i in enumerate(dtensor_idx):
            a = flat[i]
            spec = spec_of(a)
            # Fast path: same mesh object and placements as the plan; anything else gets the full check.
            if spec.mesh is mesh and specs is not None and spec.placements == specs[i]:
                gp = grad_default(spec.placements) if grad_specs is None else grad_specs[i]
                if gp is None:
                    a, gp = check_input_leaf(plan, args, flat, i, mesh, self.redistribute_inputs)
                    spec = spec_of(a)
            else:
                a, gp = check_input_leaf(plan, args, flat, i, mesh, self.redistribute_inputs)
                spec = spec_of(a)  # redistributed, maybe
            if known and even[n] is not spec:
                known = False
            if not (uneven or known):
                uneven = is_uneven_spec(spec)
            checked.append((i, a, gp, spec))
        if not (known or uneven):
            plan.even_specs = tuple(c[3] for c in checked)
        return checked, uneven

    def _grad_placements(self, checked: list, inferred: Sequence | None) -> tuple:
        """Each checked DTensor input's gradient placements (core.grads: given, else inferred, else default)."""
        given = self.in_grad_placements is not None  # then each checked gradient placement is the given one
        return tuple([leaf_grad_placements(spec.placements, gp if given else None,
                                           None if inferred is None else inferred[i])
                      for i, _, gp, spec in checked])

    def _from_locals(self, out: Any, mesh: DeviceMesh, uneven: bool, verdict: Any) -> Any:
        """The function's local outputs as DTensors: those that need a gradient through one autograd node,
        with the gradient rules the verdict (None: unchecked) gives them."""
        if isinstance(out, torch.Tensor):
            flat_out: Sequence[Any] = (out,)
            out_tree: Any = None
        else:
            flat_out, out_tree = pytree.tree_flatten(out)
        plan = self._output_plans.get(out_tree)
        if plan is None or plan.mesh is not mesh:
            plan = make_output_plan(self.out_placements, out, flat_out, mesh)
            if len(self._output_plans) < PLAN_CACHE_LIMIT:
                self._output_plans[out_tree] = plan
        dspecs = output_dtensor_specs(out, flat_out, plan, mesh, uneven)
        if out_tree is None and dspecs[0] is not None:  # one tensor (the usual case): no lists
            if out.requires_grad and torch.is_grad_enabled():
                return _with_grad(out, flat_out, dspecs, [0], mesh, verdict)[0]
            return make_dtensor(out, dspecs[0], requires_grad=False)
        results = list(flat_out)
        track_grad = torch.is_grad_enabled()
        grad_out = [i for i, s in enumerate(dspecs) if s is not None and track_grad and flat_out[i].requires_grad]
        if grad_out:
            for i, d in zip(grad_out, _with_grad(out, flat_out, dspecs, grad_out, mesh, verdict), strict=True):
                results[i] = d
        for i, s in enumerate(dspecs):
            if s is not None and results[i] is flat_out[i]:
                results[i] = make_dtensor(flat_out[i], s, requires_grad=False)
        return results[0] if out_tree is None else pytree.tree_unflatten(results, out_tree)

    # -- the placement check ------------------------------------------------------------------------------

    def _verdict(self, plan: InputPlan, flat: Sequence[Any], treespec: Any, checked: list, mesh: DeviceMesh,
                 kwargs: dict) -> Any:
        """The body's placement check for these inputs (cached: steady-state calls pay one lookup), enforced by
        the region's check mode; its verdict holds the inferred gradient placements (None when unchecked)."""
        # What else decides the body: its non-tensor arguments and keyword arguments (none on the fast path),
        # and the state it reads (module training flags, attributes, globals; none for a plain function).
        values = _value_key(flat, kwargs) if treespec is not None or kwargs else None
        state = self._state.key() if self._state is not None else None
        hit = plan.verdict  # steady state: the same DTensor specs, values and state as last time on this plan
        if hit is not None and len(hit[0]) == len(checked) and hit[2] == values and hit[3] == state:
            for s, c in zip(hit[0], checked):
                if s is not c[3]:
                    hit = None
                    break
        else:
            hit = None
        if hit is None:
            self._state = body_state(self.func)  # found again: modules may have been added since
            state = self._state.key() if self._state is not None else None
            key = (id(plan), tuple(id(c[3]) for c in checked), values, state)
            hit = self._verdicts.get(key)
            if hit is None or any(s is not c[3] for s, c in zip(hit[0], checked)):
                hit = (tuple(c[3] for c in checked), self._check_body(plan, flat, treespec, checked, mesh, kwargs),
                       values, state)
                if len(self._verdicts) < VERDICT_CACHE_LIMIT and not hit[1].per_call:
                    self._verdicts[key] = hit
        plan.verdict = hit if not hit[1].per_call else None  # a verdict of this call's values: checked again
        verdict = hit[1]
        if not verdict.settled:
            enforce(verdict, self.check, refuse_guess=False)  # after the body: its own error comes first
        return verdict

    def _check_body(self, plan: InputPlan, flat: Sequence[Any], treespec: Any, checked: list, mesh: DeviceMesh,
                    kwargs: dict) -> Any:
        """Trace and check the body on these inputs' local metadata (a verdict cache miss); where the proof
        stops, test the claim on these inputs (check.tested: "tested", "wrong" with numbers, or unproven)."""
        # under real ranks, every rank's outcome is shared before any acts on it (one gather, on this miss only)
        verdict = agree_on_ranks(lambda: check_body(self.func, self.out_placements, plan, flat, treespec, checked,
                                                    mesh, kwargs), mesh)
        if _testable(verdict) and self.check != "allow_unproven":  # accepted as it is: no test
            leaves = list(flat)
            grads: list[Any] = [None] * len(leaves)
            inferred = inferred_of(verdict, self.in_grad_placements)
            given = self.in_grad_placements is not None
            for i, a, gp, _ in checked:
                leaves[i] = a
                grads[i] = leaf_grad_placements(a.placements, gp if given else None,
                                                None if inferred is None else inferred[i])
            settle_by_test(verdict, self.func, leaves,
                           treespec if treespec is not None else pytree.tree_flatten(tuple(flat))[1], kwargs,
                           self.out_placements, grads, mesh, force=self.check == "test")
        return verdict


def _testable(verdict: Verdict) -> bool:
    """Whether the test where the proof stops may settle `verdict`: unproven claims, and a body the check could
    not trace whose gradient placements are no guess (given, or no input takes one): the test runs the body
    itself, on the call's values, so it needs no trace (the branch the values take is the one tested)."""
    return verdict.status == "unproven" or (verdict.status == "unchecked" and not verdict.guessed)


def _with_grad(out: Any, flat_out: Sequence[Any], dspecs: list, grad_out: list[int], mesh: DeviceMesh,
               verdict: Any) -> tuple:
    """The outputs `grad_out` (indices of `flat_out`) as DTensors through one autograd node, with the gradient
    rules the verdict (None: unchecked) gives them; a Partial(max/min) one is refused."""
    for i in grad_out:
        if has_extreme(dspecs[i].placements):
            raise extreme_grad_error(leaf_path("outputs", out, i), dspecs[i].placements, mesh)
    rules = None if verdict is None or verdict.out_grad_rules is None else \
        output_grad_rules(verdict, flat_out, grad_out)
    return from_local_shards(tuple([dspecs[i] for i in grad_out]), rules, *[flat_out[i] for i in grad_out])


def _value_key(flat: Sequence[Any], kwargs: dict) -> tuple:
    """The non-DTensor argument leaves and keyword arguments of a call as a key (check.function.value_key): a
    flag or a scale that changes what the body computes is checked again."""
    leaves = tuple(value_key(a) for a in flat if not isinstance(a, DTensor))
    return leaves, tuple((k, value_key(v)) for k, v in sorted(kwargs.items()))


def local_map(
    func: Callable | None = None,
    out_placements: Any = None,
    in_placements: Any = None,
    in_grad_placements: Any = None,
    device_mesh: DeviceMesh | None = None,
    *,
    redistribute_inputs: bool = False,
    spmd_types: bool = False,
    check: bool | str = True,
) -> Callable:
    """Run ``func`` on the local shards of its DTensor arguments and wrap its outputs as DTensors.

    Same signature and meaning as ``torch.distributed.tensor.experimental.local_map`` (PyTorch 2.14's, with
    ``redistribute_inputs`` and ``spmd_types``); specs may also be pytree prefixes of the arguments (see the
    README). Works as a decorator when ``func`` is None. ``check`` (True, "warn", "strict", "allow_unproven" or
    False) type-checks the body against the placements and, when ``in_grad_placements`` is None, infers the
    gradient placements; a claim it can neither prove nor refute warns once (see ``localmap.check.verdict``).
    ``spmd_types=True`` asks for a typed body: localmap's own check in its strict mode (``check="strict"``: a
    wrong claim raises, and so does a body the check cannot trace); it needs no extra package.
    """
    if func is None:
        return functools.partial(
            local_map, out_placements=out_placements, in_placements=in_placements,
            in_grad_placements=in_grad_placements, device_mesh=device_mesh,
            redistribute_inputs=redistribute_inputs, spmd_types=spmd_types, check=check,
        )
    if spmd_types:
        if check in (False, "warn", "allow_unproven"):
            raise fail("spmd_types", f"asks for a typed body but check={check!r} turns the check off or down",
                       given=f"spmd_types=True, check={check!r}",
                       fix="drop check= (spmd_types=True means check='strict'), or drop spmd_types")
        check = "strict"
    region = shared_region(func, out_placements, in_placements, in_grad_placements, device_mesh,
                           redistribute_inputs, check)

    call = region.__call__  # bound once: a call skips the type's __call__ lookup

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return call(args, kwargs)

    # Dynamo cannot iterate the attribute dict of a function it keeps in the graph (torch.nn.functional's,
    # "missing tp_iter"): while it traces, the wrapper takes the name and docstring only.
    functools.update_wrapper(wrapper, func, updated=() if torch.compiler.is_compiling() else ("__dict__",))
    wrapper.region = region  # type: ignore[attr-defined]
    return wrapper


# NOTE: shared regions. torchtitan builds `local_map(fn, ...)` inside every forward. A wrapper built again for the
# same function (by identity: code, closure objects, defaults, bound object) with the same specs, mesh and options
# shares the first one's RegionCallable, so its plans, verdicts and output specs are warm from the second step on.
REGION_CACHE_LIMIT = 256  # shared regions remembered (cleared when full)
_regions: dict[Any, tuple[tuple, RegionCallable]] = register_cache("shared_regions", {}, limit=REGION_CACHE_LIMIT,
                                                                   eviction="clear when full")


def shared_region(func: Callable, out_placements: Any, in_placements: Any, in_grad_placements: Any,
                  device_mesh: DeviceMesh | None, redistribute_inputs: bool, check: Any) -> RegionCallable:
    """The RegionCallable for these arguments: an earlier wrapper's when it had the same ones, else a new one
    (always new while Dynamo traces: a region made inside a compiled function is Dynamo's to trace)."""
    args = (func, out_placements, in_placements, in_grad_placements, device_mesh, redistribute_inputs, check)
    if torch.compiler.is_compiling():
        return RegionCallable(*args)
    try:
        fn_key, objects = function_identity(func)
        key = (fn_key, _frozen(out_placements), _frozen(in_placements), _frozen(in_grad_placements),
               id(device_mesh), redistribute_inputs, check)
        hash(key)
    except TypeError:  # an unhashable spec or closure: a region of its own
        return RegionCallable(*args)
    hit = _regions.get(key)
    if hit is not None and len(hit[0]) == len(objects) + 1 and all(
            a is b for a, b in zip(hit[0], (*objects, device_mesh))):
        return hit[1]
    region = RegionCallable(*args)
    if len(_regions) >= REGION_CACHE_LIMIT:
        _regions.clear()
    _regions[key] = ((*objects, device_mesh), region)
    return region


def _frozen(spec: Any) -> Any:
    """A spec as a hashable key (lists and dicts as tuples; placements are hashable values)."""
    if isinstance(spec, (list, tuple)):
        return (type(spec).__name__, *map(_frozen, spec))
    if isinstance(spec, dict):
        return ("dict", *((k, _frozen(v)) for k, v in sorted(spec.items(), key=lambda kv: repr(kv[0]))))
    return spec
