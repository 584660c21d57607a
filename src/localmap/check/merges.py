"""A log-sum-exp merge of per-rank attention blocks (context parallelism): proven whole.

Keys and values sharded along the key sequence on mesh dim m, each rank attends to its own block and the blocks
are merged exactly by their log-sum-exps::

    s = scores                       # [..., Lq, Lk], Shard(-1) on m: this rank's key block
    o = softmax(s, -1) @ v           # v Shard(-2) on m: this rank's value rows
    lse = logsumexp(s, -1, keepdim)  # in any of its forms: k + log(sum(exp(s - k))), aten.logsumexp
    w = exp(lse - c)                 # c the same on every rank (an all_reduce max of lse, usually)
    out = all_reduce(o * w) / all_reduce(w)

Each step alone is VARYING or AGREED (a local softmax, a local log-sum-exp: the rules cannot give them a global
meaning), so a claim on `out` was left to the test. Here the whole merge is recognised at its division and typed
as the attention over every key: Replicate on m (other mesh dims keep what DTensor's propagation gives).

NOTE: why the merge is proven. Write Z_r = sum_{j in r} exp(s_j) and U_r = sum_{j in r} exp(s_j) v_j over rank
r's keys j (its block of s's last dim and of v's rows: both evenly sharded on m with equal local lengths, so
the blocks pair up). For any k constant along the key dim, k + log sum_{j in r} exp(s_j - k) = log Z_r, so lse_r
= log Z_r whichever form computes it; the local softmax gives o_r = U_r / Z_r (softmax(s) = exp(s - lse) alike).
With c the same on every rank, w_r = Z_r exp(-c) and o_r w_r = U_r exp(-c) elementwise, so the two all_reduce
sums give exp(-c) sum_r U_r and exp(-c) sum_r Z_r, and their quotient is sum_j exp(s_j) v_j / sum_j exp(s_j):
softmax over every key of the global s, times the global v. That is what the one-rank run computes (there lse
is the whole log-sum-exp, c any value, w = exp(lse - c) and out = o), and it is the same on every rank (a
quotient of two all_reduce results). The match is exact: any other op between these steps, a reduction over
another dim, an in-place write to a matched value, an uneven shard or a strided one, and the merge is not
recognised (today's verdicts and the test settle it).

NOTE on fused kernels. ``o, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]`` (or another fused
kernel: ``check.attention.FUSED_ATTENTION``), without mask, dropout or causal mask, gives o_r = U_r / Z_r and
lse_r = log Z_r over rank r's keys as above (its lse has no last dim; ``lse.unsqueeze(-1)`` before or after the
exp broadcasts it over the head dim). With q the same on every rank of m and k, v this rank's key block (plain
shards of their second-last dim, equal local lengths), the same algebra proves the values. The gradients differ:
PyTorch's kernels return lse non-differentiable, so autograd sees each weight w_r = exp(lse_r - c) as a
constant, and the gradients of q and k miss the share that flows through the weights (on one rank the weights
cancel, so the one-rank run's gradients are the attention's own). So the merge is proven only where no gradient
reaches q or k (both detached, or not differentiable); where one does, the claim is refuted with that reason: the
region's gradients are wrong whatever its placements (its values are right).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Replicate, Shard

from localmap import compat
from localmap.check.attention import FUSED_ATTENTION, cuts_gradient
from localmap.check.propagation import default_types
from localmap.check.scans import reduces_along, scan_at
from localmap.collectives.registry import mesh_dim_of
from localmap.placements.types import RuleError, same_on_ranks

aten = torch.ops.aten

_PEELED = {aten.detach.default, aten.alias.default}  # the same values (a detached max shifts as well)
_BATCH_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}


def merged_attention(node: fx.Node, in_types: list, mesh: Any, types: dict, uneven: frozenset) -> Any:
    """The type of `node` (a div) when it completes a log-sum-exp merge over one mesh dim (see the NOTE
    above): DTensor's propagation with that dim Replicate; None when it does not."""
    if node.target is not aten.div.Tensor or len(node.args) != 2:
        return None
    top, bottom = (_all_reduced(a, mesh) for a in node.args)
    if top is None or bottom is None or top[1:] != bottom[1:] or top[1] not in ("sum", "avg"):
        return None
    m, w = top[2], bottom[0]
    if m in uneven or _shape(node) != _shape(node.args[0]) or not _merges(top[0], w, m, types):
        return None
    whole = [tuple(Replicate() if k == m else p for k, p in enumerate(t)) if isinstance(t, tuple) else t
             for t in in_types]  # the two sums as the attention over every key: whole on m
    try:
        out = default_types(node, whole, mesh, types)
    except RuleError:
        return None
    return tuple(Replicate() if k == m else p for k, p in enumerate(out)) if isinstance(out, tuple) else None


