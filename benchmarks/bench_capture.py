"""Capture time of an L-layer model: localmap.capture against PyTorch's own path, in one run.

PyTorch's path (what autoparallel does): the same model written with torch's experimental local_map, captured
by Dynamo (``dynamo_graph_capture_for_export`` with local_map wrapping enabled), then the joint forward/backward
exported by ``aot_export_joint_with_descriptors`` under PyTorch's ``defer_inlining()``. localmap's path:
``localmap.capture(model, x)``, which also partitions forward/backward and measures every region.

Model: L blocks of [attention (a region over heads) + MLP (a region over hidden)], d=256, on a fake (2, 2)
mesh (dp, tp). Printed: seconds (median of repeats) for L = 1, 8, 32, the ratio, and seconds per layer.
Run: ``.venv/bin/python benchmarks/bench_capture.py [--repeats N] [--layers 1 8 32]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import local_map as torch_local_map

import localmap
from localmap.testing import fake_mesh

DIM, HEADS, SEQ, BATCH = 256, 8, 32, 4


def attention_core(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def mlp_core(x, w1, w2):
    return F.relu(x @ w1) @ w2


class Block(nn.Module):
    def __init__(self, wrap, mesh) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(DIM, DIM) / 16) for _ in range(4))
        self.w1 = nn.Parameter(torch.randn(DIM, 4 * DIM) / 16)
        self.w2 = nn.Parameter(torch.randn(4 * DIM, DIM) / 32)
        heads = (Shard(0), Shard(1))
        # One spec per output, in a tuple: the form both torch's Dynamo path and localmap read the same way.
        self.attn = wrap(attention_core, out_placements=(heads,), in_placements=(heads, heads, heads),
                         device_mesh=mesh)
        self.mlp = wrap(mlp_core, out_placements=((Shard(0), Partial()),),
                        in_placements=((Shard(0), Replicate()), (Replicate(), Shard(1)), (Replicate(), Shard(0))),
                        device_mesh=mesh)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = ((x @ w).view(b, t, HEADS, d // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        x = x + self.attn(q, k, v).transpose(1, 2).reshape(b, t, d) @ self.wo
        return x + self.mlp(x, self.w1, self.w2)


class Model(nn.Module):
    def __init__(self, layers: int, wrap, mesh) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(wrap, mesh) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


def torch_path(layers: int, mesh) -> float:
    from torch._dynamo.functional_export import dynamo_graph_capture_for_export
    from torch._dynamo.variables.higher_order_ops import LocalMapWrappedHigherOrderVariable
    from torch._functorch.aot_autograd import aot_export_joint_with_descriptors
    from torch._higher_order_ops.local_map import defer_inlining

    model = Model(layers, torch_local_map, mesh)
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    with LocalMapWrappedHigherOrderVariable.enable():
        gm = dynamo_graph_capture_for_export(model)(x)
    with contextlib.ExitStack() as stack, defer_inlining():
        aot_export_joint_with_descriptors(stack, gm, (x,))
    return time.perf_counter() - t0


def localmap_path(layers: int, mesh) -> float:
    model = Model(layers, localmap.local_map, mesh)
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    localmap.clear_caches()  # start cold: the cache must pay off within one capture
    t0 = time.perf_counter()
    localmap.capture(model, x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with fake_mesh((2, 2), ("dp", "tp")) as mesh:
        torch_path(1, mesh), localmap_path(1, mesh)  # warm-up: imports and first-use costs of both
        print(f"torch {torch.__version__}; L blocks (attention + MLP regions), d={DIM}, fake (2, 2) mesh; "
              f"median of {args.repeats}, seconds")
        print(f"{'L':>4}{'pytorch':>10}{'localmap':>10}{'ratio':>8}{'pt s/layer':>12}{'lm s/layer':>12}")
        for layers in args.layers:
            pt = statistics.median(torch_path(layers, mesh) for _ in range(args.repeats))
            lm = statistics.median(localmap_path(layers, mesh) for _ in range(args.repeats))
            print(f"{layers:>4}{pt:>10.2f}{lm:>10.2f}{lm / pt:>8.2f}{pt / layers:>12.3f}{lm / layers:>12.3f}")


if __name__ == "__main__":
    main()
