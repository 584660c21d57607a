"""Checking a region's body against its placements, and inferring its gradient placements.

The body is traced once on fake local tensors (softmax / layer norm / mean decomposed, so the reductions inside
them show), and every value gets a placement type per mesh dim (``_types``). Then:

* each output's inferred type is compared with its out_placements (``check.verdict``'s three verdicts): equal
  is proven; a contradiction (a partial sum claimed Replicate, a replicated value claimed Shard, ...) is wrong;
  a claim on a value that varies with no derivable structure (``VARYING``), or on one the same on every rank
  with no global meaning derived (``AGREED``), is unproven, never accepted;
* each input's gradient placements are inferred as the transpose of its type: Shard stays Shard, Partial becomes
  Replicate, Replicate becomes Partial on a mesh dim where it meets data that varies (or is partial) there, else
  stays Replicate. A given in_grad_placements that differs is an error, and so is an input whose gradient is
  both (it meets per-rank data and also reaches a Replicate output unchanged): no one placement is right.

Verdicts are cached per (function, input metadata, placements), so steady-state calls pay a dictionary lookup.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from localmap import compat as _compat
from localmap.compat import pytree
from localmap.errors import fail
from localmap.placements.specs import placements_str
from localmap.sites import frame_site
from localmap.check.routing import Frames
from localmap.check.rules import output_types
from localmap.check.attention import LocalAttention, cuts_gradient, local_attention
from localmap.check.scans import LocalScan, local_scan
from localmap.collectives.registry import collective, mesh_dim_of
from localmap.check.verdict import PlacementError, Verdict
from localmap.placements.types import AGREED, FOLLOWS_MESH, OPAQUE, PER_RANK_COPY, UNKNOWN_WHY, VARYING, RuleError, \
    same_gradient_on_ranks


SITE = "localmap_site"  # node.meta key: the (file, line) that made the node (sites.traced_frame, while traced)


def _source(node: fx.Node) -> str:
    """file:line of the user's code that made `node`, from the frame kept while it was traced."""
    return frame_site(node.meta.get(SITE)) or "<unknown>"


def _op(node: fx.Node) -> str:
    facts = collective(node.target)
    if facts is not None and facts.name is not None:
        return facts.name
    return str(node.target) if isinstance(node.target, _compat.OpOverload) else \
        getattr(node.target, "__name__", str(node.target))


# ---- type-checking a graph --------------------------------------------------------------------------------------

def check_graph(gm: fx.GraphModule, in_types: Sequence[Any], out_claims: Sequence[Any], mesh: Any,
                given_grads: Sequence[Any] | None, out_paths: Sequence[str], in_paths: Sequence[str],
                uneven: frozenset = frozenset()) -> Verdict:
    """Type `gm`'s values from `in_types` (one per placeholder: placements or None), compare outputs with
    `out_claims` (one per tensor output) and infer or check gradient placements."""
    flow = _TypeFlow(mesh, uneven, len(in_types), Frames(gm, mesh, uneven), in_paths)
    for i, (node, t) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), in_types, strict=True)):
        flow.seed(node, i, t)
    for node in gm.graph.nodes:
        node.meta.pop(FOLLOWS_MESH, None)  # written afresh by the rules for these input types
        if node.op == "call_function":
            flow.visit(node)
        elif node.op == "get_attr":
            flow.constant(node, getattr(gm, node.target, None))
    outputs = [o for o in pytree.tree_leaves(gm.graph.find_nodes(op="output")[0].args[0])
               if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)]
    for k, (node, claim) in enumerate(zip(outputs, out_claims, strict=True)):
        flow.compare_output(node, claim, out_paths[k] if k < len(out_paths) else f"outputs[{k}]")
    differentiable = [_differentiable(p) for p in gm.graph.find_nodes(op="placeholder")]
    _infer_grads(flow, [t if d else None for t, d in zip(in_types, differentiable)], given_grads, in_paths)
    first_per_line: dict[str, str] = {}  # a localmap collective is several ops of one line: its first step says it
    for n in gm.graph.nodes:
        if FOLLOWS_MESH in n.meta:
            first_per_line.setdefault(_source(n), n.meta[FOLLOWS_MESH])
    flow.verdict.follows_mesh = [f"{line}: {meaning}" for line, meaning in first_per_line.items()]
    return flow.verdict


