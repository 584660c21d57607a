"""Eager overhead of localmap.local_map against PyTorch's local_map, measured side by side in one run.

Setup (as in the issue): a 1-rank gloo mesh on loopback, two Replicate DTensor inputs of 64x64 float32 that
require grad, one output, body ``torch.mm``. For each variant the script times single calls and reports the
median over interleaved rounds (the machine is shared and noisy):

  raw      the body on the local tensors (no DTensor at all)
  pytorch  torch.distributed.tensor.experimental.local_map
  localmap localmap.local_map

overhead = median(variant) - median(raw). The printed ratio is localmap's overhead / PyTorch's. localmap runs
with its placement check on (the default); the last column is the check's steady-state cost: localmap minus
localmap with check=False (the check traces the body once, then each call pays a cache lookup). A last table
times forward+backward where a Replicate weight's gradient is Partial (x Shard(0) @ w Replicate): PyTorch's
local_map given ``in_grad_placements``, localmap given them, and localmap inferring them.
Run: ``make bench`` or ``.venv/bin/python benchmarks/bench_eager.py [--calls N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map as torch_local_map

import localmap


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _forward_backward(fn, inputs: tuple, grad: torch.Tensor):
    """One timed step: `fn` on `inputs` (gradients reset), then backward from `grad`."""
    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return step


def _medians(fns: dict, args: argparse.Namespace) -> dict[str, float]:
    """Median microseconds per call of each function, over interleaved rounds after a warm-up."""
    for fn in fns.values():  # warm-up: caches, allocator
        _samples(fn, 200)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            samples[name] += _samples(fn, args.calls)
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


def _partial_gradients(mesh, args: argparse.Namespace) -> None:
    """forward+backward where a Replicate weight's gradient is Partial: x Shard(0) @ w Replicate, PyTorch's
    local_map given in_grad_placements (Shard(0), Partial()), localmap given them or inferring them."""
    S0, R, P = [Shard(0)], [Replicate()], [Partial()]
    x = distribute_tensor(torch.randn(64, 64), mesh, S0).requires_grad_()
    w = distribute_tensor(torch.randn(64, 64), mesh, R).requires_grad_()
    grad = distribute_tensor(torch.randn(64, 64), mesh, S0)
    lx, lw, lgrad = x.to_local().detach().requires_grad_(), w.to_local().detach().requires_grad_(), grad.to_local()
    regions = {"pytorch": torch_local_map(torch.mm, S0, (S0, R), (S0, P), mesh),
               "given": localmap.local_map(torch.mm, S0, (S0, R), (S0, P), mesh),
               "inferred": localmap.local_map(torch.mm, S0, (S0, R), device_mesh=mesh)}

    def step(name):
        return _forward_backward(torch.mm, (lx, lw), lgrad) if name == "raw" else \
            _forward_backward(regions[name], (x, w), grad)

    step("inferred")()
    assert w.grad.placements == (Partial(),)  # the benchmark measures what it says
    med = _medians({name: step(name) for name in ("raw", "pytorch", "given", "inferred")}, args)
    pt = med["pytorch"] - med["raw"]
    print(f"{'fwd+bwd, Partial grad':<22}{'raw body':>10}{'pytorch':>10}{'given':>10}{'inferred':>10}"
          f"{'ratio given':>13}{'ratio inferred':>16}")
    print(f"{'':<22}{med['raw']:>10.1f}{med['pytorch']:>10.1f}{med['given']:>10.1f}{med['inferred']:>10.1f}"
          f"{(med['given'] - med['raw']) / pt:>13.2f}{(med['inferred'] - med['raw']) / pt:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        R = [Replicate()]
        a = distribute_tensor(torch.randn(64, 64), mesh, R).requires_grad_()
        b = distribute_tensor(torch.randn(64, 64), mesh, R).requires_grad_()
        grad = distribute_tensor(torch.randn(64, 64), mesh, R)
        la = a.to_local().detach().requires_grad_()
        lb = b.to_local().detach().requires_grad_()
        lgrad = grad.to_local()
        specs = dict(out_placements=R, in_placements=(R, R), device_mesh=mesh)
        regions = {"pytorch": torch_local_map(torch.mm, **specs), "localmap": localmap.local_map(torch.mm, **specs),
                   "unchecked": localmap.local_map(torch.mm, check=False, **specs)}

        def forward(name):
            if name == "raw":
                return lambda: torch.mm(la, lb)
            f = regions[name]
            return lambda: f(a, b)

        def forward_backward(name):
            return _forward_backward(torch.mm, (la, lb), lgrad) if name == "raw" else \
                _forward_backward(regions[name], (a, b), grad)

        def forward_no_grad(name):
            fn = forward(name)

            def step():
                with torch.no_grad():
                    fn()
            return step

        # Same values first: the benchmark compares equal work.
        assert torch.allclose(regions["localmap"](a, b).to_local(), regions["pytorch"](a, b).to_local())

        print(f"torch {torch.__version__}, 1-rank gloo mesh, 2 inputs x 64x64 float32, body torch.mm, "
              f"{args.rounds} rounds x {args.calls} calls, medians in microseconds")
        print(f"{'mode':<22}{'raw body':>10}{'pytorch':>10}{'localmap':>10}{'pt overhead':>13}"
              f"{'lm overhead':>13}{'ratio':>8}{'check cost':>12}")
        for label, make in (("forward", forward), ("forward+backward", forward_backward),
                            ("forward, no_grad", forward_no_grad)):
            med = _medians({name: make(name) for name in ("raw", "pytorch", "localmap", "unchecked")}, args)
            pt, lm = med["pytorch"] - med["raw"], med["localmap"] - med["raw"]
            print(f"{label:<22}{med['raw']:>10.1f}{med['pytorch']:>10.1f}{med['localmap']:>10.1f}"
                  f"{pt:>13.1f}{lm:>13.1f}{lm / pt:>8.2f}{med['localmap'] - med['unchecked']:>12.1f}")
        _partial_gradients(mesh, args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
