"""Placement specs: what a user may write for in/out placements, and how it maps onto argument leaves.

A *leaf spec* is ``None`` (a non-tensor, or "no placements") or a non-empty list/tuple of ``Placement``s, one
per mesh dim. A spec argument (``in_placements``, ``out_placements``, ``in_grad_placements``) is either

* the **flat form** (PyTorch's): one leaf spec per pytree leaf of the arguments (or outputs), in flatten order;
* the **prefix form** (JAX shard_map's): a pytree prefix of the arguments, where a leaf spec placed at a list,
  tuple or dict argument applies to every leaf inside it, and a list/tuple/dict of specs matches the
  argument's own structure.

Resolution rule: if the spec sequence has exactly one entry per leaf and every entry is a leaf spec, it is the
flat form; otherwise it is read as a prefix of the arguments (one entry per positional argument). The two agree
whenever each argument is a single tensor, so the rule only matters for container arguments. For outputs, a
single leaf spec applies to every output leaf.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed.tensor import DeviceMesh, DTensor
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from localmap.compat import pytree
from localmap.errors import fail

LeafSpec = tuple[Placement, ...] | None


def is_leaf_spec(spec: Any) -> bool:
    """True for None or a non-empty list/tuple of Placements."""
    if spec is None:
        return True
    return (
        isinstance(spec, (list, tuple))
        and len(spec) > 0
        and all(isinstance(p, Placement) for p in spec)
    )


def validate_spec_argument(spec: Any, name: str) -> None:
    """Check the shape of a spec argument once, when local_map is called, so errors point at the spec."""
    if spec is None:
        return
    if isinstance(spec, Placement):
        raise fail(
            name, "a bare Placement is not a spec",
            expected="a list of placements, one per mesh dim", given=repr(spec),
            fix=f"write [{spec!r}] (or one such list per argument)",
        )
    if name != "out_placements" and not isinstance(spec, (list, tuple)):
        raise fail(name, "must be a list or tuple with one spec per argument",
                   given=type(spec).__name__, fix=f"write {name}=([Shard(0)], [Replicate()], ...)")
    _validate_spec_tree(spec, name)


def _validate_spec_tree(spec: Any, path: str) -> None:
    if is_leaf_spec(spec):
        return
    if isinstance(spec, Placement):
        raise fail(path, "a bare Placement is not a spec",
                   expected="a list of placements, one per mesh dim", given=repr(spec),
                   fix=f"write [{spec!r}]")
    if isinstance(spec, (list, tuple)):
        if any(isinstance(p, Placement) for p in spec):
            raise fail(path, "mixes Placements with other entries",
                       expected="a list of Placements (one per mesh dim), or a list of specs",
                       given=repr(spec), fix="put the placements of one tensor in their own list")
        for i, sub in enumerate(spec):
            _validate_spec_tree(sub, f"{path}[{i}]")
        return
    if isinstance(spec, dict):
        for k, sub in spec.items():
            _validate_spec_tree(sub, f"{path}[{k!r}]")
        return
    raise fail(path, "is not a placement spec",
               expected="None, a list of Placements, or a list/tuple/dict of such specs",
               given=f"{type(spec).__name__}: {spec!r}", fix="use Shard(d), Replicate() or Partial() in a list")


def _leaf_count(value: Any) -> int:
    return len(pytree.tree_leaves(value))


def _broadcast(spec: Any, value: Any, path: str, name: str) -> list[LeafSpec]:
    """Leaf specs for every leaf of `value`, reading `spec` as a prefix of `value`'s structure."""
    if is_leaf_spec(spec):
        leaf = None if spec is None else tuple(spec)
        return [leaf] * _leaf_count(value)
    if isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)):
        if len(spec) != len(value):
            raise fail(f"{name} for {path}", f"has {len(spec)} entries but {path} has {len(value)}",
                       expected=f"{len(value)} specs, or one spec for all of {path}", given=len(spec),
                       fix=f"give one spec per element of {path}, or a single list of placements")
        out: list[LeafSpec] = []
        for i, (s, v) in enumerate(zip(spec, value, strict=True)):
            out.extend(_broadcast(s, v, f"{path}[{i}]", name))
        return out
    if isinstance(value, dict) and isinstance(spec, dict):
        if set(spec) != set(value):
            raise fail(f"{name} for {path}", "has keys that differ from the argument's",
                       expected=sorted(map(repr, value)), given=sorted(map(repr, spec)),
                       fix="give one spec per key, or a single list of placements for the whole dict")
        out = []
        # torch's pytree flattens a dict in insertion order; follow the value's own order.
        for k, v in value.items():
            out.extend(_broadcast(spec[k], v, f"{path}[{k!r}]", name))
        return out
    raise fail(f"{name} for {path}", "does not match the structure of the argument",
               expected=f"a list of placements, or a structure like {type(value).__name__}",
               given=repr(spec), fix=f"give one list of placements for all of {path}")


