"""A catalogue of region bodies, each labelled right or wrong with its expected verdict, and every verdict backed
by numbers: right bodies give single-device values and gradients (with inferred gradient placements), wrong
bodies are refused by the check and, run with the check off on the simulated mesh, give a wrong value or
gradient."""

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from helpers import P, R, S0, S1, check_region, randn
from localmap import LocalMapError, Partial, PlacementError
from localmap.testing import simulated_mesh

AVG = Partial("avg")


@dataclass
class Case:
    name: str
    body: Callable
    shapes: list
    ins: list  # placements per input (1-D mesh unless mesh2d)
    out: tuple
    verdict: str  # "ok", or a fragment of the PlacementError message
    grads: Any = None  # given in_grad_placements
    expected_grads: Any = None  # what the check infers (right cases)
    mesh2d: bool = False


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def layer_norm(x, w):
    return F.layer_norm(x, (x.shape[-1],), w, None)


CASES = [
    # ---- right ------------------------------------------------------------------------------------------------
    Case("row-parallel matmul", lambda x, w: x @ w, [(8, 6), (6, 4)], [(S0,), (R,)], (S0,), "ok",
         expected_grads=[(S0,), (P,)]),
    Case("column-parallel matmul", lambda x, w: x @ w, [(8, 6), (6, 8)], [(R,), (S1,)], (S1,), "ok",
         expected_grads=[(P,), (S1,)]),
    Case("sharded contraction to partial", lambda x, w: x @ w, [(8, 8), (8, 4)], [(S1,), (S0,)], (P,), "ok",
         expected_grads=[(S1,), (S0,)]),
    Case("elementwise product of shards", lambda a, b: a * b + a, [(8, 4), (8, 4)], [(S0,), (S0,)], (S0,), "ok"),
    Case("gelu of a shard", lambda x: F.gelu(x), [(8, 4)], [(S0,)], (S0,), "ok"),
    Case("sum over an unsharded dim", lambda x: x.sum(1), [(8, 4)], [(S0,)], (S0,), "ok"),
    Case("sum over the sharded dim is partial", lambda x: x.sum(0), [(8, 4)], [(S0,)], (P,), "ok"),
    Case("mean over the sharded dim is partial avg", lambda x: x.mean(0), [(8, 4)], [(S0,)], (AVG,), "ok"),
    Case("softmax over an unsharded dim", lambda x: x.softmax(-1), [(8, 4)], [(S0,)], (S0,), "ok"),
    Case("layer norm over unsharded features", layer_norm, [(8, 4), (4,)], [(S0,), (R,)], (S0,), "ok",
         expected_grads=[(S0,), (P,)]),
    Case("rms norm over unsharded features", rms, [(8, 4), (4,)], [(S0,), (R,)], (S0,), "ok",
         expected_grads=[(S0,), (P,)]),
    Case("linear map of a partial value", lambda x: x * 2 - x / 4, [(8, 4)], [(P,)], (P,), "ok"),
    Case("partial plus partial", lambda a, b: a + b, [(8, 4), (8, 4)], [(P,), (P,)], (P,), "ok"),
    Case("partial times replicate", lambda a, w: a * w, [(8, 4), (8, 4)], [(P,), (R,)], (P,), "ok",
         expected_grads=[(R,), (P,)]),
    Case("transpose moves the shard", lambda x: x.t().contiguous(), [(8, 4)], [(S0,)], (S1,), "ok"),
    Case("reshape keeps the shard", lambda x: x.reshape(x.shape[0], 2, 2), [(8, 4)], [(S0,)], (S0,), "ok"),
    Case("replicated compute stays replicated", lambda x, w: torch.tanh(x @ w), [(4, 4), (4, 4)], [(R,), (R,)],
         (R,), "ok", expected_grads=[(R,), (R,)]),
    Case("attention over sharded heads", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
         [(2, 4, 6, 3)] * 3, [(S1,)] * 3, (S1,), "ok"),
    Case("loss averaged over a sharded batch, claimed Partial(avg)", lambda x: x.pow(2).mean(), [(8, 4)], [(S0,)],
         (AVG,), "ok"),
    Case("autoparallel #515: weight Partial on dp, Shard(0) on tp", lambda x, w: x @ w.t(), [(8, 6), (4, 6)],
         [(S0, R), (R, S0)], (S0, S1), "ok", expected_grads=[(S0, P), (P, S0)], mesh2d=True),
    # ---- wrong ------------------------------------------------------------------------------------------------
    Case("partial sum claimed Replicate", lambda x, w: x @ w, [(8, 8), (8, 4)], [(S1,), (S0,)], (R,),
         "is a partial sum over the ranks but is claimed Replicate"),
    Case("partial sum claimed Shard", lambda x, w: x @ w, [(8, 8), (8, 4)], [(S1,), (S0,)], (S0,),
         "is a partial sum over the ranks but is claimed Shard(dim=0)"),
    Case("whole value claimed Partial", lambda x: torch.tanh(x), [(8, 4)], [(R,)], (P,),
         "already whole on every rank but is claimed Partial"),
    Case("shard claimed Replicate", lambda x: F.gelu(x), [(8, 4)], [(S0,)], (R,),
         "is a shard of dim 0 (differs across ranks) but is claimed Replicate"),
    Case("shard claimed on the wrong dim", lambda x: x * 3, [(8, 8)], [(S0,)], (S1,),
         "is a shard of dim 0 but is claimed Shard(dim=1)"),
    Case("transposed shard claimed on the old dim", lambda x: x.t() * 1, [(8, 4)], [(S0,)], (S0,),
         "is a shard of dim 1 but is claimed Shard(dim=0)"),
    Case("non-linear op on a partial value", lambda x: torch.tanh(x), [(8, 4)], [(P,)], (P,),
         "aten.tanh.default cannot take a Partial value"),
    Case("partial plus replicate", lambda a, b: a + b, [(8, 4), (8, 4)], [(P,), (R,)], (P,),
         "aten.add.Tensor cannot take a Partial value"),
    Case("partial times partial", lambda a, b: a * b, [(8, 4), (8, 4)], [(P,), (P,)], (P,),
         "aten.mul.Tensor cannot take a Partial value"),
    Case("rms norm over sharded features", rms, [(8, 8), (8,)], [(S1,), (S0,)], (S1,),
         "aten.add.Tensor cannot take a Partial value"),  # mean over the shard + eps
    Case("layer norm over sharded features", layer_norm, [(8, 8), (8,)], [(S1,), (S0,)], (S1,),
         "reduces over dim 1, which is sharded"),
    # A scan or normalization over the sharded dim returned as it is and claimed a shard of that dim: refuted
    # by the proof (check.scans; followed by a log-sum-exp merge or a prefix correction it is not matched).
    Case("softmax over the sharded dim", lambda x: x.softmax(-1), [(8, 8)], [(S1,)], (S1,),
         "computed over this rank's piece alone"),
    Case("exp minus logsumexp over the sharded dim", lambda x: (x - x.logsumexp(-1, keepdim=True)).exp(),
         [(8, 8)], [(S1,)], (S1,), "x - logsumexp(x) along dim 1, which is sharded"),
    Case("cumsum over the sharded dim", lambda x: x.cumsum(1), [(8, 8)], [(S1,)], (S1,),
         "cumsum along dim 1, which is sharded"),
    Case("loss averaged over a sharded batch, claimed Replicate", lambda x: x.pow(2).mean(), [(8, 4)], [(S0,)],
         (R,), "is a partial sum over the ranks but is claimed Replicate"),
    Case("replicated weight gradient claimed Replicate", lambda x, w: x @ w, [(8, 6), (6, 4)], [(S0,), (R,)],
         (S0,), "in_grad_placements for args[1]: contradicts the body: the gradient is Partial(sum)",
         grads=[(S0,), (R,)]),
    Case("sharded input gradient claimed Replicate", lambda x, w: x @ w, [(8, 6), (6, 4)], [(S0,), (R,)],
         (S0,), "in_grad_placements for args[0]: contradicts the body: the gradient is Shard(dim=0)",
         grads=[(R,), (P,)]),
    Case("#515 shape with the dp gradient claimed Replicate", lambda x, w: x @ w.t(), [(8, 6), (4, 6)],
         [(S0, R), (R, S0)], (S0, S1), "in_grad_placements for args[1]: contradicts the body",
         grads=[(S0, P), (R, S0)], mesh2d=True),
]


