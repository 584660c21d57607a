"""``capture``: a whole program (forward and backward) as graphs in global shapes, each region one node.

The program is traced on fake tensors (nothing of global size is allocated; meta tensors work too) with
regions deferred, as one joint graph of the loss and the gradients of every input and parameter that
requires grad, then cut into forward and backward by PyTorch's default partitioner. The operator records each
region it builds (in call order); records are matched to the region's forward node by order and to its
backward node by the activations it consumes.
"""

from __future__ import annotations

import contextlib
import json
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from localmap import compat as _compat
from localmap.program import cost as _cost
from localmap.compat import pytree
from localmap.context import recording
from localmap.errors import LocalMapError, fail, wrapped_error
from localmap.sites import traceback_site
from localmap.traced.build import clean_checkpoint_tags, tag_phase
from localmap.traced.closure import ParamInfo, holding, module_state, program_params, real_dtensors_refused
from localmap.traced.meta import ROLE, SOURCE, kwargs_of, role_of
from localmap.traced.operator import defer_inlining, local_map_hop


@dataclass
class Region:
    """One region call in a captured program: placements, graphs (local shapes), shapes and costs per rank."""

    name: str
    source: str
    mesh: DeviceMesh
    in_placements: tuple
    out_placements: tuple
    in_grad_placements: tuple
    body: fx.GraphModule
    forward: fx.GraphModule
    backward: fx.GraphModule | None
    num_activations: int
    global_in_shapes: list
    local_in_shapes: list
    global_out_shapes: list
    local_out_shapes: list
    flops: dict
    activation_bytes: int
    comm_bytes: float
    comm_detail: dict = field(default_factory=dict)
    forward_node: str = ""
    backward_node: str | None = None
    verdict: str = "unchecked"  # the placement check's verdict: "ok", the first problem, or "unchecked"
    closed_over: list = field(default_factory=list)  # DTensor parameters the body reads: its last inputs
    verdict_detail: str = ""  # the verdict in full: every problem or unproven claim with its fix line
    check: Any = True  # the region's own check= (what it was traced with may be context.checking's override)

    def to_dict(self) -> dict:
        def pl(specs: Any) -> Any:
            return [None if s is None else [repr(p) for p in s] for s in specs]

        return {
            "name": self.name, "source": self.source, "mesh": {
                "shape": list(self.mesh.shape), "dim_names": list(self.mesh.mesh_dim_names or [])},
            "in_placements": pl(self.in_placements), "out_placements": pl(self.out_placements),
            "in_grad_placements": pl(self.in_grad_placements), "num_activations": self.num_activations,
            "global_in_shapes": self.global_in_shapes, "local_in_shapes": self.local_in_shapes,
            "global_out_shapes": self.global_out_shapes, "local_out_shapes": self.local_out_shapes,
            "flops": self.flops, "activation_bytes": self.activation_bytes, "comm_bytes": self.comm_bytes,
            "comm_detail": self.comm_detail, "forward_node": self.forward_node, "backward_node": self.backward_node,
            "verdict": self.verdict, "verdict_detail": self.verdict_detail, "check": self.check,
            "closed_over": self.closed_over,
        }


