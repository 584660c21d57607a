"""The demo: a small tensor-parallel block written with local_map regions, run on a simulated mesh and
compared value by value, gradient by gradient, with the same block on one device.

Block (tokens x dim, tokens sharded unevenly across ranks where the mesh allows):
  h   = rms_norm(x) * g          region: tokens Shard(0); g Replicate, its gradient a Partial sum
  u   = gelu(h @ W1)             region: column-parallel, W1 Shard(1); h Replicate, its gradient Partial
  y   = u @ W2                   region: row-parallel, W2 Shard(0); output Partial (sums over ranks)
  out = x + y                    plain DTensor ops; loss = mean(out ** 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import local_map
from .testing import distribute, full, on_one_device, simulated_mesh
from torch.distributed.tensor import Partial, Replicate, Shard


def rms_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g


def up_proj(h: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    return F.gelu(h @ w1)


def down_proj(u: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return u @ w2


def reference_block(x, g, w1, w2):
    out = x + down_proj(up_proj(rms_norm(x, g), w1), w2)
    return (out ** 2).mean()


@dataclass
class Row:
    name: str
    placements: str
    shape: tuple
    diff: float
    scale: float

    @property
    def ok(self) -> bool:
        return self.diff <= 1e-4 * max(1.0, self.scale)


def run_demo(ranks: int = 4, tokens: int = 10, dim: int = 16, hidden: int = 32, seed: int = 0,
             print_fn=print) -> bool:
    """Run the block on a simulated `ranks`-rank mesh and against one device; True when all agree."""
    with simulated_mesh(ranks, ("tp",)) as mesh:
        with on_one_device():
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(tokens, dim, generator=gen)
            g = 1 + 0.1 * torch.randn(dim, generator=gen)
            w1 = torch.randn(dim, hidden, generator=gen) / math.sqrt(dim)
            w2 = torch.randn(hidden, dim, generator=gen) / math.sqrt(hidden)
            ref_leaves = [t.clone().requires_grad_() for t in (x, g, w1, w2)]
            ref_loss = reference_block(*ref_leaves)
            ref_loss.backward()

        S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()
        norm = local_map(rms_norm, [S0], ([S0], [R]), ([S0], [P]))
        up = local_map(up_proj, [S1], ([R], [S1]), ([P], [S1]))
        down = local_map(down_proj, [P], ([S1], [S0]), ([S1], [S0]))

        placements = {"x": [S0], "g": [R], "w1": [S1], "w2": [S0]}
        leaves = {k: distribute(t, mesh, placements[k], requires_grad=True)
                  for k, t in zip(placements, (x, g, w1, w2))}
        h = norm(leaves["x"], leaves["g"])
        y = down(up(h.redistribute(mesh, [R]), leaves["w1"]), leaves["w2"])
        out = leaves["x"] + y.redistribute(mesh, [S0])
        loss = (out ** 2).mean()
        loss.backward()

        local_rows = [int(n) for n in _rows_per_rank(leaves["x"])]
        sample = (_first(leaves["g"].grad), ref_leaves[1].grad[:4].tolist())
        rows = [Row("loss", str(tuple(loss.placements)), (), _diff(loss, ref_loss), abs(ref_loss.item()))]
        for (name, d), ref in zip(leaves.items(), ref_leaves):
            rows.append(Row(f"grad {name}", str(tuple(d.grad.placements)), tuple(d.grad.shape),
                            _diff(d.grad, ref.grad), _scale(ref.grad)))

    print_fn(f"localmap demo: tensor-parallel block on a simulated {ranks}-rank mesh ('tp'), "
             f"{tokens} tokens x {dim} (rows per rank {local_rows}), hidden {hidden}")
    print_fn(f"  loss: localmap {_first(loss)[0]:.6f}   single device {ref_loss.item():.6f}")
    print_fn("  grad g[:4]: localmap [" + ", ".join(f"{v:+.5f}" for v in sample[0]) + "]")
    print_fn("         single device [" + ", ".join(f"{v:+.5f}" for v in sample[1]) + "]")
    print_fn(f"  {'value':<8} {'placements':<22} {'shape':<10} {'max |diff|':>11}  verdict")
    for r in rows:
        print_fn(f"  {r.name:<8} {r.placements:<22} {str(r.shape):<10} {r.diff:>11.2e}  "
                 f"{'ok' if r.ok else 'MISMATCH'}")
    ok = all(r.ok for r in rows)
    print_fn(f"  {'all values and gradients match one device' if ok else 'MISMATCH against one device'}")
    return ok


def _rows_per_rank(d) -> list[int]:
    from ._compat import is_simulated, simulated_local

    local = d.to_local()
    if is_simulated(local):
        return [t.shape[0] for _, t in sorted(simulated_local(local).items())]
    return [local.shape[0]]


def _diff(d, ref: torch.Tensor) -> float:
    """Largest difference of a DTensor's global value from the reference; inf when ranks disagree on a value
    that its placements say they share (a wrong placement claim)."""
    try:
        value = full(d)
    except AssertionError:
        return math.inf
    with on_one_device():
        return (value - ref.detach()).abs().max().item()


def _first(d) -> list[float]:
    """Up to four leading entries of a DTensor's global value (rank 0's view when ranks disagree)."""
    from ._compat import is_simulated, simulated_local

    value = d.full_tensor()
    if is_simulated(value):
        value = simulated_local(value)[0]
    with on_one_device():
        return value.reshape(-1)[:4].tolist()


def _scale(t: torch.Tensor) -> float:
    with on_one_device():
        return t.abs().max().item()

