"""torchtitan's current direct ``local_map`` sites (pytorch/torchtitan main, read at b5bcd76c), reproduced small
in our own words: each body does what torchtitan's does, on the placements torchtitan gives it, with its right
claim and (where issue 20 names one) its wrong claim. A right program runs under the default check without a
warning and matches one device in values and gradients; a wrong claim is refused with a PlacementError.

| site | torchtitan source |
| fused QKV split | models/common/attention.py, FusedQKVLinear.forward's ``_split`` |
| chunked loss | components/loss.py, ChunkedLossWrapper.__call__'s ``_chunk`` / ``_chunk_local`` |
| fused SwiGLU | overrides/fused_swiglu.py, ``_fused_silu_and_mul`` / ``_silu_and_mul_2d`` (``torchtitan::silu_and_mul``) |
| vision interpolate | models/qwen3_5/vision_encoder.py, ``_compute_learned_pos_embeds`` |
| rope cache | models/qwen3_5/vision_encoder.py, VisionEncoder.compute_position_embeddings / ``_compute_2d_rope_cache`` |
| causal attention | models/common/decoder_sharding.py, ``set_gqa_inner_attention_local_map`` (q token-sharded on cp, k/v
  Replicate, k/v gradients Partial) |
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from helpers import P, R, S0, S1, max_diff, randn
from localmap import PlacementError, RuleError, UnprovenError, clear_caches, local_map, register_rule
from localmap.collectives import axis_index
from localmap.testing import distribute, full, on_one_device, simulated_mesh

S2 = torch.distributed.tensor.Shard(2)


@pytest.fixture
def cp_mesh():
    with simulated_mesh(2, ("cp",)) as mesh:
        yield mesh


def _right(mesh: Any, body: Callable, inputs: Sequence[Any], in_placements: Sequence[Any], out_placements: Any,
           in_grad_placements: Any = None, then: Callable | None = None, reference: Callable | None = None) -> str:
    """The region runs under the default check without a warning; `then(out)` (default: the outputs as they are)
    and the inputs' gradients match `reference` (default: the body) on one device, for a fixed cotangent.
    Returns the verdict's status (ok: proven; tested)."""
    then = then or (lambda out: out)
    reference = reference or body
    tensors = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    with on_one_device():
        ref_in = [t.detach().clone().requires_grad_() if i in tensors else t for i, t in enumerate(inputs)]
        ref = _flat(then(reference(*ref_in)))
        cotangents = [torch.randn(r.shape, generator=torch.Generator().manual_seed(k)) for k, r in enumerate(ref)]
        torch.autograd.backward(ref, cotangents)
    region = local_map(body, out_placements, in_placements, in_grad_placements, mesh)
    args = [distribute(t, mesh, p, requires_grad=i in tensors) if p is not None else t
            for i, (t, p) in enumerate(zip(inputs, in_placements))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _flat(then(region(*args)))
    torch.autograd.backward([g.full_tensor() for g in got], cotangents)
    for g, r in zip(got, ref, strict=True):
        assert max_diff(full(g), r) < 1e-5
    for i in tensors:
        assert max_diff(full(args[i].grad), ref_in[i].grad) < 1e-5, i
    return region.region.verdicts()[0].status


def _flat(out: Any) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _refused(mesh: Any, body: Callable, inputs: Sequence[Any], in_placements: Sequence[Any], out_placements: Any,
             says: str) -> None:
    region = local_map(body, out_placements, in_placements, None, mesh)
    args = [distribute(t, mesh, p) if p is not None else t for t, p in zip(inputs, in_placements)]
    with pytest.raises(PlacementError, match=says):
        region(*args)


# ---- fused QKV split -------------------------------------------------------------------------------------------

HPK, HD = 2, 3  # query heads per kv head, head dim


def _split_qkv(t):
    """q, k, v cut out of the fused projection [tokens, kv heads, heads per kv + 2, head dim] by sizes along the
    (unsharded) third dim, each reshaped to [tokens, heads, head dim] and made contiguous."""
    tokens = t.shape[0]
    q, k, v = torch.split(t, [HPK, 1, 1], dim=-2)
    return tuple(x.reshape(tokens, -1, HD).contiguous() for x in (q, k, v))


@pytest.mark.parametrize("placement", [S1, S0], ids=["tp shards kv heads", "cp shards tokens"])
def test_fused_qkv_split(sim_mesh_4, placement):
    """q, k, v reuse the fused tensor's placements, as torchtitan claims: proven either way."""
    qkv = randn(8, 4, HPK + 2, HD)
    assert _right(sim_mesh_4, _split_qkv, [qkv], [[placement]], ([placement],) * 3, [[placement]]) == "ok"


# ---- chunked loss ----------------------------------------------------------------------------------------------

CHUNKS = 2


def _chunk_local(t):
    """The local token rows cut into equal chunks (split_with_sizes), each made contiguous."""
    size = t.shape[0] // CHUNKS
    return tuple(c.contiguous() for c in torch.split(t, [size] * CHUNKS, dim=0))


def _chunked_loss(chunk: Callable, h, labels, weight):
    """ChunkedLossWrapper's use of the chunks: lm_head and a summed cross-entropy per chunk, the losses added."""
    return sum(F.cross_entropy(hc @ weight.T, lc, reduction="sum") for hc, lc in zip(chunk(h), chunk(labels)))


def test_chunked_loss_right(sim_mesh_4):
    """Token rows Shard(0), each chunk claimed Shard(0) (torchtitan's ``(p,) * num_chunks``): the summed loss
    matches one device, silently. Each chunk alone is no shard of the one-device chunk (the cut is by local
    sizes); the region is tested as a whole, its chunks joined in order (check.tested's note)."""
    h, labels, weight = randn(16, 4), torch.randint(0, 5, (16,)), randn(5, 4)
    region = local_map(_chunk_local, ([S0],) * CHUNKS, ([S0],), None, sim_mesh_4)
    wd = distribute(weight, sim_mesh_4, [R])
    with on_one_device():
        h1 = h.clone().requires_grad_()
        ref = _chunked_loss(_chunk_local, h1, labels, weight)
        ref.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd = distribute(h, sim_mesh_4, [S0], requires_grad=True)
        loss = _chunked_loss(region, hd, distribute(labels, sim_mesh_4, [S0]), wd)
        loss.backward()
    assert max_diff(full(loss), ref) < 1e-4 and max_diff(full(hd.grad), h1.grad) < 1e-4
    verdict = region.region.verdicts()[0]
    assert verdict.status == "tested" and "outputs joined in order along dim 0" in verdict.test.where


def test_chunked_loss_chunks_claimed_replicate_are_refused(sim_mesh_4):
    _refused(sim_mesh_4, _chunk_local, [randn(16, 4)], ([S0],), ([R],) * CHUNKS,
             "differs across ranks but is claimed Replicate")


# ---- fused SwiGLU: a custom op settled by a registered rule -----------------------------------------------------

@torch.library.custom_op("localmap_tests::silu_and_mul", mutates_args=())
def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, row by row (a stand-in for torchtitan's fused kernel, on the CPU)."""
    return F.silu(gate) * up


@silu_and_mul.register_fake
def _silu_and_mul_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _silu_and_mul_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = ctx.saved_tensors
    s = torch.sigmoid(gate)
    return grad * up * s * (1 + gate * (1 - s)), grad * F.silu(gate)


silu_and_mul.register_autograd(_silu_and_mul_backward,
                               setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def elementwise_rule(node: Any, in_types: list, mesh: Any) -> Any:
    """An elementwise op of two same-shaped tensors: each output element depends on the same element of each
    input, so equal placements are kept; a Partial input (silu is not linear) or placements that differ are
    wrong."""
    gate, up = in_types[:2]
    for m, (a, b) in enumerate(zip(gate, up)):
        if a != b or isinstance(a, torch.distributed.tensor.Partial):
            raise RuleError(f"takes gate {a} and up {b} on mesh dim {m}",
                            "give gate and up the same Shard or Replicate placements", m)
    return gate


def _silu_and_mul_2d(gate, up):
    """The fused op on [rows, features] views of the local gate and up, reshaped back."""
    return silu_and_mul(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])).reshape(gate.shape)


@pytest.fixture
def silu_and_mul_rule():
    from localmap.check.rules import RULES

    op = torch.ops.localmap_tests.silu_and_mul.default
    clear_caches()
    yield lambda: register_rule(op, elementwise_rule)
    RULES.pop(op, None)
    clear_caches()


def test_fused_swiglu_is_unproven_without_a_rule_and_proven_with_one(sim_mesh_4, silu_and_mul_rule):
    """gate and up column-parallel (Shard(2): features over tp), out claimed the same. Without a rule the check
    stops at the custom op (unproven: the test settles it, "tested"); with localmap.register_rule it is proven."""
    gate, up = randn(2, 3, 8), randn(2, 3, 8)
    placements = ([S2], [S2])
    assert _right(sim_mesh_4, _silu_and_mul_2d, [gate, up], placements, [S2], placements) == "tested"
    silu_and_mul_rule()
    clear_caches()
    assert _right(sim_mesh_4, _silu_and_mul_2d, [gate, up], placements, [S2], placements) == "ok"


def test_fused_swiglu_claimed_replicate_is_refused(sim_mesh_4, silu_and_mul_rule):
    silu_and_mul_rule()
    _refused(sim_mesh_4, _silu_and_mul_2d, [randn(2, 3, 8), randn(2, 3, 8)], ([S2], [S2]), [R],
             "claimed Replicate")


# ---- vision interpolate ----------------------------------------------------------------------------------------

def _interpolate(grid):
    """The learned position grid [1, dim, side, side] resized to an image's patch grid (bilinear, corners
    aligned)."""
    return F.interpolate(grid, size=[6, 10], mode="bilinear", align_corners=True)


def test_vision_interpolate_with_channels_sharded(sim_mesh_4):
    """The grid sharded along its channels (the embedding dim), claimed the same (torchtitan's
    ``out_placements=(pos_grid.placements,)``): proven."""
    assert _right(sim_mesh_4, _interpolate, [randn(1, 8, 4, 4)], [[S1]], [S1]) == "ok"


def test_vision_interpolate_of_a_height_sharded_image_claimed_shard_is_refused(sim_mesh_4):
    _refused(sim_mesh_4, _interpolate, [randn(1, 2, 8, 4)], [[S2]], [S2], "interpolates along dim 2")


# ---- rope cache ------------------------------------------------------------------------------------------------

def _rope_cache(freq, grids, merge):
    """The 2-D rope cache: row and column positions of each patch in block order, their frequencies looked up
    and concatenated, doubled, then cos and sin concatenated ([patches, 1, 4 * freqs])."""
    out = []
    for _, h, w in grids:
        mh, mw = h // merge, w // merge
        intra = torch.arange(merge)
        rows = (torch.arange(mh)[:, None, None, None] * merge + intra[None, None, :, None]).expand(
            mh, mw, merge, merge).reshape(-1)
        cols = (torch.arange(mw)[None, :, None, None] * merge + intra[None, None, None, :]).expand(
            mh, mw, merge, merge).reshape(-1)
        out.append(torch.cat([freq[rows], freq[cols]], dim=-1))
    packed = torch.cat(out, dim=0)
    packed = torch.cat((packed, packed), dim=-1)
    return torch.cat([packed.cos(), packed.sin()], dim=-1).unsqueeze(1)


GRIDS = [[1, 4, 4], [1, 2, 4]]


def test_rope_cache_from_a_replicated_table(sim_mesh_4):
    """The frequency table Replicate (torchtitan's), the cache claimed the same: proven."""
    assert _right(sim_mesh_4, _rope_cache, [randn(4, 4), GRIDS, 2], [[R], None, None], [R]) == "ok"


def test_rope_cache_cat_over_a_sharded_table_claimed_shard_is_refused(sim_mesh_4):
    """The table sharded along its frequencies: the cat puts each rank's frequencies side by side, which is
    no shard of the one-device cache along that dim."""
    _refused(sim_mesh_4, _rope_cache, [randn(4, 8), GRIDS, 2], [[S1], None, None], [S2], "cat")


# ---- causal attention with sequence-sharded queries ------------------------------------------------------------

def _attention(q, k, v, q_start):
    """SDPA over [tokens, heads, head dim] q/k/v; the causal mask from the query's global positions (its shard
    starts at `q_start`, 0 on one device)."""
    positions = q_start + torch.arange(q.shape[0])
    causal = positions[:, None] >= torch.arange(k.shape[0])[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=causal)
    return out.transpose(0, 1)


def _cp_attention(q, k, v):
    """q token-sharded on cp, k and v whole: the shard's start from the rank's coordinate."""
    return _attention(q, k, v, axis_index("cp") * q.shape[0])


def _local_causal(q, k, v):
    """is_causal=True: the mask starts every shard at position 0 (local positions)."""
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          is_causal=True).transpose(0, 1)


