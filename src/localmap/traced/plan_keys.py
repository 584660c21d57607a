"""Content keys of region graphs: what two traces of the same region share, so a graph that names a traced
region by key prints the same text however many times the program is compiled.

A key is derived from what decides a region's behaviour: each graph module's code, the identity of every
object its graph reads by ``get_attr`` (tensors by identity, never by value: a parameter's value changes, its
identity does not), and whatever else the caller adds (placements, mesh identity, argument metadata). Two
region calls of different Python functions whose traces are equal share a content; the caller decides whether
they may share a key (``traced.dynamo_capture`` compares what they do on the tensors as given).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from localmap.traced.graphs import trace_body

KEY_BYTES = 6  # the printed key: 48 bits, an address only (the full content digest is compared on lookup)


def content_digest(parts: Any) -> bytes:
    """A full digest of `parts` (its repr): what two plans must share to be the same content."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def slot_key(digest: bytes, slot: int) -> int:
    """The short key of slot `slot` of a content (slot 0 unless contents of different behaviour collide)."""
    return int.from_bytes(hashlib.blake2b(digest + slot.to_bytes(4, "little"), digest_size=KEY_BYTES).digest(),
                          "little")


def graph_fingerprint(gm: fx.GraphModule) -> tuple:
    """Each graph module's code (the root and nested ones) and the identity of each non-module value its graph
    reads: equal for two traces of the same computation on the same objects."""
    parts: list = []
    for name, module in gm.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        parts.append((name, module.code))
        for node in module.graph.find_nodes(op="get_attr"):
            value = _attribute(module, node.target)
            if not isinstance(value, torch.nn.Module):  # a nested graph is covered by named_modules
                parts.append((name, node.target, _identity(value)))
    return tuple(parts)


def _attribute(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _identity(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    return (type(value).__name__, id(value))


def joint_fingerprint(fn: Callable[..., tuple], tensors: Sequence[torch.Tensor]) -> tuple:
    """`fn`'s forward and input gradients traced on fake `tensors` (which ops run, custom backwards included):
    two functions with equal fingerprints compute the same outputs and gradients on tensors of these shapes."""
    def joint(*inputs: torch.Tensor) -> tuple:
        outs = [o for o in fn(*inputs) if isinstance(o, torch.Tensor)]
        wanted = [x for x in inputs if x.requires_grad]
        differentiable = [o for o in outs if o.requires_grad]
        grads: Sequence[Any] = ()
        if wanted and differentiable:
            grads = torch.autograd.grad(differentiable, wanted, [torch.ones_like(o) for o in differentiable],
                                        allow_unused=True)
        return (*outs, *(g for g in grads if g is not None))

    return graph_fingerprint(trace_body(joint, list(tensors)))
