"""A mixture of experts run expert-parallel: tokens travel to the rank holding their expert and back.

    localmap inspect examples/moe.py

Mesh: 'ep' ranks, each holding E / ep experts and its own slice of the tokens. The region routes each token to
its top-1 expert, counts the tokens bound for each rank, exchanges those counts (all_to_all_single), sends the
tokens with split sizes read from the counts (``.tolist()``: sizes that depend on the data), runs its experts on
what arrives, sends the results back and scales them by the router's weight.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from localmap import Partial, Replicate, Shard, collectives, local_map

MESH = "ep=4"


def experts(x, router, w1, w2, e):
    """x [rows, dim] through expert e[i] (w1 [E, dim, hidden], w2 [E, hidden, dim] hold the experts)."""
    y = F.gelu(x.unsqueeze(0) @ w1) @ w2          # every row through every expert: fine for a few experts
    return y[e, torch.arange(x.shape[0])]


def moe_expert_parallel(x, router, w1, w2):
    ranks, local = collectives.axis_size("ep"), w1.shape[0]
    weight, expert = F.softmax(x @ router, dim=-1).max(dim=-1)        # top-1 routing
    order = expert.argsort(stable=True)                                 # grouped by expert, so by rank
    counts = torch.bincount(expert, minlength=ranks * local)
    got = collectives.all_to_all_single(counts, "ep")                   # how many rows each rank sends me
    send = counts.view(ranks, local).sum(1).tolist()
    recv = got.view(ranks, local).sum(1).tolist()
    rows = collectives.all_to_all_single(x[order], "ep", recv, send)
    mine = torch.repeat_interleave(torch.arange(local).repeat(ranks), got, output_size=rows.shape[0])
    back = collectives.all_to_all_single(experts(rows, router, w1, w2, mine), "ep", send, recv)
    # Back in token order. index_select by the inverse order gives a size known from x (order's), not from the
    # data, so nothing data-dependent leaves the region.
    return back.index_select(0, order.argsort()) * weight.unsqueeze(-1)


def moe_dense(x, router, w1, w2):
    """The same layer on one device (for --verify's reference)."""
    weight, expert = F.softmax(x @ router, dim=-1).max(dim=-1)
    return experts(x, router, w1, w2, expert) * weight.unsqueeze(-1)


class MoE(nn.Module):
    def __init__(self, dim, hidden, num_experts, mesh=None, dense=False):
        super().__init__()
        self.router = nn.Parameter(torch.randn(dim, num_experts) / math.sqrt(dim))
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, dim) / math.sqrt(hidden))
        # Tokens Shard(0) over ep, experts Shard(0) over ep, the router replicated (its gradient a partial sum).
        # The check proves the Shard(0) claim: rows sorted by expert, sent to the rank holding their expert, run
        # through it, sent back and un-permuted (docs/check-rules.md, routed rows that meet the experts of the
        # rank they land on); `--verify` compares with one device as well.
        self.layer = moe_dense if dense else local_map(
            moe_expert_parallel, out_placements=[Shard(0)],
            in_placements=([Shard(0)], [Replicate()], [Shard(0)], [Shard(0)]),
            in_grad_placements=([Shard(0)], [Partial()], [Shard(0)], [Shard(0)]), device_mesh=mesh)

    def forward(self, x):
        return (x + self.layer(x, self.router, self.w1, self.w2)).pow(2).mean()


def program(mesh):
    torch.manual_seed(0)
    model = MoE(dim=16, hidden=32, num_experts=8, mesh=mesh)
    reference = MoE(dim=16, hidden=32, num_experts=8, dense=True)
    reference.load_state_dict(model.state_dict())
    return model, (torch.randn(32, 16),), reference
