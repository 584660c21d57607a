"""Attention whose core runs per shard: batch over 'dp', heads over 'tp'.

    localmap inspect examples/attention.py            # regions, placements, checks, costs
    localmap inspect examples/attention.py --verify   # and run it rank by rank against one device

The q/k/v/o projections are ordinary global code; only the attention core (causal SDPA) is a region, given
[batch, heads, seq, head_dim] tensors sharded Shard(0) over dp and Shard(1) over tp. SDPA works on each
(batch row, head) independently, so running it on the shards computes the shards of the global result.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from localmap import Shard, local_map

MESH = "dp=2,tp=2"
HEADS = [Shard(0), Shard(1)]  # [batch, heads, seq, head_dim]: batch over dp, heads over tp


def attention_core(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, dim, heads, mesh):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
                                              for _ in range(4))
        self.core = local_map(attention_core, out_placements=HEADS, in_placements=(HEADS, HEADS, HEADS),
                              device_mesh=mesh)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = ((x @ w).view(b, t, self.heads, d // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = self.core(q, k, v).transpose(1, 2).reshape(b, t, d)
        return (x + o @ self.wo).pow(2).mean()  # a scalar loss


def program(mesh):
    torch.manual_seed(0)
    return Attention(dim=32, heads=4, mesh=mesh), (torch.randn(4, 8, 32),)