class _Reach(NamedTuple):
    """Where a gradient arriving at a value goes, on one mesh dim; and, in a double backward, what the gradient's
    own gradient coming back from there is."""

    whole: bool  # to Replicate inputs through Replicate values only: the same on every rank
    shares: bool  # into per-rank values (or through a collective into them): a share of a sum over the ranks
    whole_back: bool  # its own gradient comes back whole: from Replicate inputs, or through an all_reduce
    #                   (whose backward's transpose sums the ranks' shares)
    shares_back: bool  # its own gradient comes back as a share: from per-rank values, not through an all_reduce


_NOWHERE, _SHARES = _Reach(False, False, False, False), _Reach(False, True, False, True)
_WHOLE = _Reach(True, False, True, False)


def _sums_back(node: fx.Node, mesh: Any, m: int) -> bool:
    """Whether `node` is an all_reduce over mesh dim m: in a double backward, its backward's transpose sums the
    ranks' shares of the gradient's own gradient (``collectives.primitives._reduced_backward``)."""
    if getattr(collective(node.target), "gradient", None) != "unsummed":
        return False
    try:
        return mesh_dim_of(node, mesh) == m
    except RuleError:  # a group of another mesh: refused where the all_reduce's type is read
        return False


class _TypeFlow:
    """Placement types flowing through a body graph, node by node, with what the messages and the gradient
    inference need: where each type was made, and which Replicate inputs reach each value unchanged."""

    def __init__(self, mesh: Any, uneven: frozenset, num_inputs: int, frames: Frames,
                 in_paths: Sequence[str] = ()) -> None:
        self.mesh, self.uneven, self.ndim, self.frames = mesh, uneven, mesh.ndim, frames
        self.in_paths = in_paths
        self.verdict = Verdict()
        self.types: dict[fx.Node, Any] = {}
        self.origin: dict[fx.Node, list] = {}  # per mesh dim: the node that gave the value its type there
        self.lineage: dict[fx.Node, list[set]] = {}  # per mesh dim: Replicate inputs reaching here unchanged
        # input i meets per-rank data on mesh dim m at this node (its gradient is a Partial sum there), or None
        self.meets: list[list[fx.Node | None]] = [[None] * self.ndim for _ in range(num_inputs)]
        self.whole_uses: list[dict[int, str]] = [{} for _ in range(self.ndim)]  # input -> Replicate output
        self.reported: set = set()  # (collective node, mesh dim) already reported as needing pvary
        # per mesh dim: where a gradient arriving at the value goes (_Reach): to Replicate inputs unchanged,
        # to per-rank values (as shares)
        self.reach: dict[fx.Node, list[_Reach]] = {}
        self.collective_uses: list[dict[int, fx.Node]] = [{} for _ in range(self.ndim)]  # input -> collective
        # per mesh dim: the Replicate outputs a gradient reaches: (output index, Replicate inputs reaching it, path)
        self.replicate_outputs: list[list[tuple[int, set, str]]] = [[] for _ in range(self.ndim)]
        self.carries_grad: set[fx.Node] = set()  # values a gradient can reach (not detached, not integer)
        self.output_reach: list[list | None] = []  # per tensor output: its _Reach per mesh dim (None: no gradient)

    def seed(self, node: fx.Node, i: int, t: Any) -> None:
        if _differentiable(node):
            self.carries_grad.add(node)
        self.types[node] = None if t is None else tuple(t)
        self.origin[node] = [node] * self.ndim
        self.lineage[node] = [({i} if t is not None and isinstance(t[m], Replicate) else set())
                              for m in range(self.ndim)]
        self.reach[node] = [_NOWHERE if t is None else _WHOLE if isinstance(t[m], Replicate) else _SHARES
                            for m in range(self.ndim)]

    def constant(self, node: fx.Node, value: Any) -> None:
        """A plain tensor the body closes over or builds from Python values: the same on every rank, except a
        simulated mesh's per-rank constant (built by rank), whose structure is unknown. (Closed-over DTensors
        are inputs, typed by their placements: ``check.closure``.)"""
        if not isinstance(node.meta.get("val"), torch.Tensor):
            self.types[node] = None
            return
        if _compat.is_simulated(value):
            node.meta[OPAQUE] = True
            node.meta[UNKNOWN_WHY] = "a constant built per rank (a simulated mesh's per-rank value)"
            self.types[node] = tuple(VARYING for _ in range(self.ndim))
        else:
            self.types[node] = tuple(Replicate() for _ in range(self.ndim))
        self.origin[node] = [node] * self.ndim
        self.lineage[node] = [set() for _ in range(self.ndim)]
        self.reach[node] = [_NOWHERE] * self.ndim

    def visit(self, node: fx.Node) -> None:
        types = self.types
        if node.target is operator.getitem:
            src, idx = node.args
            t = types.get(src)
            types[node] = t[idx] if isinstance(t, list) and idx < len(t) else None
            self.origin[node] = self.origin.get(src, [node] * self.ndim)
            self.lineage[node] = self.lineage.get(src, [set() for _ in range(self.ndim)])
            self.reach[node] = self.reach.get(src, [_NOWHERE] * self.ndim)
            if src in self.carries_grad and not cuts_gradient(node):  # a fused kernel's lse: no gradient
                self.carries_grad.add(node)
            return
        val = node.meta.get("val")
        if not isinstance(val, (torch.Tensor, tuple, list)):
            types[node] = None  # sizes and scalars
            return
        inputs = [a for a in node.all_input_nodes if types.get(a) is not None and not isinstance(types[a], list)]
        if not cuts_gradient(node) and any(a in self.carries_grad for a in node.all_input_nodes):
            self.carries_grad.add(node)
        out = self._output_type(node, inputs)
        if isinstance(val, (tuple, list)) and out is not None and not isinstance(out, list):
            out = [out] * len(val)  # one type for every output of a multi-output op (its rule gave one)
        types[node] = out
        first = out[0] if isinstance(out, list) else out
        self.origin[node], self.lineage[node], self.reach[node] = [], [], []
        for m in range(self.ndim):
            self._track(node, inputs, m, first[m] if first is not None else None)

    def _output_type(self, node: fx.Node, inputs: list[fx.Node]) -> Any:
        """The node's type by its rule; a rule's refusal becomes a problem (the value is then Varying)."""
        in_types = [self.types[a] for a in inputs]
        try:
            if self.uneven and node.target in _MEANS:
                _check_uneven_mean(node, in_types, self.uneven)
            return self.frames.type_of(node, self.types, lambda typed: output_types(
                node, [typed[a] for a in inputs], self.mesh, typed, self.uneven))
        except RuleError as e:
            self.verdict.problems.append(fail(
                f"op {_op(node)} at {_source(node)}", e.problem, mesh=self.mesh, mesh_dim=e.mesh_dim,
                fix=e.fix, error=PlacementError))
            node.meta[UNKNOWN_WHY] = f"{_op(node)} was refused above"
            return tuple(VARYING for _ in range(self.ndim))

    def _track(self, node: fx.Node, inputs: list[fx.Node], m: int, here: Any) -> None:
        """Where the type on mesh dim m came from, and which Replicate inputs reach the value unchanged: one
        that reaches a value that varies on m meets per-rank data (its gradient is a Partial sum there)."""
        types, lineage = self.types, self.lineage
        same = [a for a in inputs if types[a][m] == here]
        self.origin[node].append(self.origin[same[0]][m] if same else node)
        reaching = set().union(*(lineage[a][m] for a in inputs if same_gradient_on_ranks(types[a][m])))
        gradient = getattr(collective(node.target), "gradient", None)
        self.reach[node].append(self._reach(node, inputs, m, here))
        if gradient in ("summing", "unsummed"):  # a Replicate input's gradient through it is whole on every rank
            for j in reaching:
                if not isinstance(j, fx.Node):
                    self.collective_uses[m].setdefault(j, node)
        if gradient == "summing":  # its backward sums the per-rank gradients itself
            lineage[node].append(set())
        elif same_gradient_on_ranks(here):
            starts = gradient == "unsummed" and node in self.carries_grad and _differentiable(node)
            lineage[node].append({node} if starts else reaching)
        else:
            for j in reaching:
                if isinstance(j, fx.Node):  # a collective's replicated result meets per-rank data
                    _needs_pvary(self.verdict, self.reported, j, node, self.mesh, m)
                elif self.meets[j][m] is None:
                    self.meets[j][m] = node
            lineage[node].append(set())

    def _reach(self, node: fx.Node, inputs: list[fx.Node], m: int, here: Any) -> "_Reach":
        """Where a gradient arriving at `node` goes on mesh dim m: a per-rank value's gradient is a share; a
        Replicate value's goes wherever its inputs' gradients go. In a double backward an all_reduce over m
        gives its gradient's own gradient back whole (its backward's transpose sums the shares)."""
        if node not in self.carries_grad:
            return _NOWHERE
        if not same_gradient_on_ranks(here):
            return _SHARES
        reach = [self.reach[a][m] for a in inputs if a in self.carries_grad and a in self.reach]
        whole, shares = any(r.whole for r in reach), any(r.shares for r in reach)
        if (whole or shares) and _sums_back(node, self.mesh, m):
            return _Reach(whole, shares, True, False)
        return _Reach(whole, shares, any(r.whole_back for r in reach), any(r.shares_back for r in reach))

    def input_path(self, node: fx.Node) -> str:
        """The argument path of a placeholder (input i: inputs[i] where no path was given)."""
        i = list(node.graph.find_nodes(op="placeholder")).index(node)
        return self.in_paths[i] if i < len(self.in_paths) else f"inputs[{i}]"

    def compare_output(self, node: fx.Node, claim: Any, path: str) -> None:
        """An output's inferred type against its claimed placements, mesh dim by mesh dim: proven, wrong (a
        problem) or unproven (a line naming where the proof stopped)."""
        t = self.types.get(node)
        self.verdict.output_types.append(t)
        self.output_reach.append(self.reach.get(node) if node in self.carries_grad else None)
        if t is None or claim is None:
            return
        for m, (c, got) in enumerate(zip(claim, t, strict=True)):
            if same_gradient_on_ranks(got) and node in self.carries_grad:
                inputs = {j for j in self.lineage[node][m] if not isinstance(j, fx.Node)}
                for j in inputs:
                    self.whole_uses[m].setdefault(j, path)
                self.replicate_outputs[m].append((len(self.verdict.output_types) - 1, inputs, path))
            made = self.origin[node][m]
            outcome = _compare(c, got, self.mesh, m, made.meta.get(OPAQUE, False))
            if outcome is None:
                continue
            where = f"{_op(made)} at {_source(made)}" if made.op == "call_function" else \
                "a constant" if made.op == "get_attr" else "an input"
            scan = local_scan(node, tuple(claim), m, self.types, self.mesh, self.uneven) \
                if outcome[0] == "unproven" else None
            if scan is not None:
                self.verdict.problems.append(_local_scan_problem(scan, path, c, self.mesh, m))
                continue
            attention = local_attention(node, tuple(claim), m, self.types, self.mesh, self.uneven) \
                if outcome[0] == "unproven" else None
            if attention is not None:
                self.verdict.problems.append(_local_attention_problem(attention, path, c, self.mesh, m,
                                                                      self.input_path(attention.value)))
                continue
            if outcome[0] == "unproven":
                why = made.meta.get(UNKNOWN_WHY) or "its value differs per rank with no structure localmap derives"
                self.verdict.unproven.append(
                    f"{path} claimed {c!r} on {_dim_name(self.mesh, m)} is unproven: the proof stopped at "
                    f"{where} ({why})")
                continue
            self.verdict.problems.append(fail(
                path, f"{outcome[1]} (made so by {where})", mesh=self.mesh, mesh_dim=m,
                expected=f"claimed {c!r}", given=f"inferred {got!r}", fix=outcome[2], error=PlacementError))


