"""Cost of building region graphs: localmap's operator against PyTorch's local_map operator, in one run.

A model of L identical blocks, each one region (``relu(x @ w) * 2`` on tokens sharded over 'tp', the weight
replicated), is traced forward+backward with ``make_fx`` on fake tensors, regions deferred. Each block gets its
own body GraphModule (as a front end such as Dynamo produces), traced before timing, so both operators get the
same inputs. The time is the whole trace; the difference between the operators is the building of each
region's joint forward/backward graphs and their partitioning, which localmap does once per distinct region.

Printed: median seconds over repeats for L = 1, 8, 32, and localmap / PyTorch. Also localmap through its
front end (``localmap.local_map`` on plain tensors, which traces each body itself).
Run: ``.venv/bin/python benchmarks/bench_regions.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._higher_order_ops import local_map as torch_hop_module
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import Replicate, Shard
from torch.fx.experimental.proxy_tensor import make_fx

import localmap
from localmap.hop import defer_inlining, local_map_hop
from localmap.testing import fake_mesh

TOKENS, DIM = 256, 64


def block(x: torch.Tensor, w: torch.Tensor) -> tuple:
    return (torch.relu(x @ w) * 2,)


def make_bodies(n: int, mesh) -> list:
    bodies = []
    for _ in range(n):
        body = make_fx(block)(torch.randn(TOKENS // mesh.size(), DIM), torch.randn(DIM, DIM))
        body.meta["local_map_kwargs"] = {
            "in_placements": ((Shard(0),), (Replicate(),)), "out_placements": ((Shard(0),),),
            "in_grad_placements": None, "device_mesh": mesh,
        }
        bodies.append(body)
    return bodies


def trace(hop, defer, bodies, x, ws) -> float:
    def train(x, *ws):
        h = x
        for body, w in zip(bodies, ws):
            h = hop(body, h, w)[0]
        loss = h.sum()
        return torch.autograd.grad(loss, [x, *ws])

    t0 = time.perf_counter()
    with defer():
        make_fx(train, tracing_mode="fake")(x, *ws)
    return time.perf_counter() - t0


def trace_frontend(mesh, layers: int, x, ws) -> float:
    region = localmap.local_map(lambda a, b: torch.relu(a @ b) * 2, [Shard(0)], ([Shard(0)], [Replicate()]),
                                device_mesh=mesh)

    def train(x, *ws):
        h = x
        for w in ws:
            h = region(h, w)
        return torch.autograd.grad(h.sum(), [x, *ws])

    t0 = time.perf_counter()
    with defer_inlining():
        make_fx(train, tracing_mode="fake")(x, *ws)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with fake_mesh(8, ("tp",)) as mesh:
        print(f"torch {torch.__version__}; L identical blocks relu(x @ w) * 2, x {TOKENS}x{DIM} sharded over 8 "
              f"ranks; median of {args.repeats} traces, seconds")
        print(f"{'L':>4}{'pytorch hop':>14}{'localmap hop':>14}{'ratio':>8}{'localmap front end':>20}"
              f"{'graphs built':>14}")
        with FakeTensorMode():  # warm-up: first-use imports (partitioner, inductor config) for both operators
            x = torch.randn(TOKENS, DIM, requires_grad=True)
            w = [torch.randn(DIM, DIM, requires_grad=True)]
        trace(local_map_hop, defer_inlining, make_bodies(1, mesh), x, w)
        trace(torch_hop_module.local_map_hop, torch_hop_module.defer_inlining, make_bodies(1, mesh), x, w)
        for layers in (1, 8, 32):
            times = {"pytorch": [], "localmap": [], "frontend": []}
            built = 0
            for _ in range(args.repeats):
                with FakeTensorMode():
                    x = torch.randn(TOKENS, DIM, requires_grad=True)
                    ws = [torch.randn(DIM, DIM, requires_grad=True) for _ in range(layers)]
                localmap.clear_caches()  # every repeat starts cold: the cache must pay off within one trace
                before = localmap.cache_info()["regions_built"]
                times["localmap"].append(trace(local_map_hop, defer_inlining, make_bodies(layers, mesh), x, ws))
                built = localmap.cache_info()["regions_built"] - before
                times["pytorch"].append(trace(torch_hop_module.local_map_hop, torch_hop_module.defer_inlining,
                                              make_bodies(layers, mesh), x, ws))
                localmap.clear_caches()
                times["frontend"].append(trace_frontend(mesh, layers, x, ws))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{layers:>4}{med['pytorch']:>14.3f}{med['localmap']:>14.3f}"
                  f"{med['localmap'] / med['pytorch']:>8.2f}{med['frontend']:>20.3f}{built:>14}")


if __name__ == "__main__":
    main()