def resolve_input_specs(in_placements: Sequence[Any], args: tuple, num_leaves: int,
                        name: str = "in_placements") -> tuple[LeafSpec, ...]:
    """One leaf spec per flattened argument leaf (flat form, else prefix form; see module docstring)."""
    if len(in_placements) == num_leaves and all(is_leaf_spec(s) for s in in_placements):
        return tuple(None if s is None else tuple(s) for s in in_placements)
    if len(in_placements) != len(args):
        raise fail(name, f"has {len(in_placements)} entries for a call with {len(args)} positional "
                   f"arguments ({num_leaves} tensor/value leaves); Expecting {len(in_placements)} inputs to local_map "
                   f"function based on placements, but found {len(args)}.",
                   expected=f"{len(args)} (one per argument)" + (
                       f" or {num_leaves} (one per leaf)" if num_leaves != len(args) else ""),
                   given=len(in_placements),
                   fix="give one spec per positional argument; use None for non-tensor arguments")
    out: list[LeafSpec] = []
    for i, (s, a) in enumerate(zip(in_placements, args, strict=True)):
        out.extend(_broadcast(s, a, f"args[{i}]", name))
    return tuple(out)


def resolve_output_specs(out_placements: Any, out: Any, num_leaves: int) -> tuple[LeafSpec, ...]:
    """One leaf spec per flattened output leaf; a single leaf spec applies to all outputs."""
    name = "out_placements"
    if is_leaf_spec(out_placements):
        leaf = None if out_placements is None else tuple(out_placements)
        return (leaf,) * num_leaves
    if len(out_placements) == num_leaves and all(is_leaf_spec(s) for s in out_placements):
        return tuple(None if s is None else tuple(s) for s in out_placements)
    if isinstance(out, (list, tuple)) and isinstance(out_placements, (list, tuple)) \
            and len(out_placements) == len(out):
        return tuple(_broadcast(out_placements, out, "outputs", name))
    if isinstance(out, dict) and isinstance(out_placements, dict):
        return tuple(_broadcast(out_placements, out, "outputs", name))
    given_n = len(out_placements) if isinstance(out_placements, (list, tuple, dict)) else 1
    raise fail("outputs", f"the function returned {num_leaves} output leaves but out_placements has "
               f"{given_n} specs; Expecting {given_n} outputs to local_map function based on placements, but "
               f"found {num_leaves}.", expected=num_leaves, given=given_n,
               fix="give one spec per output (None for non-tensor outputs), or one spec for all outputs")


def fit_spec_to_mesh(spec: tuple[Placement, ...], mesh: DeviceMesh, path: str, name: str) -> tuple[Placement, ...]:
    """A leaf spec with one placement per mesh dim: a shorter spec leaves the trailing mesh dims Replicate
    (PyTorch's meaning, as ``DTensor.from_local`` reads it); a longer one is refused."""
    if len(spec) > mesh.ndim:
        names = f" {tuple(mesh.mesh_dim_names)}" if mesh.mesh_dim_names else ""
        raise fail(f"{name} for {path}", f"has {len(spec)} placements for a {mesh.ndim}-d mesh{names}",
                   expected=f"at most {mesh.ndim} placements (missing trailing mesh dims are Replicate)",
                   given=spec, fix=f"give one placement per mesh dim, e.g. {list(spec[:mesh.ndim])}")
    if len(spec) < mesh.ndim:
        return tuple(spec) + (Replicate(),) * (mesh.ndim - len(spec))
    return tuple(spec)


