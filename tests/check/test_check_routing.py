"""Rows dispatched by an all_to_all and combined by its inverse (issue 20: the expert-parallel pattern): a sort
permutes each rank's rows, an all_to_all_single with split sizes from .tolist() routes them, row-wise work runs
on the routed rows, and the inverse all_to_all (the same split lists, swapped) and the un-permute bring them back.
Right programs are proven under check="strict" and match one device in values and gradients; a combine that does
not invert the dispatch, or rows never un-permuted, or work that is not row-wise, is never proven."""

from __future__ import annotations

import pytest
import torch

from helpers import R, S0, proven_like_one_device, randn
from localmap import LocalMapError, local_map
from localmap import collectives as C
from localmap.testing import distribute


def _dispatch(x, dim=0):
    """Each rank's rows sorted by destination rank (chosen from the data: the row with the
    k-th smallest first entry goes to rank k mod n) and sent there."""
    n = C.axis_size(dim)
    dest = x[:, 0].argsort().argsort() % n
    order = dest.argsort(stable=True)
    counts = torch.bincount(dest, minlength=n)
    send = counts.tolist()
    recv = C.all_to_all_single(counts, dim).tolist()
    return C.all_to_all_single(x[order], dim, recv, send), order, send, recv


def _unpermute_by_index_copy(back, order):
    return torch.empty_like(back).index_copy(0, order, back)


def _unpermute_by_inverse(back, order):
    return back[order.argsort()]


def _row_work(x, w, b):
    return torch.tanh(x @ w + b) * 2


@pytest.mark.parametrize("unpermute", [_unpermute_by_index_copy, _unpermute_by_inverse],
                         ids=["index_copy", "inverse_index"])
def test_dispatch_row_work_and_combine_keep_the_shard(sim_mesh_4, unpermute):
    def body(x, w, b):
        received, order, send, recv = _dispatch(x)
        return unpermute(C.all_to_all_single(_row_work(received, w, b), 0, send, recv), order)

    proven_like_one_device(sim_mesh_4, body, _row_work, [randn(24, 8), randn(8, 8), randn(8)], [[S0], [R], [R]])


def test_tokens_sharded_over_two_mesh_dims_dispatched_over_one(sim_mesh_2x2):
    """Rows sharded over dp and tp, routed among the tp ranks; the work is an addmm with a replicated bias."""
    def work(x, w, b):
        return torch.addmm(b, x, w).relu()

    def body(x, w, b):
        received, order, send, recv = _dispatch(x, "tp")
        back = C.all_to_all_single(work(received, w, b), "tp", send, recv)
        return back[order.argsort()]

    proven_like_one_device(sim_mesh_2x2, body, work, [randn(24, 8), randn(8, 8), randn(8)],
                            [[S0, S0], [R, R], [R, R]], (S0, S0))


def test_an_equal_split_all_to_all_and_its_inverse_keep_the_shard(sim_mesh_4):
    """No sizes read from data (traced on fakes): equal splits both ways send every row back."""
    def body(x, w, b):
        back = C.all_to_all_single(_row_work(C.all_to_all_single(x, 0), w, b), 0)
        return back

    proven_like_one_device(sim_mesh_4, body, _row_work, [randn(32, 8), randn(8, 8), randn(8)], [[S0], [R], [R]])


_STILL_ROUTED = "is unproven|differs from its one-rank run"


def _not_proven(mesh, body, x, w, says=_STILL_ROUTED):
    """check="strict" refuses it: the proof stops where the rows are not brought back (and where the proof
    stops, the test on the simulated mesh finds the difference from one device)."""
    region = local_map(body, [S0], [[S0], [R]], None, mesh, check="strict")
    with pytest.raises(LocalMapError, match=says):
        region(distribute(x, mesh, [S0]), distribute(w, mesh, [R]))


