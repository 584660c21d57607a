"""Regressions found by running the suite on another PyTorch release (2.14): each passes on every tested
release and failed on 2.14 before the fix in the fence (localmap.compat) or the checker."""

from __future__ import annotations

import torch

from helpers import R, S0, max_diff, randn
from localmap import Partial, Shard, local_map
from localmap import collectives as C
from localmap.hop import defer_inlining
from localmap.testing import distribute, fake_mesh, full, simulated_mesh


def test_detach_in_a_body_cuts_the_gradient_in_traced_regions():
    """torch 2.14's make_fx rewrites detach to alias unless given a decomposition table; the region operator
    re-differentiates the traced body, so the gradient flowed through the detach (2x instead of x)."""
    with fake_mesh(1, ("tp",)) as mesh:
        f = local_map(lambda a: a * a.detach(), [R], ([R],), device_mesh=mesh)
        x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        with defer_inlining():
            f(x).sum().backward()
        assert x.grad.tolist() == [1.0, 2.0, 3.0]  # d(a * const)/da = const = x, not 2x


def test_cat_and_all_to_all_keep_replicate_on_other_mesh_dims():
    """torch 2.14 moved aten.cat to a single-mesh-dim strategy (its schema info in another table) and picks a
    free Replicate -> Shard on a mesh dim where every input is Replicate; neither may make a correct claim fail."""
    with simulated_mesh((2, 2), ("dp", "tp")) as mesh:
        x = randn(8, 8)
        f = local_map(lambda a: torch.cat([a, a], 0), [Partial(), R], ([Partial(), R],), None, mesh)
        out = f(distribute(x, mesh, [Partial(), R]))
        assert out.placements == (Partial(), R)
        assert max_diff(full(out), torch.cat([x, x], 0)) < 1e-5
        g = local_map(lambda a: C.all_to_all(a, "dp", 1, 0), [Shard(1), R], ([S0, R],), None, mesh)
        assert max_diff(full(g(distribute(x, mesh, [S0, R]))), x) < 1e-6
