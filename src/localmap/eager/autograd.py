"""The eager path's two autograd nodes: all DTensor inputs to local tensors in one node, all local outputs to
DTensors in one node; and the compiled path's Partial('avg') gradient scaling (``ScaledGradient``).

PyTorch's local_map spends one node per input (``to_local``) and per output (``from_local``); batching them is
most of localmap's eager speed-up. ``to_local_shards``/``from_local_shards`` call the nodes without the Python
checks for functorch transforms when none is active (``compat.fast_apply``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial, Placement

from localmap.caches import register_cache
from localmap import compat
from localmap.compat import DTensorSpec, local_tensor_of, make_dtensor, make_spec, spec_of, wait_local
from localmap.placements.algebra import (avg_grad_scale, avg_ranks, grad_default, has_avg, summed_partials,
                                        whole_grad_ranks)
from localmap.eager.uneven import plain_stride
from localmap.errors import fail
from localmap.placements.shapes import dense_stride


def _input_grad(g: torch.Tensor, spec: DTensorSpec, grad_placements: tuple[Placement, ...],
                local_stride: tuple[int, ...]) -> DTensor:
    """A local gradient wrapped as the input's gradient DTensor (its global metadata, its gradient placements)."""
    spec_out, scale = _grad_recipe(spec, grad_placements)
    if scale != 1:
        g = g * scale
    if g.stride() == local_stride:
        if not g.requires_grad:  # the usual case: the input's own spec, or a remembered one for the placements
            return make_dtensor(g, spec_out, requires_grad=False)
        stride = spec.stride
    else:
        stride = dense_stride(spec.shape, plain_stride(g))
    if g.requires_grad:  # backward with create_graph=True: the wrapping must stay differentiable
        return _differentiable_input_grad(g, spec, grad_placements, stride)
    grad_spec = make_spec(spec.mesh, grad_placements, spec.shape, stride, spec.tensor_meta.dtype)
    return make_dtensor(g, grad_spec, requires_grad=False)


def _differentiable_input_grad(g: torch.Tensor, spec: DTensorSpec, grad_placements: tuple[Placement, ...],
                               stride: tuple[int, ...]) -> DTensor:
    """The input's gradient under backward(create_graph=True), wrapped so that a second backward runs through
    it as this wrapping's transpose. Where the input is Partial and its gradient Replicate, each rank holds the
    whole gradient, so each rank's part of the gradient's own gradient is 1/n of it: the shares that the
    output side sums (``_differentiable_output_grad`` reads a Partial output's gradient back as Partial).
    DTensor's from_local would give every rank the whole, counted n times there."""
    ranks = whole_grad_ranks(spec.placements, grad_placements, spec.mesh)
    if ranks != 1:
        g = ScaledGradient.apply(g, 1, ranks)
    return DTensor.from_local(g, spec.mesh, grad_placements, run_check=False, shape=spec.shape, stride=stride)


GRAD_SPEC_CACHE_LIMIT = 1024  # gradient recipes remembered (cleared when full)
_grad_recipes: dict[tuple[int, int], tuple[DTensorSpec, tuple, DTensorSpec, int]] = register_cache(
    "grad_recipes", {}, limit=GRAD_SPEC_CACHE_LIMIT, eviction="clear when full")


def _grad_recipe(spec: DTensorSpec, grad_placements: tuple[Placement, ...]) -> tuple[DTensorSpec, int]:
    """The gradient's spec (the input's global metadata with its gradient placements: a Partial gradient of a
    Replicate weight) and the Partial('avg') factor on the local gradient. Remembered per input spec object and
    placements object (a parameter's spec and its plan's placements stay the same from step to step), since
    building a spec costs about as much as the rest of the backward's wrapping, and hashing or comparing
    placements calls Python per entry. The entry holds both objects, so their ids are not reused while it
    stands."""
    key = (id(spec), id(grad_placements))
    hit = _grad_recipes.get(key)
    if hit is not None and hit[0] is spec and hit[1] is grad_placements:
        return hit[2], hit[3]
    placements = spec.placements
    scale = avg_grad_scale(placements, grad_placements, spec.mesh) if has_avg(placements) else 1
    grad_spec = spec if grad_placements == placements else \
        make_spec(spec.mesh, grad_placements, spec.shape, spec.stride, spec.tensor_meta.dtype)
    if len(_grad_recipes) >= GRAD_SPEC_CACHE_LIMIT:
        _grad_recipes.clear()
    _grad_recipes[key] = (spec, grad_placements, grad_spec, scale)
    return grad_spec, scale


