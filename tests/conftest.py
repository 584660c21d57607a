import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from localmap.testing import simulated_mesh  # noqa: E402


@pytest.fixture
def mesh1d():
    with simulated_mesh(4) as mesh:
        yield mesh


@pytest.fixture
def mesh2d():
    with simulated_mesh((2, 2), ("dp", "tp")) as mesh:
        yield mesh
