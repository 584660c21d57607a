"""A region call's plan: its check run and enforced for the path that runs it, and what follows from the verdict
(gradient placements per input leaf, the factor on each output's gradient). One function for the compiled and
traced paths; the eager path caches its verdict per input specs (eager.region) and enforces it the same way."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from localmap.check.verdict import Verdict, enforce, refuse_divided_gradients
from localmap.core.grads import Placements, inferred_of, leaf_grad_placements


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """What the check decided for one call, as every path consumes it."""

    verdict: Verdict | None  # the placement check's verdict, enforced; None when the region is unchecked
    grads: tuple[Placements | None, ...]  # per input leaf: its gradient placements (core.grads); None: no tensor
    out_factors: tuple[int, ...] | None  # per output leaf: the factor on its gradient (Verdict.out_grad_rules);
    # None: 1 for every output


def plan_call(check: Callable[[], Verdict], mode: Any, path: str, held: Sequence[Placements | None],
              given: Sequence[Placements | None] | None, in_grad_placements: Any) -> CallPlan:
    """Run `check` (the region's placement check on this call's local metadata) unless `mode` is False, enforce
    its verdict by `mode`, refuse what `path` (named in the error) cannot run, and plan each input leaf's
    gradient placements: `held` are the leaves' placements (None: not a tensor), `given` their
    in_grad_placements (None: not given)."""
    verdict = None
    if mode is not False:
        verdict = check()
        enforce(verdict, mode)
        refuse_divided_gradients(verdict, path)
    inferred = inferred_of(verdict, in_grad_placements)
    grads = tuple(None if h is None else leaf_grad_placements(
        tuple(h), None if given is None or given[i] is None else tuple(given[i]),
        None if inferred is None else inferred[i]) for i, h in enumerate(held))
    rules = None if verdict is None else verdict.out_grad_rules
    return CallPlan(verdict, grads, None if rules is None else tuple(factor for factor, _ in rules))