def test_a_combine_with_the_split_sizes_not_swapped_is_refused(sim_mesh_4):
    """The dispatch's sizes again send rows on, not back: typed as a second dispatch (and this one cannot even
    run: the received rows are not as many as the sizes it sends)."""
    def body(x, w):
        received, order, send, recv = _dispatch(x)
        back = C.all_to_all_single(received @ w, 0, recv, send)  # the dispatch's sizes again: no inverse
        return _unpermute_by_index_copy(back, order)

    _not_proven(sim_mesh_4, body, randn(24, 8), randn(8, 8), "Split sizes doesn't match")


def test_a_combine_with_other_split_lists_of_the_same_values_is_not_proven(sim_mesh_4):
    """Split lists are matched by identity: on a traced rank the received sizes are not the real ones, so
    equal values in the trace prove nothing. (This program is right: copies hold the real sizes too; it is
    left unproven, and the test where the proof stops finds it equal to one device.)"""
    def body(x, w):
        received, order, send, recv = _dispatch(x)
        back = C.all_to_all_single(received @ w, 0, list(send), list(recv))
        return _unpermute_by_index_copy(back, order)

    _not_proven(sim_mesh_4, body, randn(24, 8), randn(8, 8))


def test_rows_combined_but_never_unpermuted_are_not_proven(sim_mesh_4):
    def body(x, w):
        received, order, send, recv = _dispatch(x)
        return C.all_to_all_single(received @ w, 0, send, recv)

    _not_proven(sim_mesh_4, body, randn(24, 8), randn(8, 8))


@pytest.mark.parametrize("work", [
    lambda rows, w: rows - rows.mean(0),                      # mixes rows
    lambda rows, w: rows * (C.axis_index(0) + 1.0),           # per-rank data: depends on where a row lands
    lambda rows, w: rows.flip(0),                             # reorders rows
    lambda rows, w: torch.addmm(w[:rows.shape[0]], rows, w),  # a bias aligned with other rows
], ids=["mixes_rows", "per_rank_weight", "reorders_rows", "bias_of_other_rows"])
def test_work_between_dispatch_and_combine_that_is_not_row_wise_is_not_proven(sim_mesh_4, work):
    def body(x, w):
        received, order, send, recv = _dispatch(x)
        back = C.all_to_all_single(work(received, w), 0, send, recv)
        return _unpermute_by_index_copy(back, order)

    _not_proven(sim_mesh_4, body, randn(24, 8), randn(8, 8))


# ---- a stable sort permuting each rank's rows locally (torchtitan's token reorder, no all_to_all) -----------

def _expert_order(x):
    """This rank's rows in the order of a stable sort of an expert id read from each row."""
    return torch.sort(x[:, 0].argsort().argsort() % 3, stable=True).indices


@pytest.mark.parametrize("unpermute", [_unpermute_by_index_copy, _unpermute_by_inverse],
                         ids=["index_copy", "inverse_index"])
def test_rows_permuted_by_a_stable_sort_and_put_back_keep_the_shard(sim_mesh_4, unpermute):
    def body(x, w, b):
        order = _expert_order(x)
        return unpermute(_row_work(x[order], w, b), order)

    proven_like_one_device(sim_mesh_4, body, _row_work, [randn(24, 8), randn(8, 8), randn(8)], [[S0], [R], [R]])


@pytest.mark.parametrize("put_back", [
    lambda y, order, x: y,                                    # never un-permuted
    lambda y, order, x: y[order],                             # permuted twice, not inverted
    lambda y, order, x: y[x[:, 1].argsort().argsort()],        # another sort's inverse
    lambda y, order, x: y[order.flip(0).argsort()],           # the inverse of another permutation
    lambda y, order, x: torch.empty_like(y).index_copy(0, x[:, 1].argsort(), y),  # index_copy by another order
], ids=["not_unpermuted", "permuted_twice", "other_sort", "other_permutation", "index_copy_other_order"])
def test_rows_permuted_by_a_stable_sort_and_not_put_back_are_not_proven(sim_mesh_4, put_back):
    """Each rank's rows stay in another order than its shard's (a wrong program claimed Shard(0)): never proven,
    and where the proof stops the test finds the difference."""
    def body(x, w):
        order = _expert_order(x)
        return put_back(x[order] @ w, order, x)

    _not_proven(sim_mesh_4, body, randn(24, 8), randn(8, 8))
