"""Running a captured program on one device as the mesh would, and verifying it against the model.

``run``: the program's forward and backward graphs run on real global tensors; every region node runs its
graph once per rank of its mesh on that rank's pieces of the inputs (Shard: DTensor's torch.chunk slices;
Replicate: the value; Partial: unequal pieces that reduce to the value), and the per-rank outputs are put back
together by the output placements (Shard: concatenated; Replicate: rank 0's, other ranks checked; Partial:
reduced). Saved activations stay per rank between a region's forward and backward. A wrong placement claim
therefore shows as a wrong number.

``verify``: capture, run, and compare the loss and every gradient with the model run on one device with its
regions inlined; a difference is traced to the first region whose output (forward) or input gradient
(backward) differs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Placement, Shard

from localmap import compat as _compat
from localmap.compat import pytree
from localmap.context import recording
from localmap.errors import LocalMapError, fail, wrapped_error
from localmap.traced.build import kwargs_of, role_of, run_graph
from localmap.placements.shapes import chunk_sizes
from localmap.traced.operator import local_map_hop


class VerificationError(LocalMapError):
    """The captured program's run differs from the reference, naming the first region and tensor that differ."""


@dataclass
class PerRank:
    """One value per rank (a region's saved activations between its forward and backward)."""

    values: list


@dataclass
class RunResult:
    loss: Any
    grads: dict[str, torch.Tensor | None]
    region_outputs: dict[str, list] = field(default_factory=dict)  # region name -> global outputs
    region_input_grads: dict[str, list] = field(default_factory=dict)  # region name -> grads of its inputs
    disagreements: list[str] = field(default_factory=list)  # Replicate outputs whose ranks differ


# ---- splitting and joining by placements --------------------------------------------------------------------------

def _coordinates(mesh_shape: Sequence[int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*[range(n) for n in mesh_shape]))


def _partial_piece(value: torch.Tensor, p: Partial, n: int, c: int) -> torch.Tensor:
    """Rank c's piece of a Partial value: unequal shares that reduce back to the value."""
    op = p.reduce_op
    if op in ("sum", "avg"):
        share = (c + 1) / (n * (n + 1) / 2) * (n if op == "avg" else 1)
        return value * share
    if op == "max":
        return value if c == 0 else value - 1 - c
    if op == "min":
        return value if c == 0 else value + 1 + c
    raise fail("run", f"Partial({op!r}) inputs are not supported by run", fix="use sum, avg, max or min")


def split(value: Any, placements: Sequence[Placement] | None, mesh_shape: Sequence[int],
          coord: Sequence[int]) -> Any:
    """Rank `coord`'s local piece of a global value."""
    if not isinstance(value, torch.Tensor) or placements is None:
        return value
    for m, p in enumerate(placements):
        if isinstance(p, Shard):
            sizes = chunk_sizes(value.shape[p.dim], mesh_shape[m])
            value = value.narrow(p.dim, sum(sizes[:coord[m]]), sizes[coord[m]])
        elif isinstance(p, Partial):
            value = _partial_piece(value, p, mesh_shape[m], coord[m])
    return value


def join(values: dict[tuple, Any], placements: Sequence[Placement] | None, mesh_shape: Sequence[int],
         note: Callable[[str], None]) -> Any:
    """The global value from every rank's local value, innermost mesh dim first."""
    if placements is None:
        return values[tuple(0 for _ in mesh_shape)]
    for m in reversed(range(len(mesh_shape))):
        p = placements[m]
        grouped: dict[tuple, list] = {}
        for coord in sorted(values):
            grouped.setdefault(coord[:m] + coord[m + 1:], []).append(values[coord])
        joined = {}
        for rest, parts in grouped.items():
            joined[rest[:m] + (0,) + rest[m:]] = _join_dim(parts, p, m, note)
        values = joined
    return next(iter(values.values()))


