"""The path matrix, eager and torch.compile (aot_eager) on simulated meshes: every catalogue program, first-order
and with a gradient penalty (second-order gradients), against one device."""

from __future__ import annotations

import pytest

from localmap.core.refusals import SIMULATED_COMPILE
from matrix_cells import COMPILED, expect, mesh_of, one_device, params, refuses, select
from matrix_paths import compiled, draw, on_dtensors

pytestmark = pytest.mark.matrix
ALL = select()

# PyTorch's simulator, not localmap: under AOT autograd a tensor a compiled body makes with a factory is one plain
# tensor that LocalTensor refuses to meet (docs/compile.md, item 4; without localmap: tests/eager/
# test_compiled_paths.py::test_simulator_factory_tensor_meets_local_tensor_without_localmap). localmap's own
# collectives make their index tensors from a region input there; a body's own factory is refused by name.
COMPILE_KNOWN: dict = {}
COMPILE_REFUSED = {"parallel: position table offset by the rank's index": "torch.arange"}
# (types: partial times replicate failed after other compile cells until localmap.testing.simulated_mesh dropped
# DTensor's sharding-propagation caches at the end of each world: docs/compile.md.)
COMPILE_FLAKY: dict = {}


@pytest.mark.parametrize("prog", params(ALL))
def test_eager(prog):
    t = draw(prog, 1)
    want = one_device(prog, t)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: on_dtensors(prog, t, mesh, "single", penalty=False), want)


@pytest.mark.parametrize("prog", params(select(verdicts=("ok", "unproven", "unchecked"))))
def test_eager_gradient_penalty(prog):
    t = draw(prog, 1)
    want = one_device(prog, t, penalty=True)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: on_dtensors(prog, t, mesh, "single", penalty=True), want)


@pytest.mark.compile
@pytest.mark.parametrize("prog", params(COMPILED, COMPILE_KNOWN, flaky=COMPILE_FLAKY))
def test_compile_aot_eager(prog):
    t = draw(prog, 1)
    if prog.id in COMPILE_REFUSED:
        with mesh_of(prog) as mesh:
            refuses(lambda: on_dtensors(prog, t, mesh, "single", penalty=False, wrap=compiled()),
                    SIMULATED_COMPILE, "makes a tensor with a factory", COMPILE_REFUSED[prog.id])
        return
    want = one_device(prog, t)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: on_dtensors(prog, t, mesh, "single", penalty=False, wrap=compiled()), want)