def _local_scan_problem(scan: LocalScan, path: str, claim: Placement, mesh: Any, m: int) -> PlacementError:
    """A scan or normalization over each rank's piece of a sharded dim, returned as it is and claimed a shard of
    that dim (``check.scans``): refuted, naming the op, the dim and the mesh dim."""
    name, d = _dim_name(mesh, m), scan.dim
    fix = (f"all_gather dim {d} over {name} before the {scan.op} (or apply it outside the region), or combine "
           f"each rank's {scan.op} with the earlier ranks' totals (an exclusive-prefix correction from each rank's "
           f"last value, all_gathered over {name})") if scan.prefix else \
        (f"all_gather dim {d} over {name} before the {scan.op} (or apply it outside the region), or merge the "
         f"ranks' pieces by their log-sum-exp (all_reduce the max and the sum of exp over {name})")
    return fail(path, f"is the {scan.op} along dim {d}, which is sharded on {name}, computed over this rank's piece "
                f"alone ({_op(scan.node)} at {_source(scan.node)}): the one-rank run computes it over the whole "
                "dim, so this is no shard of that result", mesh=mesh, mesh_dim=m, expected=f"claimed {claim!r}",
                given=f"this rank's own {scan.op} of a Shard({d}) value", fix=fix, error=PlacementError)


