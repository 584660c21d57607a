"""Region metadata: where a region graph carries its placements, mesh and role, as planners and the operator
read them.

``gm.meta["local_map_kwargs"]`` (``KWARGS``, the same key as PyTorch's operator) holds ``in_placements``,
``out_placements``, ``in_grad_placements`` (may be None) and ``device_mesh``; ``gm.meta["localmap"]`` (``ROLE``)
holds localmap's own facts (role body/forward/backward, number of activations, gradient shapes and scales);
``body.meta["localmap_source"]`` (``SOURCE``) the region's name, call site and check verdict. A copy of the first
two rides in an attribute: ``torch.save`` of a GraphModule keeps attributes but drops ``meta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch.fx as fx

from localmap.errors import fail
from localmap.placements.algebra import grad_default

KWARGS = "local_map_kwargs"  # GraphModule.meta key of a region's placements and mesh (as PyTorch's operator)
ROLE = "localmap"  # GraphModule.meta key of localmap's own facts about a graph (role, activations, ...)
SOURCE = "localmap_source"  # body.meta key: the region's function name and call site (file:line)
COST = "localmap_cost"  # a planner-form region node's meta key: flops, saved_bytes, comm_bytes per rank


_SAVED = "_localmap_meta"  # an attribute copy of the meta: GraphModule pickling keeps attributes, drops meta


def set_region_meta(gm: fx.GraphModule, kwargs: dict, role: dict | None = None) -> None:
    """Record a region graph's placements (and localmap role) where planners and the operator read them."""
    gm.meta[KWARGS] = kwargs
    if role is not None:
        gm.meta[ROLE] = role
    setattr(gm, _SAVED, {KWARGS: kwargs, ROLE: gm.meta.get(ROLE)})


def _restore_meta(gm: fx.GraphModule) -> None:
    saved = getattr(gm, _SAVED, None)
    if saved and KWARGS not in gm.meta:
        gm.meta[KWARGS] = saved[KWARGS]
        if saved.get(ROLE) is not None:
            gm.meta[ROLE] = saved[ROLE]


def kwargs_of(gm: fx.GraphModule) -> dict | None:
    _restore_meta(gm)
    return gm.meta.get(KWARGS)


def region_kwargs(body: fx.GraphModule, num_args: int) -> dict:
    """The body's placements and mesh, checked against the number of arguments."""
    kwargs = kwargs_of(body) if isinstance(body, fx.GraphModule) else None
    if not isinstance(kwargs, dict) or "in_placements" not in kwargs or "out_placements" not in kwargs:
        raise fail("body", f"has no meta[{KWARGS!r}] with in_placements and out_placements",
                   expected="{'in_placements': ..., 'out_placements': ..., 'device_mesh': mesh}",
                   given=type(kwargs).__name__, fix="set body.meta['local_map_kwargs'] before calling the operator")
    if kwargs.get("device_mesh") is None:
        raise fail("body", "has no device_mesh in its local_map_kwargs", fix="set local_map_kwargs['device_mesh']")
    if len(kwargs["in_placements"]) != num_args:
        raise fail("in_placements", f"has {len(kwargs['in_placements'])} entries for {num_args} operator inputs",
                   expected=num_args, given=len(kwargs["in_placements"]),
                   fix="give one placement tuple (or None for a non-tensor) per input")
    return kwargs


def role_of(gm: fx.GraphModule) -> dict:
    _restore_meta(gm)
    return gm.meta.get(ROLE, {"role": "body", "num_activations": 0})


def grad_placements(kwargs: dict) -> tuple:
    """Gradient placements of each input: in_grad_placements when given, else the input's own with Partial
    read as Replicate (the eager default)."""
    given = kwargs.get("in_grad_placements")
    if given is not None:
        return tuple(None if p is None else tuple(p) for p in given)
    return tuple(None if p is None else grad_default(tuple(p)) for p in kwargs["in_placements"])


def planner_kwargs(kwargs: dict) -> dict:
    """A region node's placements as a planner reads them (meta-pytorch/autoparallel requires
    ``in_grad_placements`` None on every region node): the gradient placements are where it reads them, the
    backward node's ``out_placements``; the forward graph's own meta keeps its in_grad_placements."""
    return {**kwargs, "in_grad_placements": None}


# What a region graph costs, measured by program.cost (which registers itself here: traced does not import
# program); read lazily, the first time a planner looks, so a capture pays nothing for it.
_cost_measure: list[Callable[[fx.GraphModule], dict]] = []


def register_cost_measure(measure: Callable[[fx.GraphModule], dict]) -> None:
    _cost_measure[:] = [measure]


class RegionCost(Mapping):
    """``node.meta["localmap_cost"]`` of a region node: ``flops`` (one run of its graph on a rank's shards),
    ``saved_bytes`` (activations a forward saves for its backward, per rank; 0 for a backward) and
    ``comm_bytes`` (what a rank sends in the graph's collectives), measured on first access."""

    def __init__(self, graph: fx.GraphModule) -> None:
        self._graph, self._values = graph, None

    def _measured(self) -> dict:
        if self._values is None:
            if not _cost_measure:
                raise fail("localmap_cost", "has no measure registered", fix="import localmap (program.cost)")
            self._values = _cost_measure[0](self._graph)
        return self._values

    def __getitem__(self, key: str) -> Any:
        return self._measured()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._measured())

    def __len__(self) -> int:
        return len(self._measured())

    def __deepcopy__(self, memo: dict) -> dict:  # a copied graph keeps the numbers, not the region graph
        return dict(self._measured())

    def __repr__(self) -> str:
        return f"RegionCost({self._values if self._values is not None else 'not measured yet'})"
