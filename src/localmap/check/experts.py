"""Routed rows that meet the experts of the rank they land on: the expert-parallel MoE step (``check.routing``).

Each rank holds ``L`` experts of a weight stack sharded along dim 0 over mesh dim m (``n`` ranks, ``n * L``
experts: rank r holds experts ``r*L .. r*L + L - 1``). The body sorts its rows by their expert ids (the keys),
sends each rank the rows of its experts and labels what arrives with local expert ids:

```python
order = keys.argsort()                                       # ascending: grouped by expert, so by rank
counts = torch.bincount(keys, minlength=n * L)
got = all_to_all_single(counts, m)                           # equal splits: L counts from every rank
send = counts.view(n, L).sum(1).tolist()                     # rows for each rank's experts
recv = got.view(n, L).sum(1).tolist()
rows = all_to_all_single(x[order], m, recv, send)
ids = torch.arange(L).repeat(n).repeat_interleave(got)       # each received row's local expert
```

Rank r receives from rank s the rows of s whose key lies in ``[r*L, r*L + L)``, in ascending key order, and
``got[s*L + l]`` of them have key ``r*L + l``: so ``ids`` holds each received row's key minus ``r*L``, which
indexes this rank's shard of the experts exactly where the key indexes the whole stack. Work that runs every
row through every local expert (``rows.unsqueeze(0) @ w1``: [L, rows, ...]) and then picks row i's expert
``ids[i]`` is therefore row-wise work with each row's own expert, the same on one rank over the whole stack.

``local_expert_ids`` checks this data flow node by node in the traced graph (the split sizes' provenance is in
the trace on fakes: ``.tolist()`` gives unbacked symbols made by ``_local_scalar_dense``); anything else is not
matched, and the proof stops as before.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from localmap import compat

aten = torch.ops.aten
A2A = compat.FUNCTIONAL_OPS.all_to_all_single.default
WAIT = compat.FUNCTIONAL_OPS.wait_tensor.default
SORTS = {aten.sort.default, aten.sort.stable}
_SAME_1D = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
            aten.clone.default, aten.detach.default}
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def sorted_keys(index: Any) -> fx.Node | None:
    """The 1-D tensor whose ascending sort gave `index` (its indices output), or None."""
    if not isinstance(index, fx.Node) or index.target is not operator.getitem or index.args[1] != 1:
        return None
    sort = index.args[0]
    if getattr(sort, "target", None) not in SORTS:
        return None
    descending = sort.kwargs.get("descending", False) if sort.target is aten.sort.stable else \
        arg(sort, 2, "descending", False)
    return None if descending else sort.args[0]


def value_of(x: Any) -> Any:
    """A graph argument's value: a node's traced value (a size may be symbolic), anything else itself."""
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _is(x: Any, n: Any) -> bool:
    return compat.known_equal(value_of(x), n)


def _strip_1d(node: Any) -> Any:
    """`node` without the 1-D views and copies around it (``got.reshape(-1)``)."""
    while isinstance(node, fx.Node) and node.target in _SAME_1D and getattr(value_of(node), "ndim", None) == 1 \
            and getattr(value_of(node.args[0]), "ndim", None) == 1:
        node = node.args[0]
    return node


def _count_exchange(got: Any, n: int) -> tuple[fx.Node, Any] | None:
    """(counts, group) when `got` is ``all_to_all_single(counts, m)`` with equal splits (waited), else None."""
    got = _strip_1d(got)
    a2a = got.args[0] if isinstance(got, fx.Node) and got.target is WAIT else got
    if not isinstance(a2a, fx.Node) or a2a.target is not A2A:
        return None
    counts, out_splits, in_splits = a2a.args[:3]
    size = getattr(value_of(counts), "shape", (None,))[0]
    if size is None or not compat.known_equal(size % n, 0):
        return None
    equal = all(isinstance(s, (list, tuple)) and len(s) == n and all(_is(v, size // n) for v in s)
                for s in (out_splits, in_splits))
    return (counts, a2a.args[3]) if equal else None


def _block_sums(splits: Any, counts: fx.Node, n: int, local: int) -> bool:
    """Whether `splits` are ``counts.view(n, L).sum(1).tolist()``: the rows for each rank's block of experts."""
    if not isinstance(splits, (list, tuple)) or len(splits) != n:
        return False
    sums = set()
    for i, s in enumerate(splits):
        if not isinstance(s, fx.Node) or s.target is not aten._local_scalar_dense.default:
            return False
        item = s.args[0]
        if item.target is operator.getitem and item.args[1] == i and item.args[0].target is aten.unbind.int \
                and arg(item.args[0], 1, "dim", 0) == 0:
            sums.add(item.args[0].args[0])
        elif item.target is aten.select.int and item.args[1] == 0 and item.args[2] == i:
            sums.add(item.args[0])
        else:
            return False
    if len(sums) != 1:
        return False
    total = sums.pop()
    if total.target is not aten.sum.dim_IntList or list(total.args[1]) not in ([1], [-1]) or \
            arg(total, 2, "keepdim", False):
        return False
    view = total.args[0]
    shape = getattr(value_of(view), "shape", ())
    return view.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and \
        len(shape) == 2 and _is(shape[0], n) and _is(shape[1], local) and _strip_1d(view.args[0]) is counts


def _labels(ids: Any, n: int) -> tuple[int, fx.Node] | None:
    """(L, got) when `ids` is ``arange(L).repeat(n)`` repeated element-wise by the 1-D counts ``got``."""
    if not isinstance(ids, fx.Node) or ids.target is not aten.index_select.default or ids.args[1] != 0:
        return None
    table, spread = ids.args[0], ids.args[2]
    if table.target is not aten.repeat.default or list(table.args[1]) != [n]:
        return None
    rng = table.args[0]
    if rng.target not in _ARANGES or not _counts_up_from_zero(rng):
        return None
    if spread.target is not aten.repeat_interleave.Tensor:
        return None
    return value_of(rng).shape[0], spread.args[0]


def _counts_up_from_zero(rng: fx.Node) -> bool:
    if rng.target is aten.arange.default:
        return True
    start = rng.args[0]
    step = arg(rng, 2, "step", 1) if rng.target is aten.arange.start_step else 1
    return start == 0 and step == 1


def local_expert_ids(ids: Any, dispatch: fx.Node, order: fx.Node, n: int) -> int | None:
    """L when `ids` labels the rows `dispatch` received with their key minus this rank's first expert, the keys
    being those whose ascending sort gave `order` (the dispatched rows are ``x[order]``); else None."""
    labels = _labels(ids, n)
    if labels is None:
        return None
    local, got = labels
    exchange = _count_exchange(got, n)
    keys = sorted_keys(order)
    if exchange is None or keys is None:
        return None
    counts, group = exchange
    if counts.target is not aten.bincount.default or counts.args[0] is not keys or \
            arg(counts, 1, "weights") is not None or arg(counts, 2, "minlength", 0) != n * local:
        return None
    out_splits, in_splits, dispatch_group = dispatch.args[1:4]
    if dispatch_group != group or not _block_sums(in_splits, counts, n, local) or \
            not _block_sums(out_splits, _strip_1d(got), n, local):
        return None
    return local
