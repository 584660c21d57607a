"""Attention whose keys and values are sharded along the key sequence, returned as it is (or summed by one
all_reduce) and claimed Replicate or a shard, is refuted by the proof (``check.attention``), not only by the test
against the one-rank run: each rank attends only to its own key block. A log-sum-exp merge, keys and values
gathered or replicated, a mask, a Partial value: not matched, right programs there stay ok or tested."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import P, R, S0, S1, max_diff, randn
from localmap import PlacementError, local_map
from localmap import collectives as C
from localmap.testing import distribute, full, on_one_device
from torch.distributed.tensor import Shard

S2 = Shard(2)
MESSAGE = "each rank attends only to its own key block"


def attention(q, k, v):
    return (q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v


def _sdpa_on_heads_last(q, k, v):
    """(B, L, N, H) inputs transposed for SDPA and back (torchtitan's layout)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


BLH = [(2, 8, 4)] * 3  # (batch, sequence, head dim)
BHLE = [(1, 2, 8, 4)] * 3  # (batch, heads, sequence, head dim)
REFUTED = [  # (name, body, input shapes, in placements, claim, v's key dim, summed: the body without its all_reduce)
    ("queries and keys sharded, claimed a sequence shard", attention, BLH, [S1, S1, S1], S1, 1, None),
    ("blocks summed by all_reduce, claimed Replicate", lambda q, k, v: C.all_reduce(attention(q, k, v), 0),
     [(2, 4, 4), (2, 8, 4), (2, 8, 4)], [R, S1, S1], R, 1, attention),
    ("SDPA, q, k, v sharded on the sequence", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), BHLE,
     [S2, S2, S2], S2, 2, None),
    ("causal SDPA, q, k, v sharded on the sequence",
     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), BHLE, [S2, S2, S2], S2, 2, None),
    ("SDPA with a scale, summed by all_reduce", lambda q, k, v: C.all_reduce(
        F.scaled_dot_product_attention(q, k, v, scale=0.3), 0), [(1, 2, 4, 4), (1, 2, 8, 4), (1, 2, 8, 4)],
     [R, S2, S2], R, 2, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3)),
    ("SDPA on (B, L, N, H), transposed in and out", _sdpa_on_heads_last, [(1, 8, 2, 4)] * 3, [S1, S1, S1], S1, 1,
     None),
    ("scaled queries, 4-d, output made contiguous and cloned",
     lambda q, k, v: ((q * 0.5) @ k.transpose(-1, -2)).softmax(-1).matmul(v).transpose(1, 2).contiguous().clone(),
     BHLE, [S2, S2, S2], Shard(1), 2, None),
    ("softmax in float64, exp of the output", lambda q, k, v: (F.softmax(q @ k.transpose(-1, -2), -1,
     dtype=torch.float64) @ v.double()).exp(), BLH, [S1, S1, S1], S1, 1, None),
]


def _run(mesh, body, shapes, ins, out, check=True, ref=None):
    """The region on DTensors of fresh global inputs, and `ref` on one device (None without it): (output,
    reference). An input's placements: one placement (a 1-d mesh) or a list."""
    xs = [randn(*s) for s in shapes]
    with on_one_device():
        want = ref(*[x.clone() for x in xs]) if ref is not None else None
    ins = [p if isinstance(p, list) else [p] for p in ins]
    y = local_map(body, out, ins, None, mesh, check=check)(*[distribute(x, mesh, p) for x, p in zip(xs, ins)])
    return y, want


@pytest.mark.parametrize("name, body, shapes, ins, claim, dim, summed", REFUTED, ids=[r[0] for r in REFUTED])
def test_attention_to_a_key_block_alone_is_refused_by_the_proof(sim_mesh_4, name, body, shapes, ins, claim, dim,
                                                                 summed):
    with pytest.raises(PlacementError) as info:
        _run(sim_mesh_4, body, shapes, ins, [claim])
    message = str(info.value)
    assert f"values args[2] are sharded along dim {dim}, the key sequence, on mesh dim 0: {MESSAGE}" in message
    assert "its test refutes" not in message and f"all_gather k and v along the key sequence (dim {dim} of args[2])" in message, message
    assert "log-sum-exp" in message and ("summed by an all_reduce" in message) == bool(summed), message
    y, ref = _run(sim_mesh_4, body, shapes, ins, [claim], check=False, ref=summed or body)
    assert max_diff(full(y), ref) > 1e-3, "with the check off the region matches one device: the refusal is wrong"


def test_on_a_2d_mesh_the_mesh_dim_that_shards_the_keys_is_named(sim_mesh_2x2):
    ins = [[S0, S1]] * 3
    with pytest.raises(PlacementError, match=r"sharded along dim 1, the key sequence, on mesh dim 1 \('tp'\)"):
        _run(sim_mesh_2x2, attention, [(2, 8, 4)] * 3, ins, [S0, S1])


@pytest.mark.parametrize("causal", [False, True], ids=["attention", "causal SDPA"])
def test_the_witness_of_the_note(sim_mesh_4, causal):
    """check.attention's NOTE: q = k = 0, v 1 on rank 1's key block and 0 elsewhere; rank 1's output is 1 while
    the one-rank run's rows there are below 1 (1/4 without a mask)."""
    body = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)) if causal else attention
    shape, dim = ((1, 2, 8, 4), 2) if causal else ((2, 8, 4), 1)
    with on_one_device():
        q, k, v = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        v.narrow(dim, 2, 2).fill_(1.0)
        want = body(q, k, v)
    y = local_map(body, [Shard(dim)], [[Shard(dim)]] * 3, None, sim_mesh_4, check=False)(
        *[distribute(t, sim_mesh_4, [Shard(dim)]) for t in (q, k, v)])
    with on_one_device():
        assert torch.equal(full(y).narrow(dim, 2, 2), torch.ones_like(want.narrow(dim, 2, 2)))
        assert bool((want < 1).all()) and (causal or bool((want == 0.25).all()))


