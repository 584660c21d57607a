"""The path matrix, other axes: the region's output in each container (tuple, list, dict, nested) on the eager,
compiled and captured paths, and its closed-over weights as parameters, buffers and plain attributes of a module
on the eager and captured paths; each against one device."""

from __future__ import annotations

import pytest
import torch

from catalogue import BY_ID
from matrix_cells import expect, mesh_of, one_device
from matrix_paths import captured, captured_reference, compiled, draw, on_dtensors

pytestmark = pytest.mark.matrix

# A strict xfail where the cell's bug is known; a non-strict one where the cell fails only after other cells.
COMPILE_KNOWN: dict = {}
_COLUMN, _ROW = "parallel: closed-over column weight (to_local)", "parallel: closed-over row weight, partial sum"
# issue 19 bug 4 fixed: plain-attribute DTensors are closed-over DTensors (eager) and program inputs (capture).
EAGER_FORM_KNOWN: dict = {}
CAPTURED_FORM_KNOWN: dict = {}


def _cases(programs, axis, known, flaky=None):
    """(program, axis value) params; a strict xfail where `known` names the cell's bug, a non-strict one where
    `flaky` names why the cell fails only after other cells."""
    flaky = flaky or {}

    def marks(key):
        if key in known:
            return [pytest.mark.xfail(strict=True, reason=known[key])]
        return [pytest.mark.xfail(strict=False, reason=flaky[key])] if key in flaky else []
    return [pytest.param(p, a, id=f"{p.id}-{a}", marks=marks((p.id, a))) for p in programs for a in axis]


STRUCTURED = [BY_ID["types: row-parallel matmul"], BY_ID["types: sharded contraction to partial"]]
WEIGHTED = [BY_ID[_COLUMN], BY_ID[_ROW]]
STRUCTURES = ["tuple", "list", "dict", "nested"]
# (The compiled Partial-output cells failed after other cells until localmap.testing.simulated_mesh dropped DTensor's
# sharding-propagation caches at the end of each world: docs/compile.md.)
COMPILE_FLAKY: dict = {}
FORMS = ["parameter", "buffer", "attribute"]


@pytest.mark.parametrize("prog, structure", _cases(STRUCTURED, STRUCTURES, {}))
def test_structured_outputs_eager(prog, structure):
    t = draw(prog, 2)
    want = one_device(prog, t, structure)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: on_dtensors(prog, t, mesh, structure, penalty=False), want)


@pytest.mark.compile
@pytest.mark.parametrize("prog, structure", _cases(STRUCTURED, STRUCTURES, COMPILE_KNOWN, COMPILE_FLAKY))
def test_structured_outputs_compiled(prog, structure):
    t = draw(prog, 2)
    want = one_device(prog, t, structure)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: on_dtensors(prog, t, mesh, structure, penalty=False, wrap=compiled()), want)


@pytest.mark.parametrize("prog, structure", _cases(STRUCTURED, STRUCTURES, {}))
def test_structured_outputs_captured(prog, structure):
    t = draw(prog, 2)
    want = captured_reference(one_device(prog, t, structure), t)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: captured(prog, t, mesh, structure), want)


def _without_weight_grads(want):
    return {k: v for k, v in want.items() if not k.startswith("grad.w")}


@pytest.mark.parametrize("prog, form", _cases(WEIGHTED, FORMS, EAGER_FORM_KNOWN))
def test_weight_forms_eager(prog, form):
    t = draw(prog, 1)
    want = one_device(prog, t)
    if form == "buffer":  # a buffer takes no gradient
        want = _without_weight_grads(want)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: on_dtensors(prog, t, mesh, "single", penalty=False, form=form), want)


@pytest.mark.parametrize("prog, form", _cases(WEIGHTED, FORMS, CAPTURED_FORM_KNOWN))
def test_weight_forms_captured(prog, form):
    t = draw(prog, 1)
    want = captured_reference(one_device(prog, t), t)
    if form == "buffer":  # capture's gradients: the inputs' and the module's state's that requires grad
        want = _without_weight_grads(want)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: captured(prog, t, mesh, "single", form=form), want)
