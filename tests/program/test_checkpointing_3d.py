"""A transformer with selective activation checkpointing per block on a 3-D mesh (dp, tp, cp): regions over
attention (batch over dp, heads over tp, queries over cp) and the MLP (tokens over dp and cp, hidden over tp).
capture gives one region node per region call, the policy decides what each region saves (its saved bytes),
and run and verify match one device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

import localmap
from localmap import local_map
from localmap.hop import local_map_hop
from localmap.models import rms_norm
from localmap.testing import fake_mesh
from helpers import P, R, S0, S1, Checkpointed, rel_diff

S2 = localmap.Shard(2)
def save_attention_and_matmuls(ctx, op, *args, **kwargs):
    """torchtitan's usual policy: keep attention's outputs (here a region's: the policy sees a region as one op)
    and the matmuls', recompute the rest."""
    if op is local_map_hop or op == torch.ops.aten.mm.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def recompute_everything(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


def attention(q, k, v):
    """This rank's batch rows, heads and queries against all keys (non-causal: a query shard needs no mask
    offset)."""
    return F.scaled_dot_product_attention(q, k, v)


def mlp(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


class Block(nn.Module):
    """x [batch, seq, dim] -> same on a (dp, tp, cp) mesh."""

    def __init__(self, dim: int, heads: int, hidden: int, mesh) -> None:
        super().__init__()
        self.heads, s = heads, 1 / math.sqrt(dim)
        self.norm1, self.norm2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(dim, dim) * s) for _ in range(4))
        self.w_gate, self.w_up = nn.Parameter(torch.randn(dim, hidden) * s), nn.Parameter(torch.randn(dim, hidden) * s)
        self.w_down = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(hidden))
        q_spec, kv_spec = [S0, S1, S2], [S0, S1, R]  # [batch, heads, seq, head_dim]
        self.attention = local_map(attention, out_placements=q_spec, in_placements=(q_spec, kv_spec, kv_spec),
                                   device_mesh=mesh)
        # Tokens over dp (batch) and cp (sequence); weights column- then row-parallel over tp.
        self.mlp = local_map(mlp, out_placements=[S0, P, S1],
                             in_placements=([S0, R, S1], [R, S1, R], [R, S1, R], [R, S0, R]), device_mesh=mesh)

    def forward(self, x):
        b, t, d = x.shape
        h = rms_norm(x, self.norm1)
        q, k, v = ((h @ w).view(b, t, self.heads, d // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        x = x + self.attention(q, k, v).transpose(1, 2).reshape(b, t, d) @ self.wo
        return x + self.mlp(rms_norm(x, self.norm2), self.w_gate, self.w_up, self.w_down)


def Model(mesh, policy, layers: int = 2):
    return Checkpointed([Block(16, 4, 32, mesh) for _ in range(layers)], policy)


@pytest.fixture(scope="module")
def captured():
    """The model and its programs captured under each policy on a fake 2x2x2 (dp, tp, cp) mesh."""
    with fake_mesh((2, 2, 2), ("dp", "tp", "cp")) as mesh:
        progs = {}
        for policy in (save_attention_and_matmuls, recompute_everything):
            torch.manual_seed(0)
            model, x = Model(mesh, policy), torch.randn(4, 8, 16)
            progs[policy.__name__] = localmap.capture(model, x)
        yield mesh, model, x, progs


def test_one_region_node_per_call_and_the_policy_decides_what_is_saved(captured):
    _, _, _, progs = captured
    saving, recomputing = progs["save_attention_and_matmuls"], progs["recompute_everything"]
    for prog in (saving, recomputing):
        assert [r.name for r in prog.regions] == ["attention.0", "mlp.0", "attention.1", "mlp.1"]
        hops = [n for n in prog.forward.graph.nodes if n.target is local_map_hop]
        assert len(hops) == 4 and all(r.backward_node is not None for r in prog.regions)
        attn = prog.regions[0]
        assert attn.in_placements == ((S0, S1, S2), (S0, S1, R), (S0, S1, R)) and attn.mesh.ndim == 3
        assert attn.local_in_shapes == [[2, 2, 4, 4], [2, 2, 8, 4], [2, 2, 8, 4]]
        assert attn.in_grad_placements[1] == (S0, S1, P)  # keys meet every query shard: a partial sum over cp
    # The policy decides whether a region's outputs are saved or the region is run again in the backward; what
    # a region saves inside (its own forward/backward cut) is the same either way.
    for prog, recomputed in ((saving, 0), (recomputing, 4)):
        roles = [n.meta["localmap"]["role"] for n in prog.backward.graph.nodes if n.target is local_map_hop]
        assert roles.count("forward") == recomputed and roles.count("backward") == 4
    assert [r.activation_bytes for r in saving.regions] == [r.activation_bytes for r in recomputing.regions]
    assert saving.regions[0].activation_bytes > 0


def test_run_and_verify_match_one_device(captured):
    mesh, model, x, progs = captured
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    loss = torch.func.functional_call(model, params, (x,))  # regions inlined: one device
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for prog in progs.values():  # the same weights (seed 0) under either policy
        got = prog.run(x)
        assert rel_diff(got.loss, loss) < 1e-5
        for name, g in grads.items():
            assert rel_diff(got.grads[name], g) < 1e-4, name
    report = localmap.verify(model, x)  # the model's own policy: recompute everything
    assert report.regions_checked == 4 and not report.disagreements