def _merges(product: Any, w: Any, m: int, types: dict) -> bool:
    """Whether `product` is o * w with o a local softmax of s times v and w = exp(lse(s) - c), c the same on
    every rank of m, s and v this rank's key block on m; or o and lse a fused attention kernel's two outputs
    (the NOTE on fused kernels)."""
    if not _binary(product, aten.mul.Tensor) or w not in product.args or _written(product) or _written(w):
        return False
    parts = _weights(w)
    if parts is None:
        return False
    o = product.args[1] if product.args[0] is w else product.args[0]
    lse, c = parts
    tc = types.get(c) if isinstance(c, fx.Node) else None
    if not isinstance(tc, tuple) or not same_on_ranks(tc[m]) or _shape(product) != _shape(o):
        return False
    kernel = _fused_pair(o, lse)
    if kernel is not None:
        return _fused_key_block(kernel, m, types)
    operands = _matmul_operands(o)
    if operands is None:
        return False
    probs, v = operands
    s = _local_lse_source(lse)
    return s is not None and s in _softmax_sources(probs, s) and _key_block(s, v, m, types)


def _weights(w: fx.Node) -> tuple[Any, Any] | None:
    """(lse, c) where `w` is exp(lse - c), or that with a size-1 last dim added after the exp (a kernel's lse has
    no last dim to broadcast over the head dim)."""
    shape = _shape(w)
    added = _is(w, aten.unsqueeze.default) and shape is not None and w.args[1] in (-1, len(shape) - 1)
    e = w.args[0] if added else w
    if not _is(e, aten.exp.default) or not _binary(e.args[0], aten.sub.Tensor) or _written(e):
        return None
    lse, c = e.args[0].args
    return (lse, c) if _shape(e) == _shape(lse) else None


def _fused_pair(o: Any, lse: Any) -> fx.Node | None:
    """The fused attention kernel whose output 0 is `o` and output 1 (its log-sum-exp, maybe with a size-1 last
    dim added) is `lse`, with no mask, no dropout and no causal mask; None otherwise."""
    shape = _shape(lse)
    if _is(lse, aten.unsqueeze.default) and shape is not None and lse.args[1] in (-1, len(shape) - 1):
        lse = lse.args[0]
    if not (_is(o, operator.getitem) and _is(lse, operator.getitem)) or o.args[1] != 0 or lse.args[1] != 1 \
            or o.args[0] is not lse.args[0] or not _is(o.args[0], *FUSED_ATTENTION):
        return None
    kernel = o.args[0]
    arg = lambda name, default=None: compat.call_argument(kernel.target, kernel.args, kernel.kwargs, name,  # noqa: E731
                                                          default)
    if arg("attn_mask") is not None or arg("attn_bias") is not None or arg("dropout_p", 0.0) != 0 \
            or arg("is_causal", False) or set(kernel.all_input_nodes) - set(kernel.args[:3]):
        return None
    return kernel


