"""The path matrix, eager and torch.compile (aot_eager) on simulated meshes: every catalogue program, first-order
and with a gradient penalty (second-order gradients), against one device."""

from __future__ import annotations

import pytest

from matrix_cells import COMPILED, expect, mesh_of, one_device, params, select
from matrix_paths import compiled, draw, on_dtensors

pytestmark = pytest.mark.matrix
ALL = select()

# PyTorch's simulator, not localmap: under AOT autograd a tensor the compiled body makes with a factory (the arange
# of localmap's axis_index, ppermute's index table) is a plain FunctionalTensor that LocalTensor refuses to meet.
# The same cells compiled on 4 gloo processes match one device (tests/distributed/test_compile.py::
# test_collective_programs_compiled_on_gloo); the failure without localmap: tests/eager/test_compiled_paths.py::
# test_simulator_factory_tensor_meets_local_tensor_without_localmap. docs/compile.md, item 4.
_SIMULATOR_FACTORY = ("PyTorch's simulator under AOT autograd: a tensor the body makes with a factory (axis_index's "
                      "arange) is a FunctionalTensor that LocalTensor refuses (docs/compile.md, item 4); right on gloo")
COMPILE_KNOWN = {
    "parallel: Megatron vocab-parallel cross-entropy, detached max": _SIMULATOR_FACTORY,
    "collectives: shift_plus_1": _SIMULATOR_FACTORY,
}
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
    want = one_device(prog, t)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: on_dtensors(prog, t, mesh, "single", penalty=False, wrap=compiled()), want)
