"""A planner's capture without the planner: meta-pytorch/autoparallel's pipeline (Dynamo export with PyTorch's
local_map wrapping on, then the joint export with PyTorch's operator deferred), and its region nodes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from localmap import compat as _compat
from localmap.compat import dynamo as compat_dynamo
from localmap.program.run import run_joint
from localmap.traced.meta import KWARGS

__all__ = ["planner_capture", "region_nodes", "run_joint"]  # run_joint: localmap.program.run


def planner_capture(model: torch.nn.Module, *args: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(Dynamo's graph, the joint forward+backward graph) of `model` on `args` (fake tensors, or real ones). On a
    simulated mesh the program is captured once, globally, as capture traces it: the simulation set aside, and
    off the dispatch stack (set aside only, it would still see AOT autograd's FunctionalTensors first)."""
    with _compat.simulation_off_the_stack():
        return compat_dynamo.planner_capture(model, args)


def region_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The region nodes of a captured graph, in graph order: those carrying ``meta["local_map_kwargs"]`` (PyTorch's
    operator and localmap's alike)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and KWARGS in n.meta]