class CapturedProgram:
    """A captured training step (or forward): graphs in global shapes, regions, costs; runnable on one device."""

    def __init__(self, forward: fx.GraphModule, backward: fx.GraphModule | None, joint: fx.GraphModule | None,
                 regions: list[Region], input_names: list[str], module: torch.nn.Module | None,
                 dtensor_params: dict[str, ParamInfo] | None = None) -> None:
        self.forward = forward
        self.backward = backward
        self.joint = joint
        self.regions = regions
        self.input_names = input_names
        self.module = module  # the captured nn.Module (its parameters and buffers are the first inputs), or None
        # The module's DTensor parameters and buffers by input name: inputs in global shape, sharded by these
        # placements wherever a region reads them (run gives each rank its shard).
        self.dtensor_params = dict(dtensor_params or {})

    def totals(self) -> dict:
        return {
            "regions": len(self.regions),
            "flops_forward": sum(r.flops["forward"] for r in self.regions),
            "flops_backward": sum(r.flops["backward"] for r in self.regions),
            "activation_bytes": sum(r.activation_bytes for r in self.regions),
            "comm_bytes": sum(r.comm_bytes for r in self.regions),
        }

    def to_json(self, indent: int | None = 2) -> str:
        params = {n: {"mesh": list(p.mesh.shape), "placements": [repr(x) for x in p.placements]}
                  for n, p in self.dtensor_params.items()}
        return json.dumps({"regions": [r.to_dict() for r in self.regions], "totals": self.totals(),
                           "inputs": self.input_names, "dtensor_params": params}, indent=indent)

    def report(self) -> str:
        from localmap.program.draw import report

        return report(self)

    def to_dot(self, level: str = "regions") -> str:
        """Graphviz DOT of the forward program: "regions" (default; the global code between them collapsed) or
        "ops" (every op)."""
        from localmap.program.draw import to_dot

        return to_dot(self, level)

    def save_svg(self, path: str, level: str = "regions") -> str:
        """to_dot(level) drawn by Graphviz into `path` (SVG; PNG when the name ends in .png)."""
        from localmap.program.draw import save_svg

        return save_svg(self, path, level)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the captured program on real global tensors on one device, each region as the mesh would."""
        from localmap.program.run import run_program

        return run_program(self, args, kwargs)

    def __repr__(self) -> str:
        return f"CapturedProgram({len(self.regions)} regions, inputs {len(self.input_names)})"


# ---- capture ------------------------------------------------------------------------------------------------------

def capture(fn: Callable | torch.nn.Module, *args: Any, backward: bool = True, **kwargs: Any) -> CapturedProgram:
    """Capture `fn(*args, **kwargs)` (a callable or nn.Module on plain global-shaped tensors, regions made with
    localmap.local_map) as forward and backward graphs. With backward=True, `fn` returns a scalar loss."""
    module = fn if isinstance(fn, torch.nn.Module) else None
    state = module_state(module) if module is not None else {}
    names = list(state)
    leaves, treespec = pytree.tree_flatten((args, kwargs))
    input_names = [*names, *(_leaf_name(args, kwargs, i) for i in range(len(leaves)))]

    _refuse_per_rank_values(input_names, [*state.values(), *leaves])
    fake_mode = _compat.new_fake_mode()
    primals = [_to_fake(t, fake_mode) for t in (*state.values(), *leaves)]
    # DTensor parameters and buffers are inputs in global shape; a region body reading one gets its shard.
    params = {n: ParamInfo(n, t.device_mesh, tuple(t.placements)) for n, t in state.items() if isinstance(t, DTensor)}
    stand_ins: dict[int, tuple] = {}

    @contextlib.contextmanager
    def call(inputs: list) -> Iterator[Any]:
        """fn's output on the traced inputs; a module holds them as its parameters and buffers until the trace
        is done (a checkpoint recomputes the forward during the backward: it must read them, not constants)."""
        a, k = pytree.tree_unflatten(list(inputs[len(names):]), treespec)
        if module is None:
            yield fn(*a, **k)
            return
        swapped = dict(zip(names, inputs[:len(names)]))
        stand_ins.update({id(swapped[n]): (swapped[n], info) for n, info in params.items()})
        with holding(module, swapped):
            yield module(*a, **k)

    try:
        with program_params(stand_ins), real_dtensors_refused(fn):
            forward, backward_gm, joint, records = _trace(call, primals, backward, fake_mode)
    except LocalMapError:
        raise
    except Exception as e:
        raise _trace_error(fn, e) from e
    regions = _regions(forward, backward_gm, records)
    return CapturedProgram(forward, backward_gm, joint, regions, input_names, module, params)


def _refuse_per_rank_values(names: list[str], values: list) -> None:
    """A program is captured on global tensors. A tensor made while a simulated mesh is active holds one value
    per rank (a module built inside `simulated_mesh` draws its weights per rank): it would be traced as a
    constant, so it is refused, named."""
    for name, value in zip(names, values):
        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and _compat.is_simulated(value):
            raise fail(name, "is a per-rank (simulated) tensor, not a global one: it was made while a simulated "
                       "mesh was active", given=type(value).__name__,
                       fix="build the module and its inputs inside localmap.testing.on_one_device() (plain "
                           "global tensors), then capture")


def _trace_error(fn: Any, e: Exception) -> LocalMapError:
    """What to raise when tracing `fn` failed: a value deciding control flow gets the hint to avoid it; any
    other error is the original one, kept (type, message, traceback chained) and named by the line that raised."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    at = traceback_site(e.__traceback__)
    if _compat.is_data_dependent_error(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return fail("capture", f"could not trace {name!r}: a tensor's value decides what runs"
                    + (f" at {at}" if at else "") + f" ({type(e).__name__}: {first})"[:300],
                    fix="capture needs a function a trace can follow: no Python control flow on tensor values "
                        "(use torch.where), no .item()/.tolist() deciding what runs")
    return wrapped_error("capture", e, f"tracing {name!r}", at)


def _trace(call: Callable, primals: list, backward: bool, fake_mode: Any) -> tuple:
    # On a simulated mesh the program is still traced once, globally: the simulation is set aside.
    with _compat.trace_lock(), _compat.quiet_fake_tensor_errors(), _compat.outside_simulation(), \
            _compat.own_node_meta(), defer_inlining(), recording("capture") as records:
        if backward:
            with fake_mode:
                seed = torch.ones((), dtype=torch.float32)  # d(loss)/d(loss): the backward's one input
            joint = _compat.make_fx(_joint(call), tracing_mode="fake")(primals, [seed])
            clean_checkpoint_tags(joint, 1)  # selective checkpoints in the program: tags the partitioner reads
            forward, backward_gm = _compat.joint_partition(joint, [primals, [seed]], 1)
        else:
            def forward_only(inputs: list) -> Any:
                with call(inputs) as out:
                    return out

            with torch.no_grad():
                forward = _compat.make_fx(forward_only, tracing_mode="fake")(primals)
            joint, backward_gm = None, None
    return forward, backward_gm, joint, records


def _joint(call: Callable) -> Callable:
    def joint(primals: list, tangents: list) -> tuple:
        with call(primals) as loss:
            return _loss_and_grads(loss, primals, tangents)

    return joint


def _loss_and_grads(loss: Any, primals: list, tangents: list) -> tuple:
    """The joint's outputs: the loss and the gradient of every primal that requires grad (None elsewhere)."""
    tag_phase(_compat.current_trace_graph())  # what exists now is the forward
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise fail("capture", "with backward=True the function must return a scalar loss",
                   expected="a 0-d tensor", given=shape,
                   fix="return a scalar (e.g. .sum() or .mean()), or pass backward=False")
    want = [i for i, p in enumerate(primals) if isinstance(p, torch.Tensor) and p.requires_grad]
    grads: list[Any] = [None] * len(primals)
    if want and loss.requires_grad:
        found = torch.autograd.grad(loss, [primals[i] for i in want], [tangents[0].to(loss.dtype)],
                                    allow_unused=True)
        for i, g in zip(want, found, strict=True):
            grads[i] = g
    tag_phase(_compat.current_trace_graph())  # and what autograd added is the backward
    return (loss, *grads)


def _to_fake(value: Any, fake_mode: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(value, DTensor):  # a plain fake of its global shape (its shards are the regions' business)
        with fake_mode:
            fake = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return fake.requires_grad_(value.requires_grad)
    fake = fake_mode.from_tensor(value.detach())
    return fake.requires_grad_(value.requires_grad) if value.is_floating_point() or value.is_complex() else fake


def _leaf_name(args: tuple, kwargs: dict, index: int) -> str:
    path = pytree.tree_flatten_with_path((args, kwargs))[0][index][0]
    head, rest = path[0], path[1:]
    return ("args" if getattr(head, "idx", 1) == 0 else "kwargs") + pytree.keystr(rest)


# ---- regions ------------------------------------------------------------------------------------------------------

def _hop_nodes(gm: fx.GraphModule | None, roles: tuple[str, ...]) -> list[fx.Node]:
    """The region nodes of these roles in a program graph (a checkpoint's recomputation puts forward region
    nodes in the backward graph: they are no region's backward)."""
    if gm is None:
        return []
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is local_map_hop
            and n.meta.get(ROLE, {}).get("role", "forward") in roles]


def _regions(forward: fx.GraphModule, backward: fx.GraphModule | None, records: list) -> list[Region]:
    fw_nodes = _hop_nodes(forward, ("forward", "body"))
    if len(fw_nodes) != len(records):
        raise fail("capture", "found a different number of region nodes than region calls",
                   expected=len(records), given=len(fw_nodes), fix="report this with the program")
    backward_of = _match_backwards(forward, fw_nodes, records, _hop_nodes(backward, ("backward",)))
    uses: dict[str, int] = {}
    regions: list[Region] = []
    producers: dict[fx.Node, tuple[Region, int]] = {}
    for node, record in zip(fw_nodes, records, strict=True):
        body, graphs = record["body"], record["graphs"]
        kwargs = kwargs_of(body)
        info = body.meta.get(SOURCE, {"name": "region", "source": "<direct call>"})
        uses[info["name"]] = uses.get(info["name"], -1) + 1
        fw_gm = graphs.forward if graphs is not None else body
        bw_gm = graphs.backward if graphs is not None else None
        n_out = len(kwargs["out_placements"])
        bw_node = backward_of.get(node)
        bw_kwargs = kwargs_of(bw_gm) if bw_gm is not None else None
        region = Region(
            name=f"{info['name']}.{uses[info['name']]}", source=info["source"], mesh=kwargs["device_mesh"],
            in_placements=tuple(kwargs["in_placements"]), out_placements=tuple(kwargs["out_placements"]),
            in_grad_placements=tuple(bw_kwargs["out_placements"]) if bw_kwargs else
            tuple(kwargs.get("in_grad_placements") or ()),
            body=body, forward=fw_gm, backward=bw_gm,
            num_activations=role_of(fw_gm).get("num_activations", 0) if graphs is not None else 0,
            global_in_shapes=[_shape(a.meta.get("val")) if isinstance(a, fx.Node) else None for a in node.args[1:]],
            local_in_shapes=[_shape(p.meta.get("val")) for p in fw_gm.graph.find_nodes(op="placeholder")],
            global_out_shapes=[_shape(v) for v in node.meta["val"][:n_out]],
            local_out_shapes=[_shape(_meta(o)) for o in fw_gm.graph.find_nodes(op="output")[0].args[0][:n_out]],
            flops={"forward": _cost.graph_flops(fw_gm), "backward": _cost.graph_flops(bw_gm)},
            activation_bytes=_cost.activation_bytes(fw_gm, n_out) if graphs is not None else 0,
            comm_bytes=0.0, forward_node=node.name, backward_node=bw_node.name if bw_node is not None else None,
            verdict=info.get("verdict", "unchecked"), closed_over=list(info.get("closed_over", [])),
            verdict_detail=info.get("verdict_detail", info.get("verdict", "unchecked")), check=info.get("check", True),
        )
        inputs = _input_comm(node, region, producers)
        inside = _cost.collective_bytes(fw_gm) + _cost.collective_bytes(bw_gm)
        region.comm_detail = {"inputs": inputs, "collectives": inside}
        region.comm_bytes = inputs + inside
        for user in node.users:
            if user.target is operator.getitem and user.args[1] < n_out:
                producers[user] = (region, user.args[1])
        regions.append(region)
    return regions


_ALIASES = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)  # how a checkpoint saves a value