def normalize_shard_dims(spec: tuple[Placement, ...], ndim: int, path: str, name: str,
                         mesh: DeviceMesh) -> tuple[Placement, ...]:
    """Range-check Shard dims against the tensor's ndim; map negative dims to positive (as DTensor does)."""
    fixed = []
    for mesh_dim, p in enumerate(spec):
        if isinstance(p, Shard):
            d = p.dim
            if not -ndim <= d < ndim:
                raise fail(f"{name} for {path}", f"Shard({d}) is out of range for a {ndim}-d tensor",
                           expected=f"Shard(d) with {-ndim} <= d < {ndim}" if ndim else "no Shard for a 0-d tensor",
                           given=repr(p), mesh=mesh, mesh_dim=mesh_dim,
                           fix="shard a dim the tensor has, or use Replicate()")
            if d < 0:
                p = Shard(d + ndim)
        fixed.append(p)
    return tuple(fixed)


_PLAIN_LEAVES = (torch.Tensor, int, float, bool, str, type(None))  # pytree leaves (a DTensor is a tensor)


def leaf_path(root_name: str, tree: Any, index: int) -> str:
    """Path of the index-th flattened leaf of `tree`, like ``args[1]['w']``."""
    if type(tree) is tuple and all(isinstance(a, _PLAIN_LEAVES) for a in tree):  # fast path: flat arguments
        return f"{root_name}[{index}]"
    leaves = pytree.tree_flatten_with_path(tree)[0]
    return root_name + pytree.keystr(leaves[index][0])


def placements_str(placements: Sequence[Placement] | None) -> str:
    if placements is None:
        return "None"
    return "(" + ", ".join(repr(p) for p in placements) + ("," if len(placements) == 1 else "") + ")"


# ---- leaves against their specs (the same checks, and the same messages, on every path) ------------------------

def check_output_leaf(out: Any, i: int, leaf: Any, spec: LeafSpec, mesh: DeviceMesh) -> LeafSpec:
    """Output leaf `i` of `out` against its spec: a local tensor needs placements (one per mesh dim, Shard dims
    in range; returned normalized), anything else needs None."""
    if isinstance(leaf, torch.Tensor):
        if isinstance(leaf, DTensor):
            raise fail(leaf_path("outputs", out, i), "the function returned a DTensor",
                       expected="a local torch.Tensor", given="DTensor",
                       fix="return .to_local() of it, or compute on the local inputs only")
        if spec is None:
            raise fail(leaf_path("outputs", out, i), "is a Tensor but its out_placements spec is None (a tensor output expects placements)",
                       expected="a list of placements", given=None,
                       fix="give its placements, e.g. [Replicate()] or [Shard(0)]")
        spec = fit_spec_to_mesh(spec, mesh, leaf_path("outputs", out, i), "out_placements")
        return normalize_shard_dims(spec, leaf.ndim, leaf_path("outputs", out, i), "out_placements", mesh)
    if spec is not None:
        raise fail(leaf_path("outputs", out, i), "is not a Tensor but has a placement spec (a non-tensor output expects None placements)",
                   expected=None, given=placements_str(spec), fix="use None for non-tensor outputs")
    return None


def check_non_tensor_leaf(args: tuple, i: int, leaf: Any, spec: LeafSpec, name: str) -> None:
    """Argument leaf `i` that is not a tensor must have no placement spec in `name`."""
    if spec is not None and not isinstance(leaf, torch.Tensor):
        what = "a placement spec" if name == "in_placements" else f"an {name} spec"
        raise fail(leaf_path("args", args, i), f"is not a tensor but has {what} (a non-tensor input expects None placements)", expected=None,
                   given=placements_str(spec), fix=f"use None in {name} for non-tensor arguments")
