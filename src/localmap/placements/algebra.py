"""The placement algebra every path shares: gradient placements, average scaling, extreme Partials.

Each rule is written once here and read by the eager path, the traced operator, the checker and ``run``:

* **gradient default**: the gradient of a value held with some placements has those placements with Partial
  read as Replicate (PyTorch's own rule, reached through the fence): what DTensor delivers to a Partial value
  is the whole gradient on every rank.
* **average scaling**: a Partial('avg') value is the mean of n local values, so each local value gets 1/n of
  the value's gradient (``avg_ranks``); an input held as Partial('avg') whose gradient is given as Replicate
  carries 1/n of the value on each rank, so its gradient is n times the local one (``avg_grad_scale``).
* **whole gradients**: a Partial input's Replicate gradient is the whole on every rank, so under a double
  backward each rank gets 1/n of that gradient's own gradient (``whole_grad_ranks``).
* **extreme Partials**: a Partial(max/min) value's gradient belongs only to the rank holding the extreme, which
  no rank can tell locally; such an output that needs a gradient is refused (``extreme_grad_error``).
"""

from __future__ import annotations

from typing import Sequence

from torch.distributed.tensor import DeviceMesh
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate

from localmap.caches import register_cache
from localmap import compat
from localmap.errors import LocalMapError, fail
from localmap.placements.specs import placements_str

CACHE_LIMIT = 1024  # distinct placement tuples remembered by the memoized rules below (a model has few)

_grad_defaults: dict[tuple[Placement, ...], tuple[Placement, ...]] = register_cache(
    "grad_defaults", {}, limit=CACHE_LIMIT, eviction="keep first")
_avg_flags: dict[tuple[Placement, ...], bool] = register_cache("avg_flags", {}, limit=CACHE_LIMIT,
                                                               eviction="keep first")
_extreme_flags: dict[tuple[Placement, ...], bool] = register_cache("extreme_flags", {}, limit=CACHE_LIMIT,
                                                                   eviction="keep first")


def grad_default(placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """Gradient placements of a value held with `placements`: Partial read as Replicate (memoized: the eager
    hot path asks on every call)."""
    grad = _grad_defaults.get(placements)
    if grad is None:
        grad = compat.grad_placements_default(placements)
        if len(_grad_defaults) < CACHE_LIMIT:
            _grad_defaults[placements] = grad
    return grad


def has_avg(placements: tuple[Placement, ...]) -> bool:
    """Whether some mesh dim holds the value as Partial('avg') (memoized)."""
    hit = _avg_flags.get(placements)
    if hit is None:
        hit = any(isinstance(p, Partial) and p.reduce_op == "avg" for p in placements)
        if len(_avg_flags) < CACHE_LIMIT:
            _avg_flags[placements] = hit
    return hit


def avg_ranks(placements: Sequence[Placement], mesh: DeviceMesh) -> int:
    """Ranks averaged by the Partial('avg') placements: each local value gets 1/n of the value's gradient."""
    n = 1
    for m, p in enumerate(placements):
        if isinstance(p, Partial) and p.reduce_op == "avg":
            n *= mesh.size(m)
    return n


def avg_grad_scale(placements: Sequence[Placement] | None, grad_placements: Sequence[Placement] | None,
                   mesh: DeviceMesh) -> int:
    """Factor on the local gradient of an input held as Partial('avg') where its gradient is Replicate."""
    return _partial_to_replicate_ranks(placements, grad_placements, mesh, ("avg",))


def whole_grad_ranks(placements: Sequence[Placement] | None, grad_placements: Sequence[Placement] | None,
                     mesh: DeviceMesh) -> int:
    """Ranks over which an input held as Partial has a Replicate gradient: there each rank's local gradient is
    the whole gradient, computed once per rank. The transpose of wrapping those n equal copies as one
    Replicate value gives each rank 1/n of the wrapped value's own gradient (a double backward), the shares
    that a Partial output's gradient sums (see docs/gradients.md)."""
    return _partial_to_replicate_ranks(placements, grad_placements, mesh, ("sum", "avg"))


def _partial_to_replicate_ranks(placements: Sequence[Placement] | None,
                                grad_placements: Sequence[Placement] | None, mesh: DeviceMesh,
                                reduce_ops: tuple[str, ...]) -> int:
    """The product of the sizes of the mesh dims where the value is Partial(one of `reduce_ops`) and its
    gradient Replicate."""
    if placements is None or grad_placements is None:
        return 1
    n = 1
    for m, (p, g) in enumerate(zip(placements, grad_placements, strict=True)):
        if isinstance(p, Partial) and p.reduce_op in reduce_ops and isinstance(g, Replicate):
            n *= mesh.size(m)
    return n


def summed_partials(placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """`placements` with every Partial read as Partial('sum'): how per-rank pieces that are already scaled
    (a Partial('avg') value's 1/n shares) add up to the whole."""
    if not any(isinstance(p, Partial) and p.reduce_op != "sum" for p in placements):
        return placements
    return tuple(Partial() if isinstance(p, Partial) else p for p in placements)


def is_extreme(p: Placement) -> bool:
    """Partial(max) or Partial(min)."""
    return isinstance(p, Partial) and p.reduce_op in ("max", "min")


def has_extreme(placements: tuple[Placement, ...]) -> bool:
    """Whether some mesh dim holds the value as Partial(max/min) (memoized)."""
    hit = _extreme_flags.get(placements)
    if hit is None:
        hit = any(is_extreme(p) for p in placements)
        if len(_extreme_flags) < CACHE_LIMIT:
            _extreme_flags[placements] = hit
    return hit


def extreme_grad_error(path: str, placements: Sequence[Placement], mesh: DeviceMesh) -> LocalMapError:
    """A Partial(max/min) output that needs a gradient: only the rank holding the extreme should get it, which
    no rank can tell locally, so the gradient would reach every rank's local extreme (silently wrong)."""
    m = next(m for m, p in enumerate(placements) if is_extreme(p))
    return fail(path, f"is {placements[m]!r} and requires grad; its gradient belongs only to the rank holding "
                "the extreme, which no rank knows locally", mesh=mesh, mesh_dim=m,
                expected="a Partial(max/min) output that does not require grad",
                given=placements_str(placements),
                fix="all_reduce it (max/min) inside the region and claim Replicate, or return it detached")