def _join_dim(parts: list, p: Placement, m: int, note: Callable[[str], None]) -> Any:
    if not isinstance(parts[0], torch.Tensor):
        return parts[0]
    if isinstance(p, Shard):
        return torch.cat(parts, dim=p.dim)
    if isinstance(p, Partial):
        stacked = torch.stack(parts)
        return {"sum": stacked.sum(0), "avg": stacked.mean(0), "max": stacked.amax(0),
                "min": stacked.amin(0)}[p.reduce_op]
    first = parts[0]
    if any(not torch.allclose(first, q, rtol=1e-4, atol=1e-5) for q in parts[1:]):
        note(f"claimed Replicate on mesh dim {m} but ranks hold different values")
    return first


# ---- interpreting the program -------------------------------------------------------------------------------------

class _MeshInterpreter(fx.Interpreter):
    """Runs a program graph; region nodes run per rank."""

    def __init__(self, gm: fx.GraphModule, names: dict[str, str], result: RunResult) -> None:
        super().__init__(gm)
        self.names = names  # program node name -> region name
        self.result = result
        self.node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is local_map_hop:
            return self._region(args[0], args[1:])
        per_rank = [a for a in (*args, *kwargs.values()) if isinstance(a, PerRank)]
        if per_rank:  # an op on a saved activation between regions (its size, say): once per rank
            def on(r: int, a: Any) -> Any:
                return a.values[r] if isinstance(a, PerRank) else a

            return PerRank([super(_MeshInterpreter, self).call_function(
                target, tuple(on(r, a) for a in args), {k: on(r, a) for k, a in kwargs.items()})
                for r in range(len(per_rank[0].values))])
        return super().call_function(target, args, kwargs)

    def _region(self, gm: fx.GraphModule, args: Sequence[Any]) -> tuple:
        kwargs, role = kwargs_of(gm), role_of(gm)
        mesh_shape = tuple(kwargs["device_mesh"].shape)
        skip = role["num_activations"] if role["role"] == "backward" else 0
        saved, inputs = args[:skip], args[skip:]
        coords = _coordinates(mesh_shape)
        traced = [h.meta.get("val") for h in gm.graph.find_nodes(op="placeholder")][skip:]
        scales = role.get("tangent_scales") or (1,) * len(inputs)
        local_args = {}
        for r, coord in enumerate(coords):
            pieces = [_like(split(a, p, mesh_shape, coord), t)
                      for a, p, t in zip(inputs, kwargs["in_placements"], traced)]
            local_args[coord] = [s.values[r] for s in saved] + [x / k if k != 1 else x
                                                                for x, k in zip(pieces, scales)]
        try:
            if has_collectives(gm):  # ranks talk to each other: run them together on the simulated mesh
                per_rank = _run_ranks_together(gm, local_args, kwargs["device_mesh"])
            else:
                per_rank = {coord: run_graph(gm, local) for coord, local in local_args.items()}
        except LocalMapError:
            raise
        except Exception as e:  # only on the error path: name the region and where it is called
            node = self.node.name if self.node is not None else ""
            raise wrapped_error(f"region {self.names.get(node, node)} ({getattr(self, 'sources', {}).get(node, '?')})",
                                e, f"running its {role['role']} graph per rank") from e
        n = len(kwargs["out_placements"])
        name = self.names.get(self.node.name, self.node.name) if self.node is not None else "region"

        def note(msg: str) -> None:
            if f"{name}: {msg}" not in self.result.disagreements:
                self.result.disagreements.append(f"{name}: {msg}")

        expected = self.node.meta.get("val") if self.node is not None else None
        outs = [join({c: o[i] for c, o in per_rank.items()}, kwargs["out_placements"][i], mesh_shape, note)
                for i in range(n)]
        if isinstance(expected, (tuple, list)):  # the layout the program was traced with
            outs = [_like(o, e) for o, e in zip(outs, expected)]
        grad_scales = role.get("grad_scales") if role["role"] == "backward" else None
        if grad_scales:  # gradients of Partial('avg') inputs (see _region._annotate)
            outs = [o * k if k != 1 and isinstance(o, torch.Tensor) else o for o, k in zip(outs, grad_scales)]
        total = len(next(iter(per_rank.values())))
        activations = [PerRank([per_rank[c][j] for c in coords]) for j in range(n, total)]
        store = self.result.region_input_grads if role["role"] == "backward" else self.result.region_outputs
        store[name] = outs
        return (*outs, *activations)


