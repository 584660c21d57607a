"""Rows routed by an all_to_all and permuted by a sort, and brought back: the expert-parallel dispatch/combine.

A value's rows may be in a *frame*: a stack of steps away from rows whose placement type is known (the base).

* ``("perm", order)``: ``x[order]`` with ``order`` the indices of a sort of a 1-D tensor as long as ``x``'s dim 0
  (a permutation of the local rows, whatever the keys);
* ``("a2a", m, passed)``: ``all_to_all_single`` over mesh dim m of rows whose base is sharded along dim 0 there
  (the ranks' rows partition the global rows), with the split-size lists the body passed (by identity).

Inside a frame only row-wise ops keep it: pointwise ops whose other operands broadcast over dim 0, ``mm`` /
``addmm`` of the rows by a matrix, copies and views that keep dim 0. Operands from outside the frame must be the
same on every rank of the frame's all_to_all mesh dims (a row computed on another rank must see what it would
have seen at home). A value in a frame carries the type its rows would have at the base (what the row-wise work
gives there); the frame's last step is undone by

* the inverse all_to_all: the same mesh dim, the dispatch's split-size lists passed swapped (the same Python
  objects, holding the same values at both calls): it sends every row back where it came from;
* ``index_copy(base, 0, order, rows)`` into a base of as many rows (every row written), or ``rows[inverse]`` with
  ``inverse`` the sort indices of ``order``: the permutation undone.

Back at the base, the value has the base's rows in their order with row-wise work applied, so its carried type
holds. Every value also keeps its own type by the ordinary rules (an all_to_all's result is Varying on its mesh
dim), which is what any other use of it, and an output still in a frame, gets: the proof stops there. The split-size lists are matched by identity, not by their values in the traced graph: when a body
is traced on one rank's values, sizes received from other ranks are not the real ones.

Work between a dispatch and its combine may also depend on the rank the rows land on, in one way: every routed
row through every expert this rank holds (an ``[experts, rows, ...]`` value, ``batched``), then each row's own
expert picked by local expert ids that ``check.experts`` proves are the rows' keys less this rank's first expert.
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any, Callable

import torch
import torch.fx as fx

from localmap import compat
from localmap.check.experts import local_expert_ids, sorted_keys, value_of
from localmap.collectives.registry import mesh_dim_of
from localmap.placements.types import PER_RANK_COPY, UNKNOWN_WHY
from torch.distributed.tensor.placement_types import Replicate

aten = torch.ops.aten
SPLITS_PASSED = "localmap_splits_passed"  # gm.meta key: the all_to_all_single calls' split lists, in call order
_A2A = compat.FUNCTIONAL_OPS.all_to_all_single.default
_WAIT = compat.FUNCTIONAL_OPS.wait_tensor.default
_ROW_COPIES = {aten.clone.default, aten.detach.default, aten.alias.default, aten._to_copy.default, _WAIT}
_ROW_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_MATMULS = {aten.mm.default: 0, aten.addmm.default: 1}  # op -> position of the rows operand


def splits_by_node(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Each all_to_all_single node's split lists as the body passed them, when the logged calls line up with
    the graph's all_to_all nodes one for one (same count, same values); else none (no pairing is proven)."""
    log = gm.meta.get(SPLITS_PASSED)
    nodes = list(gm.graph.find_nodes(op="call_function", target=_A2A))
    if log is None or len(log) != len(nodes):
        return {}
    for node, passed in zip(nodes, log):
        for given, traced in zip(passed.values, node.args[1:3]):
            if given is not None and not _same_sizes(given, traced):
                return {}
    return dict(zip(nodes, log))


def _same_sizes(given: tuple, traced: Any) -> bool:
    """The sizes a call passed and those its graph node holds agree (symbolic sizes are not compared)."""
    return isinstance(traced, (list, tuple)) and len(traced) == len(given) and all(
        type(g) is not int or (type(t) is int and t == g) for g, t in zip(given, traced))