class ToLocalShards(torch.autograd.Function):
    """DTensor inputs -> their local tensors, in one node. Backward wraps each local gradient as a DTensor
    with the input's global metadata and its gradient placements."""

    @staticmethod
    def forward(ctx: Any, grad_placements: tuple, *dtensors: DTensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.materialize_grads = False  # what set_materialize_grads(False) sets, without the call
        views = []
        saved = []
        for d, placements in zip(dtensors, grad_placements, strict=True):
            t = local_tensor_of(d)
            if type(t) is not torch.Tensor:  # a subclass: maybe a collective still in flight
                t = wait_local(t)
            views.append(t.detach())  # a fresh alias for autograd to mark (half a view_as's cost)
            saved.append((spec_of(d), placements, t.stride()))
        ctx.saved = saved
        return tuple(views)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:  # type: ignore[override]
        out: list[Any] = [None]
        for g, (spec, placements, local_stride) in zip(grads, ctx.saved, strict=True):
            out.append(None if g is None else _input_grad(g, spec, placements, local_stride))
        return tuple(out)


class FromLocalShards(torch.autograd.Function):
    """Local outputs -> DTensors, in one node. Backward brings each DTensor gradient to the placements the
    local output had (Partial read as Replicate) and returns its local tensor."""

    @staticmethod
    def forward(ctx: Any, specs: Sequence[DTensorSpec], grad_rules: Sequence[Any] | None,  # type: ignore[override]
                *locals_: torch.Tensor) -> tuple[DTensor, ...]:
        ctx.materialize_grads = False  # what set_materialize_grads(False) sets, without the call
        ctx.specs, ctx.grad_rules = specs, grad_rules
        if len(locals_) == 1:
            t = locals_[0]
            return (make_dtensor(t.detach(), specs[0], requires_grad=t.requires_grad),)
        return tuple([make_dtensor(t.detach(), s, requires_grad=t.requires_grad)
                      for t, s in zip(locals_, specs, strict=True)])

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:  # type: ignore[override]
        rules = ctx.grad_rules
        if len(grads) == 1:
            g = grads[0]
            return None, None, _output_grad(g, ctx.specs[0], rules and rules[0]) if isinstance(g, DTensor) else g
        out: list[Any] = [None, None]
        for g, spec, rule in zip(grads, ctx.specs, rules or (None,) * len(grads), strict=True):
            out.append(_output_grad(g, spec, rule) if isinstance(g, DTensor) else g)
        return tuple(out)


def _output_grad(g: DTensor, spec: DTensorSpec, rule: tuple[float, Any] | None) -> torch.Tensor:
    """The local gradient of an output from the DTensor gradient flowing into it. `rule`, from the placement
    check (None: the default): the factor on it, and the second-order rule (``_differentiable_output_grad``)."""
    target, ranks = _output_recipe(spec)
    g_spec = spec_of(g)
    if torch.is_grad_enabled():  # create_graph=True: keep the conversion differentiable
        local = _differentiable_output_grad(g, spec, target, None if rule is None else rule[1])
    elif g_spec.placements is not target and g_spec.placements != target:
        target_spec = DTensorSpec(spec.mesh, target, tensor_meta=g_spec.tensor_meta)
        local = wait_local(compat.redistribute_local(local_tensor_of(g), g_spec, target_spec))
    else:
        local = local_tensor_of(g)
        if type(local) is not torch.Tensor:  # a subclass: maybe a collective still in flight
            local = wait_local(local)
    if ranks != 1:
        local = local / ranks
    return local if rule is None or rule[0] == 1 else local * rule[0]


_output_recipes: dict[int, tuple[DTensorSpec, tuple[Placement, ...], int]] = register_cache(
    "output_recipes", {}, limit=GRAD_SPEC_CACHE_LIMIT, eviction="clear when full")


def _output_recipe(spec: DTensorSpec) -> tuple[tuple[Placement, ...], int]:
    """An output's gradient placements (Partial read as Replicate) and the ranks a Partial('avg') divides its
    gradient by, remembered per spec object (output specs are cached per plan): hashing placements calls
    Python per entry. The entry holds the spec, so its id is not reused while it stands."""
    hit = _output_recipes.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1], hit[2]
    placements = spec.placements
    recipe = (grad_default(placements), avg_ranks(placements, spec.mesh) if has_avg(placements) else 1)
    if len(_output_recipes) >= GRAD_SPEC_CACHE_LIMIT:
        _output_recipes.clear()
    _output_recipes[id(spec)] = (spec, *recipe)
    return recipe


