"""The checkpointed 3-D transformer of test_checkpointing_3d on a simulated (dp, tp, cp) mesh (that file holds a
fake mesh open for its module): capture and verify, and a module built per rank refused by name."""

from __future__ import annotations

import pytest
import torch

import localmap
from test_checkpointing_3d import Model, recompute_everything, save_attention_and_matmuls



def test_capture_and_verify_on_a_simulated_3d_mesh():
    """The same model on a simulated (dp, tp, cp) mesh, built on one device: captured with both policies, and
    verify runs every region rank by rank against one device."""
    from localmap.testing import on_one_device, simulated_mesh

    with simulated_mesh((2, 2, 2), ("dp", "tp", "cp")) as mesh:
        for policy in (save_attention_and_matmuls, recompute_everything):
            with on_one_device():
                torch.manual_seed(0)
                model, x = Model(mesh, policy), torch.randn(4, 8, 16)
            prog = localmap.capture(model, x)
            assert [r.name for r in prog.regions] == ["attention.0", "mlp.0", "attention.1", "mlp.1"]
            report = localmap.verify(model, x)
            assert report.regions_checked == 4 and not report.disagreements and report.loss_diff < 1e-5


def test_a_module_built_per_rank_is_refused_by_name():
    """Built inside the simulated mesh (not on one device), the weights hold one value per rank: capture names
    the first such parameter and says how to build it."""
    from localmap.testing import simulated_mesh

    with simulated_mesh((2, 2, 2), ("dp", "tp", "cp")) as mesh:
        model = Model(mesh, recompute_everything, layers=1)
        with pytest.raises(localmap.LocalMapError, match=r"(?s)blocks\.0\.norm1: is a per-rank .*on_one_device"):
            localmap.capture(model, torch.ones(4, 8, 16))
