"""Proofs for the patterns real code uses (issue 20): pieces cut along unsharded dims, tokens flattened over a
batch and a sharded sequence (a strided shard) summed into a loss, and warnings once per region definition
and reason. Each right program is proven (no warning) and matches one device; each wrong one is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import P, R, S0, S1, check_region, max_diff, randn
from localmap import PlacementError, UnprovenError, local_map
from localmap.testing import distribute, full
from torch.distributed.tensor import Shard


def _proven(mesh, body, inputs, in_placements, out_placements):
    """The region is proven (check="strict" refuses a claim that is only tested) without a warning and matches
    one device in values and gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_region(mesh, body, inputs, in_placements, out_placements, check="strict")


def _refused(mesh, body, inputs, in_placements, out_placements, says):
    region = local_map(body, out_placements, in_placements, None, mesh)
    with pytest.raises(PlacementError, match=says):
        region(*[distribute(t, mesh, p) for t, p in zip(inputs, in_placements)])


@pytest.mark.parametrize("cut", [
    lambda a: a.split([1, 3], dim=1)[1] * 2,
    lambda a: torch.cat([c.exp() for c in a.chunk(2, dim=1)], 1),
    lambda a: torch.stack(list(a.unbind(1))[::-1], 1),
    lambda a: a.narrow(1, 1, 2).sin(),
    lambda a: a[:, 1:3] + 1,
], ids=["split_with_sizes", "chunk", "unbind", "narrow", "slice"])
def test_pieces_cut_along_an_unsharded_dim_keep_the_shard(sim_mesh_4, cut):
    _proven(sim_mesh_4, cut, [randn(8, 4)], [[S0]], [S0])


def test_pieces_cut_along_the_sharded_dim_claimed_replicate_are_refused(sim_mesh_4):
    """Chunks of a Shard(0) input are cut out of each rank's own rows: they differ across ranks."""
    _refused(sim_mesh_4, lambda a: a.split([1, 1], dim=0)[0] * 1, [randn(8, 4)], [[S0]], [R],
             "differs across ranks but is claimed Replicate")


def test_pieces_cut_along_the_sharded_dim_claimed_shard_are_unproven_naming_the_cut(sim_mesh_4):
    """ChunkedLossWrapper's cut: each rank's chunk c is not a shard of the one-device chunk c."""
    region = local_map(lambda a: a.split([1, 1], dim=0)[0] * 1, [S0], [[S0]], None, sim_mesh_4)
    with pytest.warns(UserWarning, match="cuts dim 0, which is sharded, by local sizes"):
        region(distribute(randn(8, 4), sim_mesh_4, [S0]))


