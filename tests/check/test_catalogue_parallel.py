"""The region catalogue, continued (tests/check/test_types_catalogue.py holds its first part): region programs
from tensor, sequence, context, expert and data parallel code, each with the verdict the check must give and
every verdict backed by numbers against one device.

Verdicts: ``ok`` (no error, no warning; values and gradients equal one device's: proven, or tested where the
proof stops), ``refused`` (a PlacementError saying `says`; with the check off the region computes a wrong value or
gradient), ``unproven`` (the proof stops: the claim rests on a value the check cannot type; by default the test
against the one-rank run settles it: a right program runs silently, "tested", a wrong one is refused with the
test's numbers; ``check="strict"`` raises either way; the numbers are what `right` says), ``unchecked`` (the body
cannot be traced, on fakes or on the call's values: with its gradient placements given it runs with a
``local_map:`` warning, strict raises; numbers as `right` says). A body that branches on values is checked on the
branch taken.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from helpers import P, R, S0, S1, doubled, grad_for_output, rel_diff
from localmap import LocalMapError, Partial, PlacementError, Shard, local_map
from localmap import collectives as C
from localmap.testing import distribute, full, on_one_device, simulated_mesh

S2, S3, AVG = Shard(2), Shard(3), Partial("avg")
MESHES = {"tp": ((4,), ("tp",)), "cp": ((4,), ("cp",)), "ep": ((4,), ("ep",)), "dp": ((4,), ("dp",)),
          "dp_tp": ((2, 2), ("dp", "tp"))}


@dataclass
class Prog:
    name: str
    body: Callable  # the region's body; with `weights`, a factory: body(weights) -> the body
    inputs: list  # per input: a shape (float) or ("int", high, shape)
    ins: list  # in_placements per input
    out: tuple  # out_placements (one output)
    verdict: str  # "ok" | "refused" | "unproven" | "unchecked"
    says: str = ""  # refused: a fragment of the PlacementError
    right: bool | None = None  # do the numbers match one device (default: verdict == "ok")
    ref: Callable | None = None  # one-device computation when the body uses collectives (else the body itself)
    weights: list = field(default_factory=list)  # closed-over DTensors: (shape, placements)
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the region call
    grads: Any = None  # given in_grad_placements
    mesh: str = "tp"
    xfail: str | None = None  # what today's check gets wrong

    @property
    def is_right(self) -> bool:
        return self.verdict == "ok" if self.right is None else self.right


def _make(spec: Any, gen: torch.Generator) -> torch.Tensor:
    if spec and spec[0] == "int":
        return torch.randint(0, spec[1], spec[2], generator=gen)
    return torch.randn(*spec, generator=gen)


def run(prog: Prog, check: Any = True) -> dict[str, float]:
    """The region on DTensors of the simulated mesh against the one-device computation; returns the relative
    differences of the value and every gradient (inputs and closed-over weights)."""
    shape, names = MESHES[prog.mesh]
    with simulated_mesh(shape, names) as mesh:
        with on_one_device():
            gen = torch.Generator().manual_seed(7)
            inputs = [_make(s, gen) for s in prog.inputs]
            weights = [torch.randn(*s, generator=gen) for s, _ in prog.weights]
            ref_in = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs + weights]
            fn = prog.ref or (prog.body(ref_in[len(inputs):]) if prog.weights else prog.body)
            ref_out = fn(*ref_in[:len(inputs)], **prog.kwargs)
            upstream = torch.randn(ref_out.shape, generator=gen)
            ref_out.backward(upstream)
        dts = [distribute(t, mesh, pl, requires_grad=t.is_floating_point()) for t, pl in zip(inputs, prog.ins)]
        wds = [distribute(w, mesh, pl, requires_grad=True) for w, (_, pl) in zip(weights, prog.weights)]
        body = prog.body(wds) if prog.weights else prog.body
        out = local_map(body, [prog.out], prog.ins, prog.grads, mesh, check=check)(*dts, **prog.kwargs)
        out.backward(distribute(upstream, mesh, grad_for_output(prog.out)))
        diffs = {"out": rel_diff(full(out), ref_out)}
        for k, (d, r) in enumerate(zip(dts + wds, ref_in)):
            if r.grad is not None:
                diffs[f"grad{k}"] = rel_diff(full(d.grad), r.grad)
        return diffs


def _matches(diffs: dict[str, float]) -> bool:
    return all(v <= 1e-4 for v in diffs.values())


def _wrong_numbers(prog: Prog) -> bool:
    """With the check off, does the region compute something other than one device does?"""
    try:
        return not _matches(run(prog, check=False))
    except (AssertionError, RuntimeError):  # a Replicate output that differs across ranks, or shapes that differ
        return True


def local(w: Any) -> torch.Tensor:
    """A closed-over weight as the body sees it (torchtitan's ``self.w.to_local()``); the weight itself in the
    one-device reference. isinstance, not hasattr(w, "to_local"): Dynamo answers that hasattr False for a DTensor
    (docs/compile.md), so a compiled body would compute with the DTensor itself."""
    return w.to_local() if isinstance(w, DTensor) else w


# ---- bodies --------------------------------------------------------------------------------------------------

def vocab_embedding(ws):
    """Megatron's vocab-parallel embedding: the table Shard(0) closed over, ids Replicate, a Partial sum."""
    def body(ids):
        table = local(ws[0])
        start = C.axis_index("tp") * table.shape[0] if isinstance(ws[0], DTensor) else 0
        ids = ids - start
        inside = (ids >= 0) & (ids < table.shape[0])
        return F.embedding(ids.clamp(0, table.shape[0] - 1), table) * inside.unsqueeze(-1)
    return body


def vocab_parallel_ce(logits, labels):
    """Megatron's vocab-parallel cross-entropy: max detached and all-reduced, sum of exp all-reduced, the target
    logit picked on the rank that holds it."""
    m = C.all_reduce(logits.amax(-1, keepdim=True).detach(), "tp", "max")
    total = C.all_reduce((logits - m).exp().sum(-1, keepdim=True), "tp")
    n = logits.shape[-1]
    mine = labels - C.axis_index("tp") * n
    inside = (mine >= 0) & (mine < n)
    picked = logits.gather(-1, mine.clamp(0, n - 1).unsqueeze(-1)).squeeze(-1) * inside
    return (total.log().squeeze(-1) + m.squeeze(-1) - C.all_reduce(picked, "tp")).sum()


def vocab_parallel_ce_undetached(logits):
    """The same with the max not detached: the collective's result meets per-rank logits with a gradient."""
    m = C.all_reduce(logits.amax(-1, keepdim=True), "tp", "max")
    return ((logits - m).exp().sum(-1) + m.squeeze(-1)).sum()


def ce_sum(logits, labels):
    return F.cross_entropy(logits, labels, reduction="sum")


def cp_attention_lse_merge(q, k, v):
    """Context-parallel attention: keys/values sharded on the sequence, each rank attends to its block, the
    blocks' softmaxes merged exactly by their log-sum-exp."""
    s = q @ k.transpose(-1, -2) / 2.0
    m = s.amax(-1, keepdim=True)
    p = (s - m).exp()
    lse = m + p.sum(-1, keepdim=True).log()
    o = (p / p.sum(-1, keepdim=True)) @ v
    top = C.all_reduce(lse.detach(), "cp", "max")
    w = (lse - top).exp()
    return C.all_reduce(o * w, "cp") / C.all_reduce(w, "cp")


def attention(q, k, v):
    return (q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v


def cp_attention_local_softmax(q, k, v):
    """Each rank's softmax over its own keys, summed: the blocks are normalised separately (wrong)."""
    return C.all_reduce((q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v, "cp")


def sdpa_transposed_gqa(q, k, v):
    """torchtitan's inner attention: (B, L, N, H) heads sharded, transposed for SDPA, GQA, causal."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return o.transpose(1, 2)


def ln_by_hand(x, w):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def split_then_ops(x):
    a, b = x.split([2, 4], dim=1)
    return a.contiguous().sum(1) + b.sum(1)


def mixed_use(x, w):
    """x meets the sharded weight and is also returned whole: its gradient is partly partial, partly whole."""
    return C.all_gather(x @ w, "tp", dim=1) + x


def branch_on_values(x, w):
    if x.new_ones(()).item() > 0:  # reads a tensor into Python: checked on the call's values
        return x @ w
    return x


def untraceable(x, w):
    return doubled(x) @ w  # a custom op with no fake implementation: no trace can follow it


def maybe_total(a, total=False):
    return a.sum(0, keepdim=True) if total else a * 2


def position_offset(x, pos):
    """Each rank adds its own rows of the position table (offset by its index on cp)."""
    n = x.shape[0]
    return x + pos.index_select(0, C.axis_index("cp") * n + torch.arange(n))


def all_to_all_rows_to_cols(x):
    return C.all_to_all(x, "ep", split_dim=1, concat_dim=0) * 2


def heads_reshape(x):
    """Three heads hard-coded: the local feature count (3 of 12) is not three heads of the global width."""
    return x.reshape(x.shape[0], x.shape[1], 3, -1) * 1


def _ce_ref(logits, labels):
    return F.cross_entropy(logits, labels, reduction="sum")


def _undetached_ref(x):
    m = x.amax(-1, keepdim=True)
    return ((x - m).exp().sum(-1) + m.squeeze(-1)).sum()


IDS, LABELS = ("int", 16, (2, 5)), ("int", 16, (4,))

RIGHT = [
    # tensor parallel
    Prog("closed-over column weight (to_local)", lambda ws: lambda x: x @ local(ws[0]), [(4, 6)], [(R,)], (S1,),
         "ok", weights=[((6, 8), (S1,))]),
    Prog("closed-over row weight, partial sum", lambda ws: lambda x: x @ local(ws[0]), [(4, 8)], [(S1,)], (P,),
         "ok", weights=[((8, 4), (S0,))]),
    Prog("vocab-parallel embedding, closed-over table", vocab_embedding, [IDS], [(R,)], (P,), "ok",
         weights=[((16, 8), (S0,))]),
    Prog("swiglu column-parallel", lambda x, a, b: F.silu(x @ a) * (x @ b), [(4, 6), (6, 8), (6, 8)],
         [(R,), (S1,), (S1,)], (S1,), "ok"),
    Prog("row-parallel then all_reduce", lambda h, w: C.all_reduce(h @ w, "tp"), [(4, 8), (8, 4)], [(S1,), (S0,)],
         (R,), "ok", ref=lambda h, w: h @ w),
    Prog("heads reshape, local size divisible", lambda x: x.reshape(x.shape[0], x.shape[1], -1, 2) * 1,
         [(2, 3, 8)], [(S2,)], (S2,), "ok"),
    Prog("SDPA on transposed (B, L, N, H) heads, GQA", sdpa_transposed_gqa, [(2, 6, 8, 4), (2, 6, 4, 4),
         (2, 6, 4, 4)], [(S2,)] * 3, (S2,), "ok"),
    Prog("split_with_sizes then more ops", split_then_ops, [(8, 6)], [(S0,)], (S0,), "ok"),
    Prog("topk values over an unsharded dim", lambda x: x.topk(2, dim=1).values * 2, [(8, 6)], [(S0,)], (S0,),
         "ok"),
    Prog("max with indices over an unsharded dim", lambda x: (lambda v, i: v + i.to(v.dtype))(*x.max(dim=1)),
         [(8, 6)], [(S0,)], (S0,), "ok"),
    Prog("var_mean over an unsharded dim", lambda x: (lambda v, m: v + m)(*torch.var_mean(x, dim=1)), [(8, 6)],
         [(S0,)], (S0,), "ok"),
    Prog("chunk then product", lambda x: (lambda a, b: a * b)(*x.chunk(2, dim=1)), [(8, 6)], [(S0,)], (S0,), "ok"),
    Prog("sort values over an unsharded dim", lambda x: x.sort(1).values, [(8, 6)], [(S0,)], (S0,), "ok"),
    Prog("int64 labels: summed cross-entropy over a sharded batch", ce_sum, [(8, 10), ("int", 10, (8,))],
         [(S0,), (S0,)], (P,), "ok", grads=[(S0,), (S0,)]),
    Prog("Megatron vocab-parallel cross-entropy, detached max", vocab_parallel_ce, [(4, 16), LABELS], [(S1,), (R,)],
         (R,), "ok", ref=_ce_ref),
    Prog("layer norm by hand over unsharded features", ln_by_hand, [(8, 4), (4,)], [(S0,), (R,)], (S0,), "ok"),
    Prog("log_softmax over an unsharded dim", lambda x: x.log_softmax(-1), [(8, 4)], [(S0,)], (S0,), "ok"),
    Prog("std over an unsharded dim", lambda x: x.std(1) + x.var(1), [(8, 4)], [(S0,)], (S0,), "ok"),
    Prog("exp(s - logsumexp(s)) over an unsharded dim", lambda s: (s - s.logsumexp(-1, keepdim=True)).exp(),
         [(8, 4)], [(S0,)], (S0,), "ok"),
    Prog("keyword flag off", maybe_total, [(8, 4)], [(S0,)], (S0,), "ok", kwargs={"total": False}),
    Prog("mixed use of a replicated input (refused)", mixed_use, [(4, 8), (8, 8)],
         [(R,), (S1,)], (R,), "refused", "typed per rank",
         ref=lambda x, w: x @ w + x),
    Prog("branch on values with its gradient placements given", branch_on_values, [(8, 6), (6, 4)],
         [(S0,), (R,)], (S0,), "ok", grads=[(S0,), (P,)]),
    Prog("branch on values, weight gradient inferred on the branch taken", branch_on_values, [(8, 6), (6, 4)],
         [(S0,), (R,)], (S0,), "ok"),
    Prog("untraceable body with its gradient placements given", untraceable, [(8, 6), (6, 4)], [(S0,), (R,)],
         (S0,), "unchecked", right=True, grads=[(S0,), (P,)], ref=lambda x, w: x * 2 @ w),
    Prog("untraceable body, its weight's gradient given Replicate", untraceable, [(8, 6), (6, 4)], [(S0,), (R,)],
         (S0,), "unchecked", "differs from its one-rank run", right=False, grads=[(S0,), (R,)],
         ref=lambda x, w: x * 2 @ w),
    # sequence parallel
    Prog("all_gather the sequence, column-parallel matmul", lambda x, w: C.all_gather(x, "tp", dim=1) @ w,
         [(2, 8, 4), (4, 8)], [(S1,), (S1,)], (S2,), "ok", ref=lambda x, w: x @ w),
    Prog("row-parallel matmul, reduce_scatter over the sequence",
         lambda h, w: C.reduce_scatter(h @ w, "tp", dim=1), [(2, 8, 8), (8, 4)], [(S2,), (S0,)], (S1,), "ok",
         ref=lambda h, w: h @ w),
    Prog("rms norm on a sequence shard", rms, [(2, 8, 4), (4,)], [(S1,), (R,)], (S1,), "ok"),
    # context parallel
    Prog("context-parallel attention, log-sum-exp merge", cp_attention_lse_merge, [(2, 4, 4), (2, 8, 4),
         (2, 8, 4)], [(R,), (S1,), (S1,)], (R,), "ok", ref=attention, mesh="cp"),  # check.merges
    Prog("position table offset by the rank's index", position_offset, [(8, 4), (8, 4)], [(S0,), (R,)], (S0,),
         "ok", ref=lambda x, pos: x + pos, mesh="cp"),
    # expert parallel
    Prog("experts: batched matmul on the expert shard", torch.bmm, [(4, 3, 6), (4, 6, 5)], [(S0,), (S0,)], (S0,),
         "ok", mesh="ep"),
    Prog("experts: closed-over expert weights", lambda ws: lambda x: torch.bmm(x, local(ws[0])), [(4, 3, 6)],
         [(S0,)], (S0,), "ok", weights=[((4, 6, 5), (S0,))], mesh="ep"),
    Prog("experts: per-expert bias", lambda x, b: x + b, [(4, 3, 6), (4, 1, 6)], [(S0,), (S0,)], (S0,), "ok",
         mesh="ep"),
    Prog("all_to_all rows to columns", all_to_all_rows_to_cols, [(8, 8)], [(S0,)], (S1,), "ok",
         ref=lambda x: x * 2, mesh="ep"),
    # data parallel
    Prog("data-parallel linear, weight gradient partial", F.linear, [(8, 6), (4, 6)], [(S0,), (R,)], (S0,), "ok",
         mesh="dp"),
    Prog("data-parallel loss, Partial(avg)", lambda x, w: (x @ w).pow(2).mean(), [(8, 6), (6, 4)], [(S0,), (R,)],
         (AVG,), "ok", mesh="dp"),
    Prog("dp x tp: column-parallel on a batch shard", lambda x, w: torch.relu(x @ w), [(8, 6), (6, 8)],
         [(S0, R), (R, S1)], (S0, S1), "ok", mesh="dp_tp"),
    Prog("dp x tp: summed loss partial on both", lambda x, w: (x @ w).pow(2).sum(), [(8, 6), (6, 8)],
         [(S0, R), (R, S1)], (P, P), "ok", mesh="dp_tp"),
]

WRONG = [
    # tensor parallel
    Prog("closed-over column weight claimed Replicate", lambda ws: lambda x: x @ local(ws[0]), [(4, 6)], [(R,)],
         (R,), "refused", "claimed Replicate", weights=[((6, 8), (S1,))]),
    Prog("closed-over row weight: partial sum claimed Shard", lambda ws: lambda x: x @ local(ws[0]), [(4, 8)],
         [(S1,)], (S0,), "refused", "partial sum", weights=[((8, 4), (S0,))]),
    Prog("vocab-parallel embedding claimed Replicate", vocab_embedding, [IDS], [(R,)], (R,), "refused",
         "claimed Replicate", weights=[((16, 8), (S0,))]),
    Prog("swiglu claimed Replicate", lambda x, a, b: F.silu(x @ a) * (x @ b), [(4, 6), (6, 8), (6, 8)],
         [(R,), (S1,), (S1,)], (R,), "refused", "claimed Replicate"),
    Prog("heads reshape, local size not divisible", heads_reshape, [(2, 3, 12)], [(S2,)], (S3,), "refused",
         "is a shard of dim 2"),
    Prog("heads reshape claimed on the head-dim", lambda x: x.reshape(x.shape[0], x.shape[1], -1, 2) * 1,
         [(2, 3, 8)], [(S2,)], (S3,), "refused", "claimed Shard(dim=3)"),
    Prog("split_with_sizes then ops, claimed Replicate", split_then_ops, [(8, 6)], [(S0,)], (R,), "refused",
         "claimed Replicate"),
    Prog("topk values claimed Replicate", lambda x: x.topk(2, dim=1).values * 2, [(8, 6)], [(S0,)], (R,),
         "refused", "claimed Replicate"),
    Prog("max with indices claimed Replicate", lambda x: (lambda v, i: v + i.to(v.dtype))(*x.max(dim=1)),
         [(8, 6)], [(S0,)], (R,), "refused", "claimed Replicate"),
    Prog("var_mean claimed Replicate", lambda x: (lambda v, m: v + m)(*torch.var_mean(x, dim=1)), [(8, 6)],
         [(S0,)], (R,), "refused", "claimed Replicate"),
    Prog("int64 labels: mean cross-entropy over a sharded batch claimed Replicate",
         lambda x, y: F.cross_entropy(x, y), [(8, 10), ("int", 10, (8,))], [(S0,), (S0,)], (R,), "refused",
         "claimed Replicate"),
    Prog("vocab-parallel CE, max not detached (needs pvary)", vocab_parallel_ce_undetached, [(4, 16)], [(S1,)],
         (R,), "refused", "pvary", ref=_undetached_ref),
    Prog("vocab-sharded logits, local max subtracted, claimed Shard",
         lambda x: (x - x.amax(-1, keepdim=True).detach()).exp(), [(4, 16)], [(S1,)], (S1,), "refused",
         "x - amax(x) along dim 1, which is sharded"),
    Prog("softmax by exp(s - logsumexp(s)) over the sharded dim", lambda s: (s - s.logsumexp(-1, keepdim=True)).exp(),
         [(4, 8)], [(S1,)], (S1,), "refused", "x - logsumexp(x) along dim 1, which is sharded"),
    Prog("layer norm by hand over sharded features", ln_by_hand, [(8, 8), (8,)], [(S1,), (S0,)], (S1,), "refused",
         "Partial"),
    Prog("log_softmax over the sharded dim", lambda x: x.log_softmax(-1), [(4, 8)], [(S1,)], (S1,), "refused",
         "log_softmax along dim 1, which is sharded"),
    Prog("std over the sharded dim claimed Partial", lambda x: x.std(1), [(4, 8)], [(S1,)], (P,), "refused",
         "reduces over dim 1"),
    Prog("cumsum over the sharded dim", lambda x: x.cumsum(1), [(4, 8)], [(S1,)], (S1,), "refused",
         "cumsum along dim 1, which is sharded"),
    Prog("keyword flag on: partial sum claimed Shard", maybe_total, [(8, 4)], [(S0,)], (S0,), "refused",
         "partial sum", kwargs={"total": True}),
    # sequence parallel
    Prog("reshape(-1, d) of a sequence shard claimed Shard(0)", lambda x: x.reshape(-1, x.shape[-1]) * 1,
         [(2, 8, 4)], [(S1,)], (S0,), "refused", "interleaved"),
    Prog("position table sliced by the local length", lambda x, pos: x + pos[: x.shape[1]], [(2, 8, 4), (8, 4)],
         [(S1,), (R,)], (S1,), "refused", "first rows instead of its own"),
    Prog("all_gather result claimed Shard", lambda x: C.all_gather(x, "tp", dim=1) * 2, [(2, 8, 4)], [(S1,)],
         (S1,), "refused", "claimed Shard(dim=1)", ref=lambda x: x * 2),
    Prog("reduce_scatter result claimed Replicate", lambda h, w: C.reduce_scatter(h @ w, "tp", dim=1),
         [(2, 8, 8), (8, 4)], [(S2,), (S0,)], (R,), "refused", "claimed Replicate", ref=lambda h, w: h @ w),
    Prog("rms norm over a sharded hidden dim", rms, [(2, 4, 8), (8,)], [(S2,), (S0,)], (S2,), "refused",
         "Partial"),
    # context parallel
    Prog("context-parallel attention, blocks normalised separately", cp_attention_local_softmax,
         [(2, 4, 4), (2, 8, 4), (2, 8, 4)], [(R,), (S1,), (S1,)], (R,), "refused",
         "each rank attends only to its own key block", ref=attention, mesh="cp"),
    Prog("autoparallel's CP attention: q, k, v sharded on the sequence", lambda q, k, v:
         F.scaled_dot_product_attention(q, k, v), [(1, 2, 8, 4)] * 3, [(S2,)] * 3, (S2,), "refused",
         "sharded along dim 2, the key sequence", mesh="cp"),
    Prog("attention over a key shard claimed as a sequence shard", attention, [(2, 8, 4), (2, 8, 4), (2, 8, 4)],
         [(S1,), (S1,), (S1,)], (S1,), "refused", "each rank attends only to its own key block", mesh="cp"),
    # expert parallel
    Prog("experts: batched matmul claimed Replicate", torch.bmm, [(4, 3, 6), (4, 6, 5)], [(S0,), (S0,)], (R,),
         "refused", "claimed Replicate", mesh="ep"),
    Prog("experts: closed-over weights claimed Replicate", lambda ws: lambda x: torch.bmm(x, local(ws[0])),
         [(4, 3, 6)], [(S0,)], (R,), "refused", "claimed Replicate", weights=[((4, 6, 5), (S0,))], mesh="ep"),
    Prog("all_to_all rows to columns claimed on the old dim", all_to_all_rows_to_cols, [(8, 8)], [(S0,)], (S0,),
         "refused", "is a shard of dim 1 but is claimed Shard(dim=0)", ref=lambda x: x * 2, mesh="ep"),
    # data parallel
    Prog("data-parallel batch statistics: mean over the sharded batch", lambda x: x - x.mean(0), [(8, 4)], [(S0,)],
         (S0,), "refused", "Partial", mesh="dp"),
    Prog("data-parallel loss claimed Replicate", lambda x, w: (x @ w).pow(2).mean(), [(8, 6), (6, 4)],
         [(S0,), (R,)], (R,), "refused", "claimed Replicate", mesh="dp"),
    Prog("dp x tp: summed loss claimed Replicate on tp", lambda x, w: (x @ w).pow(2).sum(), [(8, 6), (6, 8)],
         [(S0, R), (R, S1)], (P, R), "refused", "claimed Replicate", mesh="dp_tp"),
]
PROGS = RIGHT + WRONG


def _params(verdict: str) -> list:
    return [pytest.param(p, id=p.name, marks=[pytest.mark.xfail(strict=True, reason=p.xfail)] if p.xfail else [])
            for p in PROGS if p.verdict == verdict]


def _run_recording(prog: Prog) -> tuple[bool, list[str]]:
    """run() with the default check: whether it matched one device, and the local_map warnings it gave. A
    PlacementError propagates."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            matched = _matches(run(prog))
        except (AssertionError, RuntimeError) as e:
            if isinstance(e, LocalMapError):
                raise
            matched = False
    return matched, [str(w.message) for w in caught if str(w.message).startswith("local_map:")]


def test_catalogue_size():
    """With the first part: at least 80 programs, 40 right and 40 wrong, over five kinds of parallelism."""
    from test_types_catalogue import CASES

    right = sum(c.verdict == "ok" for c in CASES) + sum(p.is_right for p in PROGS)
    wrong = len(CASES) + len(PROGS) - right
    assert right >= 40 and wrong >= 40, (right, wrong)
    assert {p.mesh for p in PROGS} == set(MESHES)


@pytest.mark.parametrize("prog", _params("ok"))
def test_right_programs_run_silently_and_match_one_device(prog):
    matched, said = _run_recording(prog)
    assert not said, said
    assert matched, "differs from one device"


@pytest.mark.parametrize("prog", _params("refused"))
def test_wrong_programs_are_refused_and_really_wrong(prog):
    with pytest.raises(PlacementError) as info:
        run(prog)
    assert prog.says in str(info.value), str(info.value)
    assert "fix:" in str(info.value)
    assert _wrong_numbers(prog), "with the check off the region matches one device: the refusal is wrong"


@pytest.mark.parametrize("prog", _params("unproven"))
def test_claims_where_the_proof_stops_are_settled_by_the_test(prog):
    """The proof stops; the test (the region on the simulated mesh against its one-rank run) settles the claim:
    a right program runs silently ("tested") and matches one device, a wrong one is refused with the test's
    numbers and really computes other values; check='strict' (proven claims only) raises either way."""
    if prog.is_right:
        matched, said = _run_recording(prog)
        assert not said, said
        assert matched, "differs from one device"
    elif "all_to_all" in prog.name:  # rows routed between ranks: the one-rank run is another program, so the
        matched, said = _run_recording(prog)  # test's difference stays unproven, with its numbers (no false alarm)
        assert len(said) == 1 and "unproven" in said[0] and "tested on" in said[0], said
        assert _wrong_numbers(prog), "with the check off the region matches one device: it is not wrong"
    else:
        with pytest.raises(PlacementError) as info:
            run(prog)
        assert "differs from its one-rank run" in str(info.value) and "fix:" in str(info.value), str(info.value)
        assert _wrong_numbers(prog), "with the check off the region matches one device: the refusal is wrong"
    with pytest.raises(LocalMapError):
        run(prog, check="strict")


@pytest.mark.parametrize("prog", _params("unchecked"))
def test_untraceable_bodies_are_settled_by_the_test_and_fail_strict(prog):
    """No trace follows the body, so nothing is proven; with its gradient placements given (none is a guess) the
    test runs the body itself on the call's values against its one-rank run: a right program runs silently
    ("tested") and matches one device, a wrong one is refused with the test's numbers. Before, both warned
    "could not be checked" and ran. check='strict' raises either way."""
    if prog.is_right:
        matched, said = _run_recording(prog)
        assert not said and matched, said
    else:
        with pytest.raises(PlacementError) as info:
            run(prog)
        assert prog.says in str(info.value) and "the body could not be checked" in str(info.value), str(info.value)
        assert _wrong_numbers(prog), "with the check off the region matches one device: the refusal is wrong"
    with pytest.raises(LocalMapError):
        run(prog, check="strict")