def test_catalogue_size():
    right = [c for c in CASES if c.verdict == "ok"]
    assert len(CASES) >= 30 and len(right) >= 15 and len(CASES) - len(right) >= 15


def _run(case, **kwargs):
    with simulated_mesh((2, 2) if case.mesh2d else 4, ("dp", "tp") if case.mesh2d else ("tp",)) as mesh:
        inputs = [randn(*s) for s in case.shapes]
        return check_region(mesh, case.body, inputs, case.ins, case.out, **kwargs)


@pytest.mark.parametrize("case", [c for c in CASES if c.verdict == "ok"], ids=lambda c: c.name)
def test_right_bodies_pass_and_match_one_device(case):
    """No error, and values and gradients equal one device's, with the gradient placements inferred."""
    _run(case, in_grad_placements=case.grads, expected_grads=case.expected_grads)


@pytest.mark.parametrize("case", [c for c in CASES if c.verdict == "unproven"], ids=lambda c: c.name)
def test_wrong_claims_where_the_proof_stops_are_refused_by_the_test(case):
    """A claim resting on a value the check cannot type: the proof stops, and the test (the region on the
    simulated mesh against its one-rank run, localmap.check.tested) refutes it with the numbers; check='strict'
    raises too. These bodies are wrong: with the check off they compute other values."""
    with pytest.raises(PlacementError, match="differs from its one-rank run") as info:
        _run(case, in_grad_placements=case.grads)
    assert "fix:" in str(info.value)
    with pytest.raises(LocalMapError):
        _run(case, in_grad_placements=case.grads, check="strict")
    with pytest.raises((AssertionError, RuntimeError)):
        _run(case, in_grad_placements=case.grads, check=False)


