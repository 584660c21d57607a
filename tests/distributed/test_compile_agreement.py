"""Check outcomes agreed by every rank under torch.compile on real gloo processes (check.tested.agree_while_tracing).

The check runs while Dynamo traces, once per rank, and a proof that reads the rank (a literal vocab offset from
``dist.get_rank``, check.offsets) can hold on one rank only. Under check="strict" one rank would then raise at
trace time while the other went on into the compiled graph's all_reduce and waited for it. Every rank must
reach the same outcome: by default no proof reads the rank while Dynamo traces; under Dynamo's compiler
collectives the ranks exchange their outcomes, as eager does. Each run is bounded (a rank waiting on a peer
fails within COLLECTIVE_BOUND seconds)."""

from __future__ import annotations

import pytest
import torch

from localmap.testing import run_gloo

pytestmark = pytest.mark.slow

V, D = 16, 3
COLLECTIVE_BOUND = 30.0  # seconds a rank may wait for a peer in a collective
RUN_LIMIT = 400.0  # the whole run, spawning and compiling included


def _lookup(body_kind: str):
    """A vocab-parallel lookup (torchtitan's: the offset from the group's rank). "right": every rank's mask is
    the one the proof reads, so each rank proves its own literal offset; "right, proven on rank 0 only": rank 1
    writes the same mask on the shifted ids, which no rule proves (the same values); "offset 0 everywhere": every
    rank looks up from row 0, right on rank 0 only (wrong: rank 1 returns rank 0's rows)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    def body(table, ids):
        n = table.shape[0]
        rank = dist.get_rank()
        offset = 0 if body_kind == "offset 0 everywhere" else rank * n
        shifted = ids - offset
        out = F.embedding(shifted.clamp(0, n - 1), table)
        if body_kind == "right, proven on rank 0 only" and rank == 1:
            mask = (shifted >= 0) & (shifted < n)
        else:
            mask = (ids >= offset) & (ids < offset + n)
        return out * mask.unsqueeze(-1).to(out.dtype)
    return body


BODIES = ("right", "right, proven on rank 0 only", "offset 0 everywhere")


def _compiled_outcomes(mesh, compiler_collectives: bool) -> dict:
    """Per body and check mode, this rank's outcome of the compiled call: ("ran", largest difference from one
    device, the local_map warnings) or (the error's class name, its first line). `compiler_collectives`: what
    localmap reads of torch._dynamo.config.enable_compiler_collectives (compat.compiler_collectives_on), set
    here without Dynamo's own: its gather needs an accelerator (on a CPU gloo group it fails before tracing)."""
    import warnings

    import torch._dynamo
    import torch.nn.functional as F

    import localmap.compat
    from helpers import P, R, S0, max_diff
    from localmap import local_map
    from localmap.testing import distribute, full, on_one_device

    localmap.compat.compiler_collectives_on = lambda: compiler_collectives
    torch.manual_seed(0)
    table, ids = torch.randn(V, D), torch.tensor([[0, 5, 15, 9], [3, 12, 7, 8]])
    with on_one_device():
        reference = F.embedding(ids, table)
    found = {}
    for kind in BODIES:
        for check in (True, "strict"):
            torch._dynamo.reset()
            region = local_map(_lookup(kind), [P], ([S0], [R]), None, mesh, check=check)
            try:  # eagerly first: each rank's own proof is then in the check's verdict cache
                region(distribute(table, mesh, [S0]), distribute(ids, mesh, [R]))
            except Exception:
                pass
            step = torch.compile(lambda t, i: region(t, i).redistribute(mesh, [R]), backend="aot_eager",
                                 fullgraph=True)
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                try:
                    out = step(distribute(table, mesh, [S0]), distribute(ids, mesh, [R]))
                except Exception as e:  # the check's refusal, surfaced at trace time
                    found[kind, check] = (type(e).__name__, str(e).splitlines()[0])
                    continue
            warned = sorted({str(w.message)[:80] for w in said if "local_map" in str(w.message)})
            found[kind, check] = ("ran", max_diff(full(out), reference), warned)
    return found


def _agreed(compiler_collectives: bool) -> dict:
    """Each (body, mode)'s outcome, asserted the same on both ranks (differences and warnings may differ only
    in their numbers where the program is wrong)."""
    ranks = run_gloo(_compiled_outcomes, 2, args=(compiler_collectives,), timeout=RUN_LIMIT,
                     collective_timeout=COLLECTIVE_BOUND)
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert ranks[0][key][0] == ranks[1][key][0], (key, ranks[0][key], ranks[1][key])
    return ranks[0] | {(k, c, "rank 1"): v for (k, c), v in ranks[1].items()}


def _assert_right_ones_match_one_device(found: dict) -> None:
    for (kind, *_), outcome in found.items():
        if kind.startswith("right") and outcome[0] == "ran":
            assert outcome[1] < 1e-6, (kind, outcome)


def test_ranks_reach_one_outcome_when_the_literal_offset_is_withheld():
    """Without compiler collectives no proof reads the rank while Dynamo traces: every body is unproven on both
    ranks alike. check="strict" refuses all three on both ranks (no rank left waiting in the graph's all_reduce);
    the default check runs them on both, warning once for the definition they share (the first), the right
    bodies matching one device."""
    found = _agreed(compiler_collectives=False)
    for kind in BODIES:
        assert found[kind, "strict"][0] == "UnprovenError", (kind, found[kind, "strict"])
        assert found[kind, True][0] == "ran", (kind, found[kind, True])
    assert found["right", True][2] and found["right", True, "rank 1"][2], found
    for key in [(kind, "strict") for kind in BODIES] + [(kind, "strict", "rank 1") for kind in BODIES]:
        assert "literal rank offset" in found[key][1], found[key]  # why, where eager proves the right body
    _assert_right_ones_match_one_device(found)


def test_ranks_exchange_outcomes_under_compiler_collectives():
    """Under Dynamo's compiler collectives (every rank compiles in lockstep; read through
    compat.compiler_collectives_on) the ranks exchange outcomes at trace time, eager's rule: the right body, proven by each rank from its own offset, runs under
    check="strict" without a warning and matches one device; a body proven on rank 0 only is unproven on both
    (refused by "strict" on both; warned and run by default), the right one matching one device there."""
    found = _agreed(compiler_collectives=True)
    assert found["right", "strict"][0] == "ran" and not found["right", "strict"][2], found["right", "strict"]
    assert found["right", True][0] == "ran" and not found["right", True][2], found["right", True]
    for kind in ("right, proven on rank 0 only", "offset 0 everywhere"):
        assert found[kind, "strict"][0] in ("UnprovenError", "PlacementError"), (kind, found[kind, "strict"])
    assert found["right, proven on rank 0 only", True][0] == "ran"
    _assert_right_ones_match_one_device(found)
