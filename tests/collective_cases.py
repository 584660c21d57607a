"""Shared by the collective tests (tests/eager/test_collectives.py, tests/program/test_captured_collectives.py,
tests/distributed/test_collectives_gloo.py): one region over one mesh dim compared with one device, the table of
collective cases, and the MoE and ring-attention bodies."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from helpers import max_diff, randn

from localmap import Partial, Replicate, Shard, local_map
from localmap import collectives as C
from localmap.testing import distribute, full, on_one_device

S0, S1, R = Shard(0), Shard(1), Replicate()


def on_dim(mesh, m: int, p):
    """Placements with `p` on mesh dim m and Replicate elsewhere."""
    return [p if k == m else R for k in range(mesh.ndim)]


def run_collective_region(mesh, m, body, reference, inputs, in_pl, out_pl, atol=1e-4, grad_placements=None, **kw):
    """Run `body` as a region over mesh dim m (inputs placed by `in_pl`, Replicate on other dims), compare the
    output and every input gradient with `reference` on one device (and the gradients' placements with
    `grad_placements` when given). Returns the largest differences."""
    dim = mesh.mesh_dim_names[m] if mesh.mesh_dim_names else m
    with on_one_device():
        refs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        want = reference(*refs)
        upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
        want.backward(upstream)
    # Some cases mean what they mean on the mesh (the reference takes n); the check proves that meaning on the
    # call's mesh (docs/check-verdicts.md, "Bodies that read the mesh on purpose"), so the default check runs and
    # an "unproven" warning fails the case.
    region = local_map(lambda *a: body(dim, *a), on_dim(mesh, m, out_pl), tuple(on_dim(mesh, m, p) for p in in_pl),
                       device_mesh=mesh, **kw)
    dts = [distribute(t, mesh, on_dim(mesh, m, p), requires_grad=t.is_floating_point()) for t, p in zip(inputs, in_pl)]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = region(*dts)
    unproven = [str(w.message) for w in said if "unproven" in str(w.message)]
    assert not unproven or kw.get("check") is not None, unproven
    out_grad_pl = [R if isinstance(p, Partial) else p for p in out.placements]
    out.backward(distribute(upstream, mesh, out_grad_pl))
    if grad_placements is not None:
        assert [tuple(d.grad.placements) for d in dts] == [tuple(p) for p in grad_placements]
    diffs = {"out": max_diff(full(out), want)}
    for k, (d, r) in enumerate(zip(dts, refs)):
        if r.grad is not None:
            diffs[f"grad{k}"] = max_diff(full(d.grad), r.grad)
    assert all(v <= atol for v in diffs.values()), diffs
    return diffs


def blocks(x, n):
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


# (name, body(dim, *local), reference(n)(*global), input shapes, in placements, out placement)
CASES = [
    ("all_reduce_sum", lambda d, x: C.all_reduce(x, d), lambda n: lambda x: blocks(x, n).sum(0),
     [(8, 6)], [S0], R),
    ("all_reduce_avg", lambda d, x: C.all_reduce(x, d, "avg"), lambda n: lambda x: blocks(x, n).mean(0),
     [(8, 6)], [S0], R),
    ("all_reduce_max", lambda d, x: C.all_reduce(x, d, "max"), lambda n: lambda x: blocks(x, n).amax(0),
     [(8, 6)], [S0], R),
    ("all_reduce_min", lambda d, x: C.all_reduce(x, d, "min"), lambda n: lambda x: blocks(x, n).amin(0),
     [(8, 6)], [S0], R),
    ("all_reduce_of_partial", lambda d, x, w: C.all_reduce(x @ w, d), lambda n: lambda x, w: x @ w,
     [(4, 8), (8, 6)], [S1, S0], R),
    ("all_gather_dim0", lambda d, q, k: q @ C.all_gather(k, d, 0).T, lambda n: lambda q, k: q @ k.T,
     [(8, 6), (8, 6)], [S0, S0], S0),
    ("all_gather_dim1", lambda d, x: x.T @ C.all_gather(x, d, 1), lambda n: lambda x: x.T @ x,
     [(6, 8)], [S1], S0),
    ("reduce_scatter_sum", lambda d, a, b: C.reduce_scatter(a @ b, d, 0), lambda n: lambda a, b: a @ b,
     [(8, 8), (8, 8)], [S1, S0], S0),
    ("reduce_scatter_avg_dim1", lambda d, a, b: C.reduce_scatter(a @ b, d, 1, "avg"),
     lambda n: lambda a, b: (a @ b) / n, [(8, 8), (8, 8)], [S1, S0], S1),
    ("all_to_all_rows_to_cols", lambda d, x: C.all_to_all(x, d, 1, 0), lambda n: lambda x: x * 1,
     [(8, 8)], [S0], S1),
    ("all_to_all_cols_to_rows", lambda d, x: C.all_to_all(x, d, 0, 1), lambda n: lambda x: x * 1,
     [(8, 8)], [S1], S0),
    ("all_to_all_single_even", lambda d, x: C.all_to_all_single(x, d),
     lambda n: lambda x: x.reshape(n, n, -1, x.shape[1]).transpose(0, 1).reshape(x.shape), [(16, 3)], [S0], S0),
    ("ppermute_reverse", lambda d, x: C.ppermute(x, d, [(r, C.axis_size(d) - 1 - r) for r in range(C.axis_size(d))]),
     lambda n: lambda x: blocks(x, n).flip(0).reshape(x.shape), [(8, 6)], [S0], S0),
    ("shift_plus_1", lambda d, x: C.shift(x, d, 1), lambda n: lambda x: torch.roll(x, x.shape[0] // n, 0),
     [(8, 6)], [S0], S0),
    ("shift_minus_1", lambda d, x: C.shift(x, d, -1), lambda n: lambda x: torch.roll(x, -(x.shape[0] // n), 0),
     [(8, 6)], [S0], S0),
    ("axis_index", lambda d, x: x * (1 + C.axis_index(d)),
     lambda n: lambda x: x * (1 + torch.arange(n).repeat_interleave(x.shape[0] // n)).unsqueeze(1),
     [(8, 6)], [S0], S0),
    ("axis_size", lambda d, x: x * C.axis_size(d), lambda n: lambda x: x * n, [(8, 6)], [S0], S0),
    ("pvary_after_all_reduce", lambda d, x: x * C.pvary(C.all_reduce(x.sum(0, keepdim=True), d), d),
     lambda n: lambda x: x * x.sum(0, keepdim=True), [(8, 6)], [S0], S0),
]


TOP_K = 2


def moe_experts(x, w_router, w1, w2):
    """Expert-parallel MoE on one rank: route each token to its top-k experts, send it to the ranks holding them
    (all_to_all_single with data-dependent splits), run the local experts, send results back, combine."""
    n, e_local = C.axis_size("ep"), w1.shape[0]
    probs = torch.softmax(x @ w_router, dim=-1)
    weights, experts = probs.topk(TOP_K, dim=-1)  # [t, k]
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)  # token copies grouped by expert, so by destination rank
    sent = x.repeat_interleave(TOP_K, dim=0).index_select(0, order)
    counts = F.one_hot(flat, n * e_local).sum(0)  # tokens this rank sends to each expert
    recv_counts = C.all_to_all_single(counts, "ep")  # [src rank, local expert] tokens arriving
    in_splits = counts.view(n, e_local).sum(1).tolist()
    out_splits = recv_counts.view(n, e_local).sum(1).tolist()
    recv = C.all_to_all_single(sent, "ep", out_splits, in_splits)
    expert_of_row = torch.arange(e_local).repeat(n).repeat_interleave(recv_counts, output_size=recv.shape[0])
    out = torch.zeros_like(recv)
    for e in range(e_local):  # every local expert on every row, kept where the row is its own (static shapes)
        out = out + (expert_of_row == e).unsqueeze(1) * (F.silu(recv @ w1[e]) @ w2[e])
    back = C.all_to_all_single(out, "ep", in_splits, out_splits)
    unsorted = back.index_select(0, order.argsort())  # token order again, with a size known from x's
    return (unsorted.view(-1, TOP_K, x.shape[1]) * weights.unsqueeze(-1)).sum(1)


def moe_reference(x, w_router, w1, w2):
    probs = torch.softmax(x @ w_router, dim=-1)
    weights, experts = probs.topk(TOP_K, dim=-1)
    outs = torch.stack([F.silu(x @ w1[e]) @ w2[e] for e in range(w1.shape[0])], 1)  # [t, E, d]
    picked = outs.gather(1, experts.unsqueeze(-1).expand(-1, -1, x.shape[1]))
    return (picked * weights.unsqueeze(-1)).sum(1)


MOE_PLACEMENTS = dict(out_placements=[S0], in_placements=([S0], [R], [S0], [S0]))


def moe_inputs(tokens=16, dim=8, experts=8, hidden=12):
    return [randn(tokens, dim), randn(dim, experts), randn(experts, dim, hidden) / 3, randn(experts, hidden, dim) / 3]


def ring_attention(q, k, v):
    """Non-causal attention over a sequence sharded on dim 2 of [batch, heads, seq, head_dim] ('cp'): keys and
    values travel the ring with shift while each rank keeps a running (max, sum, output) for its queries."""
    scale = q.shape[-1] ** -0.5
    m = torch.full(q.shape[:-1] + (1,), -math.inf)
    s = torch.zeros(q.shape[:-1] + (1,))
    o = torch.zeros_like(q)
    for step in range(C.axis_size("cp")):
        scores = (q @ k.transpose(-1, -2)) * scale
        m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
        p = torch.exp(scores - m_new)
        correction = torch.exp(m - m_new)
        s = s * correction + p.sum(-1, keepdim=True)
        o = o * correction + p @ v
        m = m_new
        if step + 1 < C.axis_size("cp"):
            k, v = C.shift(k, "cp", 1), C.shift(v, "cp", 1)
    return o / s