def _match_backwards(forward: fx.GraphModule, fw_nodes: list[fx.Node], records: list,
                     candidates: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Each forward region node's backward node: the one consuming its activations (saved across the cut under
    the same names, maybe through the detach a checkpoint saves them with); the rest (regions a checkpoint
    recomputes, whose backward consumes the recomputation; regions with no activations) by order, as the
    backward runs regions in reverse."""
    by_name = {n.name: n for n in forward.graph.nodes}

    def root(name: str) -> str:
        node = by_name.get(name)
        while node is not None and node.op == "call_function" and node.target in _ALIASES:
            node = node.args[0]
        return node.name if node is not None else name

    unmatched = list(candidates)
    found: dict[fx.Node, fx.Node] = {}
    needing = [(n, r) for n, r in zip(fw_nodes, records, strict=True)
               if r["graphs"] is not None and r["graphs"].backward is not None]
    for node, record in needing:
        n_out = len(kwargs_of(record["body"])["out_placements"])
        saved = {u.name for u in node.users if u.target is operator.getitem and u.args[1] >= n_out}
        match = next((c for c in unmatched if any(isinstance(a, fx.Node) and root(a.name) in saved
                                                  for a in c.args[1:])), None)
        if match is not None:
            found[node] = match
            unmatched.remove(match)
    rest = [n for n, _ in needing if n not in found]
    for node, candidate in zip(reversed(rest), unmatched):
        found[node] = candidate
    return found


def _input_comm(node: fx.Node, region: Region, producers: dict) -> float:
    """Bytes to bring each input from its producer region's out placements to this region's in placements
    (inputs from program inputs or unknown producers count as already placed)."""
    total = 0.0
    for arg, dst in zip(node.args[1:], region.in_placements):
        if not isinstance(arg, fx.Node) or dst is None:
            continue
        src = _producer(arg, producers)
        val = arg.meta.get("val")
        if src is not None and isinstance(val, torch.Tensor):
            prod_region, idx = src
            total += _cost.reshard_bytes(val.shape, val.dtype, prod_region.out_placements[idx], dst,
                                         tuple(region.mesh.shape))
    return total


def _producer(node: fx.Node, producers: dict) -> tuple | None:
    """Follow shape-preserving single-input ops back to a region output."""
    seen = 0
    while seen < 64:
        if node in producers:
            return producers[node]
        tensor_args = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        val = node.meta.get("val")
        if node.op != "call_function" or len(tensor_args) != 1 or not isinstance(val, torch.Tensor) \
                or tuple(tensor_args[0].meta["val"].shape) != tuple(val.shape):
            return None
        node = tensor_args[0]
        seen += 1
    return None


def _meta(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _shape(val: Any) -> list | None:
    return [int(s) if not isinstance(s, torch.SymInt) else str(s) for s in val.shape] \
        if isinstance(val, torch.Tensor) else None
