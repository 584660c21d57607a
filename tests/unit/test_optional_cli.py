"""The command line is an optional extra: the library imports and runs without click and rich, and the
`localmap` script says how to install them."""

from __future__ import annotations

import subprocess
import sys

_WITHOUT_CLI = """
import sys
sys.modules["click"] = None   # an import of either now fails, as when the extra is not installed
sys.modules["rich"] = None
import torch
import localmap, localmap.testing, localmap.models, localmap.hop, localmap.collectives
from localmap import Replicate, Shard, local_map
with localmap.testing.simulated_mesh(2) as mesh:
    f = local_map(lambda x: x * 2, [Shard(0)], ([Shard(0)],), device_mesh=mesh)
    with localmap.testing.on_one_device():
        x = torch.arange(4.0)
    y = f(localmap.testing.distribute(x, mesh, [Shard(0)]))
    assert torch.equal(localmap.testing.full(y), x * 2)
import localmap.cli
localmap.cli.main(["demo"])
"""


def test_library_runs_without_the_cli_extra_and_the_script_says_how_to_install_it():
    res = subprocess.run([sys.executable, "-c", _WITHOUT_CLI], capture_output=True, text=True, timeout=240)
    assert res.returncode == 1, res.stderr
    # from a source checkout (as here) the hint is the checkout's; installed, it is pip install 'localmap[cli]'
    assert "pip install -e '.[cli]'" in res.stderr and "click and rich" in res.stderr
    assert "Traceback" not in res.stderr
