"""The path matrix, traced paths: capture(...).run and verify, values and gradients against one device, on the
simulated mesh. (A planner's capture and defer_inlining + make_fx are not in the matrix yet: tests/traced.)"""

from __future__ import annotations

import pytest

from localmap import PlacementError
from localmap.program.verify import VerificationError
from localmap.core.refusals import TRACED_CALL
from matrix_cells import TRACED, expect, mesh_of, one_device, params, refuses
from matrix_paths import captured, captured_reference, draw, verified

pytestmark = pytest.mark.matrix

# What the traced paths cannot trace on fake tensors is refused by name (core.refusals.traced_untraceable_error),
# checked here as such: program id -> what its error must say. Eagerly these programs match one device.
_READS_VALUES = ("reads tensor values into Python", "torch.where", "call this region eagerly")
_NO_FAKE_IMPL = ("no fake implementation", "register_fake", "call this region eagerly")
TRACED_REFUSED = {
    "parallel: branch on values with its gradient placements given": _READS_VALUES,
    "parallel: branch on values, weight gradient inferred on the branch taken": _READS_VALUES,
    "parallel: untraceable body with its gradient placements given": _NO_FAKE_IMPL,
    "parallel: untraceable body, its weight's gradient given Replicate": _NO_FAKE_IMPL,
}


@pytest.mark.parametrize("prog", params(TRACED))
def test_capture_run(prog):
    t = draw(prog, 1)
    if prog.id in TRACED_REFUSED:
        with mesh_of(prog) as mesh:
            refuses(lambda: captured(prog, t, mesh, "single"), TRACED_CALL, *TRACED_REFUSED[prog.id])
        return
    want = captured_reference(one_device(prog, t), t)
    with mesh_of(prog) as mesh:
        expect(prog, lambda: captured(prog, t, mesh, "single"), want)


@pytest.mark.parametrize("prog", params(TRACED))
def test_verify(prog):
    t = draw(prog, 1)
    with mesh_of(prog) as mesh:
        if prog.id in TRACED_REFUSED:
            refuses(lambda: verified(prog, t, mesh, "single"), TRACED_CALL, *TRACED_REFUSED[prog.id])
            return
        if prog.verdict == "refused":
            with pytest.raises(PlacementError, match=None) as info:
                verified(prog, t, mesh, "single")
            assert prog.says in str(info.value)
            return
        if not prog.right:  # an unproven or unchecked claim that is wrong: verify names the region
            with pytest.raises(VerificationError, match="region"):
                verified(prog, t, mesh, "single")
            return
        report = verified(prog, t, mesh, "single")
    assert report.regions_checked == 1 and not report.disagreements
