"""Placement types of values inside a region's body: the lattice the checker computes in.

For each mesh dim a value's type is one of:

* ``Replicate()``: the same on every rank of that dim;
* ``Shard(d)``: this rank's piece of dim d of one global tensor;
* ``Partial(op)``: the true value is the reduction (op) of every rank's value;
* ``VARYING``: differs across ranks with no global meaning that localmap can derive.

A value's type is a tuple with one entry per mesh dim. Rules (``localmap.check.rules``) give each op's output
type from its inputs' types, or raise ``RuleError``.
"""

from __future__ import annotations


class Varying:
    """Differs across the ranks of a mesh dim, with no shard or partial structure that localmap can derive."""

    _instance = None

    def __new__(cls) -> "Varying":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "Varying"


VARYING = Varying()
Type = tuple  # one entry per mesh dim: Replicate | Shard | Partial | Varying


class RuleError(Exception):
    """Raised by a rule when an op is applied to values of types it cannot combine."""

    def __init__(self, problem: str, fix: str, mesh_dim: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.fix, self.mesh_dim = problem, fix, mesh_dim