def _local_attention_problem(att: LocalAttention, path: str, claim: Placement, mesh: Any, m: int,
                             values: str) -> PlacementError:
    """Attention whose keys and values are sharded along the key sequence, returned as it is or summed by one
    all_reduce, claimed Replicate or a shard (``check.attention``): refuted, naming the op, v's dim and the mesh
    dim."""
    name, d = _dim_name(mesh, m), att.dim
    what = (f"is attention whose values {values} are sharded along dim {d}, the key sequence, on {name}: each "
            f"rank attends only to its own key block ({att.op}: {_op(att.node)} at {_source(att.node)})")
    if att.summed is not None:
        what += (f", and the ranks' blocks, each normalised separately, are summed by an all_reduce over {name} "
                 f"({_source(att.summed)}): a sum of per-block attentions is not the attention over every key")
        given = "the sum over ranks of each rank's attention to its own key block"
    else:
        what += ": the one-rank run attends to every key, so this is no piece of that result"
        given = "this rank's attention to its own key block"
    fix = (f"all_gather k and v along the key sequence (dim {d} of {values}) over {name} before the attention "
           "(each rank then attends to every key), or merge the ranks' blocks by their log-sum-exp (all_reduce "
           f"the max of each block's log-sum-exp over {name}, rescale each block's output by exp(its lse - that "
           "max), and divide the all_reduced sum of the rescaled outputs by the all_reduced sum of the scales), "
           "as ring attention does")
    return fail(path, what, mesh=mesh, mesh_dim=m, expected=f"claimed {claim!r}", given=given, fix=fix,
                error=PlacementError)