def _fused_key_block(kernel: fx.Node, m: int, types: dict) -> bool:
    """q the same on every rank of m, k and v this rank's key block (plain shards of their second-last dim, of
    equal local length); raises where a gradient reaches q or k (the NOTE on fused kernels)."""
    q, k, v = kernel.args[:3]
    tq, tk, tv = (types.get(a) for a in (q, k, v))
    kv, vv = _val(k), _val(v)
    if not all(isinstance(t, tuple) for t in (tq, tk, tv)) or kv is None or vv is None or kv.ndim < 2 \
            or not same_on_ranks(tq[m]) or not _shard_of(tk[m], kv.ndim - 2) or not _shard_of(tv[m], vv.ndim - 2) \
            or not compat.known_equal(kv.shape[-2], vv.shape[-2]):
        return False
    if _gradient_reaches(q) or _gradient_reaches(k):
        raise RuleError(
            f"merges the ranks' attention blocks by the log-sum-exp {_op_name(kernel)} returns, which carries no "
            "gradient (PyTorch's fused attention kernels return it non-differentiable): the merge's values are "
            "the attention over every key, but the gradients of q and k miss the weights' share (each block's "
            "weight exp(lse - c) depends on q and k), so they differ from the one-rank run's",
            "compute the log-sum-exp from the scores (torch.logsumexp(q @ k.transpose(-1, -2) * scale, -1)) "
            "and the blocks with it, or give the merge its own backward (a torch.autograd.Function using the "
            "kernel's backward with the merged log-sum-exp, as ring attention does); for inference only, "
            "detach q and k in the body", mesh_dim=m)
    return True


def _gradient_reaches(node: Any) -> bool:
    """Whether a gradient can flow back from `node` to a floating-point input: a path through no op that cuts it
    (``check.attention.cuts_gradient``: detach, a fused kernel's log-sum-exp)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen or cuts_gradient(n):
            continue
        seen.add(n)
        val = _val(n)
        if n.op == "placeholder":
            if val is not None and (val.is_floating_point() or val.is_complex()):
                return True
            continue
        todo.extend(n.all_input_nodes)
    return False


def _op_name(node: fx.Node) -> str:
    return f"aten.{node.target.name().split('::')[-1]}"


def _key_block(s: fx.Node, v: fx.Node, m: int, types: dict) -> bool:
    """s typed Shard(last dim) on m, v Shard(its second-last) on m, plain shards of equal local length."""
    ts, tv = types.get(s), types.get(v)
    sv, vv = _val(s), _val(v)
    if not isinstance(ts, tuple) or not isinstance(tv, tuple) or sv is None or vv is None or vv.ndim < 2:
        return False
    return _shard_of(ts[m], sv.ndim - 1) and _shard_of(tv[m], vv.ndim - 2) \
        and compat.known_equal(sv.shape[-1], vv.shape[-2])


def _shard_of(p: Any, dim: int) -> bool:
    return isinstance(p, Shard) and not compat.is_strided_shard(p) and p.dim == dim


def _local_lse_source(lse: Any) -> fx.Node | None:
    """s where `lse` is logsumexp(s, -1, keepdim=True), or k + log(sum(exp(s - k), -1, keepdim=True)) with k
    constant along the last dim (either order of the add); None otherwise."""
    s = lse.args[0] if _is(lse, aten.logsumexp.default) else None
    if s is not None:
        return s if _last_dim_reduction(lse, aten.logsumexp.default, s) else None
    if not _binary(lse, aten.add.Tensor) or _written(lse):
        return None
    for k, log in (lse.args, lse.args[::-1]):
        total = log.args[0] if _is(log, aten.log.default) else None
        e = total.args[0] if _is(total, aten.sum.dim_IntList) else None
        shift = e.args[0] if _is(e, aten.exp.default) else None
        if shift is None or not _binary(shift, aten.sub.Tensor) or _peel(shift.args[1]) is not _peel(k):
            continue
        s = shift.args[0]
        if _last_dim_reduction(total, aten.sum.dim_IntList, e) and _shape(k) == _shape(total) \
                and not any(_written(x) for x in (log, total, e, shift)):
            return s
    return None


def _softmax_sources(probs: Any, s: fx.Node) -> tuple:
    """The values `probs` is a local softmax of along the last dim: a decomposed softmax (check.scans), or
    exp(s - lse(s))."""
    val = _val(probs)
    if val is None or _written(probs) or _shape(probs) != _shape(s):
        return ()
    found = scan_at(probs, val.ndim - 1)
    if found is not None and found.op == "softmax":
        return found.sources
    if _is(probs, aten.exp.default) and _binary(probs.args[0], aten.sub.Tensor):
        x, lse = probs.args[0].args[:2]
        return (x,) if x is s and _local_lse_source(lse) is s else ()
    return ()


def _matmul_operands(o: Any) -> tuple[fx.Node, fx.Node] | None:
    """(p, v) where `o` is p @ v (bmm or mm, under views of the batch dims only): p's last dim contracted with
    v's second-last."""
    if _is(o, aten._unsafe_view.default) or _is(o, aten.view.default):
        o = o.args[0] if _is(o.args[0], aten.bmm.default) else o
    if not (_is(o, aten.bmm.default) or _is(o, aten.mm.default)):
        return None
    p, v = (_batch_viewed(a) for a in o.args[:2])
    return (p, v) if p is not None and v is not None else None