def has_collectives(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "_c10d_functional"
               for n in gm.graph.nodes)


def _run_ranks_together(gm: fx.GraphModule, local_args: dict[tuple, list], mesh: Any) -> dict[tuple, tuple]:
    """Run a region graph that holds collectives once for all ranks, each rank's values in a simulated tensor
    (LocalTensorMode over the mesh's process groups, which must still exist)."""
    ranks = {coord: int(mesh.mesh[coord]) for coord in local_args}
    width = len(next(iter(local_args.values())))
    packed = [_compat.simulated_value({ranks[c]: args[i] for c, args in local_args.items()}) for i in range(width)]
    with _compat.local_tensor_mode(frozenset(ranks.values())):
        out = run_graph(gm, packed)
    return {c: tuple(_compat.value_on_rank(o, ranks[c]) for o in out) for c in local_args}


def _like(value: Any, traced: Any) -> Any:
    """`value` with the dim order (strides) of the traced fake `traced`, copying only when they differ."""
    if not isinstance(value, torch.Tensor) or not isinstance(traced, torch.Tensor) or value.shape != traced.shape:
        return value
    from localmap.placements.shapes import like_stride

    want = like_stride(value.shape, traced.stride())
    if value.stride() == tuple(want):
        return value
    if any(s == 0 and n > 1 for s, n in zip(want, value.shape)):  # a broadcast (expanded) layout: not writable
        return value
    return torch.empty_strided(value.shape, want, dtype=value.dtype, device=value.device).copy_(value)


def _real_inputs(prog: Any, args: tuple, kwargs: dict) -> list:
    leaves = pytree.tree_leaves((args, kwargs))
    state = []
    if prog._module is not None:
        for name, t in (*prog._module.named_parameters(), *prog._module.named_buffers()):
            if t.is_meta:
                raise fail(name, "is a meta tensor; run needs real values", given="meta",
                           fix="materialize the module (e.g. to_empty + init) before run")
            state.append(t.detach())
    return [*state, *(t.detach() if isinstance(t, torch.Tensor) else t for t in leaves)]


def run_program(prog: Any, args: tuple, kwargs: dict) -> RunResult:
    inputs = _real_inputs(prog, args, kwargs)
    names = {r.forward_node: r.name for r in prog.regions}
    names.update({r.backward_node: r.name for r in prog.regions if r.backward_node})
    sources = {r.forward_node: r.source for r in prog.regions}
    sources.update({r.backward_node: r.source for r in prog.regions if r.backward_node})
    result = RunResult(loss=None, grads={})
    with torch.no_grad():
        fw_run = _MeshInterpreter(prog.forward, names, result)
        fw_run.sources = sources
        fw_out = fw_run.run(*inputs)
        if prog.backward is None:
            result.loss = fw_out
            return result
        produced = dict(zip([n.name for n in prog.forward.graph.find_nodes(op="output")[0].args[0]], fw_out))
        produced.update({p.name: torch.ones((), dtype=fw_out[0].dtype)  # the loss's own gradient
                         for p in prog.backward.graph.find_nodes(op="placeholder") if p.name.startswith("tangents")})
        bw_in = [produced[p.name] for p in prog.backward.graph.find_nodes(op="placeholder")]
        bw_run = _MeshInterpreter(prog.backward, names, result)
        bw_run.sources = sources
        grads = bw_run.run(*bw_in)
    result.loss = fw_out[0]
    result.grads = {name: g for name, g in zip(prog.input_names, grads) if g is not None}
    return result


# ---- verify -------------------------------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    loss_diff: float
    grad_diffs: dict[str, float]
    regions_checked: int
    disagreements: list[str]

    def __str__(self) -> str:
        worst = max(self.grad_diffs.values(), default=0.0)
        return (f"verified: loss differs by {self.loss_diff:.2e}, {len(self.grad_diffs)} gradients by at most "
                f"{worst:.2e}, {self.regions_checked} regions")


