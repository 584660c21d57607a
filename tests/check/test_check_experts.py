"""Routed rows that meet the experts of the rank they land on (issue 20: the expert-parallel MoE): rows sorted by
their expert ids, sent with split sizes read by .tolist() to the rank holding their expert, labelled there with
local expert ids built from the exchanged counts, run through this rank's shard of the expert stack, sent back
and un-permuted. Right programs are proven under check="strict" (eagerly on a simulated mesh and in a trace
with no values) and match one device in values and gradients; a program that breaks one link of the chain is
never proven (and where the test where the proof stops runs, it finds the difference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import R, S0, proven_like_one_device, randn
from localmap import LocalMapError, local_map
from localmap import collectives as C
from localmap.testing import distribute, on_one_device



def _experts(x, w1, w2, e):
    """Row i of x through expert e[i] (every row through every expert, then the row's own picked)."""
    y = F.gelu(x.unsqueeze(0) @ w1) @ w2
    return y[e, torch.arange(x.shape[0])]


def _route(x, router):
    weight, expert = F.softmax(x @ router, dim=-1).max(dim=-1)
    return weight, expert


def dense(x, router, w1, w2):
    """One device: every expert over the whole stack."""
    weight, expert = _route(x, router)
    return _experts(x, w1, w2, expert) * weight.unsqueeze(-1)


def _dispatch(x, keys, local, dim, *, labels_from="got", descending=False, splits_swapped=False):
    ranks = C.axis_size(dim)
    order = keys.argsort(stable=True, descending=descending)
    counts = torch.bincount(keys, minlength=ranks * local)
    got = C.all_to_all_single(counts, dim)
    send = counts.view(ranks, local).sum(1).tolist()
    recv = got.view(ranks, local).sum(1).tolist()
    rows = C.all_to_all_single(x[order], dim, *((send, recv) if splits_swapped else (recv, send)))
    per = got if labels_from == "got" else counts
    ids = torch.repeat_interleave(torch.arange(local).repeat(ranks), per, output_size=rows.shape[0])
    return rows, ids, order, send, recv


def expert_parallel(x, router, w1, w2, dim=0, **variant):
    weight, expert = _route(x, router)
    rows, ids, order, send, recv = _dispatch(x, expert, w1.shape[0], dim, **variant)
    back = C.all_to_all_single(_experts(rows, w1, w2, ids), dim, send, recv)
    return back.index_select(0, order.argsort()) * weight.unsqueeze(-1)


def expert_parallel_swiglu(x, router, w1, w2, dim=0):
    """SwiGLU-style experts (two matmuls by expert stacks multiplied) and rows un-permuted by ``back[inverse]``."""
    weight, expert = _route(x, router)
    rows, ids, order, send, recv = _dispatch(x, expert, w1.shape[0], dim)
    h = rows.unsqueeze(0)
    y = (F.silu(h @ w1) * (h @ w1)) @ w2
    back = C.all_to_all_single(y[ids, torch.arange(rows.shape[0])], dim, send, recv)
    return back[order.argsort()] * weight.unsqueeze(-1)


def dense_swiglu(x, router, w1, w2):
    weight, expert = _route(x, router)
    h = x.unsqueeze(0)
    y = (F.silu(h @ w1) * (h @ w1)) @ w2
    return y[expert, torch.arange(x.shape[0])] * weight.unsqueeze(-1)


def _inputs(tokens=24, dim=8, hidden=16, experts=8):
    """The same inputs whatever ran before (their own generator: the routing, and so each rank's row count,
    follows from them)."""
    gen = torch.Generator().manual_seed(0)
    return [randn(tokens, dim, generator=gen), randn(dim, experts, generator=gen),
            randn(experts, dim, hidden, generator=gen) * 0.3, randn(experts, hidden, dim, generator=gen) * 0.3]


EP_1D = ([S0], [R], [S0], [S0])


def test_the_inputs_do_not_depend_on_the_draws_before():
    """Run after other tests, _inputs() gave other values (torch.manual_seed does not reseed helpers' generator):
    another routing, one rank receiving a single row, and the simulation bug below in the backward."""
    first = _inputs()
    randn(3)  # what an earlier test's inputs draw
    assert all(torch.equal(a, b) for a, b in zip(first, _inputs()))


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason="PyTorch's LocalTensor (2.13, 2.14) combines the "
                   "ranks' sym_is_contiguous answers as ints, so one contiguous rank makes the whole tensor read "
                   "as contiguous and reshape takes the view path on ranks where it cannot")
def test_a_reshape_where_one_rank_alone_is_contiguous(sim_mesh_4):
    """What a rank receiving exactly one routed row meets in the expert matmul's backward: the gradient
    (2, 16, rows) in a transposed layout, contiguous only where rows == 1, reshaped to (32, rows)."""
    from localmap.compat.simulation import simulated_value, value_on_rank

    with on_one_device():
        per_rank = {r: torch.randn(2, n, 16).transpose(1, 2) for r, n in enumerate((8, 1, 10, 5))}
    grad = simulated_value(per_rank)
    flat = grad.reshape(32, grad.shape[2])
    for r, t in per_rank.items():
        assert torch.equal(value_on_rank(flat, r), t.reshape(32, -1))


