"""localmap.collectives inside regions: values and gradients against a single-device reference for every
collective, on 1-D and 2-D simulated meshes and on each mesh dim; the checker's rules for them; gloo processes;
capture and .run of regions that communicate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import max_diff, randn

import localmap
from localmap import LocalMapError, PlacementError, Partial, Replicate, Shard, local_map
from localmap import collectives as C
from localmap.testing import distribute, fake_mesh, full, on_one_device, run_gloo, simulated_mesh

S0, S1, R = Shard(0), Shard(1), Replicate()


def _on(mesh, m: int, p):
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
    region = local_map(lambda *a: body(dim, *a), _on(mesh, m, out_pl), tuple(_on(mesh, m, p) for p in in_pl),
                       device_mesh=mesh, **kw)
    dts = [distribute(t, mesh, _on(mesh, m, p), requires_grad=t.is_floating_point()) for t, p in zip(inputs, in_pl)]
    out = region(*dts)
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


def _blocks(x, n):
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


# (name, body(dim, *local), reference(n)(*global), input shapes, in placements, out placement)
CASES = [
    ("all_reduce_sum", lambda d, x: C.all_reduce(x, d), lambda n: lambda x: _blocks(x, n).sum(0),
     [(8, 6)], [S0], R),
    ("all_reduce_avg", lambda d, x: C.all_reduce(x, d, "avg"), lambda n: lambda x: _blocks(x, n).mean(0),
     [(8, 6)], [S0], R),
    ("all_reduce_max", lambda d, x: C.all_reduce(x, d, "max"), lambda n: lambda x: _blocks(x, n).amax(0),
     [(8, 6)], [S0], R),
    ("all_reduce_min", lambda d, x: C.all_reduce(x, d, "min"), lambda n: lambda x: _blocks(x, n).amin(0),
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
     lambda n: lambda x: _blocks(x, n).flip(0).reshape(x.shape), [(8, 6)], [S0], S0),
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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mesh_shape,m", [((4,), 0), ((2, 2), 0), ((2, 2), 1)], ids=["1d", "2d-dp", "2d-tp"])
def test_collective_values_and_gradients(case, mesh_shape, m):
    name, body, reference, shapes, in_pl, out_pl = case
    names = ("tp",) if len(mesh_shape) == 1 else ("dp", "tp")
    with simulated_mesh(mesh_shape, names) as mesh:
        n = mesh.size(m)
        run_collective_region(mesh, m, body, reference(n), [randn(*s) for s in shapes], in_pl, out_pl)


def test_mesh_dim_by_index_and_explicit_mesh(mesh2d):
    x = randn(8, 6)
    run_collective_region(mesh2d, 1, lambda d, x: C.all_reduce(x, 1, mesh=mesh2d),
                          lambda x: _blocks(x, 2).sum(0), [x], [S0], R)


# ---- the checker's rules for collectives ---------------------------------------------------------------------

def test_all_reduce_result_meeting_per_rank_data_needs_pvary(mesh1d):
    def body(x):
        return x * C.all_reduce(x.sum(0, keepdim=True), 0)  # no pvary: its gradient would miss other ranks

    x = randn(8, 6)
    with pytest.raises(PlacementError, match=r"(?s)meets per-rank data in aten.mul.*pvary"):
        local_map(body, [S0], ([S0],), device_mesh=mesh1d)(distribute(x, mesh1d, [S0]))
    # The verdict is backed by numbers: unchecked, the forward is right but the gradient is not.
    with pytest.raises(AssertionError, match="grad0"):
        run_collective_region(mesh1d, 0, lambda d, x: body(x), lambda x: x * x.sum(0, keepdim=True),
                              [x], [S0], S0, check=False)


def test_all_gather_result_claimed_replicate_is_an_error_and_wrong_gradient(mesh1d):
    x = randn(8, 6)
    with pytest.raises(PlacementError, match="claimed Replicate"):
        local_map(lambda a: C.all_gather(a, 0) * 2, [R], ([S0],), device_mesh=mesh1d)(distribute(x, mesh1d, [S0]))
    with pytest.raises(AssertionError, match="grad0"):  # reduce-scatter sums n copies of a replicated gradient
        run_collective_region(mesh1d, 0, lambda d, a: C.all_gather(a, d) * 2, lambda a: a * 2, [x], [S0], R,
                              check=False)


def test_all_reduce_claimed_replicate_passes_the_check_and_partial_does_not(mesh1d):
    x = distribute(randn(8, 6), mesh1d, [S0])
    assert local_map(lambda a: C.all_reduce(a, 0), [R], ([S0],), device_mesh=mesh1d)(x).placements == (R,)
    with pytest.raises(PlacementError, match="claimed Partial"):
        local_map(lambda a: C.all_reduce(a, 0), [Partial()], ([S0],), device_mesh=mesh1d)(x)


def test_replicate_input_meeting_gathered_data_gets_partial_gradient(mesh1d):
    """A Replicate weight used with all_gather'd (per-rank-gradient) data: inferred Partial and right."""
    x, w = randn(8, 6), randn(6, 6)
    body = lambda d, x, w: C.all_gather(x, d) @ w  # noqa: E731
    out_ref = lambda x, w: (x @ w).repeat(4, 1)  # noqa: E731  every rank holds the whole product
    run_collective_region(mesh1d, 0, body, out_ref, [x, w], [S0, R], S0,
                          grad_placements=[(S0,), (Partial(),)])


