"""Running a captured program on one device as the mesh would.

``run``: the program's forward and backward graphs run on real global tensors; every region node runs its
graph once per rank of its mesh on that rank's pieces of the inputs (Shard: DTensor's torch.chunk slices;
Replicate: the value; Partial: unequal pieces that reduce to the value), and the per-rank outputs are put back
together by the output placements (Shard: concatenated; Replicate: rank 0's, other ranks checked; Partial:
reduced). Saved activations stay per rank between a region's forward and backward. A wrong placement claim
therefore shows as a wrong number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor import DTensor

from localmap import compat as _compat
from localmap.compat import dynamo as compat_dynamo
from localmap.compat import pytree
from localmap.collectives.registry import communicates
from localmap.errors import LocalMapError, fail, wrapped_error
from localmap.traced.closure import module_state
from localmap.traced.graphs import run_graph
from localmap.traced.meta import kwargs_of, role_of
from localmap.program.split import coordinates, global_value, join, split
from localmap.traced.operator import local_map_hop, region_graph_of


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


# ---- interpreting the program -------------------------------------------------------------------------------------

class _MeshInterpreter(fx.Interpreter):
    """Runs a program graph; region nodes run per rank."""

    def __init__(self, gm: fx.GraphModule, regions: dict[str, Any], result: RunResult) -> None:
        super().__init__(gm)
        self.regions = regions  # program node name (forward or backward) -> its Region
        self.result = result
        self.node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is local_map_hop:
            return self._region(args[0], args[1:])
        if region_graph_of(target) is not None:  # a region node in a planner's capture
            return self._region(region_graph_of(target), args)
        torch_region = compat_dynamo.torch_region_call(target, args)  # PyTorch's (region_operator("torch"))
        if torch_region is not None:
            graph, tensors, placements, role = torch_region
            return self._region(graph, tensors, (placements, role))
        per_rank = [a for a in (*args, *kwargs.values()) if isinstance(a, PerRank)]
        if per_rank:  # an op on a saved activation between regions (its size, say): once per rank
            def on(r: int, a: Any) -> Any:
                return a.values[r] if isinstance(a, PerRank) else a

            return PerRank([super(_MeshInterpreter, self).call_function(
                target, tuple(on(r, a) for a in args), {k: on(r, a) for k, a in kwargs.items()})
                for r in range(len(per_rank[0].values))])
        return super().call_function(target, args, kwargs)

    def _region(self, gm: fx.GraphModule, args: Sequence[Any], facts: tuple[dict, dict] | None = None) -> tuple:
        """The region graph run per rank; `facts`: its (placements, role) where the graph's own meta is not
        localmap's (PyTorch's region nodes)."""
        kwargs, role = facts or (kwargs_of(gm), role_of(gm))
        mesh_shape = tuple(kwargs["device_mesh"].shape)
        skip = role["num_activations"] if role["role"] == "backward" else 0
        saved, inputs = args[:skip], args[skip:]
        coords = coordinates(mesh_shape)
        traced = [h.meta.get("val") for h in gm.graph.find_nodes(op="placeholder")][skip:]
        scales = role.get("tangent_scales") or (1,) * len(inputs)
        local_args = {}
        for r, coord in enumerate(coords):
            pieces = [_like(split(a, p, mesh_shape, coord), t)
                      for a, p, t in zip(inputs, kwargs["in_placements"], traced, strict=True)]
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
            region = self.regions.get(self.node.name) if self.node is not None else None
            where = f"{region.name} ({region.source})" if region is not None else "(not a captured region)"
            raise wrapped_error(f"region {where}", e, f"running its {role['role']} graph per rank") from e
        n = len(kwargs["out_placements"])
        region = self.regions.get(self.node.name) if self.node is not None else None
        name = region.name if region is not None else (self.node.name if self.node is not None else "region")

        def note(msg: str) -> None:
            if f"{name}: {msg}" not in self.result.disagreements:
                self.result.disagreements.append(f"{name}: {msg}")

        expected = self.node.meta.get("val") if self.node is not None else None
        outs = [join({c: o[i] for c, o in per_rank.items()}, kwargs["out_placements"][i], mesh_shape, note)
                for i in range(n)]
        if isinstance(expected, (tuple, list)):  # the layout the program was traced with
            outs = [_like(o, e) for o, e in zip(outs, expected)]
        grad_scales = role.get("grad_scales") if role["role"] == "backward" else None
        if grad_scales:  # gradients of Partial('avg') inputs (see traced.build._annotate)
            outs = [o * k if k != 1 and isinstance(o, torch.Tensor) else o for o, k in zip(outs, grad_scales)]
        total = len(next(iter(per_rank.values())))
        activations = [PerRank([per_rank[c][j] for c in coords]) for j in range(n, total)]
        store = self.result.region_input_grads if role["role"] == "backward" else self.result.region_outputs
        store[name] = outs
        return (*outs, *activations)


def has_collectives(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and communicates(n.target) for n in gm.graph.nodes)


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
    if prog.module is not None:
        for name, t in module_state(prog.module).items():
            if t.is_meta:
                raise fail(name, "is a meta tensor; run needs real values", given="meta",
                           fix="materialize the module (e.g. to_empty + init) before run")
            # A DTensor parameter is a program input in global shape: regions give each rank its shard.
            state.append(global_value(t.detach()) if isinstance(t, DTensor) else t.detach())
    return [*state, *(t.detach() if isinstance(t, torch.Tensor) else t for t in leaves)]


def _check_inputs(prog: Any, inputs: list) -> None:
    """Refuse, by name, inputs whose shape or dtype differ from those the program was captured with (its
    graphs, and every region's local graphs, are traced at those shapes)."""
    traced = [p.meta.get("val") for p in prog.forward.graph.find_nodes(op="placeholder")]
    fix = "capture the program again with inputs of these shapes (localmap.capture(fn, *args)), or run it on " \
          "inputs shaped like the captured ones"
    for name, value, fake in zip(prog.input_names, inputs, traced):
        if not isinstance(value, torch.Tensor) or not isinstance(fake, torch.Tensor):
            continue
        if tuple(value.shape) != tuple(fake.shape) or value.dtype != fake.dtype:
            raise fail(f"run: {name}", "has another shape or dtype than when the program was captured",
                       expected=f"{tuple(fake.shape)} {fake.dtype}", given=f"{tuple(value.shape)} {value.dtype}",
                       fix=fix)


def run_program(prog: Any, args: tuple, kwargs: dict) -> RunResult:
    inputs = _real_inputs(prog, args, kwargs)
    _check_inputs(prog, inputs)
    regions = {r.forward_node: r for r in prog.regions}
    regions.update({r.backward_node: r for r in prog.regions if r.backward_node})
    result = RunResult(loss=None, grads={})
    with torch.no_grad(), _compat.outside_simulation():  # run simulates the ranks itself
        fw_out = _MeshInterpreter(prog.forward, regions, result).run(*inputs)
        if prog.backward is None:
            result.loss = fw_out
            return result
        produced = dict(zip([n.name for n in prog.forward.graph.find_nodes(op="output")[0].args[0]], fw_out))
        produced.update({p.name: torch.ones((), dtype=fw_out[0].dtype)  # the loss's own gradient
                         for p in prog.backward.graph.find_nodes(op="placeholder") if p.name.startswith("tangents")})
        bw_in = [produced[p.name] for p in prog.backward.graph.find_nodes(op="placeholder")]
        grads = _MeshInterpreter(prog.backward, regions, result).run(*bw_in)
    result.loss = fw_out[0]
    result.grads = {name: g for name, g in zip(prog.input_names, grads) if g is not None}
    return result


def run_joint(joint: fx.GraphModule, inputs: Sequence[Any]) -> tuple[list, RunResult]:
    """A planner's joint graph (``localmap.testing.planner_capture``) run on one device as a planner that honours
    each region node's placements runs it: region nodes per rank, split and joined by their placements (see the
    module docstring). Returns the graph's outputs and the run's record (disagreements: Replicate outputs whose
    ranks differ)."""
    result = RunResult(loss=None, grads={})
    with torch.no_grad(), _compat.outside_simulation():
        return list(_MeshInterpreter(joint, {}, result).run(*inputs)), result