@pytest.mark.parametrize("body, reference", [(expert_parallel, dense),
                                             (expert_parallel_swiglu, dense_swiglu)],
                         ids=["index_select_inverse", "swiglu_index_inverse"])
def test_experts_sharded_over_the_dispatch_dim_are_proven(sim_mesh_4, body, reference):
    proven_like_one_device(sim_mesh_4, body, reference, _inputs(), EP_1D)


def test_tokens_over_dp_and_tp_experts_over_tp(sim_mesh_2x2):
    """Tokens sharded over both mesh dims, dispatched among the tp ranks; experts Shard(0) over tp, Replicate
    over dp; the router's gradient a Partial sum over both."""
    def body(x, router, w1, w2):
        return expert_parallel(x, router, w1, w2, "tp")

    proven_like_one_device(sim_mesh_2x2, body, dense, _inputs(), ([S0, S0], [R, R], [R, S0], [R, S0]), (S0, S0))


def test_the_traced_check_proves_it_too(fake_mesh_4):
    """No values at all (a fake process group): the split sizes are unbacked symbols, and the proof follows
    where they come from."""
    from localmap.check.function import check_function
    from localmap.compat import pytree

    inputs = _inputs(tokens=8 * 4)
    local = [inputs[0][:8], inputs[1], inputs[2][:2], inputs[3][:2]]
    specs = [tuple(p) for p in EP_1D]
    _, treespec = pytree.tree_flatten(tuple(local))
    verdict = check_function(expert_parallel, local, specs, [S0], None, fake_mesh_4, treespec, {})
    assert verdict.ok and not verdict.unproven, verdict.summary()


_NOT_PROVEN = "is unproven|differs from its one-rank run|refutes"


@pytest.mark.parametrize("variant", [
    dict(labels_from="counts"),    # local ids from this rank's own counts, not the exchanged ones
    dict(descending=True),         # rows sorted the other way: blocks sent to the wrong ranks
], ids=["labels_from_own_counts", "descending_sort"])
def test_a_broken_link_is_not_proven(sim_mesh_4, variant):
    def body(x, router, w1, w2):
        return expert_parallel(x, router, w1, w2, **variant)

    region = local_map(body, [S0], EP_1D, None, sim_mesh_4, check="strict")
    with pytest.raises(LocalMapError, match=_NOT_PROVEN):
        region(*[distribute(t, sim_mesh_4, p) for t, p in zip(_inputs(), EP_1D)])


def test_replicated_experts_picked_by_local_ids_are_not_proven(sim_mesh_4):
    """The whole stack on every rank, indexed by local ids (key minus this rank's first expert): the wrong
    experts. The pattern needs the stack sharded over the dispatch dim."""
    def body(x, router, w1, w2):
        weight, expert = _route(x, router)
        rows, ids, order, send, recv = _dispatch(x, expert, 2, 0)
        back = C.all_to_all_single(_experts(rows, w1, w2, ids), 0, send, recv)
        return back.index_select(0, order.argsort()) * weight.unsqueeze(-1)

    ins = ([S0], [R], [R], [R])
    region = local_map(body, [S0], ins, None, sim_mesh_4, check="strict")
    with pytest.raises(LocalMapError, match=_NOT_PROVEN):
        region(*[distribute(t, sim_mesh_4, p) for t, p in zip(_inputs(), ins)])


def test_keys_not_aligned_with_the_rows_are_not_proven(sim_mesh_4):
    """Experts chosen by local position (arange of the shard's length): on one rank the positions are global,
    so the rows meet other experts there."""
    def body(x, router, w1, w2):
        keys = torch.arange(x.shape[0]) % 8
        rows, ids, order, send, recv = _dispatch(x, keys, 2, 0)
        back = C.all_to_all_single(_experts(rows, w1, w2, ids), 0, send, recv)
        return back.index_select(0, order.argsort())

    region = local_map(body, [S0], EP_1D, None, sim_mesh_4, check="strict")
    with pytest.raises(LocalMapError, match=_NOT_PROVEN):
        region(*[distribute(t, sim_mesh_4, p) for t, p in zip(_inputs(), EP_1D)])


def test_the_demo_moe_region_is_proven(sim_mesh_2x2):
    """The demo's MoE (top-2 routing of tokens flattened from batch and sequence shards, experts over tp):
    proven under check="strict" and equal to the dense mixture on one device, values and gradients."""
    from localmap.models.demo import moe_dense, moe_expert_parallel

    S1 = torch.distributed.tensor.Shard(1)
    inputs = [randn(4, 8, 16), randn(16, 4), randn(4, 16, 32) * 0.3, randn(4, 32, 16) * 0.3]
    ins = ([S0, S1], [R, R], [R, S0], [R, S0])
    proven_like_one_device(sim_mesh_2x2, lambda x, r, a, b: moe_expert_parallel(x, r, a, b, 2),
                           lambda x, r, a, b: moe_dense(x, r, a, b, 2), inputs, ins, (S0, S1))
