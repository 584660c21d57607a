"""verify's tolerance is relative to each tensor's scale: a right program whose gradients are large (unit-variance
weights) is not a false alarm on any seed, and a real difference in one element is still found."""

from __future__ import annotations

import pytest
import torch

from helpers import R
from localmap import Partial, Shard, VerificationError, local_map, verify
from localmap.testing import fake_mesh

SEEDS = range(20)


def _mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


def _program(mesh, seed):
    """A tensor-parallel MLP (w1 by columns, w2 by rows, a partial sum out) with unit-variance weights: its
    gradients are around 1e4, where float32 rounding (4 partial sums added in another order than one device's
    matmul) is far above any fixed absolute tolerance."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=gen)
    w1 = torch.randn(64, 300, generator=gen).requires_grad_()
    w2 = torch.randn(300, 64, generator=gen).requires_grad_()
    region = local_map(_mlp, [Partial()], ([R], [Shard(1)], [Shard(0)]), None, mesh)

    def step(x, w1, w2):
        return (region(x, w1, w2) ** 2).sum()

    return step, (x, w1, w2)


def test_no_false_alarm_on_a_right_program_with_large_gradients_across_seeds():
    worst = 0.0
    with fake_mesh(4, ("tp",)) as mesh:
        for seed in SEEDS:
            step, args = _program(mesh, seed)
            report = verify(step, *args)
            assert max(report.grad_diffs.values()) > 1e-3  # float32 rounding on 4 partial sums: far above 1e-5
            worst = max(worst, *report.grad_rel_diffs.values())
            assert set(report.region_diffs) == {"_mlp.0"}
    assert worst < 1e-4


def test_a_one_element_difference_is_still_found_and_named():
    with fake_mesh(4, ("tp",)) as mesh:
        step, args = _program(mesh, 0)
        scale = verify(step, *args).grad_diffs  # the right program passes
        assert scale

        def off_by_one_element(x, w1, w2):  # the same loss, plus a term in one element of w2 only
            return step(x, w1, w2) + 50.0 * w2[3, 5]

        with pytest.raises(VerificationError, match=r"gradient of args\[2\]") as info:
            verify(step, *args, reference=off_by_one_element)
        assert "tolerance 1e-05 + 0.0001 x each tensor's largest magnitude" in str(info.value)