def test_causal_attention_with_global_query_positions(cp_mesh):
    """torchtitan's placements (q Shard(0), k/v Replicate with Partial gradients), the mask from global query
    positions: equal to one device, without a warning, and proven (check.coordinates: the positions
    ``axis_index * k + arange(k)`` are Shard(0) of arange(n * k), so the mask is a shard of the one-device mask).
    An offset off by one shard length is not proven."""
    q, k, v = randn(8, 2, 4), randn(8, 2, 4), randn(8, 2, 4)
    status = _right(cp_mesh, _cp_attention, [q, k, v], [[S0], [R], [R]], [S0], [[S0], [P], [P]],
                    reference=lambda q, k, v: _attention(q, k, v, 0))
    assert status == "ok"
    off = lambda q, k, v: _attention(q, k, v, axis_index("cp") * (q.shape[0] + 1))  # noqa: E731
    region = local_map(off, [S0], [[S0], [R], [R]], [[S0], [P], [P]], cp_mesh, check="strict")
    with pytest.raises((PlacementError, UnprovenError)):
        region(*[distribute(t, cp_mesh, p) for t, p in zip((q, k, v), ([S0], [R], [R]))])


def test_causal_attention_with_local_positions_is_refused(cp_mesh):
    _refused(cp_mesh, _local_causal, [randn(8, 2, 4), randn(8, 2, 4), randn(8, 2, 4)], [[S0], [R], [R]], [S0],
             "causal|positions")