def _silent_and_right(mesh, body, shapes, ins, out, ref=None):
    """The default check neither refuses nor warns, and the region matches one device (`ref`, else the body)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, want = _run(mesh, body, shapes, ins, out, ref=ref or body)
    assert not [str(w.message) for w in caught if str(w.message).startswith("local_map:")]
    assert max_diff(full(y), want) <= 1e-5


def _gathered_keys(q, k, v):
    """The fix: keys and values all_gathered along the sequence, each rank's queries attend to every key."""
    return attention(q, C.all_gather(k, 0, dim=1), C.all_gather(v, 0, dim=1))


def _lse_merged(q, k, v):
    """Context-parallel attention merged exactly by the blocks' log-sum-exp."""
    s = q @ k.transpose(-1, -2) / 2.0
    m = s.amax(-1, keepdim=True)
    p = (s - m).exp()
    lse = m + p.sum(-1, keepdim=True).log()
    w = (lse - C.all_reduce(lse.detach(), 0, "max")).exp()
    return C.all_reduce((p / p.sum(-1, keepdim=True)) @ v * w, 0) / C.all_reduce(w, 0)


def _blocked(q, k, v):
    """Attention within blocks of 2 positions (a rank's block on 4 ranks of 8): each block's keys are its own."""
    b, n, e = q.shape
    o = attention(*(t.view(b, -1, 2, e) for t in (q, k, v)))
    return o.reshape(b, n, e)


def _blocked_by_reshape(q, k, v):
    """The same with a reshape that is the identity on a rank's shard: in the one-rank run it splits the
    sequence into blocks of 2 (the body writes the block size), so it is right; the proof does not follow a
    view the body writes."""
    o = attention(*(t.reshape(-1, 2, t.shape[-1]) for t in (q, k, v)))
    return o.reshape(q.shape)


def _block_softmax(q, k, v):
    """Weights normalised within blocks of 2 keys; the blocks' outputs summed (by all_reduce on the mesh)."""
    s = q @ k.transpose(-1, -2) / 2.0
    return s.view(*s.shape[:-1], -1, 2).softmax(-1).view(s.shape) @ v


RIGHT = [  # (name, body, shapes, in placements, claim, one-device reference or None for the body)
    ("keys and values all_gathered", _gathered_keys, BLH, [S1, S1, S1], S1, attention),
    ("log-sum-exp merge", _lse_merged, [(2, 4, 4), (2, 8, 4), (2, 8, 4)], [R, S1, S1], R, attention),
    ("tensor-parallel heads, SDPA", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
     [(1, 4, 8, 4)] * 3, [Shard(1)] * 3, Shard(1), None),
    ("queries sharded, keys and values replicated", attention, BLH, [S1, R, R], S1, None),
    ("attention within the rank's block of positions", _blocked, BLH, [S1, S1, S1], S1, None),
    ("the same, by a reshape the identity on each rank", _blocked_by_reshape, BLH, [S1, S1, S1], S1, None),
    ("weights normalised per key block, summed by all_reduce", lambda q, k, v: C.all_reduce(_block_softmax(q, k, v),
     0), [(2, 4, 4), (2, 8, 4), (2, 8, 4)], [R, S1, S1], R, _block_softmax),
    ("a Partial value summed by all_reduce", lambda q, k, v: C.all_reduce(attention(q, k, v), 0), BLH, [R, R, P],
     R, lambda q, k, v: attention(q, k, v)),
]


@pytest.mark.parametrize("name, body, shapes, ins, claim, ref", RIGHT, ids=[r[0] for r in RIGHT])
def test_right_attention_programs_are_not_refused(sim_mesh_4, name, body, shapes, ins, claim, ref):
    _silent_and_right(sim_mesh_4, body, shapes, ins, [claim], ref)


NOT_MATCHED = [  # wrong or right, the proof does not settle them: left to today's verdicts (the test)
    ("causal SDPA, queries sharded, keys replicated (local positions)",
     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), BHLE, [S2, R, R], S2),
    ("SDPA with an attn_mask", lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
     BHLE + [(8, 8)], [R, S2, S2, Shard(1)], R),
    ("scores plus an additive mask", lambda q, k, v, mask: (q @ k.transpose(-1, -2) + mask).softmax(-1) @ v,
     BLH + [(8, 8)], [R, S1, S1, S1], R),
    ("blocks averaged by all_reduce", lambda q, k, v: C.all_reduce(attention(q, k, v), 0, "avg"),
     [(2, 4, 4), (2, 8, 4), (2, 8, 4)], [R, S1, S1], R),
    ("self-attention, v the scores' own input", lambda x: attention(x, x, x), [(2, 8, 4)], [S1], S1),
    ("the output rescaled", lambda q, k, v: attention(q, k, v) * 2.0, BLH, [S1, S1, S1], S1),
]


@pytest.mark.parametrize("name, body, shapes, ins, claim", NOT_MATCHED, ids=[r[0] for r in NOT_MATCHED])
def test_attention_the_proof_cannot_settle_is_left_to_the_test(sim_mesh_4, name, body, shapes, ins, claim):
    """Not refused by this proof: a refusal, if any, is the test's (with its numbers) or the ordinary types' (a
    value that varies claimed Replicate), never the attention refutation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _run(sim_mesh_4, body, shapes, ins, [claim])
        except PlacementError as e:
            assert MESSAGE not in str(e), str(e)
            assert "its test refutes" in str(e) or "inferred Varying" in str(e), str(e)
