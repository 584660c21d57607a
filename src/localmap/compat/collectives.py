"""PyTorch's functional collectives (``torch.distributed._functional_collectives``) and their graph ops.

localmap's collectives are these (they trace into graphs, run under gloo/NCCL and on the simulated mesh); the
checker, the cost model and ``run`` recognise their nodes by ``FUNCTIONAL_OPS``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed._functional_collectives as _funcol
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DeviceMesh

FUNCTIONAL_OPS = torch.ops._c10d_functional  # the op namespace the functional collectives trace to
FUNCTIONAL_NAMESPACE = "_c10d_functional"


def wait(t: torch.Tensor) -> torch.Tensor:
    """The finished value of a collective's result (functional collectives return it unwaited)."""
    return _funcol.wait_tensor(t) if isinstance(t, AsyncCollectiveTensor) else t


def wait_local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor, waited when it is still an in-flight collective (no graph op)."""
    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def all_reduce(x: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    return wait(_funcol.all_reduce(x, op, group))


def all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    return wait(_funcol.all_gather_single(x, dim, group))


def reduce_scatter(x: torch.Tensor, op: str, dim: int, group: Any) -> torch.Tensor:
    return wait(_funcol.reduce_scatter_single(x, op, dim, group))


def all_to_all_single(x: torch.Tensor, output_split_sizes: Sequence[int] | None,
                      input_split_sizes: Sequence[int] | None, group: Any) -> torch.Tensor:
    return wait(_funcol.all_to_all_single(x, output_split_sizes, input_split_sizes, group))


def all_gather_stack(t: torch.Tensor, mesh: DeviceMesh, mesh_dim: int) -> torch.Tensor:
    """Every rank of `mesh_dim` gets all ranks' `t`, stacked along a new dim 0."""
    return all_gather(t.unsqueeze(0), 0, (mesh, mesh_dim))


def is_functional_collective(target: Any) -> bool:
    """Whether a graph node's target is one of the functional collectives' ops."""
    return str(getattr(target, "namespace", "")) == FUNCTIONAL_NAMESPACE


def group_size(group: Any) -> int | None:
    """Size of a process group given by name (as functional collectives record it in graphs)."""
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group).size() if isinstance(group, str) else None
    except Exception:  # an unknown name (a graph from another process): no size, no cost
        return None
