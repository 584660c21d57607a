"""The path matrix, traced paths: capture(...).run and verify, values and gradients against one device, on the
simulated mesh. (A planner's capture and defer_inlining + make_fx: test_planner_paths.py.)"""

from __future__ import annotations

import pytest

from localmap import PlacementError
from localmap.program.verify import VerificationError
from localmap.core.refusals import TRACED_CALL
from matrix_cells import TRACED, TRACED_REFUSED, expect, mesh_of, one_device, params, refuses
from matrix_paths import captured, captured_reference, draw, verified

pytestmark = pytest.mark.matrix


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
