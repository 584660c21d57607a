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
# What torch.compile cannot trace is refused by name (core.refusals.refuse_untraceable), checked here as such (not
# an xfail): program id -> what its LocalMapError must say (the path, the reason, the fix). Eagerly these programs
# match one device (test_eager): a branch on values is checked on the values of each call.
_READS_VALUES = ("torch.compile (fullgraph=True)", "cannot trace its body", "reads tensor values into Python",
                 "torch.where", "run this region eagerly")
_NO_FAKE_IMPL = ("torch.compile", "cannot trace its body", "no fake implementation", "register_fake",
                 "run this region eagerly")
COMPILE_REFUSED = {
    "parallel: branch on values with its gradient placements given": _READS_VALUES,
    "parallel: branch on values, weight gradient inferred on the branch taken": _READS_VALUES,
    "parallel: untraceable body with its gradient placements given": _NO_FAKE_IMPL,
    "parallel: untraceable body, its weight's gradient given Replicate": _NO_FAKE_IMPL,
    "parallel: position table offset by the rank's index": (SIMULATED_COMPILE, "makes a tensor with a factory",
                                                              "torch.arange"),
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
    want = None if prog.id in COMPILE_REFUSED else one_device(prog, t)
    with mesh_of(prog) as mesh:
        run = lambda: on_dtensors(prog, t, mesh, "single", penalty=False, wrap=compiled())  # noqa: E731
        if want is None:
            refuses(run, *COMPILE_REFUSED[prog.id])
        else:
            expect(prog, run, want)