def _token_loss(h, labels):
    """torchtitan's cross-entropy body: tokens flattened over batch and a (sharded) sequence, summed."""
    return F.cross_entropy(h.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum")


def test_tokens_flattened_over_a_sharded_sequence_and_summed_are_a_partial_sum(sim_mesh_4):
    """flatten(0, 1) of [B, S/n, V] interleaves the sharded sequence (a strided shard); a sum over every token
    is a partial sum whichever tokens each rank holds."""
    labels = torch.randint(0, 10, (2, 8))
    region = local_map(_token_loss, [P], ([S1], [S1]), None, sim_mesh_4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = distribute(randn(2, 8, 10), sim_mesh_4, [S1], requires_grad=True)
        out = region(h, distribute(labels, sim_mesh_4, [S1]))

    from localmap.testing import full, on_one_device
    with on_one_device():
        ref_h = full(h).detach().clone().requires_grad_()
        ref = _token_loss(ref_h, labels)
        ref.backward()
    out.full_tensor().backward()
    assert max_diff(full(out), ref) < 1e-4
    assert max_diff(full(h.grad), ref_h.grad) < 1e-5


def test_flattened_rows_summed_per_feature_are_proven(sim_mesh_4):
    _proven(sim_mesh_4, lambda x: x.reshape(-1, x.shape[-1]).sum(0), [randn(2, 8, 4)], [[S1]], [P])


def test_tokens_flattened_over_a_sharded_sequence_claimed_shard_are_refused(sim_mesh_4):
    """The flattened rows are interleaved (batch 0's shard, then batch 1's): not a contiguous Shard(0)."""
    _refused(sim_mesh_4, lambda x: x.flatten(0, 1) * 1, [randn(2, 8, 4)], [[S1]], [S0], "interleaved")


def test_a_strided_shard_mixed_with_a_plain_shard_is_not_proven(sim_mesh_4):
    """Rows of a strided shard and of a plain Shard(0) are different rows of the global tensor: adding them is
    no shard of the one-device sum (claimed Replicate: refused)."""
    _refused(sim_mesh_4, lambda x, y: (x.flatten(0, 1) + y).sum(), [randn(2, 8, 4), randn(16, 4)],
             [[S1], [S0]], [R], "claimed Replicate")


def _cut_first(a):
    return a.split(a.shape[0] // 2, dim=0)[0] * 1


def test_an_unproven_region_warns_once_per_definition_and_reason(sim_mesh_4):
    """Checked again for other dtypes and shapes (ChunkedLossWrapper chunks float states and int labels), a
    body that stops at the same op and line warns once. (Inputs over the test's budget: the claim stays
    unproven; within it the test refutes this claim, see the next test.)"""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for x in (randn(256, 300), randn(256, 300).double(), randn(512, 160)):
            local_map(_cut_first, [S0], [[S0]], None, sim_mesh_4)(distribute(x, sim_mesh_4, [S0]))
    said = [str(w.message) for w in seen if "unproven" in str(w.message)]
    assert len(said) == 1, said
    assert "aten.split" in said[0] and "test_check_proofs.py" in said[0]


def test_pieces_cut_by_local_sizes_differ_from_one_rank_but_stay_unproven(sim_mesh_4):
    """Each rank's first half of its own shard is not the shard of the one-device first half, but a program
    may mean exactly that (ChunkedLossWrapper sums every chunk's loss): the test's difference is reported with
    its numbers and the cut, as unproven, never as a false alarm."""
    region = local_map(_cut_first, [S0], [[S0]], None, sim_mesh_4)
    with pytest.warns(UserWarning, match="(?s)unproven.*split"):
        region(distribute(randn(8, 4), sim_mesh_4, [S0]))
    assert region.region.verdicts()[0].status == "unproven"


# Pieces of a split along the sharded dim, recombined in the body: right when every piece, in order, comes back
# (cat along that dim, or all summed); wrong when one piece stands alone or the order changes. Not yet proven
# either way (docs/check-rules.md): the right ones must run and match one device, the wrong ones never pass.
_HALVES = lambda x: x.split(x.shape[1] // 2, dim=1)  # noqa: E731  (the local halves, as ChunkedLossWrapper cuts)
RIGHT_RECOMBINED = {
    "cat in order": (lambda x: torch.cat([c.exp() for c in _HALVES(x)], 1), S1),
    "every piece summed": (lambda x: sum(c.exp().sum() for c in _HALVES(x)), P),
}
WRONG_RECOMBINED = {
    "cat reversed": (lambda x: torch.cat([c.exp() for c in _HALVES(x)][::-1], 1), S1),
    "one piece summed": (lambda x: _HALVES(x)[0].exp().sum(), P),
    "one piece as a shard": (lambda x: _HALVES(x)[1].exp(), S1),
}


@pytest.mark.parametrize("name", RIGHT_RECOMBINED)
def test_pieces_of_the_sharded_dim_all_recombined_are_tested_and_match_one_device(name):
    """Never a false alarm: where the proof stops at the cut, the test (the region against its one-rank run)
    settles a body that recombines every piece in order: tested, silently, and it matches one device."""
    from localmap.testing import simulated_mesh

    body, claim = RIGHT_RECOMBINED[name]
    with simulated_mesh(2) as mesh, warnings.catch_warnings():
        warnings.simplefilter("error")
        region = local_map(body, [claim], [[S1]], None, mesh)
        x = randn(2, 8, 3)
        check_region(mesh, body, [x], [[S1]], [claim], atol=1e-4)  # float32 sums of 48 exps (~1e2): 1e-5 is rounding
        region(distribute(x, mesh, [S1]))
    assert region.region.verdicts()[0].status == "tested"


@pytest.mark.parametrize("name", [*RIGHT_RECOMBINED, *WRONG_RECOMBINED])
def test_pieces_of_the_sharded_dim_are_never_accepted_by_strict(name):
    """No claim about pieces of a split along a sharded dim is proven; a wrong recombination, or a piece used
    alone, differs from its one-rank run (which cuts the whole sequence), so the test never settles it."""
    from localmap.testing import simulated_mesh

    body, claim = {**RIGHT_RECOMBINED, **WRONG_RECOMBINED}[name]
    with simulated_mesh(2) as mesh:
        region = local_map(body, [claim], [[S1]], None, mesh, check="strict")
        with pytest.raises((UnprovenError, PlacementError)):
            region(distribute(randn(2, 8, 3), mesh, [S1]))
        settled = ("tested",) if name in RIGHT_RECOMBINED else ("unproven", "wrong")
        assert region.region.verdicts()[0].status in settled


# Every piece returned as its own output, each claimed the shard (ChunkedLossWrapper's ``(p,) * num_chunks``):
# tested as a whole, its pieces joined in order against the one-rank run's. Out of order, or with a piece
# missing or repeated, the joined pieces differ too: never settled (the split reads a shard as a unit, so the
# difference is reported unproven, with a warning, not refuted).
PIECES = {
    "every piece in order": lambda x: tuple(c.exp() for c in _HALVES(x)),
    "pieces reversed": lambda x: tuple(c.exp() for c in _HALVES(x))[::-1],
    "a piece twice": lambda x: (_HALVES(x)[0].exp(),) * 2,
    "other pieces cut": lambda x: tuple(c.exp() for c in x.split(1, dim=1)[:2]),
}


@pytest.mark.parametrize("name", PIECES)
def test_every_piece_returned_is_tested_as_a_whole_and_only_in_order(name):
    from localmap.testing import simulated_mesh

    x = randn(2, 8, 3)
    with simulated_mesh(2) as mesh:
        region = local_map(PIECES[name], ([S1], [S1]), [[S1]], None, mesh)
        xd = distribute(x, mesh, [S1], requires_grad=True)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            sum(p.sum() for p in region(xd)).backward()
        verdict = region.region.verdicts()[0]
    if name != "every piece in order":
        assert verdict.status == "unproven" and len(said) == 1 and not verdict.test.same, verdict.summary()
        return
    assert verdict.status == "tested" and not said, verdict.summary()
    assert verdict.test.where == "its 2 outputs joined in order along dim 1"
    assert max_diff(full(xd.grad), x.exp()) < 1e-4  # d/dx sum(exp(x)), every element once


# ---- gathers and scatter-adds with whole indices (torchtitan's combine, cross-entropy's index_put_) ----------

_ROWS = torch.tensor([3, 0, 3, 1, 2, 0, 1, 3])


def _combine(expert_out):
    """Expert outputs (partial sums over tp) scattered back to their tokens: torchtitan's combine."""
    rows = _ROWS[:, None].expand_as(expert_out)
    return torch.zeros(4, expert_out.shape[1]).scatter_add(0, rows, expert_out)


@pytest.mark.parametrize("body", [
    _combine,
    lambda y: torch.zeros(4, y.shape[1]).index_add(0, _ROWS, y),
    lambda y: torch.zeros(4, y.shape[1]).index_put_((_ROWS,), y, accumulate=True),
    lambda y: y.gather(0, _ROWS[:4, None].expand(4, y.shape[1])),
    lambda y: y[_ROWS] * 2,
    lambda y: F.embedding(_ROWS, y),
], ids=["scatter_add", "index_add", "index_put_accumulate", "gather", "index", "embedding"])
def test_partial_sums_gathered_or_scattered_by_whole_indices_stay_partial(sim_mesh_4, body):
    _proven(sim_mesh_4, body, [randn(8, 3)], [[P]], [P])


def test_a_partial_sum_scattered_into_a_base_that_is_not_zero_is_refused(sim_mesh_4):
    """ones + scatter(partial): each rank adds its own ones, so the sum over ranks counts them n times."""
    _refused(sim_mesh_4, lambda y: torch.ones(4, 3).index_add(0, _ROWS, y), [randn(8, 3)], [[P]], [P],
             "Partial")


def test_a_partial_sum_gathered_by_per_rank_indices_is_refused(sim_mesh_4):
    """Indices that differ per rank (sharded) pick other rows of each rank's partial sums: no partial sum of
    the one-device gather."""
    _refused(sim_mesh_4, lambda y, rows: y[rows], [randn(8, 3), _ROWS], [[P], [S0]], [P], "Partial")


@torch.library.custom_op("localmap_test::scatter_rows", mutates_args=())
def _scatter_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return out.scatter_add(0, index, src)


@_scatter_rows.register_fake
def _(out, index, src):
    return torch.empty_like(out)


_scatter_rows.register_autograd(lambda ctx, g: (g, None, g.gather(0, ctx.index)),
                                setup_context=lambda ctx, inputs, output: setattr(ctx, "index", inputs[1]))


def _custom_combine(expert_out):
    index = _ROWS[:, None].expand_as(expert_out)
    return torch.ops.localmap_test.scatter_rows(torch.zeros(4, expert_out.shape[1]), index, expert_out)


def test_a_custom_op_is_settled_by_a_registered_rule(sim_mesh_4):
    """A custom op without a rule (torchtitan's deterministic_scatter_add) is unproven; one registered line
    (docs/check-rules.md) proves it."""
    import localmap
    from localmap.check.rules import RULES

    op = torch.ops.localmap_test.scatter_rows.default
    region = local_map(_custom_combine, [P], ([P],), None, sim_mesh_4, check="strict")
    with pytest.raises(UnprovenError, match="scatter_rows"):  # the proof stops at the op (the test alone: tested)
        region(distribute(randn(8, 3), sim_mesh_4, [P]))
    localmap.register_rule(op, localmap.linear_in(values=("src",), indices=("index",), base="out"))
    try:
        localmap.clear_caches()
        _proven(sim_mesh_4, _custom_combine, [randn(8, 3)], [[P]], [P])
    finally:
        RULES.pop(op)
        localmap.clear_caches()


# ---- cat and resizing over sharded dims -----------------------------------------------------------------------

def test_cat_of_equal_shards_along_their_dim_is_interleaved_and_summed_is_partial(sim_mesh_4):
    """cat([a, b], 1) of Shard(1) pieces: rank r holds piece r of a and of b (a strided shard); summed over
    the dim it is a partial sum of the one-device sum."""
    _proven(sim_mesh_4, lambda a, b: torch.cat([a, b.exp()], 1).sum(1), [randn(3, 8), randn(3, 8)],
            [[S1], [S1]], [P])


def test_a_rope_table_cat_over_a_sharded_dim_claimed_shard_is_refused(sim_mesh_4):
    """torchtitan's rope cache: cat([cos, sin], -1) of a table sharded along that dim is no Shard(-1)."""
    _refused(sim_mesh_4, lambda f: torch.cat([f.cos(), f.sin()], -1), [randn(6, 8)], [[S1]], [S1],
             "interleaved")


def test_cat_along_an_unsharded_dim_keeps_the_shard(sim_mesh_4):
    _proven(sim_mesh_4, lambda a, b: torch.cat([a, b], 1), [randn(8, 3), randn(8, 2)], [[S0], [S0]], [S0])


def test_bilinear_resize_of_a_height_sharded_image_is_refused(sim_mesh_4):
    body = lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")  # noqa: E731
    _refused(sim_mesh_4, body, [randn(1, 2, 8, 4)], [[Shard(2)]], [Shard(2)], "interpolates along dim 2")


def test_nearest_resize_by_a_whole_factor_of_a_sharded_image_keeps_the_shard(sim_mesh_4):
    _proven(sim_mesh_4, lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), [randn(1, 2, 8, 4)],
            [[Shard(2)]], [Shard(2)])


def test_bilinear_resize_of_a_channel_sharded_image_keeps_the_shard(sim_mesh_4):
    _proven(sim_mesh_4, lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), [randn(1, 4, 4, 4)],
            [[S1]], [S1])


# ---- rank offsets: a lookup masked to this rank's rows ----------------------------------------------------------

def _vocab_lookup(table, ids):
    """Megatron's vocab-parallel embedding, the offset from axis_index: each rank looks up the ids in its rows
    and zeros the rest; summed over ranks, the one-device lookup."""
    from localmap import collectives as C

    n = table.shape[0]
    shifted = ids - C.axis_index(0) * n
    inside = (shifted >= 0) & (shifted < n)
    return F.embedding(shifted.clamp(0, n - 1), table) * inside.unsqueeze(-1).to(table.dtype)


_IDS = torch.tensor([[0, 5, 15, 9], [3, 12, 7, 1]])


def test_a_vocab_parallel_lookup_masked_by_the_rank_offset_is_a_partial_sum(sim_mesh_4):

    from localmap.testing import full, on_one_device

    table = randn(16, 3)
    region = local_map(lambda t: _vocab_lookup(t, _IDS), [P], [[S0]], None, sim_mesh_4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt = distribute(table, sim_mesh_4, [S0], requires_grad=True)
        out = region(dt)
    with on_one_device():
        ref_table = table.clone().requires_grad_()
        ref = F.embedding(_IDS, ref_table)
        upstream = torch.randn(ref.shape)
        ref.backward(upstream)
    out.backward(distribute(upstream, sim_mesh_4, [R]))
    assert max_diff(full(out), ref) < 1e-6
    assert max_diff(full(dt.grad), ref_table.grad) < 1e-6


def test_a_vocab_parallel_lookup_claimed_replicate_is_refused(sim_mesh_4):
    _refused(sim_mesh_4, lambda table: _vocab_lookup(table, _IDS), [randn(16, 3)], [[S0]], [R],
             "partial sum over the ranks but is claimed Replicate")


def test_a_lookup_shifted_by_the_wrong_offset_is_not_proven(sim_mesh_4):
    """Shifted by the rank's index times a size that is not the shard's, the mask no longer picks the rank's
    own rows: no partial sum is derived (the claim is unproven, not accepted)."""
    from localmap import collectives as C

    def body(table):
        n = table.shape[0]
        shifted = _IDS - C.axis_index(0) * (n + 1)
        inside = (shifted >= 0) & (shifted < n)
        return F.embedding(shifted.clamp(0, n - 1), table) * inside.unsqueeze(-1).to(table.dtype)

    region = local_map(body, [P], [[S0]], None, sim_mesh_4)
    with pytest.warns(UserWarning, match="unproven"):  # axis_index: the test's one-rank run is another program
        region(distribute(randn(16, 3), sim_mesh_4, [S0]))


def _not_accepted(mesh, body, table, in_placements=((S0,),), claim=P):
    """The check does not prove the region: check="strict" refuses it (unproven or wrong), never runs it."""
    region = local_map(body, [claim], [list(p) for p in in_placements], None, mesh, check="strict")
    with pytest.raises((UnprovenError, PlacementError)):
        region(distribute(table, mesh, list(in_placements[0])))


def test_a_lookup_masked_along_the_row_dim_is_not_proven(sim_mesh_4):
    """The right offset and mask, but the mask laid along each row's own dim (ids of length 4, rows of width
    4: unsqueeze(0) broadcasts id j's mask over column j of every row): not the rank's rows, never accepted."""
    from localmap import collectives as C

    ids = torch.tensor([0, 5, 15, 9])

    def body(table):
        n = table.shape[0]
        shifted = ids - C.axis_index(0) * n
        inside = (shifted >= 0) & (shifted < n)
        return F.embedding(shifted.clamp(0, n - 1), table) * inside.unsqueeze(0).to(table.dtype)

    _not_accepted(sim_mesh_4, body, randn(16, 4))


def test_a_lookup_into_unevenly_sharded_rows_is_not_proven(sim_mesh_4):
    """15 rows over 4 ranks (shards of 4, 4, 4, 3): the last rank's rows start at 12, not 3 * 3, so the offset
    coordinate * local length is wrong there; a mesh dim with uneven shards proves no offset."""
    _not_accepted(sim_mesh_4, lambda table: _vocab_lookup(table, _IDS), randn(15, 3))


def test_a_lookup_into_rows_two_mesh_dims_cut_is_not_proven(sim_mesh_2x2):
    """Rows cut by both mesh dims ([Shard(0), Shard(0)]): the shard start is not coordinate * local length on
    either dim alone."""
    _not_accepted(sim_mesh_2x2, lambda table: _vocab_lookup(table, _IDS), randn(16, 3), ((S0, S0),))


def _zeroed_gather(logits, labels, off_by=0, zero_values=True):
    """torchtitan's vocab-parallel pick of the target logit, the offset from axis_index: the ids outside this
    rank's rows set to row 0, the picked values set to zero there (``x[outside] = 0``). `off_by` moves the
    mask's lower bound (wrong for any value but 0); `zero_values` False leaves the wrong rows' values."""
    from localmap import collectives as C

    n = logits.shape[-1]
    shifted = labels - C.axis_index(0) * n
    outside = (shifted < off_by) | (shifted >= n)
    shifted[outside] = 0
    picked = logits.gather(-1, shifted.unsqueeze(-1))
    if zero_values:
        picked[outside.unsqueeze(-1)] = 0
    return picked


_LABELS = torch.tensor([0, 5, 15, 9, 3, 12])


def test_a_gather_zeroed_outside_the_rank_offset_is_a_partial_sum(sim_mesh_4):
    """``shifted[outside] = 0; picked = gather(...); picked[outside] = 0``: each rank keeps the targets in its
    rows and zeros the rest; summed over ranks, the one-device gather. Proven (strict), and it matches."""
    _proven_against(sim_mesh_4, lambda x: _zeroed_gather(x, _LABELS), lambda x: x.gather(-1, _LABELS.unsqueeze(-1)),
                    randn(6, 16), S1, P)


@pytest.mark.parametrize("variant", [{"off_by": 1}, {"zero_values": False}], ids=["mask off by one", "not zeroed"])
def test_a_gather_zeroed_by_a_wrong_mask_or_not_at_all_is_not_proven(sim_mesh_4, variant):
    """The mask's bound one row off, or the wrong rows' values left in place: not the rank's rows, never
    accepted."""
    _not_accepted(sim_mesh_4, lambda x: _zeroed_gather(x, _LABELS, **variant), randn(6, 16), ((S1,),))


# ---- all_reduce: the one-rank run's value only for partial results of its own reduction ----------------------

def _proven_against(mesh, body, ref, x, ins, claim, check="strict"):
    """The region on `x` placed `ins` (or on lists of inputs and placements; check="strict": proven, else any
    silent verdict) matches `ref` on one device in value and gradients, without a warning; returns the region."""

    from localmap.testing import full, on_one_device

    xs, placed = (x, ins) if isinstance(x, list) else ([x], [ins])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region = local_map(body, [claim], [[p] for p in placed], None, mesh, check=check)
        dxs = [distribute(t, mesh, [p], requires_grad=True) for t, p in zip(xs, placed)]
        out = region(*dxs)
    with on_one_device():
        rxs = [t.clone().requires_grad_() for t in xs]
        want = ref(*rxs)
        upstream = torch.randn(want.shape)
        want.backward(upstream)
    out.backward(distribute(upstream, mesh, [R]))
    assert max_diff(full(out), want) < 1e-5
    assert all(max_diff(full(d.grad), r.grad) < 1e-5 for d, r in zip(dxs, rxs))
    return region


def _all_reduce(x, op="sum"):
    from localmap import collectives as C

    return C.all_reduce(x, 0, op)


@pytest.mark.parametrize("body, ref, shape, ins", [
    (lambda x: _all_reduce(x.exp().sum(1)), lambda x: x.exp().sum(1), (4, 8), S1),
    (lambda x: _all_reduce(x.amax(1), "max"), lambda x: x.amax(1), (4, 8), S1),
    (lambda x: _all_reduce(x.mean(0), "avg"), lambda x: x.mean(0), (8, 4), S0),
], ids=["sum of Partial(sum)", "max of Partial(max)", "avg of Partial(avg)"])
def test_all_reduce_of_partial_results_of_its_own_reduction_is_proven_replicate(sim_mesh_4, body, ref, shape, ins):
    _proven_against(sim_mesh_4, body, ref, randn(*shape), ins, R)


@pytest.mark.parametrize("body, shape, ins", [
    (lambda x: _all_reduce(x.mean(0)), (8, 4), S0),  # n times the mean
    (lambda x: _all_reduce(x.sum(0), "avg"), (8, 4), S0),  # the sum divided by n
    (lambda x: _all_reduce(x * 2), (8, 4), R),  # n times a replicated value
], ids=["sum of Partial(avg)", "avg of Partial(sum)", "sum of Replicate"])
def test_all_reduce_of_other_values_claimed_replicate_is_not_proven_and_its_test_refutes_it(
        sim_mesh_4, body, shape, ins):
    """The result is the same on every rank but not the one-rank run's value (AGREED): the Replicate claim is
    not proven, and the test against the one-rank run refutes it (before AGREED, all_reduce of anything was
    Replicate: these were proven, silently wrong)."""
    x = randn(*shape)
    _not_accepted(sim_mesh_4, body, x, ((ins,),), claim=R)
    with pytest.raises(PlacementError, match="differs from its one-rank run"):
        local_map(body, [R], [[ins]], None, sim_mesh_4)(distribute(x, sim_mesh_4, [ins]))


def test_all_reduce_of_a_value_of_unknown_meaning_is_settled_by_the_test(sim_mesh_4):
    """max over the ranks of 2 m - m (m each rank's max): the global max, which the proof does not derive (a
    difference of Partial(max) values is Varying): not proven, tested, silent, and it matches one device."""
    body = lambda x: _all_reduce(x.amax(1) * 2 - x.amax(1), "max")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region = _proven_against(sim_mesh_4, body, lambda x: x.amax(1), randn(4, 8), S1, R, check=True)
    assert region.region.verdicts()[0].status == "tested"
    _not_accepted(sim_mesh_4, body, randn(4, 8), ((S1,),), claim=R)


# ---- all_to_all: a shard of concat_dim becomes a shard of split_dim ----------------------------------------

def _all_to_all(split_dim, concat_dim):
    from localmap import collectives as C

    return lambda x: C.all_to_all(x, 0, split_dim=split_dim, concat_dim=concat_dim) * 2


@pytest.mark.parametrize("split_dim, concat_dim", [(1, 0), (0, 1), (2, 1)])
def test_all_to_all_of_a_shard_of_concat_dim_is_proven_a_shard_of_split_dim(sim_mesh_4, split_dim, concat_dim):
    _proven_against(sim_mesh_4, _all_to_all(split_dim, concat_dim), lambda x: x * 2, randn(8, 8, 4),
                    Shard(concat_dim), Shard(split_dim))


def test_all_to_all_claimed_on_its_input_dim_is_refused(sim_mesh_4):
    _refused(sim_mesh_4, _all_to_all(1, 0), [randn(8, 8)], [[S0]], [S0], "is a shard of dim 1 but is claimed")


@pytest.mark.parametrize("split_dim, concat_dim, ins", [(1, 0, R), (0, 0, S0), (1, 0, S1)],
                         ids=["replicated input", "split_dim == concat_dim", "input sharded on split_dim"])
def test_all_to_all_of_other_inputs_is_not_proven(sim_mesh_4, split_dim, concat_dim, ins):
    """A replicated input (every rank sends its copy's chunks: n copies of one chunk arrive), a split along
    concat_dim itself (pieces interleaved), or an input sharded on split_dim: not a shard of split_dim."""
    _not_accepted(sim_mesh_4, _all_to_all(split_dim, concat_dim), randn(16, 16), ((ins,),), claim=Shard(split_dim))


# ---- this rank's rows of a whole table: arange(k) + k * axis_index ---------------------------------------------

def _my_rows(lookup="index_select", factor=0, base=0):
    """x (rows sharded) plus this rank's rows of a whole position table; `factor` changes the offset's factor
    from the local length, `base` adds a constant to the positions (both wrong for any value but 0)."""
    from localmap import collectives as C

    def body(x, pos):
        k = x.shape[0]
        rows = torch.arange(k) + C.axis_index(0) * (k + factor)
        rows = rows + base if base else rows
        picked = {"index_select": lambda: pos.index_select(0, rows), "embedding": lambda: F.embedding(rows, pos),
                  "index": lambda: pos[rows]}[lookup]()
        return x + picked
    return body


@pytest.mark.parametrize("lookup", ["index_select", "embedding", "index"])
def test_a_whole_table_at_the_ranks_rows_is_a_shard(sim_mesh_4, lookup):
    _proven_against(sim_mesh_4, _my_rows(lookup), lambda x, pos: x + pos, [randn(8, 4), randn(8, 4)], [S0, R], S0)


def test_a_whole_table_at_rows_offset_by_another_factor_is_not_proven(sim_mesh_4):
    """Offset by a factor that is not the local length: rank r reads rows r*(k+1) ..., not its chunk of the
    one-rank lookup (which reads rows 0 .. n*k - 1), never accepted."""
    region = local_map(_my_rows(factor=1), [S0], [[S0], [R]], None, sim_mesh_4, check="strict")
    with pytest.raises((UnprovenError, PlacementError)):
        region(distribute(randn(8, 4), sim_mesh_4, [S0]), distribute(randn(12, 4), sim_mesh_4, [R]))


@pytest.mark.parametrize("variant, table_rows, first", [({"base": 1}, 13, 1), ({}, 16, 0)],
                         ids=["a base added", "a table of other length"])
def test_a_whole_table_at_the_ranks_positions_shifted_or_longer_is_a_shard(sim_mesh_4, variant, table_rows, first):
    """The rank's positions arange(k) + k * axis_index are a shard of the global positions (check.coordinates),
    so the positions shifted by a constant, or a table longer than n * k rows, read chunk r of the one-rank
    lookup (rows first .. first + n*k - 1) on rank r: proven, and equal to one device."""
    _proven_against(sim_mesh_4, _my_rows(**variant), lambda x, pos: x + pos[first:first + 8],
                    [randn(8, 4), randn(table_rows, 4)], [S0, R], S0)


# ---- positions: tables sliced or made by the local length --------------------------------------------------------

def test_a_position_table_sliced_by_the_local_length_is_refused(sim_mesh_4):
    """x sequence-sharded plus pos[: local length]: every rank adds the first rows (rotary tables, learned
    positions indexed by local positions)."""
    _refused(sim_mesh_4, lambda x, pos: x + pos[: x.shape[1]], [randn(2, 8, 4), randn(8, 4)], [[S1], [R]],
             [S1], "first rows instead of its own")


def test_positions_from_the_local_length_are_refused(sim_mesh_4):
    """A causal mask built from arange(local length) with sequence-sharded queries uses local positions."""
    def body(s):
        n = s.shape[0]
        causal = torch.arange(n)[:, None] >= torch.arange(s.shape[1])[None, :]
        return s.masked_fill(~causal, float("-inf")).softmax(-1)

    _refused(sim_mesh_4, body, [randn(8, 8)], [[S0]], [S0], "first rows instead of its own")
