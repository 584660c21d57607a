"""Shared fixtures for every test folder (unit, eager, traced, check, program, distributed, cli).

Mesh fixtures say what kind of mesh they give:

* ``sim_mesh_*``: a simulated mesh (``localmap.testing.simulated_mesh``, PyTorch's LocalTensorMode): every rank
  is run in this process and holds real values;
* ``fake_mesh_*``: a mesh over the fake process group (``localmap.testing.fake_mesh``), for tracing only: any
  size, no values.

The suffix is the mesh shape; a 2-D or larger mesh has named dims (2x2: ``dp, tp``; 8x8x4x8: ``dp, tp, cp, ep``),
a 1-D fake mesh is named ``tp`` and a 1-D simulated mesh is unnamed.

Markers (registered in pyproject.toml; pick with ``-m``): ``slow`` (real processes; deselect with ``-m "not slow"``),
``gloo`` (real gloo processes: tests/distributed/ and every other test marked slow today), ``compile``
(torch.compile: the compile test files and matrix cells), ``property`` (tests/check/test_properties.py), ``matrix``
and ``quick`` (tests/matrix/; ``make test-quick`` runs the quick slice). Folder- and file-wide markers are applied
here, in one place.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The command-line tests read output as a pipe gets it (tables PIPE_WIDTH wide) unless they set COLUMNS
# themselves; pytest-xdist's workers (make test) are given COLUMNS=80 and LINES=24, a shell may export them.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

from localmap.testing import fake_mesh, simulated_mesh  # noqa: E402


_COMPILE_FILES = ("tests/eager/test_compiled.py", "tests/eager/test_compiled_paths.py", "tests/distributed/test_compile.py",
                  "tests/unit/test_compiling.py", "tests/traced/test_upstream_causes.py")


def pytest_collection_modifyitems(config, items):
    """Markers by place: gloo for tests/distributed/ and tests marked slow (today: those spawning gloo processes),
    compile for the compile test files, property for the property tests."""
    for item in items:
        path = item.path.as_posix()
        if "/tests/distributed/" in path or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.gloo)
        if path.endswith(_COMPILE_FILES):
            item.add_marker(pytest.mark.compile)
        if path.endswith("tests/check/test_properties.py"):
            item.add_marker(pytest.mark.property)


# ---- simulated meshes: values on every rank -----------------------------------------------------------------

@pytest.fixture
def sim_mesh_4():
    with simulated_mesh(4) as mesh:
        yield mesh


@pytest.fixture
def sim_mesh_2x2():
    with simulated_mesh((2, 2), ("dp", "tp")) as mesh:
        yield mesh


# ---- fake meshes: tracing only, no values -------------------------------------------------------------------

@pytest.fixture
def fake_mesh_1():
    with fake_mesh(1, ("tp",)) as mesh:
        yield mesh


@pytest.fixture
def fake_mesh_4():
    with fake_mesh(4, ("tp",)) as mesh:
        yield mesh


@pytest.fixture
def fake_mesh_2x2():
    with fake_mesh((2, 2), ("dp", "tp")) as mesh:
        yield mesh


@pytest.fixture
def fake_mesh_8x8x4x8():
    with fake_mesh((8, 8, 4, 8), ("dp", "tp", "cp", "ep")) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def _warnings_shown_again():
    """A region definition warns once per reason in a process; each test starts as a fresh process would, so a
    test that expects a warning does not depend on which tests ran before it."""
    from localmap.caches import registered

    registered()["warnings_shown"].clear()
    yield


@pytest.fixture(autouse=True)
def _inputs_drawn_per_test(request):
    """helpers.randn's generator and torch's default one (torch.randn, a module's initial weights) are seeded
    from the test's own id before each test, so a test gets the same inputs whichever tests its worker ran
    before (a tolerance failure seen once in CI then reproduces alone). LOCALMAP_TEST_SEED=K draws other inputs,
    the same way: a run with another K finds a tolerance that held only by luck."""
    import zlib

    import helpers
    import torch

    salt = os.environ.get("LOCALMAP_TEST_SEED")
    seed = zlib.crc32((request.node.nodeid + (f"#{salt}" if salt else "")).encode())
    helpers._gen.manual_seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _compile_state_fresh(request):
    """A compile test starts from Dynamo's and FX's initial state: in one process, aot_eager's partitioner failed
    on a program compiled after many other tests and passed alone (a leaked checkpoint tag in FX's current node
    meta, or a cached graph), so each compile test resets Dynamo and FX's node-meta state before it runs."""
    if request.node.get_closest_marker("compile") is not None:
        import torch._dynamo
        import torch.fx.traceback as fx_traceback

        torch._dynamo.reset()
        fx_traceback.current_meta.clear()
        fx_traceback.should_preserve_node_meta = False
        fx_traceback._should_preserve_node_meta = False
    yield
