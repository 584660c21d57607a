"""What a path refuses for a call, one error builder per refusal, naming the path that refuses."""

from __future__ import annotations

from typing import Any, Sequence

from torch.distributed.tensor.placement_types import Placement

from localmap.check.verdict import Verdict
from localmap.errors import LocalMapError, body_error, fail
from localmap.placements.specs import placements_str

# The paths that refuse an unevenly sharded input, and why (eager supports it: eager.uneven).
COMPILED = "torch.compile"
TRACED_CALL = "a traced region (capture, verify, a planner's capture)"  # the path's name in the check's refusals
PLANNER_CAPTURE = "a planner's capture (Dynamo export with PyTorch's local_map wrapping on, then the joint export)"
TRACED = "regions traced as graph nodes (capture, defer_inlining), whose graphs are traced at one rank's shard sizes"


def uneven_error(arg_path: str, shape: Sequence[int], placements: Sequence[Placement], mesh_shape: Sequence[int],
                 path: str) -> LocalMapError:
    """The error for argument `arg_path` (global `shape`, held with `placements` on a mesh of `mesh_shape`)
    sharded into pieces of different sizes, on a path (COMPILED, TRACED) that cannot run it."""
    return fail(arg_path, f"is unevenly sharded, which local_map does not support under {path}",
                given=f"shape {tuple(shape)} with {placements_str(tuple(placements))} on mesh {tuple(mesh_shape)}",
                fix="pad the sharded dim to a multiple of the ranks sharding it, or run this region eagerly on "
                    "DTensors")


def planner_closed_over_error(func: Any, paths: Sequence[str]) -> LocalMapError:
    """The error for a region whose body reads DTensors it closes over (`paths`: parameters, buffers), captured
    for a planner: a region node there takes the call's tensor arguments only, so read at trace time the DTensor
    would be one rank's shard frozen into the region graph, no input of the joint graph, with no gradient."""
    return fail(paths[0], f"is a DTensor the body of region {getattr(func, '__name__', 'region')!r} closes over, "
                f"which {PLANNER_CAPTURE} cannot record: its region node takes the call's tensor arguments only, "
                f"so one rank's shard would be frozen into the region graph, no input of the joint graph, with no "
                f"gradient",
                given=f"closed over: {', '.join(paths)}",
                fix="pass the weight to the region as an argument (a plain tensor, its placements in "
                    "in_placements), as a planner's model holds it; or capture with localmap.capture")


def traced_untraceable_error(func: Any, exc: BaseException, why: str) -> LocalMapError:
    """The error for a region whose body the traced paths (capture, verify, a planner's capture) cannot trace on
    fake tensors (`why`: Python reading tensor values, an op without a fake implementation): BodyError naming the
    path, the region, its line and a fix for that reason."""
    if why.startswith("it reads tensor values"):
        fix = ("compute both sides with torch.where instead of a Python branch, or call this region eagerly "
               "(eager checks the branch each call takes); a captured program holds one graph per region")
    else:
        fix = ("register a fake implementation (@op.register_fake for a torch.library.custom_op, "
               "torch.library.register_fake otherwise), or call this region eagerly")
    return body_error(func, exc, f"tracing its body for {TRACED_CALL} ({why})", fix=fix)


def refuse_untraceable(verdict: Verdict, one_graph: bool) -> Verdict:
    """`verdict`, unless the check found the body untraceable on fake tensors, which torch.compile's Dynamo cannot
    trace either: then a LocalMapError naming the compiled path, the region and why. Python that reads tensor
    values is refused only where a graph break is refused too (`one_graph`: fullgraph=True); with graph breaks
    allowed, Dynamo runs that part of the body eagerly, and the verdict (unchecked) is enforced as usual."""
    why = verdict.untraceable
    if why is None or (why.startswith("it reads tensor values") and not one_graph):
        return verdict
    if why.startswith("it reads tensor values"):
        path, fix = (f"{COMPILED} (fullgraph=True)",
                     "compute both sides with torch.where instead of a Python branch, compile with fullgraph=False "
                     "(Dynamo then runs that part eagerly after a graph break; give in_grad_placements=, which "
                     "the check cannot infer there), or run this region eagerly (eager checks the branch each "
                     "call takes, on its values)")
    else:
        path, fix = (COMPILED, "register a fake implementation (@op.register_fake for a torch.library.custom_op, "
                               "torch.library.register_fake otherwise), or run this region eagerly")
    raise fail(f"region {verdict.function!r}", f"{path} cannot trace its body: {why}", given=verdict.unchecked,
               fix=fix)


SIMULATED_COMPILE = "torch.compile on a simulated mesh (PyTorch's LocalTensorMode)"


def simulated_factory_error(region: str, calls: Sequence[tuple[str, str]]) -> LocalMapError:
    """The error for region `region` whose body, compiled on a simulated mesh, makes tensors with factories
    (`calls`: (call, source line)). There AOT autograd sees such a tensor as one plain tensor that the
    simulator's LocalTensor refuses to meet, and at run time the simulator makes that graph node a LocalTensor
    among per-rank plain tensors (docs/compile.md, item 4): no right result either way."""
    made = "; ".join(f"{call} at {line}" for call, line in calls)
    return fail(f"region {region!r}", f"makes a tensor with a factory in its body, which {SIMULATED_COMPILE} "
                "cannot run: AOT autograd sees that tensor as one plain tensor, which the simulator's LocalTensor "
                "refuses to meet (PyTorch's simulator; docs/compile.md, item 4)", given=made,
                fix="make it from an input (x.new_zeros / x.new_full / torch.zeros_like(x); an arange as "
                    "x.new_ones(n, dtype=torch.long).cumsum(0) - 1), or run this region eagerly, or compile it "
                    "on real process groups (gloo, NCCL), where it works")