def _dim_name(mesh: Any, m: int) -> str:
    return f"mesh dim {m} ({mesh.mesh_dim_names[m]!r})" if mesh.mesh_dim_names else f"mesh dim {m}"


def _infer_grads(flow: _TypeFlow, in_types: Sequence[Any], given_grads: Sequence[Any] | None,
                 in_paths: Sequence[str]) -> None:
    """Each input's gradient placements, the transpose of its type (Shard stays, Partial becomes Replicate,
    Replicate becomes Partial where it meets per-rank data), checked against the given ones. Inputs typed None
    (non-tensors, integer and bool tensors: no gradient reaches them) get none and no check."""
    grads = []
    for i, t in enumerate(in_types):
        grads.append(None if t is None else [
            p if isinstance(p, Shard) else Replicate() if isinstance(p, Partial) else
            (Partial() if flow.meets[i][m] is not None else Replicate()) for m, p in enumerate(t)])
    scaled = [_settle_mixed(flow, grads, m, in_paths) for m in range(flow.ndim)]
    grads = [None if g is None else tuple(g) for g in grads]
    _output_grads(flow, scaled)
    flow.verdict.grad_placements = tuple(grads)
    for i, (given, inferred) in enumerate(zip(given_grads or (), grads)):
        if given is None or inferred is None or tuple(given) == inferred:
            continue
        m = next(m for m, (a, b) in enumerate(zip(given, inferred)) if a != b)
        why = _grad_reason(inferred[m])
        path = in_paths[i] if i < len(in_paths) else f"inputs[{i}]"
        closed = path.startswith("closed-over ")
        fix = (f"call {path.split(' ', 1)[1]}.to_local(grad_placements={placements_str(inferred)}) in the body, or "
               "pass it as an argument so local_map infers it") if closed else \
            f"use {placements_str(inferred)}, or leave in_grad_placements=None to have it inferred"
        flow.verdict.problems.append(fail(
            f"{'the gradient placements its to_local() declares, for' if closed else 'in_grad_placements for'} "
            f"{path}", f"contradicts the body: the gradient is {inferred[m]!r} ({why})", mesh=flow.mesh,
            mesh_dim=m, expected=placements_str(inferred), given=placements_str(tuple(given)), fix=fix,
            error=PlacementError))


