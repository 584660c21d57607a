"""What localmap knows of each collective op as it appears in traced graphs, one entry per op.

The checker reads an entry's type rule and gradient kind, the cost model its cost rule, and ``run`` whether
the op communicates. Entries are written next to each collective's implementation
(``localmap.collectives.primitives``), so one collective's facts live in one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx

from localmap.placements.types import RuleError

TypeRule = Callable[[fx.Node, list, Any], Any]  # (node, input types, mesh) -> output type


@dataclass(frozen=True)
class Collective:
    """One collective op's facts."""

    name: str | None  # what users wrote (localmap.collectives' function), for messages
    type_rule: TypeRule  # the output's placement type from the inputs' (see localmap.placements.types)
    cost: Callable[[float, int], float] | None  # bytes one rank sends, from its input bytes and the group size;
    #                                             None: the op itself sends nothing (a local op or a wait)
    gradient: str = "transposed"  # "transposed": the backward is the transpose collective; "unsummed": the
    #                               result is Replicate and its backward passes this rank's gradient on unsummed
    #                               (all_reduce); "summing": the backward sums the per-rank gradients (pvary)


COLLECTIVES: dict[Any, Collective] = {}


def register(op: Any, facts: Collective) -> None:
    COLLECTIVES[op] = facts


def collective(target: Any) -> Collective | None:
    """The facts of a graph node's target, or None when it is no collective."""
    return COLLECTIVES.get(target)


def communicates(target: Any) -> bool:
    """Whether a node with this target exchanges data between ranks."""
    facts = COLLECTIVES.get(target)
    return facts is not None and facts.cost is not None


def mesh_dim_of(node: fx.Node, mesh: Any) -> int:
    """The mesh dim whose process group a collective node runs over (its last argument names the group)."""
    name = node.args[-1]
    for m in range(mesh.ndim):
        if mesh.get_group(m).group_name == name:
            return m
    raise RuleError(f"{node.target} runs over process group {name!r}, which is no dim of the region's mesh",
                    "run collectives over the region's own mesh dims (localmap.collectives by dim name)")


def on_its_mesh_dim(to: Callable[[Any], Any]) -> TypeRule:
    """A type rule for a collective over one mesh dim: that dim's entry becomes to(input entry); others pass (the
    collectives are linear, so a value partial over another dim stays partial there). A Partial input over the
    collective's own dim is read as per-rank data (per-rank token counts sent by an all_to_all, say)."""

    def rule(node: fx.Node, in_types: list, mesh: Any) -> Any:
        m = mesh_dim_of(node, mesh)
        return tuple(to(p) if k == m else p for k, p in enumerate(in_types[0]))

    return rule


def same_as_input(node: fx.Node, in_types: list, mesh: Any) -> Any:
    return in_types[0]