def _differentiable_output_grad(g: DTensor, spec: DTensorSpec, target: tuple[Placement, ...],
                                summed_dims: Any) -> torch.Tensor:
    """The local gradient under backward(create_graph=True), as DTensor ops so that a second backward runs
    through it. That second backward is this conversion's transpose: per-rank local gradients back to a DTensor
    held as the output was, so where the output is Partial the ranks' shares are summed (read as Replicate, one
    rank's share would stand for the whole and the ranks would disagree); so are they on the Replicate mesh
    dims the check found them shares on (`summed_dims`; a str: why no placement is right)."""
    if isinstance(summed_dims, str):
        raise fail("a region output's gradient", f"cannot be differentiated again: {summed_dims}",
                   mesh=spec.mesh, fix="all_reduce inside the region only what meets per-rank data, or compute "
                   "this gradient penalty outside the region")
    if spec_of(g).placements != target:
        g = g.redistribute(spec.mesh, target)
    placements = summed_partials(spec.placements)
    if summed_dims:
        placements = tuple(Partial() if m in summed_dims else p for m, p in enumerate(placements))
    return g.to_local(grad_placements=placements)


def output_grad_rules(verdict: Any, flat_out: Sequence[Any], grad_out: Sequence[int]) -> tuple | None:
    """Per output in `grad_out` (indices of `flat_out`): (factor on its gradient, its double-backward rule) from
    the placement check's verdict (see check.checker._output_grads), or None when all take the default."""
    rules = verdict.out_grad_rules
    if rules is None:
        return None
    positions: dict[int, int] = {}  # flat index -> index among the tensor outputs (what the check numbers)
    for i, o in enumerate(flat_out):
        if isinstance(o, torch.Tensor):
            positions[i] = len(positions)
    return tuple(rules[positions[i]] for i in grad_out)


def local_tensors(flat: Sequence[Any], idx: Sequence[int], dtensors: Sequence[DTensor],
                  grad_placements: tuple[tuple[Placement, ...], ...]) -> list:
    """`flat` with each DTensor `dtensors[k]` (at `flat[idx[k]]`) replaced by its local tensor: those that need a
    gradient through one ToLocalShards node, with their gradient placements `grad_placements[k]`, the others
    directly."""
    locals_ = list(flat)
    track = torch.is_grad_enabled()
    wants = [track and d.requires_grad for d in dtensors]
    if wants and all(wants):  # the usual case: every input, one node, no sub-lists
        for i, t in zip(idx, to_local_shards(grad_placements, *dtensors), strict=True):
            locals_[i] = t
        return locals_
    need = []
    for k, (i, d) in enumerate(zip(idx, dtensors, strict=True)):
        if wants[k]:
            need.append(k)
        else:
            locals_[i] = wait_local(local_tensor_of(d))
    if need:
        shards = to_local_shards(tuple([grad_placements[k] for k in need]), *[dtensors[k] for k in need])
        for k, t in zip(need, shards, strict=True):
            locals_[idx[k]] = t
    return locals_


class ScaledGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `times` and divides it by `divided_by`: the
    compiled path's Partial('avg') scaling (``placements.algebra``), where DTensor's own conversions carry the
    gradient and do not scale it. Differentiable (a gradient penalty)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, times: int, divided_by: int) -> torch.Tensor:  # type: ignore[override]
        ctx.times, ctx.divided_by = times, divided_by
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None) -> tuple:  # type: ignore[override]
        if g is not None and ctx.times != 1:
            g = g * ctx.times
        if g is not None and ctx.divided_by != 1:
            g = g / ctx.divided_by
        return g, None, None


to_local_shards = compat.fast_apply(ToLocalShards)
from_local_shards = compat.fast_apply(FromLocalShards)