def test_bad_collective_arguments_name_the_argument(mesh1d):
    x = distribute(randn(8, 6), mesh1d, [S0])
    with pytest.raises(LocalMapError, match="mesh_dim: names no dim"):
        local_map(lambda a: C.all_reduce(a, "nope"), [R], ([S0],), device_mesh=mesh1d, check=False)(x)
    with pytest.raises(LocalMapError, match="op: is not a reduction"):
        local_map(lambda a: C.all_reduce(a, 0, "prod"), [R], ([S0],), device_mesh=mesh1d, check=False)(x)
    with pytest.raises(LocalMapError, match="perm"):
        local_map(lambda a: C.ppermute(a, 0, [(0, 1), (1, 1)]), [S0], ([S0],), device_mesh=mesh1d,
                  check=False)(x)
    with pytest.raises(LocalMapError, match="mesh: a collective needs a mesh"):
        C.all_reduce(torch.ones(2), 0)


# ---- MoE expert parallelism and ring attention ------------------------------------------------------------------

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


def _moe_inputs(tokens=16, dim=8, experts=8, hidden=12):
    return [randn(tokens, dim), randn(dim, experts), randn(experts, dim, hidden) / 3, randn(experts, hidden, dim) / 3]


def test_moe_expert_parallel_region_matches_one_device():
    with simulated_mesh(4, ("ep",)) as mesh:
        inputs = _moe_inputs()
        diffs = run_collective_region(mesh, 0, lambda d, *a: moe_experts(*a), moe_reference, inputs,
                                      [S0, R, S0, S0], S0)
    assert diffs["grad1"] <= 1e-4  # the router weight's gradient (inferred Partial over 'ep') is right


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


def test_ring_attention_region_matches_one_device():
    with simulated_mesh(4, ("cp",)) as mesh:
        q, k, v = randn(2, 2, 16, 4), randn(2, 2, 16, 4), randn(2, 2, 16, 4)
        seq = Shard(2)
        run_collective_region(mesh, 0, lambda d, *a: ring_attention(*a), F.scaled_dot_product_attention,
                              [q, k, v], [seq, seq, seq], seq)


def _assert_every_collective_waited(region):
    wait = torch.ops._c10d_functional.wait_tensor.default
    found = 0
    for gm in (region.forward, region.backward):
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", "") == "_c10d_functional" \
                    and node.target is not wait:
                found += 1
                assert any(u.target is wait for u in node.users), f"{node} has no wait_tensor"
    assert found >= 4  # two all_to_all_single forward (counts, tokens) + back, and their backward


def test_moe_and_ring_attention_captured_and_run():
    with fake_mesh(4, ("ep",)) as mesh:
        moe = local_map(moe_experts, device_mesh=mesh, **MOE_PLACEMENTS)
        inputs = [t.requires_grad_() for t in _moe_inputs()]
        prog = localmap.capture(lambda *a: moe(*a).pow(2).sum(), *inputs)
        (region,) = prog.regions
        assert region.comm_bytes > 0 and region.verdict == "ok"
        _assert_every_collective_waited(region)
        report = localmap.verify(lambda *a: moe(*a).pow(2).sum(), *inputs,
                                 reference=lambda *a: moe_reference(*a).pow(2).sum(), atol=1e-4)
        assert report.loss_diff < 1e-4
    with fake_mesh(4, ("cp",)) as mesh:
        seq = [Shard(2)]
        ring = local_map(ring_attention, seq, (seq, seq, seq), device_mesh=mesh)
        qkv = [randn(2, 2, 16, 4).requires_grad_() for _ in range(3)]
        prog = localmap.capture(lambda *a: ring(*a).pow(2).sum(), *qkv)
        got = prog.run(*qkv)
        refs = [t.detach().clone().requires_grad_() for t in qkv]
        F.scaled_dot_product_attention(*refs).pow(2).sum().backward()
        for name, ref in zip(("args[0]", "args[1]", "args[2]"), refs):
            assert max_diff(got.grads[name], ref.grad) < 1e-4, name
        (region,) = prog.regions
        assert region.comm_bytes > 0


