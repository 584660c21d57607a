"""Placement types of values inside a region's body: the lattice the checker computes in.

For each mesh dim a value's type is one of:

* ``Replicate()``: the same on every rank of that dim;
* ``Shard(d)``: this rank's piece of dim d of one global tensor;
* ``Partial(op)``: the true value is the reduction (op) of every rank's value;
* ``PER_RANK_COPY``: the same value on every rank, but typed per rank: its gradient is a per-rank share that
  its producer's backward sums (``pvary``'s and ``all_gather``'s results, as JAX types them varying). As a value
  it is Replicate (an op with sharded data gives the shard); claimed Replicate as it is, its gradient would be
  counted once per rank;
* ``VARYING``: differs across ranks with no global meaning that localmap can derive. A claim of Shard or
  Partial on such a value is *unproven* (never accepted as proven);
* ``AGREED``: the same on every rank, but with no global meaning that localmap can derive: an all_reduce of
  per-rank values with no global form, or a sum of a Replicate value (an all_reduce of partial results of its
  own reduction, or of a shard's blocks, has one: ``localmap.collectives.primitives``). Its one-rank run (every collective the identity) computes something else as far as the
  check knows, so any claim on it is *unproven* (the test settles it), never proven nor refused. As a value it
  flows like Replicate (asked about as Replicate; its gradient, like a Replicate value's, is the same on every
  rank), but what it makes stays AGREED where the result is the same on every rank and becomes VARYING where it
  meets shards or partial sums.

A value's type is a tuple with one entry per mesh dim. Rules (``localmap.check.rules``) give each op's output
type from its inputs' types, or raise ``RuleError``.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor.placement_types import Replicate


class _Marker:
    """A lattice element that is not a PyTorch placement: one instance per class, compared with ``is``."""

    _instance = None

    def __new__(cls) -> "_Marker":
        if cls.__dict__.get("_instance") is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return type(self).__name__


class Varying(_Marker):
    """Differs across the ranks of a mesh dim, with no shard or partial structure that localmap can derive."""


class PerRankCopy(_Marker):
    """The same on every rank of a mesh dim in value, per rank in gradient (see the module docstring)."""


class Agreed(_Marker):
    """The same on every rank of a mesh dim, with no global meaning that localmap can derive (see the module
    docstring)."""


VARYING = Varying()
PER_RANK_COPY = PerRankCopy()
AGREED = Agreed()
Type = tuple  # one entry per mesh dim: Replicate | Shard | Partial | PerRankCopy | Varying | Agreed


def same_gradient_on_ranks(p: Any) -> bool:
    """Whether a value of this entry is the same on every rank and so is its gradient (Replicate, AGREED):
    the gradient flow of the checker treats both alike."""
    return isinstance(p, Replicate) or p is AGREED


def same_on_ranks(p: Any) -> bool:
    """Whether a value of this entry is the same on every rank (Replicate, PER_RANK_COPY, AGREED)."""
    return isinstance(p, Replicate) or p is PER_RANK_COPY or p is AGREED


class RuleError(Exception):
    """Raised by a rule when an op is applied to values of types it cannot combine."""

    def __init__(self, problem: str, fix: str, mesh_dim: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.fix, self.mesh_dim = problem, fix, mesh_dim


# Why a value became VARYING at a node, kept in the check graph's node.meta under this key (for the message
# that names where a proof stopped).
UNKNOWN_WHY = "localmap_unknown_why"
OPAQUE = "localmap_opaque"  # node.meta key: the op has no rule at all, so even a Replicate claim is unproven
# node.meta key: the proof read this step by its meaning on the call's mesh, which follows the mesh's size (an
# all_reduce of a shard, ppermute: NOTE in check.coordinates); the verdict lists them (Verdict.follows_mesh)
FOLLOWS_MESH = "localmap_follows_mesh"
