"""GPU smoke test: localmap regions on CUDA tensors over a one-rank NCCL mesh, compiled with inductor on the
device, and the eager overhead against PyTorch's local_map on the device. Prints a short table; see docs/gpu.md
for the expected output.

Run from the repository root on a machine with a CUDA build of torch:  ``python benchmarks/gpu_smoke.py``
Without a CUDA device it prints "no CUDA device: skipped" and exits 0. ``--device cpu`` runs the same checks on
the CPU (gloo, inductor's C++ backend): how the test suite exercises the script without a GPU.
Exit status: 0 when every check passed (or skipped), 1 when one failed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))  # run from a checkout

ATOL = 1e-4  # float32 on the device (TF32 is off below)


@dataclass
class Row:
    check: str
    ok: bool
    detail: str


def table(rows: list[Row]) -> str:
    """The printed table: one line per check."""
    width = max([len(r.check) for r in rows] + [5])
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{r.check:<{width}}  {'ok' if r.ok else 'FAIL':<6}  {r.detail}" for r in rows]
    return "\n".join(lines)


def largest_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.detach().float() - want.detach().float()).abs().max().item()


def median_us(fn: Callable[[], object], calls: int, rounds: int, sync: Callable[[], None]) -> float:
    """Median over rounds of the time per call (microseconds) of `calls` back-to-back calls, synchronized at the
    end of each round: the host's cost per call when the device keeps up (the inputs are small)."""
    for _ in range(max(calls // 4, 10)):  # warm-up: caches, allocator, the check's first trace
        fn()
    sync()
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call) * 1e6


def overhead_ratio(raw: float, pytorch: float, localmap: float) -> float:
    """localmap's overhead over the raw body, in units of PyTorch local_map's overhead."""
    return (localmap - raw) / (pytorch - raw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_mesh(device: str):
    """A one-rank DeviceMesh over NCCL (cuda) or gloo (cpu), dim named "tp"."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    return init_device_mesh(device, (1,), mesh_dim_names=("tp",))


def _mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


def _row_parallel(h, w):
    from localmap import collectives as C
    return C.all_reduce(h @ w, "tp")


def check_regions(mesh, device: str) -> list[Row]:
    """Regions on device tensors, values and gradients against the plain computation on the device: an MLP
    (Shard(0) rows, Replicate weights, gradients inferred Partial) and a body with an all_reduce."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    import localmap

    S0, S1, R = [Shard(0)], [Shard(1)], [Replicate()]
    gen = torch.Generator(device=device).manual_seed(0)
    x, w1, w2 = (torch.randn(*s, device=device, generator=gen) for s in ((64, 32), (32, 64), (64, 32)))
    rows = []
    region = localmap.local_map(_mlp, S0, (S0, R, R), device_mesh=mesh)
    dts = [distribute_tensor(t, mesh, p).requires_grad_() for t, p in ((x, S0), (w1, R), (w2, R))]
    region(*dts).sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, w1, w2)]
    _mlp(*refs).sum().backward()
    diff = max(largest_difference(d.grad.full_tensor(), r.grad) for d, r in zip(dts, refs))
    device_ok = all(d.to_local().device.type == device for d in dts)
    rows.append(Row("region: MLP, grads inferred", diff <= ATOL and device_ok and dts[1].grad.placements ==
                    (Partial(),), f"max grad diff {diff:.1e}, weight grad {dts[1].grad.placements[0]}"))
    h, w = (torch.randn(*s, device=device, generator=gen) for s in ((16, 32), (32, 8)))
    reduced = localmap.local_map(_row_parallel, R, (S1, [Shard(0)]), device_mesh=mesh)
    out = reduced(distribute_tensor(h, mesh, S1), distribute_tensor(w, mesh, [Shard(0)]))
    diff = largest_difference(out.full_tensor(), h @ w)
    rows.append(Row(f"region: all_reduce on {mesh.get_group().name()}", diff <= ATOL, f"max diff {diff:.1e}"))
    return rows


def check_compile(mesh, device: str) -> list[Row]:
    """The MLP region inside torch.compile(backend="inductor", fullgraph=True): loss and gradients as eager."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import localmap

    S0, R = [Shard(0)], [Replicate()]
    region = localmap.local_map(_mlp, S0, (S0, R, R), device_mesh=mesh)

    def step(x, w1, w2):
        return region(x, w1, w2).redistribute(mesh, R).pow(2).sum()

    gen = torch.Generator(device=device).manual_seed(1)
    values = [torch.randn(*s, device=device, generator=gen) for s in ((64, 32), (32, 64), (64, 32))]
    results = []
    for fn in (step, torch.compile(step, backend="inductor", fullgraph=True)):
        dts = [distribute_tensor(t, mesh, p).requires_grad_() for t, p in zip(values, (S0, R, R))]
        loss = fn(*dts)
        loss.backward()
        results.append([loss.full_tensor(), *(d.grad.full_tensor() for d in dts)])
    diff = max(largest_difference(a, b) / max(1.0, b.abs().max().item()) for a, b in zip(*results))
    return [Row("compile: inductor, fullgraph", diff <= ATOL, f"max relative diff vs eager {diff:.1e}")]


def check_overhead(mesh, device: str, calls: int, rounds: int) -> list[Row]:
    """Eager overhead against PyTorch's local_map, same DTensors, same run: forward (two Replicate 64x64 inputs,
    torch.mm) and forward+backward with a Replicate weight whose gradient is Partial (x Shard(0) @ w)."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import local_map as torch_local_map

    import localmap

    S0, R, P = [Shard(0)], [Replicate()], [Partial()]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a, b = (distribute_tensor(torch.randn(64, 64, device=device), mesh, R) for _ in range(2))
    la, lb = a.to_local(), b.to_local()
    fwd = {"raw": lambda: torch.mm(la, lb)}
    for name, make in (("pytorch", torch_local_map), ("localmap", localmap.local_map)):
        f = make(torch.mm, R, (R, R), device_mesh=mesh)
        fwd[name] = lambda f=f: f(a, b)
    x = distribute_tensor(torch.randn(64, 64, device=device), mesh, S0).requires_grad_()
    w = distribute_tensor(torch.randn(64, 64, device=device), mesh, R).requires_grad_()
    lx, lw = x.to_local().detach().requires_grad_(), w.to_local().detach().requires_grad_()
    bwd = {"raw": lambda: torch.mm(lx, lw).sum().backward()}
    for name, f in (("pytorch", torch_local_map(torch.mm, S0, (S0, R), (S0, P), mesh)),
                    ("localmap", localmap.local_map(torch.mm, S0, (S0, R), device_mesh=mesh))):
        bwd[name] = lambda f=f: f(x, w).sum().backward()
    rows = []
    for label, fns in (("forward", fwd), ("forward+backward, Partial grad", bwd)):
        med = {name: median_us(fn, calls, rounds, sync) for name, fn in fns.items()}
        ratio = overhead_ratio(med["raw"], med["pytorch"], med["localmap"])
        rows.append(Row(f"overhead: {label}", True, f"raw {med['raw']:.1f} us, pytorch {med['pytorch']:.1f} us, "
                        f"localmap {med['localmap']:.1f} us, ratio {ratio:.2f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--calls", type=int, default=500, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    import torch.distributed as dist

    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    mesh = one_rank_mesh(args.device)
    try:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"torch {torch.__version__}, {name}, one-rank {mesh.get_group().name()} mesh")
        rows = check_regions(mesh, args.device) + check_compile(mesh, args.device) + \
            check_overhead(mesh, args.device, args.calls, args.rounds)
    finally:
        dist.destroy_process_group()
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