@pytest.mark.parametrize("case", [c for c in CASES if c.verdict not in ("ok", "unproven")], ids=lambda c: c.name)
def test_wrong_bodies_are_refused_and_really_wrong(case):
    with pytest.raises(PlacementError, match=None) as info:
        _run(case, in_grad_placements=case.grads)
    assert case.verdict in str(info.value), str(info.value)
    assert "fix:" in str(info.value)
    # The check is right: without it the region computes a wrong value or gradient.
    with pytest.raises((AssertionError, RuntimeError)):
        _run(case, in_grad_placements=case.grads, check=False)


def test_check_warn_mode_warns_and_runs():
    case = next(c for c in CASES if c.name == "shard claimed Replicate")
    with pytest.warns(UserWarning, match="claimed Replicate"):
        with pytest.raises((AssertionError, RuntimeError)):  # it runs, and is wrong
            _run(case, check="warn")


def test_untraceable_body_is_tested_on_the_call_and_runs_silently():
    """A body the tracer cannot follow (here: a custom op with no fake implementation) is settled by the test
    where no gradient placement has to be guessed: it runs silently, "tested" (before: a warning, "could not be
    checked"). Over the test's budget it still runs with that warning (test_check_runs_unchecked_over_budget)."""
    import localmap
    from helpers import doubled, max_diff
    from localmap.testing import distribute, full

    def body(x):
        return doubled(x)

    with simulated_mesh(4) as mesh:
        x = randn(8, 4)
        f = localmap.local_map(body, [S0], ([S0],))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = f(distribute(x, mesh, [S0]))
        assert max_diff(full(out), x * 2) < 1e-6
        (verdict,) = f.region.verdicts()
        assert verdict.status == "tested" and verdict.unchecked and "no fake" in verdict.unchecked, verdict.summary()


def test_check_runs_unchecked_over_budget():
    """Inputs over the test's budget: the untraceable body is not tested, and runs unchecked with a warning."""
    import localmap
    from helpers import doubled, max_diff
    from localmap.check import tested
    from localmap.testing import distribute, full

    with simulated_mesh(4) as mesh, pytest.MonkeyPatch.context() as patch:
        patch.setattr(tested, "TEST_BUDGET_ELEMENTS", 8)
        x = randn(8, 4)
        f = localmap.local_map(lambda x: doubled(x), [S0], ([S0],))
        with pytest.warns(UserWarning, match="could not be checked"):
            out = f(distribute(x, mesh, [S0]))
        assert max_diff(full(out), x * 2) < 1e-6 and f.region.verdicts()[0].status == "unchecked"
