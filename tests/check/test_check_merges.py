"""A log-sum-exp merge of per-rank attention blocks (context parallelism: keys and values sharded along the key
sequence) is proven whole (``check.merges``): ok, not tested, and right against one device. Near misses are not
matched: a wrong merge is never called ok."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import R, S0, S1, max_diff, proven_like_one_device, randn
from localmap import Partial, PlacementError, Shard, local_map
from localmap import collectives as C
from localmap.testing import distribute, full, on_one_device, simulated_mesh

QKV = [(2, 4, 4), (2, 8, 4), (2, 8, 4)]
PLACED = [[R], [S1], [S1]]  # queries whole, keys and values sharded along the key sequence


def attention(q, k, v):
    return (q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v


def _merge(o, lse):
    top = C.all_reduce(lse.detach(), "cp", "max")
    w = (lse - top).exp()
    return C.all_reduce(o * w, "cp") / C.all_reduce(w, "cp")


def by_hand(q, k, v):
    """The max subtracted before exp, kept for the log-sum-exp (the catalogue's form)."""
    s = q @ k.transpose(-1, -2) / 2.0
    m = s.amax(-1, keepdim=True)
    p = (s - m).exp()
    return _merge((p / p.sum(-1, keepdim=True)) @ v, m + p.sum(-1, keepdim=True).log())


def detached_max(q, k, v):
    s = q @ k.transpose(-1, -2) / 2.0
    m = s.amax(-1, keepdim=True).detach()
    return _merge(s.softmax(-1) @ v, m + (s - m).exp().sum(-1, keepdim=True).log())


def library_calls(q, k, v):
    s = q @ k.transpose(-1, -2) / 2.0
    return _merge(F.softmax(s, dim=-1) @ v, torch.logsumexp(s, -1, keepdim=True))


def softmax_from_lse(q, k, v):
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.5
    lse = s.logsumexp(-1, keepdim=True)
    return _merge((s - lse).exp() @ v, lse)


def averaged(q, k, v):
    """Both sums as averages over the ranks: the 1/n cancels in the quotient."""
    s = q @ k.transpose(-1, -2) / 2.0
    lse = s.logsumexp(-1, keepdim=True)
    w = (lse - C.all_reduce(lse.detach(), "cp", "max")).exp()
    return C.all_reduce(s.softmax(-1) @ v * w, "cp", "avg") / C.all_reduce(w, "cp", "avg")


MERGES = [by_hand, detached_max, library_calls, softmax_from_lse, averaged]


@pytest.mark.parametrize("body", MERGES, ids=[f.__name__ for f in MERGES])
def test_a_log_sum_exp_merge_is_proven_and_matches_one_device(body):
    """Proven under check="strict" (the test is not run), values and gradients equal to the attention over every
    key on one device."""
    with simulated_mesh((4,), ("cp",)) as mesh:
        proven_like_one_device(mesh, body, attention, [randn(*s) for s in QKV], PLACED, [R])


def test_a_merge_on_one_mesh_dim_keeps_the_other_dims_types():
    """Batch over dp, keys over cp: the merge is whole on cp and the output stays Shard(0) over dp. (The local
    p @ v, whose keys are cut on cp, is typed on dp with cp collapsed: check.propagation's NOTE.)"""
    with simulated_mesh((2, 2), ("dp", "cp")) as mesh:
        proven_like_one_device(mesh, by_hand, attention, [randn(*s) for s in QKV],
                               [[S0, R], [S0, S1], [S0, S1]], [S0, R])


def own_weights(q, k, v):
    """Each rank weighs its block by exp(its own lse - its own lse) = 1: the blocks are summed, not merged."""
    s = q @ k.transpose(-1, -2) / 2.0
    lse = s.logsumexp(-1, keepdim=True)
    w = (lse - lse.detach()).exp()
    return C.all_reduce(s.softmax(-1) @ v * w, "cp") / C.all_reduce(w, "cp")


def other_scores(q, k, v):
    """The weights from the scores of different keys (k doubled) than the softmax's."""
    s = q @ k.transpose(-1, -2) / 2.0
    lse = (2 * s).logsumexp(-1, keepdim=True)
    w = (lse - C.all_reduce(lse.detach(), "cp", "max")).exp()
    return C.all_reduce(s.softmax(-1) @ v * w, "cp") / C.all_reduce(w, "cp")


def unnormalised(q, k, v):
    """The merge's numerator without the division by the weights' sum."""
    s = q @ k.transpose(-1, -2) / 2.0
    lse = s.logsumexp(-1, keepdim=True)
    w = (lse - C.all_reduce(lse.detach(), "cp", "max")).exp()
    return C.all_reduce(s.softmax(-1) @ v * w, "cp") / C.all_reduce(w.detach() * 0 + 1, "cp")


WRONG = [own_weights, other_scores, unnormalised]


@pytest.mark.parametrize("body", WRONG, ids=[f.__name__ for f in WRONG])
def test_a_merge_that_is_not_one_is_never_called_ok(body):
    """Each differs from one device; the proof does not match it, and the test refuses it."""
    with simulated_mesh((4,), ("cp",)) as mesh:
        region = local_map(body, [R], PLACED, None, mesh)
        with pytest.raises(PlacementError, match="its test refutes"):
            region(*(distribute(randn(*s), mesh, p) for s, p in zip(QKV, PLACED)))


def test_values_cut_on_another_mesh_dim_are_not_matched():
    """Keys cut over cp, values over dp: each rank's key block and value rows are different pieces (the blocks
    do not pair up). Nothing is proven; the region is not called ok."""
    with simulated_mesh((2, 2), ("dp", "cp")) as mesh:
        placed = [[R, R], [R, S1], [S1, R]]
        region = local_map(by_hand, [R, R], placed, None, mesh)
        try:
            region(*(distribute(randn(*s), mesh, p) for s, p in zip(QKV, placed)))
        except PlacementError:
            return
        assert all(v.status != "ok" for v in region.region.verdicts())


# ---- the merge of a fused kernel's (out, lse): values proven, gradients through its lse refuted ---------------

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # what SDPA runs on CPU (GPUs: their kernel)
QKV4 = [(1, 2, 4, 4), (1, 2, 8, 4), (1, 2, 8, 4)]  # [batch, heads, sequence, head dim]
PLACED4 = [[R], [Shard(2)], [Shard(2)]]


def attention4(q, k, v):
    return (q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v  # the kernel's default scale: 1 / sqrt(4)


def flash_lse_unsqueezed(q, k, v):
    o, lse = FLASH(q.detach(), k.detach(), v)[:2]
    return _merge(o, lse.unsqueeze(-1))


def flash_weights_unsqueezed(q, k, v):
    o, lse = FLASH(q.detach(), k.detach(), v)[:2]
    w = (lse - C.all_reduce(lse, "cp", "max")).exp().unsqueeze(-1)
    return C.all_reduce(o * w, "cp") / C.all_reduce(w, "cp")


def flash_with_gradients(q, k, v):
    o, lse = FLASH(q, k, v)[:2]
    return _merge(o, lse.unsqueeze(-1))


def flash_causal(q, k, v):
    o, lse = FLASH(q.detach(), k.detach(), v, is_causal=True)[:2]
    return _merge(o, lse.unsqueeze(-1))


def _region_and_inputs(mesh, body, check=True):
    xs = [randn(*s) for s in QKV4]
    return (local_map(body, [R], PLACED4, None, mesh, check=check), xs,
            [distribute(x, mesh, p, requires_grad=True) for x, p in zip(xs, PLACED4)])


@pytest.mark.parametrize("body", [flash_lse_unsqueezed, flash_weights_unsqueezed])
def test_a_merge_of_a_fused_kernels_outputs_is_proven_where_no_gradient_reaches_q_or_k(body):
    """q and k detached (the kernel's lse carries no gradient): proven under check='strict'; the values and v's
    gradient equal the attention over every key on one device."""
    with simulated_mesh((2,), ("cp",)) as mesh:
        region, xs, dts = _region_and_inputs(mesh, body, check="strict")
        out = region(*dts)
        out.sum().backward()
        with on_one_device():
            v = xs[2].clone().requires_grad_()
            want = attention4(xs[0], xs[1], v)
            want.sum().backward()
    assert max_diff(full(out), want) < 1e-5 and max_diff(full(dts[2].grad), v.grad) < 1e-5
    assert region.region.verdicts()[0].status == "ok"


def test_a_merge_of_a_fused_kernels_outputs_with_gradients_to_q_and_k_is_refused_and_really_wrong():
    """The kernel's lse is not differentiable, so the merge's q and k gradients miss the weights' share: refused
    by the proof, naming the kernel; with the check off its values match one device and q's gradient does not."""
    with simulated_mesh((2,), ("cp",)) as mesh:
        region, xs, dts = _region_and_inputs(mesh, flash_with_gradients)
        with pytest.raises(PlacementError, match="_scaled_dot_product_flash_attention_for_cpu returns, which "
                                                 "carries no gradient") as info:
            region(*dts)
        assert "detach q and k" in str(info.value)
        grads = [[Partial()], [Shard(2)], [Shard(2)]]  # q's share of each key block, summed over ranks
        unchecked = local_map(flash_with_gradients, [R], PLACED4, grads, mesh, check=False)
        dts = [distribute(x, mesh, p, requires_grad=True) for x, p in zip(xs, PLACED4)]
        out = unchecked(*dts)
        out.sum().backward()
        with on_one_device():
            ref = [x.clone().requires_grad_() for x in xs]
            want = attention4(*ref)
            want.sum().backward()
    assert max_diff(full(out), want) < 1e-5
    assert max_diff(full(dts[0].grad), ref[0].grad) > 1e-3


def test_a_causal_fused_kernel_is_not_merged():
    """Causal masks on key blocks (local positions) are not the merge: never called ok."""
    with simulated_mesh((2,), ("cp",)) as mesh:
        region, _, dts = _region_and_inputs(mesh, flash_causal)
        try:
            region(*dts)
        except PlacementError:
            return
    assert region.region.verdicts()[0].status != "ok"
