"""Activation checkpointing with selective policies around regions: each region call is one region in the
captured program, its activations follow the policy (saved, or recomputed in the backward), the run matches
one device, and nothing of the checkpoint's trace state leaks out of capture."""

from __future__ import annotations


import pytest
import torch
import torch.fx.traceback as fx_traceback
from torch.utils.checkpoint import CheckpointPolicy

import localmap
from localmap.hop import local_map_hop
from localmap.models import LlamaBlock
from helpers import Checkpointed


def _save_regions_and_matmuls(ctx, op, *args, **kwargs):
    if op is local_map_hop or op == torch.ops.aten.mm.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_everything(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


def _Checkpointed(mesh, policy):
    """Two Llama blocks (attention and MLP regions each), every block checkpointed with `policy`."""
    return Checkpointed([LlamaBlock(16, 4, 32, mesh) for _ in range(2)], policy)


def _region_roles(gm):
    return [n.meta["localmap"]["role"] for n in gm.graph.nodes if n.target is local_map_hop]


@pytest.mark.parametrize("policy,recomputed", [(_save_regions_and_matmuls, 0), (_recompute_everything, 4)])
def test_selective_checkpointing_around_regions(fake_mesh_2x2, policy, recomputed):
    torch.manual_seed(0)
    model, x = _Checkpointed(fake_mesh_2x2, policy), torch.randn(4, 6, 16)
    before = dict(fx_traceback.current_meta)
    prog = localmap.capture(model, x)
    assert dict(fx_traceback.current_meta) == before  # no recompute tag left behind
    assert [r.name for r in prog.regions] == ["attention_core.0", "swiglu_mlp.0", "attention_core.1", "swiglu_mlp.1"]
    assert all(r.backward_node is not None for r in prog.regions)
    roles = _region_roles(prog.backward)
    assert roles.count("backward") == 4 and roles.count("forward") == recomputed  # the policy decides
    report = localmap.verify(model, x)
    assert report.loss_diff < 1e-5 and report.regions_checked == 4


def test_a_later_capture_under_preserve_node_meta_is_not_tagged(fake_mesh_2x2):
    torch.manual_seed(0)
    localmap.capture(_Checkpointed(fake_mesh_2x2, _recompute_everything), torch.randn(4, 6, 16))
    block = LlamaBlock(16, 4, 32, fake_mesh_2x2)
    with fx_traceback.preserve_node_meta():
        prog = localmap.capture(lambda x: block(x).sum(), torch.randn(4, 6, 16))
    assert len(prog.regions) == 2
    assert not any("recompute" in n.meta for n in prog.forward.graph.nodes)


def test_the_recomputation_reads_the_parameters_not_their_values_at_capture(fake_mesh_2x2):
    """A checkpoint recomputes the block during the backward: the captured backward must read the module's
    parameters as inputs (as the forward does), so a program captured once runs right on updated weights."""
    torch.manual_seed(0)
    model, x = _Checkpointed(fake_mesh_2x2, _recompute_everything), torch.randn(4, 6, 16)
    prog = localmap.capture(model, x)
    assert not [n.target for n in prog.backward.graph.nodes if n.op == "get_attr" and "constant" in n.target]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # a training step changed the weights after capture
    got = prog.run(x)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    with localmap.testing.on_one_device():
        loss = torch.func.functional_call(model, params, (x,))
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    assert torch.allclose(got.loss, loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(got.grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item()), name