def _reference(fn: Any, args: tuple, kwargs: dict) -> tuple[Any, dict, list]:
    """Loss, gradients by input name, and region records of `fn` on one device with regions inlined."""
    module = fn if isinstance(fn, torch.nn.Module) else None
    state = {k: v.detach().clone().requires_grad_(v.requires_grad)
             for k, v in (module.named_parameters() if module is not None else [])}
    buffers = dict(module.named_buffers()) if module is not None else {}
    leaves, spec = pytree.tree_flatten((args, kwargs))
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in leaves]
    a, k = pytree.tree_unflatten(leaves, spec)
    with recording("reference") as records:
        loss = torch.func.functional_call(module, {**state, **buffers}, a, k) if module is not None else fn(*a, **k)
        want = {n: t for n, t in state.items() if t.requires_grad}
        want.update({_arg_name(args, kwargs, i): t for i, t in enumerate(leaves)
                     if isinstance(t, torch.Tensor) and t.requires_grad})
        grads = torch.autograd.grad(loss, list(want.values()), allow_unused=True) if want else []
    return loss.detach(), {n: g for n, g in zip(want, grads) if g is not None}, records


def _arg_name(args: tuple, kwargs: dict, index: int) -> str:
    path = pytree.tree_flatten_with_path((args, kwargs))[0][index][0]
    return ("args" if getattr(path[0], "idx", 1) == 0 else "kwargs") + pytree.keystr(path[1:])


def _differs(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def verify(fn: Callable | torch.nn.Module, *args: Any, reference: Callable | None = None, atol: float = 1e-5,
           rtol: float = 1e-4, **kwargs: Any) -> VerifyReport:
    """Capture `fn`, run it as the mesh would, and compare loss and gradients with `reference` (default: `fn`
    on one device with every region inlined). Raises VerificationError naming the first region that differs."""
    from localmap.program.capture import capture

    prog = capture(fn, *args, **kwargs)
    got = prog.run(*args, **kwargs)
    ref_loss, ref_grads, records = _reference(reference if reference is not None else fn, args, kwargs)
    problems = []
    if _differs(got.loss, ref_loss, atol, rtol):
        problems.append(f"the loss: {got.loss.item():.6g} vs {ref_loss.item():.6g}")
    for name, g in ref_grads.items():
        if name not in got.grads or _differs(got.grads[name], g, atol, rtol):
            problems.append(f"the gradient of {name}")
    report = VerifyReport(
        loss_diff=_max_diff(got.loss, ref_loss),
        grad_diffs={n: _max_diff(got.grads[n], g) for n, g in ref_grads.items() if n in got.grads},
        regions_checked=len(prog.regions), disagreements=got.disagreements)
    if not problems:
        return report
    culprit = _first_region(prog, got, records, atol, rtol)
    raise VerificationError(
        f"local_map: verify: {culprit}; as a result {problems[0]} differs"
        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        + ("\n  ranks disagree: " + "; ".join(got.disagreements) if got.disagreements else "")
        + "\n  fix: check that region's out_placements / in_grad_placements against what its body computes",
        path=culprit)


def _first_region(prog: Any, got: RunResult, records: list, atol: float, rtol: float) -> str:
    if len(records) == len(prog.regions):
        for region, record in zip(prog.regions, records):
            for i, (mine, ref) in enumerate(zip(got.region_outputs.get(region.name, []), record["outputs"])):
                if _differs(mine, ref, atol, rtol):
                    return (f"region {region.name} ({region.source}) output {i} differs by "
                            f"{_max_diff(mine, ref):.3g} (out_placements {region.out_placements[i]})")
        for region, record in reversed(list(zip(prog.regions, records))):
            mine_all = got.region_input_grads.get(region.name, [])
            for j, flat_index in enumerate(record["tensor_inputs"]):
                ref = record["input_grads"].get(flat_index)
                mine = mine_all[j] if j < len(mine_all) else None
                if ref is not None and mine is not None and _differs(mine, ref, atol, rtol):
                    return (f"region {region.name} ({region.source}) gradient of input {j} differs by "
                            f"{_max_diff(mine, ref):.3g} (in_grad_placements {region.in_grad_placements[j]})")
    return "no single region differs on its own (check the code between regions)"