# NOTE: mixed gradients. A Replicate input that meets per-rank data (a share of its gradient on each rank) and
# also reaches a Replicate output (a whole gradient, the same on every rank) has a local gradient that is
# share + whole: read as Partial the whole part is counted n times, read as Replicate the other ranks' shares
# are dropped. JAX casts the input (pvary) where it meets per-rank data, so the share is summed there. localmap
# gets the same sum without touching the body: the input's gradient is Partial, and the gradient entering each
# such Replicate output is divided by n, so its whole part becomes n equal shares. That is exact when the
# output's gradient goes only to Replicate inputs (which then all become Partial there, and so do the other
# Replicate outputs they reach); anything else is refused with the pvary fix.
def _settle_mixed(flow: _TypeFlow, grads: list, m: int, in_paths: Sequence[str]) -> set[int]:
    """The Replicate outputs whose gradient is divided by the ranks of mesh dim m (their Replicate inputs'
    gradients made Partial there), or a problem per input for which that is not exact."""
    partial = {i for i, g in enumerate(grads) if g is not None and flow.meets[i][m] is not None
               and (i in flow.whole_uses[m] or i in flow.collective_uses[m])}
    scaled: set[int] = set()
    grown = bool(partial)
    while grown:
        grown = False
        for k, inputs, _ in flow.replicate_outputs[m]:
            if k not in scaled and inputs & partial:
                scaled.add(k)
                grown = grown or not inputs <= partial
                partial |= inputs
    blocked = {k: path for k, _, path in flow.replicate_outputs[m]
               if k in scaled and flow.output_reach[k][m].shares}
    for i in sorted(partial):
        grads[i][m] = Partial()
        why = _why_inexact(flow, i, m, blocked)
        if why is not None:
            met = flow.meets[i][m]
            met_at = f" (in {_op(met)} at {_source(met)})" if met is not None else ""
            flow.verdict.problems.append(fail(
                in_paths[i] if i < len(in_paths) else f"inputs[{i}]",
                f"meets per-rank data{met_at} and its gradient is also whole through {why}: its gradient is part "
                "partial sum, part whole, and no one placement is right", mesh=flow.mesh, mesh_dim=m,
                fix=f"pass it through localmap.collectives.pvary(x, {_dim_label(flow.mesh, m)}) where it meets "
                "the per-rank data: its gradient is then summed there, and Replicate", error=PlacementError))
    return scaled


