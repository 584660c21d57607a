"""Rank offsets read from a process group (torchtitan's vocab-parallel embedding: ``offset = dist.get_rank(tp) *
chunk``): traced on a real rank, the offset is a literal int, proven to be this rank's shard start only there.
Right programs are proven (``check="strict"``) and match one device; wrong ones are not accepted."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import P, R, S0, max_diff, randn
from localmap import LocalMapError, PlacementError, UnprovenError, local_map
from localmap.testing import distribute, full, on_one_device, run_gloo, simulated_mesh

V, D = 16, 3
_IDS = torch.tensor([[0, 5, 15, 9], [3, 12, 7, 8]])


def _titan_lookup(rows: int = V, shift_shards: int = 0, masked: bool = True, mask_shards: int = 0,
                  chunk: str = "ceil"):
    """torchtitan 0.3.0's body for a table of `rows` rows: the offset from the group's rank, the mask on the
    unshifted ids, clamp, lookup, then the mask applied. `shift_shards` moves the offset by whole shards,
    `mask_shards` the mask's range (wrong for any value but 0); `chunk="local"` takes the rank's local row count
    as the shard length (wrong where the shards are uneven: the last rank's rows start at rank * ceil(V / ranks))."""
    def body(table, ids):
        group = dist.group.WORLD
        n, ranks = table.shape[0], dist.get_world_size(group)
        size = -(-rows // ranks) if chunk == "ceil" else n
        offset = (dist.get_rank(group) + shift_shards) % ranks * size
        local = (ids - offset).clamp(0, n - 1)
        out = F.embedding(local, table)
        if not masked:
            return out
        low = offset + mask_shards * size
        mask = (ids >= low) & (ids < low + n)
        return out * mask.unsqueeze(-1).to(out.dtype)
    return body


EVEN = {"right": (_titan_lookup(), P), "offset one shard off": (_titan_lookup(shift_shards=1), P),
        "mask one shard off": (_titan_lookup(mask_shards=1), P), "mask missing": (_titan_lookup(masked=False), P),
        "claimed Replicate": (_titan_lookup(), R)}
UNEVEN = {"uneven right": (_titan_lookup(V - 1), P), "uneven local length": (_titan_lookup(V - 1, chunk="local"), P)}


def _verdict(mesh, body, claim, table, ids) -> tuple[str, float]:
    """'ok' (proven: check='strict' accepts), 'unproven', 'wrong' or 'unchecked', and the largest difference from one
    device (values of the output, gradient of the table) where it ran."""
    region = local_map(body, [claim], ([S0], [R]), None, mesh, check="strict")
    dt = distribute(table, mesh, [S0], requires_grad=True)
    try:
        out = region(dt, distribute(ids, mesh, [R]))
    except UnprovenError:
        return "unproven", float("nan")
    except PlacementError:
        return "wrong", float("nan")
    except LocalMapError:  # not traceable (torch 2.14's simulated mesh hands the body a per-rank int): unchecked
        return "unchecked", float("nan")
    with on_one_device():
        ref_table = table.clone().requires_grad_()
        ref = F.embedding(ids, ref_table)
        ref.backward(torch.ones_like(ref))
    out.full_tensor().backward(torch.ones_like(ref))
    return "ok", max(max_diff(full(out), ref), max_diff(full(dt.grad), ref_table.grad))


def _all_variants(mesh) -> dict[str, tuple[str, float]]:
    """Each variant's verdict: EVEN on a table of V rows (8 per rank on 2), UNEVEN on V - 1 (8 and 7)."""
    torch.manual_seed(0)
    even, uneven = torch.randn(V, D), torch.randn(V - 1, D)
    found = {name: _verdict(mesh, body, claim, even, _IDS) for name, (body, claim) in EVEN.items()}
    ids = _IDS.clamp(max=V - 2)
    return found | {name: _verdict(mesh, body, claim, uneven, ids) for name, (body, claim) in UNEVEN.items()}


@pytest.mark.slow
def test_offsets_from_the_process_group_rank_on_gloo():
    """Each rank checks its own trace: the right body is proven and matches one device; an offset or a mask one
    shard off, a missing mask and a Replicate claim are never accepted. On uneven shards no offset is proven:
    the right body is unproven (not refused), the one taking the local row count as the shard length (wrong on
    the last rank) is not accepted."""
    for rank, found in enumerate(run_gloo(_all_variants, 2, timeout=240)):
        verdict, diff = found["right"]
        assert verdict == "ok" and diff < 1e-6, (rank, found)
        assert found["claimed Replicate"][0] == "wrong", (rank, found)
        assert found["uneven right"][0] == "unproven", (rank, found)
        for name in ("offset one shard off", "mask one shard off", "mask missing", "uneven local length"):
            assert found[name][0] in ("wrong", "unproven"), (rank, name, found)


def test_offsets_from_the_process_group_rank_prove_nothing_on_a_simulated_mesh():
    """On a simulated mesh one trace stands for every rank and the fake group says rank 0 to all of them: the
    literal offset anchors to no rank, so the body (wrong there: every rank looks up shard 0) is not accepted."""
    with simulated_mesh(2) as mesh:
        found = _all_variants(mesh)
    assert all(verdict != "ok" for verdict, _ in found.values()), found
