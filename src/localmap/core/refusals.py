"""What a path refuses for a call, one error builder per refusal, naming the path that refuses."""

from __future__ import annotations

from typing import Sequence

from torch.distributed.tensor.placement_types import Placement

from localmap.errors import LocalMapError, fail
from localmap.placements.specs import placements_str

# The paths that refuse an unevenly sharded input, and why (eager supports it: eager.uneven).
COMPILED = "torch.compile"
TRACED_CALL = "a traced region (capture, verify, a planner's capture)"  # the path's name in the check's refusals
TRACED = "regions traced as graph nodes (capture, defer_inlining), whose graphs are traced at one rank's shard sizes"


def uneven_error(arg_path: str, shape: Sequence[int], placements: Sequence[Placement], mesh_shape: Sequence[int],
                 path: str) -> LocalMapError:
    """The error for argument `arg_path` (global `shape`, held with `placements` on a mesh of `mesh_shape`)
    sharded into pieces of different sizes, on a path (COMPILED, TRACED) that cannot run it."""
    return fail(arg_path, f"is unevenly sharded, which local_map does not support under {path}",
                given=f"shape {tuple(shape)} with {placements_str(tuple(placements))} on mesh {tuple(mesh_shape)}",
                fix="pad the sharded dim to a multiple of the ranks sharding it, or run this region eagerly on "
                    "DTensors")
