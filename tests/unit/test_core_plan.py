"""The region core's per-call rules (localmap.core): gradient placements given > inferred > default, the check
run and enforced for a named path, and the one uneven refusal. Every path (eager, compiled, traced) calls these."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from localmap import LocalMapError, PlacementError
from localmap.check.verdict import Verdict
from localmap.core.grads import leaf_grad_placements
from localmap.core.plan import CallPlan, plan_call
from localmap.core.refusals import COMPILED, TRACED, uneven_error

R, S0, P = (Replicate(),), (Shard(0),), (Partial(),)


def test_gradient_placements_given_then_inferred_then_default():
    assert leaf_grad_placements(R, S0, P) == S0  # given wins over the check
    assert leaf_grad_placements(R, None, P) == P  # inferred by the check
    assert leaf_grad_placements(P, None, None) == R  # default: a Partial's gradient is Replicate


def test_plan_call_plans_each_leaf_and_skips_the_check_when_off():
    verdict = Verdict(grad_placements=(None, P, None))
    plan = plan_call(lambda: verdict, True, COMPILED, [S0, R, None], None, None)
    assert plan == CallPlan(verdict, (S0, P, None), None)
    given = plan_call(lambda: verdict, True, COMPILED, [S0, R, None], [S0, R, None], [S0, R, None])
    assert given.grads == (S0, R, None)  # stated in_grad_placements: nothing inferred replaces them

    def never() -> Verdict:
        raise AssertionError("check=False runs no check")

    assert plan_call(never, False, COMPILED, [S0, R], None, None) == CallPlan(None, (S0, R), None)


def test_plan_call_enforces_and_refuses_by_path_name():
    wrong = Verdict(problems=[PlacementError("outputs[0]: claimed Replicate, is Partial")])
    with pytest.raises(PlacementError, match="claimed Replicate"):
        plan_call(lambda: wrong, True, COMPILED, [R], None, None)
    divided = Verdict(grad_placements=(P,), out_grad_rules=((2, None),))
    with pytest.raises(LocalMapError, match="torch.compile cannot divide"):
        plan_call(lambda: divided, True, COMPILED, [R], None, None)


@pytest.mark.parametrize("path", [COMPILED, TRACED])
def test_one_uneven_refusal_names_the_path(path):
    message = str(uneven_error("args[1]", (9, 4), S0, (2,), path))
    assert message.startswith("local_map: args[1]: is unevenly sharded") and path in message
    assert "shape (9, 4) with (Shard(dim=0),) on mesh (2,)" in message and "pad the sharded dim" in message


def test_call_mode_names_the_path_of_each_call():
    """One function picks a call's path from its arguments and the context (eager.modes.call_mode)."""
    import torch

    from localmap.context import recording
    from localmap.eager.modes import CallMode, call_mode
    from localmap.hop import defer_inlining

    assert call_mode(True) is CallMode.EAGER and call_mode(False) is CallMode.PLAIN
    with defer_inlining():
        assert call_mode(False) is CallMode.DEFERRED and call_mode(True) is CallMode.EAGER
    with recording("reference"):
        assert call_mode(False) is CallMode.REFERENCE

    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x):
        seen.append((call_mode(True), call_mode(False)))
        return x + 1

    traced(torch.ones(2))
    assert seen == [(CallMode.COMPILING, CallMode.PLANNER_CAPTURE)]
