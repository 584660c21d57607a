"""Captured programs whose regions communicate: every collective waited on in the region graphs, run and verify
against one device (MoE over 'ep', ring attention over 'cp'), and the collectives' bytes in a region's comm
cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from collective_cases import MOE_PLACEMENTS, S0, moe_experts, moe_inputs, moe_reference, ring_attention
from helpers import max_diff, randn

import localmap
from localmap import Shard, local_map
from localmap import collectives as C
from localmap.testing import fake_mesh, on_one_device


def _assert_every_collective_waited(region):
    wait = torch.ops._c10d_functional.wait_tensor.default
    found = 0
    for gm in (region.forward, region.backward):
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", "") == "_c10d_functional" \
                    and node.target is not wait:
                found += 1
                assert any(u.target is wait for u in node.users), f"{node} has no wait_tensor"
    assert found >= 4  # two all_to_all_single forward (counts, tokens) + back, and their backward


def test_moe_and_ring_attention_captured_and_run():
    with fake_mesh(4, ("ep",)) as mesh:
        moe = local_map(moe_experts, device_mesh=mesh, check="allow_unproven", **MOE_PLACEMENTS)
        inputs = [t.requires_grad_() for t in moe_inputs()]
        prog = localmap.capture(lambda *a: moe(*a).pow(2).sum(), *inputs)
        (region,) = prog.regions
        # Tokens routed by all_to_all: the check cannot prove the Shard(0) claim (unproven, not ok); verify does.
        assert region.comm_bytes > 0 and region.verdict.startswith("unproven: outputs claimed Shard(dim=0)")
        _assert_every_collective_waited(region)
        report = localmap.verify(lambda *a: moe(*a).pow(2).sum(), *inputs,
                                 reference=lambda *a: moe_reference(*a).pow(2).sum(), atol=1e-4)
        assert report.loss_diff < 1e-4
    with fake_mesh(4, ("cp",)) as mesh:
        seq = [Shard(2)]
        ring = local_map(ring_attention, seq, (seq, seq, seq), device_mesh=mesh)
        qkv = [randn(2, 2, 16, 4).requires_grad_() for _ in range(3)]
        prog = localmap.capture(lambda *a: ring(*a).pow(2).sum(), *qkv)
        got = prog.run(*qkv)
        refs = [t.detach().clone().requires_grad_() for t in qkv]
        F.scaled_dot_product_attention(*refs).pow(2).sum().backward()
        for name, ref in zip(("args[0]", "args[1]", "args[2]"), refs):
            assert max_diff(got.grads[name], ref.grad) < 1e-4, name
        (region,) = prog.regions
        assert region.comm_bytes > 0


def test_collectives_inside_a_region_count_in_its_comm_bytes():
    """Ring costs per rank: all_gather of a [2, 3] float shard over 4 ranks sends 3 * 24 bytes forward; its
    backward reduce-scatters the [8, 3] gradient, 3/4 * 96 bytes; all_reduce of a [1, 3] float sends
    2 * 3/4 * 12 forward and nothing backward (its gradient passes unchanged); pvary's backward all-reduces the
    same 12 bytes."""
    with fake_mesh(4, ("tp",)) as mesh:
        def body(q, k):
            s = C.pvary(C.all_reduce(q.sum(0, keepdim=True), "tp"), "tp")
            return q @ C.all_gather(k, "tp").T + s.sum()

        region = local_map(body, [S0], ([S0], [S0]), device_mesh=mesh)
        q, k = (torch.randn(8, 3, requires_grad=True) for _ in range(2))
        (r,) = localmap.capture(lambda q, k: region(q, k).sum(), q, k).regions
        assert r.comm_detail["collectives"] == pytest.approx(3 * 24 + 3 / 4 * 96 + 2 * 3 / 4 * 12 + 2 * 3 / 4 * 12)


class _VocabParallelEmbedding(torch.nn.Module):
    """Megatron's vocab-parallel embedding: the table a Shard(0) DTensor parameter the body reads by to_local(),
    offset by this rank's coordinate, a Partial sum out."""

    def __init__(self, mesh, table):
        super().__init__()
        self.table = torch.nn.Parameter(localmap.testing.distribute(table, mesh, [Shard(0)]))
        self.region = local_map(self._body, [localmap.Partial()], [[localmap.Replicate()]], device_mesh=mesh)

    def _body(self, ids):
        table = self.table.to_local()
        local = ids - C.axis_index("tp") * table.shape[0]
        inside = (local >= 0) & (local < table.shape[0])
        return F.embedding(local.clamp(0, table.shape[0] - 1), table) * inside.unsqueeze(-1)

    def forward(self, ids):
        return self.region(ids)


class _Squared(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *xs):
        return self.inner(*xs).pow(2).sum()


def _row_parallel(x, w):
    return C.all_reduce(x @ w, "tp")


def test_verify_default_reference_runs_collective_bodies_on_one_rank():
    """verify's own reference (no reference= given) runs each region's body on the whole tensors as on a one-rank
    mesh (collectives the identity, axis_index 0: the region's global meaning, as the check's test runs it), so a
    body with collectives is verified against one device instead of failing for want of a mesh."""
    with localmap.testing.simulated_mesh((4,), ("tp",)) as mesh:
        with on_one_device():
            table, ids = randn(16, 3), torch.randint(0, 16, (2, 5))
            x, w = randn(4, 8).requires_grad_(), randn(8, 6).requires_grad_()
        report = localmap.verify(_Squared(_VocabParallelEmbedding(mesh, table)), ids)
        assert report.regions_checked == 1 and not report.disagreements and report.loss_diff < 1e-4
        assert max(report.grad_diffs.values()) < 1e-4  # the table's gradient, against the one-rank run's
        row = local_map(_row_parallel, [localmap.Replicate()], ([Shard(1)], [Shard(0)]), device_mesh=mesh)
        report = localmap.verify(lambda x, w: row(x, w).pow(2).sum(), x, w)
        assert report.regions_checked == 1 and not report.disagreements and report.loss_diff < 1e-4
        assert set(report.grad_diffs) == {"args[0]", "args[1]"} and max(report.grad_diffs.values()) < 1e-4