# ---- real processes ---------------------------------------------------------------------------------------------

def _collectives_on_gloo(mesh):
    """Every collective case on every mesh dim of a real gloo mesh; returns the largest difference."""
    worst = 0.0
    torch.manual_seed(0)  # the same global inputs on every rank
    for m in range(mesh.ndim):
        n = mesh.size(m)
        for name, body, reference, shapes, in_pl, out_pl in CASES:
            inputs = [torch.randn(*s) for s in shapes]
            diffs = run_collective_region(mesh, m, body, reference(n), inputs, in_pl, out_pl)
            worst = max(worst, *diffs.values())
    inputs = _moe_inputs()
    if mesh.ndim == 1:
        ep = type(mesh)("cpu", mesh.mesh, mesh_dim_names=("ep",))
        diffs = run_collective_region(ep, 0, lambda d, *a: moe_experts(*a), moe_reference, inputs,
                                      [S0, R, S0, S0], S0)
        worst = max(worst, *diffs.values())
    return worst


@pytest.mark.parametrize("world,shape", [(2, (2,)), (4, (2, 2))], ids=["2", "2x2"])
def test_collectives_under_gloo(world, shape):
    names = ("tp",) if len(shape) == 1 else ("dp", "tp")
    for worst in run_gloo(_collectives_on_gloo, world, mesh_shape=shape, mesh_dim_names=names, timeout=240):
        assert worst <= 1e-4


def _compiled_collectives(mesh):
    """torch.compile(fullgraph=True) of regions with collectives: the same values and gradients as eager."""
    from helpers import rel_diff

    torch.manual_seed(0)
    q, k = torch.randn(8, 6), torch.randn(8, 6)

    def body(q, k):
        s = C.pvary(C.all_reduce(q.sum(0, keepdim=True), "tp"), "tp")
        return (q @ C.all_gather(k, "tp").T) * s.sum() + C.shift(q, "tp", 1).sum()

    region = local_map(body, [S0], ([S0], [S0]), device_mesh=mesh)

    def step(q, k):
        return (region(q, k) ** 2).sum()

    def grads(fn):
        leaves = [distribute(t, mesh, [S0], requires_grad=True) for t in (q, k)]
        loss = fn(*leaves)
        loss.backward()
        return [full(loss)] + [full(d.grad) for d in leaves]

    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True))
    return max(rel_diff(c, e) for c, e in zip(compiled, eager))


def test_collectives_under_torch_compile():
    for diff in run_gloo(_compiled_collectives, 2, mesh_dim_names=("tp",), timeout=300):
        assert diff < 1e-5


def test_collectives_inside_a_region_count_in_its_comm_bytes():
    """Ring costs per rank: all_gather of a [2, 3] float shard over 4 ranks sends 3 * 24 bytes forward; its
    backward reduce-scatters the [8, 3] gradient, 3/4 * 96 bytes; all_reduce of a [1, 3] float sends
    2 * 3/4 * 12 forward and nothing backward (its gradient passes unchanged); pvary's backward all-reduces the
    same 12 bytes."""
    with fake_mesh(4, ("tp",)) as mesh:
        def body(q, k):
            s = C.pvary(C.all_reduce(q.sum(0, keepdim=True), "tp"), "tp")
            return q @ C.all_gather(k, "tp").T + s.sum()

        region = local_map(body, [S0], ([S0], [S0]), device_mesh=mesh)
        q, k = (torch.randn(8, 3, requires_grad=True) for _ in range(2))
        (r,) = localmap.capture(lambda q, k: region(q, k).sum(), q, k).regions
        assert r.comm_detail["collectives"] == pytest.approx(3 * 24 + 3 / 4 * 96 + 2 * 3 / 4 * 12 + 2 * 3 / 4 * 12)