class Frames:
    """The frame of each value whose rows are routed or permuted (absent: the value is at its base), and the type
    its rows carry (``types`` keeps every value's own type, by the ordinary rules)."""

    def __init__(self, gm: fx.GraphModule, mesh: Any, uneven: frozenset = frozenset()) -> None:
        self.mesh, self.passed, self.uneven = mesh, splits_by_node(gm), uneven
        self.of: dict[fx.Node, tuple] = {}
        self.carried: dict[fx.Node, Any] = {}
        self.dispatches: dict[tuple, fx.Node] = {}  # an all_to_all step of a frame -> its node
        # [experts, rows, ...] values: every routed row through every local expert (check.experts), as
        # (frame of the rows, local experts L, the type the rows carry)
        self.batched: dict[fx.Node, tuple] = {}
        self.equal_rows: list[tuple] = []  # (a combine's row count, its dispatch's): equal when both ran

    def type_of(self, node: fx.Node, types: dict, by: Callable[[Any], Any]) -> Any:
        """`node`'s type: `by(types)` (its ordinary rule on the values' own types), except where it undoes the
        last step of a frame: then the type its rows carried. A node that makes or keeps a frame records the
        carried type (`by` on the carried types)."""
        view = ChainMap(self.carried, types)
        made = self._made(node, view)
        if made is None and self._expert_step(node, view):
            return by(types)
        if made is None:
            framed = [self.of[a] for a in node.all_input_nodes if a in self.of]
            if framed and all(f == framed[0] for f in framed) and self._row_wise(node, framed[0], view):
                made = framed[0], by(view)
        if made is None:
            return by(types)
        frame, carried = made
        if not frame:
            return carried  # back at the base
        self.of[node], self.carried[node] = frame, carried
        t = by(types)
        if frame != self.of.get(node.args[0] if node.args else None):
            node.meta[UNKNOWN_WHY] = (
                "its rows are routed by an all_to_all or permuted by a sort and not brought back (no inverse "
                "all_to_all with the same split lists swapped, no un-permute, or work between that is not "
                "row-wise)")
        return t

    def _made(self, node: fx.Node, types: dict) -> tuple[tuple, Any] | None:
        """(frame, type) when `node` pushes or pops a step, or picks each routed row's expert."""
        if node.target is aten.index.Tensor and len(node.args[1]) == 2 and node.args[0] in self.batched:
            return self._picked_experts(node, types)
        if node.target is aten.squeeze.dim and node.args[0] in self.batched and node.args[1] == 0:
            frame, local, carried = self.batched[node.args[0]]  # rows.unsqueeze(0).squeeze(0): the rows again
            return (frame, carried) if _same(local, 1) else None
        rows_index = _rows_indexed(node)
        if rows_index is not None:
            rows, index = rows_index
            frame = self.of.get(rows, ())
            if frame and frame[-1] == ("perm", _sorted_order(index)) and self._rows_match(index, rows):
                return frame[:-1], types.get(rows)  # rows[argsort(order)]: the permutation undone
            if _is_permutation(index, rows) and types.get(rows) is not None:
                return frame + (("perm", index),), types[rows]
            return None
        if node.target is aten.index_copy.default:
            base, dim, order, src = node.args[:4]
            frame = self.of.get(src, ())
            if dim == 0 and frame and frame[-1] == ("perm", order) and _same(_rows(base), _rows(src)) \
                    and self._rows_match(src, order):
                return frame[:-1], types.get(src)
            return None
        if node.target is _A2A:
            return self._all_to_all(node, types)
        return None

    def _all_to_all(self, node: fx.Node, types: dict) -> tuple[tuple, Any] | None:
        rows, passed = node.args[0], self.passed.get(node)
        t, frame = types.get(rows), self.of.get(rows, ())
        if passed is None or t is None:  # (None split sizes, equal splits, are matched like a list)
            return None
        m = mesh_dim_of(node, self.mesh)
        last = frame[-1] if frame else None
        if last is not None and last[0] == "a2a" and last[1:] == (m, *_key(passed, swapped=True)):
            # The combine returns as many rows as the dispatch sent: its output sizes are the dispatch's input
            # sizes, whose sum c10d checks against the rows sent (else the dispatch fails).
            sent = self.dispatches.get(last)
            if sent is not None:
                self.equal_rows.append((_rows(node), _rows(sent.args[0])))
            return frame[:-1], t
        if compat.sharded_dim(t[m]) == 0:
            step = ("a2a", m, *_key(passed))
            self.dispatches[step] = node
            return frame + (step,), t
        return None

    def _expert_step(self, node: fx.Node, types: dict) -> bool:
        """Whether `node` makes or keeps an [experts, rows, ...] value (recorded in ``batched``): routed rows
        given a leading dim (unsqueeze, expand), views keeping the two leading dims, a batched matmul by an
        expert stack of this rank (``expert_weight``), pointwise work with operands the same on every rank."""
        val, a = node.meta.get("val"), node.args[0] if node.args else None
        if not isinstance(val, torch.Tensor) or val.ndim < 3 or not isinstance(a, fx.Node):
            return False
        made = None
        if a in self.of and node.target in (aten.unsqueeze.default, aten.expand.default) and \
                a.meta["val"].ndim == val.ndim - 1 and _same(val.shape[1], _rows(a)) and (node.target is aten.expand.default or node.args[1] == 0):
            made = (self.of[a], val.shape[0], types.get(a))
        elif a in self.batched and _same(val.shape[1], a.meta["val"].shape[1]):
            frame, local, carried = self.batched[a]
            if node.target in _ROW_VIEWS and _same(local, val.shape[0]) or \
                    node.target is aten.expand.default and (_same(local, 1) or _same(local, val.shape[0])):
                made = (frame, val.shape[0], carried)  # a view keeping both leading dims, or experts broadcast
            elif node.target is aten.bmm.default and _same(local, val.shape[0]) and \
                    self._expert_weight(node.args[1], frame, local, types):
                made = self.batched[a]
            elif torch.Tag.pointwise in getattr(node.target, "tags", ()) and all(
                    self.batched.get(b) == self.batched[a] and b.meta["val"].shape == val.shape
                    or self._same_everywhere(b, val, types) for b in node.all_input_nodes):
                made = self.batched[a]
        if made is None:
            return False
        self.batched[node] = made
        return True

    def _expert_weight(self, w: Any, frame: tuple, local: Any, types: dict) -> bool:
        """`w` (through same-shape views and expands) is an input holding L experts along dim 0, sharded there
        evenly over the frame's all_to_all mesh dim and the same on every other mesh dim."""
        while isinstance(w, fx.Node) and w.target in (*_ROW_VIEWS, aten.expand.default) and \
                tuple(w.meta["val"].shape) == tuple(w.args[0].meta["val"].shape):
            w = w.args[0]
        t = types.get(w) if isinstance(w, fx.Node) else None
        moved = [step[1] for step in frame if step[0] == "a2a"]
        if t is None or len(moved) != 1 or moved[0] in self.uneven or not _same(w.meta["val"].shape[0], local):
            return False
        return all(compat.sharded_dim(p) == 0 if m == moved[0] else isinstance(p, Replicate) for m, p in enumerate(t))

    def _same_everywhere(self, b: fx.Node, out: torch.Tensor, types: dict) -> bool:
        """An operand broadcast over the experts and rows dims and the same on every rank."""
        t, val = types.get(b), b.meta.get("val")
        return t is not None and all(isinstance(p, Replicate) for p in t) and \
            (not isinstance(val, torch.Tensor) or val.ndim <= out.ndim - 2)

    def _rows_match(self, a: fx.Node, b: fx.Node) -> bool:
        """Whether `a` and `b` have as many rows: known from their sizes, or a combine's rows are its dispatch's
        (symbolic sizes from .tolist() in a trace on fakes)."""
        ra, rb = _rows(a), _rows(b)
        return _same(ra, rb) or any(_same(ra, x) and _same(rb, y) or _same(ra, y) and _same(rb, x)
                                    for x, y in self.equal_rows)

    def _picked_experts(self, node: fx.Node, types: dict) -> tuple[tuple, Any] | None:
        """``y[ids, arange(rows)]`` on an [experts, rows, ...] value: row i's output from expert ``ids[i]``;
        routed rows again when ``ids`` are the rows' keys less this rank's first expert (check.experts)."""
        y, (ids, positions) = node.args[0], node.args[1]
        frame, local, carried = self.batched[y]
        rows = y.meta["val"].shape[1]
        if len(frame) < 2 or frame[-2][0] != "perm" or frame[-1] not in self.dispatches or \
                not isinstance(positions, fx.Node) or positions.target is not aten.arange.default or \
                not _same(value_of(positions.args[0]), rows) or not _same(node.meta["val"].shape[0], rows):
            return None
        order, dispatch = frame[-2][1], self.dispatches[frame[-1]]
        permuted = _rows_indexed(dispatch.args[0]) if isinstance(dispatch.args[0], fx.Node) else None
        if permuted is None or permuted[1] is not order or \
                not self._aligned(sorted_keys(order), permuted[0], frame[:-2], types):
            return None
        n = self.mesh.size(frame[-1][1])
        found = local_expert_ids(ids, dispatch, order, n)
        return (frame, carried) if found is not None and _same(found, local) else None

    def _aligned(self, keys: Any, rows: Any, frame: tuple, types: dict) -> bool:
        """Key i belongs to row i on every rank as on one rank: both in `frame`, typed alike on every mesh dim
        (Shard(0) or Replicate), so local position i is the same global row for both."""
        if not isinstance(keys, fx.Node) or not isinstance(rows, fx.Node) or \
                self.of.get(keys, ()) != frame or self.of.get(rows, ()) != frame:
            return False
        tk, tx = types.get(keys), types.get(rows)
        return tk is not None and tx is not None and all(
            (isinstance(a, Replicate) and isinstance(b, Replicate)) or (compat.sharded_dim(a) == 0 and a == b)
            for a, b in zip(tk, tx, strict=True))

    def _row_wise(self, node: fx.Node, frame: tuple, types: dict) -> bool:
        """Whether `node` does the same work on each row of its framed operands, whose rows it keeps."""
        val = node.meta.get("val")
        framed = [a for a in node.all_input_nodes if self.of.get(a) == frame]
        outside = [a for a in node.all_input_nodes if a not in self.of and isinstance(a.meta.get("val"), torch.Tensor)]
        if not isinstance(val, torch.Tensor) or val.ndim == 0 or not all(_same(_rows(a), val.shape[0]) for a in framed):
            return False
        moved = {step[1] for step in frame if step[0] == "a2a"}
        if any(types.get(a) is None or not all(isinstance(types[a][m], Replicate) or types[a][m] is PER_RANK_COPY
                                               for m in moved) for a in outside):
            return False
        if node.target in _ROW_COPIES or node.target in _ROW_VIEWS:
            return True
        if node.target in _MATMULS:  # the rows times a matrix (its last argument), plus a bias over the rows
            rows, matrix = node.args[_MATMULS[node.target]], node.args[-1]
            return framed == [rows] and all(_broadcasts_over_rows(a, val) for a in outside if a is not matrix)
        if torch.Tag.pointwise in getattr(node.target, "tags", ()):  # framed rows aligned with the output's
            return all(a.meta["val"].ndim == val.ndim for a in framed) and \
                all(_broadcasts_over_rows(a, val) for a in outside)
        return False


