"""A region's body may not write to its inputs: they are the caller's shards (DTensor local tensors)."""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from localmap import compat
from localmap.errors import fail


def check_no_input_mutation(body: fx.GraphModule, paths: Sequence[str] | None = None) -> None:
    """A body may not mutate its inputs (the region's inputs are DTensor shards owned by the caller). `paths`:
    the argument path of each placeholder, for the message."""
    aliases: dict[fx.Node, int] = {}
    for i, node in enumerate(n for n in body.graph.nodes if n.op == "placeholder"):
        aliases[node] = i
    for node in body.graph.nodes:
        schema = compat.op_schema(node.target) if node.op == "call_function" else None
        if schema is None:
            continue
        for arg, formal in zip(node.args, schema.arguments):
            if not isinstance(arg, fx.Node) or arg not in aliases:
                continue
            if formal.alias_info is not None and formal.alias_info.is_write:
                k = aliases[arg]
                raise fail(paths[k] if paths is not None and k < len(paths) else f"inputs[{k}]",
                           f"is mutated in the region's body by {node.target}",
                           expected="a body that does not write to its inputs", given=str(node.target),
                           fix="compute into a new tensor (out-of-place op), or clone the input first")
            if formal.alias_info is not None and not formal.alias_info.is_write:
                aliases[node] = aliases[arg]  # a view of an input: writes to it write the input
