"""torch.compile of a model with localmap regions against the same model with PyTorch's local_map, one run.

Setup: a 1-rank gloo mesh on loopback; a 4-layer MLP whose layers are regions (``relu(x @ w1) @ w2`` on
sharded activations and Replicate weights), compiled with ``torch.compile(fullgraph=True)`` (inductor by
default), a forward and backward per step. localmap runs with its placement check on (the default) and infers
the weights' gradient placements (Partial); PyTorch's local_map is given those placements as
``in_grad_placements``, so both compute the same thing. For each variant the script measures, in interleaved
rounds (the machine is shared and noisy):

  compile  the first step after ``torch.compiler.reset()`` and ``localmap.clear_caches()`` (Dynamo, the
           trace-time placement check for localmap, AOT autograd, the backend), minus a warm step's time;
           inductor's on-disk caches are off, so each round compiles as a fresh process does. With
           ``--warm-caches`` a round is a recompile instead: inductor's and localmap's caches are kept
  step     a compiled forward+backward step, median over all rounds' calls (the two variants' calls
           interleaved in chunks)

and prints medians and localmap / PyTorch ratios (targets: step <= 1.0, compile <= 1.2).
Run: ``.venv/bin/python benchmarks/bench_compile.py [--calls N] [--rounds R] [--backend aot_eager] [--warm-caches]``.
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

LAYERS, BATCH, DIM, HIDDEN = 4, 64, 128, 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlp(a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.relu(a @ w1) @ w2


def _model(mesh, which: str):
    """step(x, weights) -> loss with one region per layer, written with `which` local_map."""
    S0, R = [Shard(0)], [Replicate()]
    if which == "localmap":
        region = localmap.local_map(_mlp, S0, (S0, R, R), device_mesh=mesh)
    else:
        region = torch_local_map(_mlp, S0, (S0, R, R), (S0, [Partial()], [Partial()]), mesh)

    def step(x, weights):
        for w1, w2 in weights:
            x = x + region(x, w1, w2)
        return (x ** 2).mean()
    return step


def _run(fn, x, weights) -> None:
    for w1, w2 in weights:
        w1.grad = w2.grad = None
    fn(x, weights).backward()


def _samples(fn, x, weights, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        _run(fn, x, weights)
        out.append(time.perf_counter() - t0)
    return out


def _inputs(mesh):
    torch.manual_seed(0)
    R = [Replicate()]
    x = distribute_tensor(torch.randn(BATCH, DIM), mesh, [Shard(0)])
    weights = [(distribute_tensor(torch.randn(DIM, HIDDEN) / DIM ** 0.5, mesh, R).requires_grad_(),
                distribute_tensor(torch.randn(HIDDEN, DIM) / HIDDEN ** 0.5, mesh, R).requires_grad_())
               for _ in range(LAYERS)]
    return x, weights


def _compile(mesh, name: str, backend: str, warm: bool) -> tuple[float, object, tuple]:
    """(seconds to the end of the first step, the compiled step, its inputs) of a fresh compilation of
    `name`'s model (Dynamo's caches cleared, and localmap's unless `warm`)."""
    torch.compiler.reset()
    if not warm:
        localmap.clear_caches()
    x, weights = _inputs(mesh)
    fn = torch.compile(_model(mesh, name), fullgraph=True, backend=backend)
    t0 = time.perf_counter()
    _run(fn, x, weights)
    return time.perf_counter() - t0, fn, (x, weights)


def _same_values(mesh, backend: str) -> None:
    """Both compiled models give the same loss and gradients (the benchmark compares equal work)."""
    got = []
    for name in ("pytorch", "localmap"):
        torch.compiler.reset()
        x, weights = _inputs(mesh)
        _run(torch.compile(_model(mesh, name), fullgraph=True, backend=backend), x, weights)
        got.append([w.grad.full_tensor() for pair in weights for w in pair])
        assert all(w.grad.placements == (Partial(),) for pair in weights for w in pair)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*got))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200, help="timed compiled steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5, help="fresh compilations per variant")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--warm-caches", action="store_true",
                        help="keep inductor's on-disk caches and localmap's check cache across rounds (a recompile)")
    args = parser.parse_args()
    if not args.warm_caches:  # every round compiles as a fresh process would (read when inductor is imported)
        os.environ.update(TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        _same_values(mesh, args.backend)
        compile_s: dict[str, list[float]] = {"pytorch": [], "localmap": []}
        step_s: dict[str, list[float]] = {"pytorch": [], "localmap": []}
        for _ in range(args.rounds):
            compiled = {}
            for name in compile_s:
                seconds, fn, inputs = _compile(mesh, name, args.backend, args.warm_caches)
                compiled[name] = (fn, inputs)
                warm = _samples(fn, *inputs, 20)  # warm-up; then what a step costs in the first step is known
                compile_s[name].append(seconds - statistics.median(warm[10:]))
            for _ in range(10):  # steps interleaved in chunks: both variants see the same machine load
                for name, (fn, inputs) in compiled.items():
                    step_s[name] += _samples(fn, *inputs, args.calls // 10)
        print(f"torch {torch.__version__}, 1-rank gloo mesh, torch.compile(fullgraph=True, backend={args.backend!r}), "
              f"{LAYERS} region layers of {BATCH}x{DIM} @ {DIM}x{HIDDEN} @ {HIDDEN}x{DIM}, forward+backward, "
              f"{args.rounds} rounds x {args.calls} steps")
        print(f"{'measure':<22}{'pytorch':>12}{'localmap':>12}{'ratio':>8}{'target':>8}")
        for label, samples, unit, scale, target in (("compiled step", step_s, "us", 1e6, 1.0),
                                                    ("compile (first step)", compile_s, "s", 1.0, 1.2)):
            pt, lm = statistics.median(samples["pytorch"]), statistics.median(samples["localmap"])
            print(f"{label + ' (' + unit + ')':<22}{pt * scale:>12.3f}{lm * scale:>12.3f}{lm / pt:>8.2f}"
                  f"{'<= ' + str(target):>8}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