def _why_inexact(flow: _TypeFlow, i: int, m: int, blocked: dict[int, str]) -> str | None:
    """Why dividing the whole part of input i's gradient among the ranks would not be exact, or None."""
    used = flow.collective_uses[m].get(i)
    if used is not None:
        return f"{_op(used)} at {_source(used)} (a collective whose backward gives every rank the whole)"
    for k, inputs, _ in flow.replicate_outputs[m]:
        if k in blocked and i in inputs:
            return f"{blocked[k]}, a Replicate output whose gradient also reaches per-rank data"
    return None


def _output_grads(flow: _TypeFlow, scaled: list[set[int]]) -> None:
    """Per tensor output: the factor on its incoming gradient (1/n for the mesh dims that divide it, see
    _settle_mixed), and for a double backward the Replicate mesh dims where its gradient's own gradient is a
    share on each rank (Partial: the gradient reaches per-rank data, or is divided), or why it is neither share
    nor whole. Both stay None when every output takes the default (no factor; its placements, with Partial read
    as Partial('sum'))."""
    scales, second = [], []
    for k, (t, reach) in enumerate(zip(flow.verdict.output_types, flow.output_reach)):
        scales.append(1 / math.prod(flow.mesh.size(m) for m in range(flow.ndim) if k in scaled[m]))
        summed: Any = set()
        for m, p in enumerate(t if t is not None and reach is not None else ()):
            if not same_gradient_on_ranks(p):
                continue
            if reach[m].whole_back and reach[m].shares_back and k not in scaled[m]:
                summed = f"its gradient reaches both Replicate inputs and per-rank data on {_dim_name(flow.mesh, m)}"
                break
            if k in scaled[m] or (reach[m].shares_back and not reach[m].whole_back):
                summed.add(m)
        second.append(summed if isinstance(summed, str) else frozenset(summed) or None)
    if any(s != 1 for s in scales) or any(s is not None for s in second):
        flow.verdict.out_grad_rules = tuple(zip(scales, second))


def _dim_label(mesh: Any, m: int) -> str:
    return repr(mesh.mesh_dim_names[m]) if mesh.mesh_dim_names else str(m)


def _grad_reason(placement: Any) -> str:
    """Why an input's gradient has this placement on a mesh dim (the transpose of the input's type there)."""
    if isinstance(placement, Partial):
        return "it meets data that varies across those ranks, so each rank holds a partial sum"
    if isinstance(placement, Shard):
        return f"the input is sharded on dim {placement.dim}, so each rank holds the gradient of its own shard"
    return "every rank computes the same gradient"


def _differentiable(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())


def _needs_pvary(verdict: Verdict, reported: set, made: fx.Node, used: fx.Node, mesh: Any, m: int) -> None:
    """A replicated collective result used with per-rank data: its gradient there is per rank, but the
    collective's backward passes this rank's share on as if it were the whole gradient."""
    if (made, m) in reported:
        return
    reported.add((made, m))
    name = repr(mesh.mesh_dim_names[m]) if mesh.mesh_dim_names else str(m)
    path = f"op {_op(made)} at {_source(made)}"
    verdict.problems.append(fail(
        path, f"its result is the same on every rank but meets per-rank data in {_op(used)} at {_source(used)}, "
        "so its gradient differs per rank and the collective's backward would keep only this rank's share",
        mesh=mesh, mesh_dim=m, fix=f"pass the result through localmap.collectives.pvary(y, {name}) where it "
        "meets per-rank data (identity forward, all_reduce backward)", error=PlacementError))


_MEANS = {torch.ops.aten.mean.dim, torch.ops.aten.mean.default}