def _batch_viewed(a: Any) -> fx.Node | None:
    """The value under views and expands that keep its last two dims as they are (only batch dims reshaped)."""
    tail = _shape(a)
    while _is(a, *_BATCH_VIEWS) and isinstance(a.args[0], fx.Node):
        below = _shape(a.args[0])
        if tail is None or below is None or len(below) < 2 or below[-2:] != tail[-2:]:
            return None
        a = a.args[0]
    return a if isinstance(a, fx.Node) and tail is not None and len(tail) >= 2 else None


def _all_reduced(node: Any, mesh: Any) -> tuple[fx.Node, str, int] | None:
    """(source, op, mesh dim) of an all_reduce: localmap's ``reduced(x, result, op, group)`` or the functional
    ``wait_tensor(all_reduce(x, op, group))``."""
    if _is(node, torch.ops.localmap.reduced.default):
        src, op, at = node.args[0], node.args[2], node
    elif _is(node, compat.FUNCTIONAL_OPS.wait_tensor.default) and \
            _is(node.args[0], compat.FUNCTIONAL_OPS.all_reduce.default):
        at = node.args[0]
        src, op = _peel(at.args[0]), at.args[1]
    else:
        return None
    try:
        return src, op, mesh_dim_of(at, mesh)
    except RuleError:
        return None


def _last_dim_reduction(node: fx.Node, target: Any, src: Any) -> bool:
    x = _val(src)
    return x is not None and x.ndim >= 1 and reduces_along(node, target, src, x.ndim - 1)


def _written(node: fx.Node) -> bool:
    """Whether some op writes to `node`'s tensor in place (then the values read later are not the ones matched)."""
    for user in node.users:
        schema = compat.op_schema(user.target) if user.op == "call_function" else None
        if schema is None:
            continue
        for arg, formal in zip(user.args, schema.arguments):
            if arg is node and formal.alias_info is not None and formal.alias_info.is_write:
                return True
    return False


def _peel(a: Any) -> Any:
    while _is(a, *_PEELED):
        a = a.args[0]
    return a


def _binary(a: Any, target: Any) -> bool:
    """`a` is target(x, y) with no alpha (add and sub's scale of y)."""
    return _is(a, target) and len(a.args) == 2 and not a.kwargs


def _is(a: Any, *targets: Any) -> bool:
    return isinstance(a, fx.Node) and a.op == "call_function" and a.target in targets


def _val(a: Any) -> torch.Tensor | None:
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape(a: Any) -> tuple | None:
    v = _val(a)
    return tuple(v.shape) if v is not None else None
