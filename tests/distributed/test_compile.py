"""torch.compile(fullgraph=True) of a function calling localmap.local_map on DTensors runs under gloo (2 ranks)
and gives the same values and gradients as eager."""

import pytest
import torch

from localmap.testing import run_gloo

pytestmark = pytest.mark.slow


def _compiled_vs_eager(mesh):
    from helpers import P, R, S0, S1, rel_diff
    from localmap import local_map
    from localmap.testing import distribute, full

    torch.manual_seed(0)
    x, w1, w2 = torch.randn(8, 6), torch.randn(6, 8), torch.randn(8, 6)
    up = local_map(lambda a, b: torch.relu(a @ b), [S1], ([R], [S1]), ([P], [S1]))
    down = local_map(lambda h, b: h @ b, [P], ([S1], [S0]))

    def step(x, w1, w2):
        return (down(up(x * 2, w1), w2).redistribute(mesh, [R]) ** 2).sum()

    def grads(fn):
        leaves = [distribute(t, mesh, pl, requires_grad=True) for t, pl in ((x, [R]), (w1, [S1]), (w2, [S0]))]
        loss = fn(*leaves)
        loss.backward()
        return [full(loss)] + [full(d.grad) for d in leaves], [d.grad.placements for d in leaves]

    eager, eager_pl = grads(step)
    compiled, compiled_pl = grads(torch.compile(step, fullgraph=True))
    return max(rel_diff(c, e) for c, e in zip(compiled, eager)), compiled_pl == eager_pl


def test_compile_fullgraph_matches_eager():
    for diff, same_placements in run_gloo(_compiled_vs_eager, 2, timeout=300):
        assert diff < 1e-5 and same_placements