def _check_uneven_mean(node: fx.Node, in_types: list, uneven: frozenset) -> None:
    """A mean over a dim sharded on a mesh dim where shards differ in size: the local means are not pieces of
    a Partial(avg) (each rank divides by its own count). `uneven`: mesh dims on which some input is unevenly
    sharded (conservative: the value reduced may descend from it)."""
    t = in_types[0] if in_types else None
    if t is None:
        return
    ndim = node.args[0].meta["val"].ndim
    dims = node.args[1] if node.target is torch.ops.aten.mean.dim and node.args[1] else range(ndim)
    dims = {d % ndim for d in dims} if ndim else set()
    for m, p in enumerate(t):
        if m in uneven and _compat.sharded_dim(p) in dims:
            raise RuleError(f"takes a mean over dim {p.dim}, which is sharded unevenly (shards of different "
                            "sizes): the local means are not a Partial(avg) of the global mean",
                            "sum locally and divide by the global size, or shard that dim evenly", mesh_dim=m)


def _compare(claim: Placement, got: Any, mesh: Any, m: int, opaque: bool) -> tuple | None:
    """None when a claimed placement is proven by the inferred type on one mesh dim; ("unproven",) when it
    rests on an untyped value; ("wrong", problem, fix) when the type contradicts it."""
    name = repr(mesh.mesh_dim_names[m]) if mesh.mesh_dim_names else f"mesh dim {m}"
    if got is AGREED:  # the same on every rank, but not known to be the one-rank run's value
        return ("unproven",)
    if got is VARYING:
        if isinstance(claim, Replicate) and not opaque:
            return ("wrong", "differs across ranks but is claimed Replicate", "return a value that is the same "
                    f"on every rank (all_gather / all_reduce over {name}), or claim the placement it has")
        return ("unproven",)
    if got is PER_RANK_COPY:
        if isinstance(claim, Replicate):
            return ("wrong", "is the same on every rank, but typed per rank (a pvary or all_gather result): its "
                    "backward sums the ranks' gradients, so as a Replicate output each rank's whole gradient "
                    "would be counted once per rank", "return the value from before the pvary/all_gather (claim "
                    "its own placement and let DTensor redistribute outside the region)")
        return ("wrong", f"is the same on every rank but is claimed {claim!r}", "claim Replicate() (with the "
                "value from before the pvary/all_gather)")
    if claim == got:
        return None
    problem = _contradiction(claim, got, name)
    return None if problem is None else ("wrong", *problem)


def _contradiction(claim: Placement, got: Any, name: str) -> tuple[str, str] | None:
    """(problem, fix) for a claim that differs from a proven Replicate, Shard or Partial type."""
    if isinstance(got, Partial):
        if isinstance(claim, Replicate):
            return ("is a partial sum over the ranks but is claimed Replicate",
                    f"all_reduce over {name} before returning, or claim {got!r}")
        if isinstance(claim, Shard):
            return (f"is a partial sum over the ranks but is claimed {claim!r}",
                    f"reduce_scatter over {name} on dim {claim.dim} before returning, or claim {got!r}")
        return (f"is {got!r} but is claimed {claim!r}", f"claim {got!r}")
    if isinstance(got, Replicate):
        if isinstance(claim, Shard):
            return (f"is the same on every rank but is claimed {claim!r} (the global value would repeat it)",
                    "claim Replicate()")
        return ("is already whole on every rank but is claimed Partial (the global value would be a multiple "
                "of it)", "claim Replicate()")
    if _compat.sharded_dim(got) is not None:
        if isinstance(claim, Replicate):
            return (f"is a shard of dim {got.dim} (differs across ranks) but is claimed Replicate",
                    f"all_gather over {name} on dim {got.dim} before returning, or claim {got!r}")
        if _compat.is_strided_shard(got):
            return (f"is an interleaved (strided) piece of dim {got.dim}, not a contiguous shard: a reshape "
                    "merged the sharded dim with a dim before it", "keep the sharded dim outermost in the "
                    "reshape (or reshape outside the region), or claim the placement before the reshape")
        return (f"is a shard of dim {got.dim} but is claimed {claim!r}", f"claim {got!r}")
    return None
