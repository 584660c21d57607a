"""Every use of a PyTorch-private API in localmap goes through this module.

A new PyTorch release should need changes here and nowhere else. Each name below says what it is for; the
public modules import these, never ``torch.distributed.tensor._*`` directly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.placement_types import Placement
from torch.utils import _pytree as pytree

__all__ = [
    "AsyncCollectiveTensor",
    "DTensorSpec",
    "TensorMeta",
    "pytree",
    "make_dtensor",
    "make_spec",
    "global_shape_and_stride",
    "redistribute_local",
    "simulated_rank_map",
    "simulated_local",
    "is_simulated",
]


def make_spec(mesh: DeviceMesh, placements: tuple[Placement, ...], shape: Sequence[Any],
              stride: Sequence[Any], dtype: torch.dtype) -> DTensorSpec:
    """A DTensor's spec: mesh, placements and global metadata."""
    return DTensorSpec(mesh, placements, tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), dtype))


def make_dtensor(local: torch.Tensor, spec: DTensorSpec, requires_grad: bool) -> DTensor:
    """Wrap a local tensor as a DTensor without any checks or communication (the caller computed the spec).

    Calls DTensor's C++ constructor directly: ``DTensor(...)`` adds a dynamo-disabled ``__init__`` that does
    nothing but costs microseconds on every region call.
    """
    return torch.Tensor._dtensor__new__(DTensor, local, spec, requires_grad=requires_grad)


def fast_apply(fn: type[torch.autograd.Function]) -> Any:
    """``fn.apply`` without the Python-level checks for functorch transforms, used when none is active.

    Falls back to ``fn.apply`` inside vmap/grad transforms, which need the full path.
    """
    c_apply = super(torch.autograd.Function, fn).apply  # type: ignore[misc]
    full_apply = fn.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args: Any) -> Any:
        return full_apply(*args) if transforms_active() else c_apply(*args)

    return apply


def global_shape_and_stride(local: torch.Tensor, mesh: DeviceMesh,
                            placements: Sequence[Placement]) -> tuple[list[Any], list[Any]]:
    """DTensor's own rule for a global shape and stride from an evenly sharded local tensor (C++, fast)."""
    from torch.distributed.tensor._utils import compute_global_tensor_info

    return compute_global_tensor_info(local, mesh, placements)


def redistribute_local(local: torch.Tensor, current: DTensorSpec, target: DTensorSpec) -> torch.Tensor:
    """Redistribute a local tensor between two specs (used on gradients inside backward)."""
    from torch.distributed.tensor._redistribute import redistribute_local_tensor

    return redistribute_local_tensor(local, current, target)


# The simulated mesh (LocalTensorMode) stores one tensor per rank inside a LocalTensor and gives per-rank sizes
# as symbolic ints. These helpers let the shape logic read per-rank sizes without a collective on real ints.

def is_simulated(t: Any) -> bool:
    from torch.distributed._local_tensor import LocalTensor

    return isinstance(t, LocalTensor)


def simulated_local(t: Any) -> dict[int, torch.Tensor]:
    """rank -> that rank's plain tensor, for a LocalTensor."""
    return t._local_tensors


def simulation_active() -> bool:
    """Whether a LocalTensorMode is simulating ranks right now."""
    from torch.distributed._local_tensor import local_tensor_mode

    return local_tensor_mode() is not None


def simulated_rank_map(fn: Any) -> torch.Tensor:
    """A LocalTensor whose rank r value is fn(r), under the active LocalTensorMode."""
    from torch.distributed._local_tensor import local_tensor_mode

    mode = local_tensor_mode()
    assert mode is not None, "simulated_rank_map needs an active LocalTensorMode"
    return mode.rank_map(fn)


def fake_process_group(world_size: int) -> None:
    """Initialize the fake (no-communication) process group that the simulated mesh runs over."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def local_tensor_mode(world_size: int) -> Any:
    """A LocalTensorMode simulating `world_size` ranks in this process."""
    from torch.distributed._local_tensor import LocalTensorMode

    return LocalTensorMode(world_size)


def reconcile(t: torch.Tensor) -> torch.Tensor:
    """The single plain tensor of a LocalTensor whose ranks all hold the same value (plain tensors pass)."""
    return t.reconcile() if is_simulated(t) else t


def all_gather_stack(t: torch.Tensor, mesh: DeviceMesh, mesh_dim: int) -> torch.Tensor:
    """Every rank of `mesh_dim` gets all ranks' `t`, stacked along a new dim 0 (functional collective)."""
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_single(t.unsqueeze(0), 0, (mesh, mesh_dim)))


def outside_simulation() -> Any:
    """A context in which the active LocalTensorMode (if any) is off, so tensors are plain single-device ones."""
    import contextlib

    from torch.distributed._local_tensor import local_tensor_mode

    mode = local_tensor_mode()
    return mode.disable() if mode is not None else contextlib.nullcontext()
