"""Which path a region call takes: one named mode, chosen in one place (``call_mode``) from what the call is
given and where it runs; ``RegionCallable.__call__`` and ``eager.compiled.call_compiling`` dispatch on it."""

from __future__ import annotations

import enum

import torch

from localmap.context import recorder
from localmap.traced.operator import is_deferring


class CallMode(enum.Enum):
    """A region call's path."""

    EAGER = "eager"  # DTensor arguments, run now: eager.region's pipeline
    COMPILING = "compiling"  # DTensor arguments while Dynamo traces: eager.compiled (checks at trace time)
    PLANNER_CAPTURE = "planner capture"  # plain tensors while Dynamo traces: traced.dynamo_capture
    DEFERRED = "deferred"  # plain tensors under hop.defer_inlining (capture): traced.frontend.call_traced
    REFERENCE = "reference"  # plain tensors while verify records its reference: traced.frontend.call_reference
    PLAIN = "plain"  # plain tensors otherwise: the function itself (warned where a region node was expected)


def call_mode(has_dtensor: bool, compiling: bool | None = None) -> CallMode:
    """The path of a call whose arguments hold a DTensor (`has_dtensor`) or not, here and now (Dynamo tracing,
    defer_inlining, verify's reference recorder: the context's per-thread stacks, read only here). `compiling`:
    whether Dynamo traces, when the caller already asked (the eager hot path asks once)."""
    if torch.compiler.is_compiling() if compiling is None else compiling:  # first: Dynamo reads no stack
        return CallMode.COMPILING if has_dtensor else CallMode.PLANNER_CAPTURE
    if has_dtensor:
        return CallMode.EAGER
    if is_deferring():
        return CallMode.DEFERRED
    if recorder("reference") is not None:
        return CallMode.REFERENCE
    return CallMode.PLAIN
