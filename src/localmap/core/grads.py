"""A region call's gradient placements: one definition for the eager, compiled and traced paths."""

from __future__ import annotations

from typing import Any, Sequence

from torch.distributed.tensor.placement_types import Placement

from localmap.placements.algebra import grad_default

Placements = tuple[Placement, ...]


def leaf_grad_placements(held: Placements, given: Placements | None, inferred: Placements | None) -> Placements:
    """The gradient placements of one tensor input held with `held` placements: `given` (its in_grad_placements),
    else `inferred` (by the check's verdict), else the default (placements.algebra.grad_default: Partial read as
    Replicate). Where the input is held as Partial('avg') and its gradient is Replicate, each rank's local
    gradient is scaled by placements.algebra.avg_grad_scale of the two (every path applies that factor)."""
    if given is not None:
        return given
    if inferred is not None:
        return inferred
    return grad_default(held)


def inferred_of(verdict: Any, in_grad_placements: Any) -> Sequence[Placements | None] | None:
    """Per input leaf, the gradient placements the verdict inferred; None when the region states its own
    (in_grad_placements given) or was not checked."""
    if in_grad_placements is not None or verdict is None:
        return None
    return verdict.grad_placements
