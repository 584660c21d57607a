"""Collectives inside regions, by mesh dim, with the gradients typed regions need.

Public functions (implemented with their type, cost and gradient facts in ``primitives``; the facts table is
``registry``): ``all_reduce``, ``pvary``, ``all_gather``, ``reduce_scatter``, ``all_to_all``,
``all_to_all_single``, ``ppermute``, ``shift``, ``axis_index``, ``axis_size``.
"""

from localmap.collectives.primitives import (
    all_gather, all_reduce, all_to_all, all_to_all_single, axis_index, axis_size, ppermute, pvary, reduce_scatter,
    shift,
)

__all__ = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_single", "ppermute", "shift",
           "axis_index", "axis_size", "pvary"]
