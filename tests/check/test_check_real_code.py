"""The check on patterns from real models: every random op is typed random, and inputs no gradient can reach
(integer labels) get no gradient check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import R, S0, max_diff, randn
from localmap import PlacementError, local_map
from localmap.testing import distribute, full, on_one_device


def test_dropout_is_random_per_rank(sim_mesh_4):
    """F.dropout traces to aten.bernoulli_ (in place): its mask differs per rank, so a Replicate claim is wrong."""
    x = randn(8, 4)
    wrong = local_map(lambda a: F.dropout(a, 0.5, True), [R], ([R],), None, sim_mesh_4)
    with pytest.raises(PlacementError, match="differs across ranks but is claimed Replicate"):
        wrong(distribute(x, sim_mesh_4, [R]))
    right = local_map(lambda a: F.dropout(a, 0.5, True), [S0], ([S0],), None, sim_mesh_4)
    assert right(distribute(x, sim_mesh_4, [S0])).placements == (S0,)


def _token_loss(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def test_integer_labels_get_no_gradient_check(sim_mesh_4):
    """torchtitan's losses pass int64 labels with an in_grad_placements entry; no gradient flows to integers, so
    no entry can contradict the body."""
    with on_one_device():
        logits, labels = randn(8, 10), torch.randint(0, 10, (8,))
        ref = logits.clone().requires_grad_()
        _token_loss(ref, labels).sum().backward()
    f = local_map(_token_loss, [S0], ([S0], [S0]), ([S0], [R]), sim_mesh_4)
    ld = distribute(logits, sim_mesh_4, [S0], requires_grad=True)
    out = f(ld, distribute(labels, sim_mesh_4, [S0]))
    out.backward(distribute(torch.ones(8), sim_mesh_4, [S0]))
    assert max_diff(full(out), _token_loss(logits, labels)) < 1e-5
    assert max_diff(full(ld.grad), ref.grad) < 1e-5


def _scaled(scale):
    def body(a):
        return a * scale

    return body


def test_a_wrapper_rebuilt_every_forward_is_checked_once(sim_mesh_4):
    """torchtitan builds `local_map(...)` inside forward on every call: the check keys the body by its code and
    what it closes over, not by the wrapper object, so the body is traced once."""
    import localmap

    x = distribute(randn(8, 4), sim_mesh_4, [S0])
    before = localmap.cache_info()["bodies_checked"]
    for _ in range(5):
        local_map(_scaled(2.0), [S0], ([S0],), None, sim_mesh_4)(x)
    assert localmap.cache_info()["bodies_checked"] - before == 1
    # closing over another object is another function: checked again, and a wrong claim is caught
    with on_one_device():
        scale = torch.full((), 3.0)
    with pytest.raises(PlacementError, match="claimed Replicate"):
        local_map(_scaled(scale), [R], ([S0],), None, sim_mesh_4)(x)
    assert localmap.cache_info()["bodies_checked"] - before == 2
    assert local_map(_scaled(scale), [S0], ([S0],), None, sim_mesh_4)(x).placements == (S0,)


def _stable_exp(x):
    """Megatron's vocab-parallel softmax numerator: the max over the sharded vocab, detached (no gradient)."""
    from localmap import collectives as C

    return (x - C.all_reduce(x.amax(-1, keepdim=True).detach(), 0, "max")).exp()


def test_a_detached_all_reduce_meeting_per_rank_data_needs_no_pvary(sim_mesh_4):
    from localmap import Shard

    with on_one_device():
        x = randn(4, 16)
        ref = x.clone().requires_grad_()
        (ref - ref.amax(-1, keepdim=True).detach()).exp().sum().backward()
    f = local_map(_stable_exp, [Shard(1)], ([Shard(1)],), None, sim_mesh_4)
    xd = distribute(x, sim_mesh_4, [Shard(1)], requires_grad=True)
    out = f(xd)
    out.backward(distribute(torch.ones(4, 16), sim_mesh_4, [Shard(1)]))
    assert max_diff(full(out), (x - x.amax(-1, keepdim=True)).exp()) < 1e-5
    assert max_diff(full(xd.grad), ref.grad) < 1e-5


def _maybe_total(a, total=False):
    return a.sum(0, keepdim=True) if total else a * 2


def test_a_keyword_flag_that_changes_the_body_is_checked_again(sim_mesh_4):
    """The verdict depends on keyword arguments and non-tensor arguments, not only on the input specs: the same
    region called with a flag that makes its output a partial sum must not reuse the earlier 'ok'."""
    x = distribute(randn(8, 4), sim_mesh_4, [S0])
    f = local_map(_maybe_total, [S0], ([S0],), None, sim_mesh_4)
    assert f(x, total=False).placements == (S0,)
    with pytest.raises(PlacementError, match="partial sum"):
        f(x, total=True)
    g = local_map(lambda a, k: a * k if k < 3 else a.sum(0, keepdim=True), [S0], ([S0], None), None, sim_mesh_4)
    assert g(x, 2).placements == (S0,)
    with pytest.raises(PlacementError, match="partial sum"):
        g(x, 5)


def test_a_rebuilt_wrapper_shares_its_region(sim_mesh_4):
    """The same function (code and closure objects) with the same specs and mesh shares one RegionCallable, so
    plans and verdicts are warm from the second build; other specs or other closed-over objects do not."""
    x = distribute(randn(8, 4), sim_mesh_4, [S0])
    first = local_map(_scaled(2.0), [S0], ([S0],), None, sim_mesh_4)
    again = local_map(_scaled(2.0), [S0], ([S0],), None, sim_mesh_4)
    assert again.region is first.region
    assert local_map(_scaled(3.0), [S0], ([S0],), None, sim_mesh_4).region is not first.region
    assert local_map(_scaled(2.0), [R], ([R],), None, sim_mesh_4).region is not first.region
    assert local_map(_scaled(2.0), [S0], ([S0],), None, sim_mesh_4, check=False).region is not first.region
    first(x)
    assert again.region.cache_info()["input_plans"] == 1
    assert max_diff(full(again(x)), full(x) * 2) < 1e-6
