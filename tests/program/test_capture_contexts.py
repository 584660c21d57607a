"""Capture where users run it: regions that draw random numbers, region building under any outer trace, and a
simulated mesh (the program is traced and run globally, the simulation set aside)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import localmap
from helpers import R, S0
from localmap import local_map
from localmap.hop import defer_inlining, local_map_hop
from localmap.models import LlamaBlock
from localmap.testing import on_one_device


def _dropout_mm(x, w):
    return torch.nn.functional.dropout(x @ w, 0.5, True)


def test_a_region_with_dropout_is_captured(fake_mesh_4):
    f = local_map(_dropout_mm, [S0], ([S0], [R]), None, fake_mesh_4, check=False)
    prog = localmap.capture(lambda x, w: f(x, w).sum(), torch.randn(8, 4), torch.randn(4, 4, requires_grad=True))
    (region,) = prog.regions
    assert region.backward is not None and region.backward_node is not None
    # the random mask is saved for the backward, not drawn again
    assert not any("bernoulli" in str(n.target) or "rand" in str(n.target) for n in region.backward.graph.nodes)


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_region_building_under_an_outer_trace_with_a_random_op(fake_mesh_4, tracing_mode):
    f = local_map(lambda x, w: (x @ w) * torch.rand_like(x @ w), [S0], ([S0], [R]), None, fake_mesh_4, check=False)

    def step(x, w):
        return torch.autograd.grad(f(x, w).sum(), [w])

    with defer_inlining():
        gm = make_fx(step, tracing_mode=tracing_mode)(torch.randn(8, 4), torch.randn(4, 4, requires_grad=True))
    assert sum(n.target is local_map_hop for n in gm.graph.nodes) == 2  # the region's forward and backward


class _Loss(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x).pow(2).mean()


def test_capture_run_and_verify_on_a_simulated_mesh(sim_mesh_2x2):
    with on_one_device():
        torch.manual_seed(0)
        model, x = _Loss(LlamaBlock(16, 4, 32, sim_mesh_2x2)), torch.randn(4, 6, 16)
    prog = localmap.capture(model, x)
    assert [r.name for r in prog.regions] == ["attention_core.0", "swiglu_mlp.0"]
    with on_one_device():
        report = localmap.verify(model, x)
        expected = model(x)
    assert report.regions_checked == 2 and len(report.grad_diffs) == 9 and report.loss_diff < 1e-5
    assert abs(prog.run(x).loss.item() - expected.item()) < 1e-5
