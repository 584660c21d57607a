"""The region catalogue as one importable list: every program of tests/check/test_types_catalogue.py (CASES),
tests/check/test_catalogue_parallel.py (PROGS) and tests/collective_cases.py (CASES), each in one shape
(`Program`), so the path matrix (tests/matrix/) runs the same programs the check's tests define, not copies.

A program is a region body with its input shapes, placements, mesh, the verdict the check gives and whether its
numbers match one device; `reference(weights)` is the one-device computation."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "check"))

import collective_cases  # noqa: E402
import test_catalogue_parallel as parallel  # noqa: E402
import test_types_catalogue as types_catalogue  # noqa: E402

MESH_4 = ((4,), ("tp",))
MESH_2x2 = ((2, 2), ("dp", "tp"))


@dataclass(frozen=True)
class Program:
    name: str
    source: str  # which catalogue defined it: "types", "parallel" or "collectives"
    make_body: Callable[[Any], Callable]  # weights -> the region's body (weights read when the body runs)
    inputs: tuple  # per input: a shape (float) or ("int", high, shape)
    ins: tuple  # in_placements per input
    out: tuple  # out_placements (one output)
    mesh: tuple  # (shape, dim names)
    verdict: str  # "ok" | "refused" | "unproven" | "unchecked"
    right: bool  # do the numbers match one device (with the check off for a refused program)
    make_reference: Callable[[Any], Callable]  # weights -> the one-device computation
    says: str = ""  # refused: a fragment of the PlacementError
    grads: Any = None  # given in_grad_placements
    weights: tuple = ()  # closed-over DTensors: (shape, placements)
    kwargs: dict = field(default_factory=dict)
    known: str | None = None  # what the check's own catalogue test marks as wrong today (its xfail)
    own_reference: bool = False  # the reference is not the body (a body with collectives)

    @property
    def id(self) -> str:
        """Unique over the catalogues (two of them may use the same name)."""
        return f"{self.source}: {self.name}"

    @property
    def differentiable(self) -> bool:
        return any(not (s and s[0] == "int") for s in self.inputs) or bool(self.weights)


def _const(fn: Callable) -> Callable[[Any], Callable]:
    return lambda weights: fn


def _from_types(case: Any) -> Program:
    verdict = "ok" if case.verdict == "ok" else "unproven" if case.verdict == "unproven" else "refused"
    return Program(case.name, "types", _const(case.body), tuple(case.shapes), tuple(case.ins), tuple(case.out),
                   MESH_2x2 if case.mesh2d else MESH_4, verdict, verdict == "ok", _const(case.body),
                   says="" if verdict != "refused" else case.verdict, grads=case.grads)


def _from_parallel(prog: Any) -> Program:
    shape, names = parallel.MESHES[prog.mesh]
    body = prog.body if prog.weights else _const(prog.body)
    reference = _const(prog.ref) if prog.ref else body
    return Program(prog.name, "parallel", body, tuple(prog.inputs), tuple(prog.ins), tuple(prog.out),
                   (shape, names), prog.verdict, prog.is_right, reference, says=prog.says, grads=prog.grads,
                   weights=tuple(prog.weights), kwargs=dict(prog.kwargs), known=prog.xfail,
                   own_reference=prog.ref is not None)


# Every collective case is proven: those whose meaning follows the mesh's size (an all_reduce of a shard,
# ppermute, shift, axis_index, an even all_to_all_single) with that meaning on the call's mesh, which the
# reference computes from n (docs/check-verdicts.md, "Bodies that read the mesh on purpose").


def _from_collectives(case: tuple) -> Program:
    name, body, reference, shapes, ins, out = case
    n = MESH_4[0][0]
    return Program(name, "collectives", _const(lambda *a: body("tp", *a)), tuple(shapes),
                   tuple((p,) for p in ins), (out,), MESH_4, "ok",
                   True, _const(reference(n)), own_reference=True)


PROGRAMS: list[Program] = ([_from_types(c) for c in types_catalogue.CASES]
                           + [_from_parallel(p) for p in parallel.PROGS]
                           + [_from_collectives(c) for c in collective_cases.CASES])
BY_ID = {p.id: p for p in PROGRAMS}
assert len(BY_ID) == len(PROGRAMS), "a catalogue holds two programs of the same name"


def make_input(spec: Any, gen: torch.Generator) -> torch.Tensor:
    """A global input from its spec (the catalogues' one form): a float shape or ("int", high, shape)."""
    return parallel._make(spec, gen)
