"""A deliberately wrong region: a row-parallel matmul that claims its output is Replicate.

    localmap inspect examples/wrong_region.py            # the check's verdict names the op and the fix
    localmap inspect examples/wrong_region.py --verify   # and running it shows the wrong values

`down` multiplies hidden-sharded activations by a row-sharded weight: each rank holds a partial sum of the
result, so the output is Partial() until it is summed over 'tp'. Claiming Replicate() makes every rank keep
only its own share. (check="warn" so that the program is still captured; with the default check=True the region
raises PlacementError at its first call.)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from localmap import Partial, Replicate, Shard, local_map

MESH = "tp=2"


def up(x, w1):
    return F.gelu(x @ w1)


def down(h, w2):
    return h @ w2


class MLP(nn.Module):
    def __init__(self, dim, hidden, mesh):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, hidden) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(hidden))
        self.up = local_map(up, out_placements=[Shard(1)], in_placements=([Replicate()], [Shard(1)]),
                            in_grad_placements=([Partial()], [Shard(1)]), device_mesh=mesh)
        self.down = local_map(down, out_placements=[Replicate()],  # WRONG: a partial sum; should be [Partial()]
                              in_placements=([Shard(1)], [Shard(0)]), device_mesh=mesh, check="warn")

    def forward(self, x):
        return (x + self.down(self.up(x, self.w1), self.w2)).pow(2).mean()


def program(mesh):
    torch.manual_seed(0)
    return MLP(dim=16, hidden=32, mesh=mesh), (torch.randn(8, 16),)