# Row counts may be symbolic (split sizes from .tolist() in a trace on fakes): compared without a guard, so an
# unknown equality stops the proof instead of failing the trace.
_same = compat.known_equal


def _rows(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.shape[0] if isinstance(val, torch.Tensor) and val.ndim > 0 else None


_sorted_order = sorted_keys  # the tensor whose ascending sort gave an index (a descending one is not inverted)


def _rows_indexed(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(rows, index) for ``rows[index]`` or ``rows.index_select(0, index)`` with a 1-D index node."""
    if node.target is aten.index.Tensor and len(node.args[1]) == 1 and isinstance(node.args[1][0], fx.Node):
        return node.args[0], node.args[1][0]
    if node.target is aten.index_select.default and node.args[1] == 0 and isinstance(node.args[2], fx.Node):
        return node.args[0], node.args[2]
    return None


def _is_permutation(index: fx.Node, rows: fx.Node) -> bool:
    """`index` holds the indices of a sort of a 1-D tensor as long as `rows`' dim 0: a permutation of its rows."""
    keys = _sorted_order(index)
    val = keys.meta.get("val") if keys is not None else None
    return isinstance(val, torch.Tensor) and val.ndim == 1 and _same(val.shape[0], _rows(rows))


def _key(passed: Any, swapped: bool = False) -> tuple:
    """An all_to_all step's split lists by identity (the objects stay alive in the trace's log) and values at
    the call; `swapped`: the key of the dispatch that this call would undo."""
    key = (id(passed.output), id(passed.input), passed.values)
    return (key[1], key[0], key[2][::-1]) if swapped else key


def _broadcasts_over_rows(a: fx.Node, out: torch.Tensor) -> bool:
    val = a.meta.get("val")
    return val.ndim < out.ndim or _same(val.shape[0], 1)
