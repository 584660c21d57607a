"""What a matrix cell must show, by the program's verdict, on any path: a right program matches one device with no
warning; a wrong one is refused with a PlacementError saying what the check says; an unproven or unchecked one
warns once and its numbers are what the catalogue says, except where the eager test settles an unproven claim (or
an untraceable body's, its gradient placements given: the test runs the body itself): a right one then runs
silently ("tested") and matches one device, a wrong one is refused by the test. A path that cannot run a program
raises a LocalMapError naming itself (`refuses`)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import pytest

import os

from catalogue import BY_ID, PROGRAMS, Program
from localmap import LocalMapError, PlacementError
from localmap.testing import simulated_mesh
from matrix_paths import Tensors, compare, matches, recording, reference


def expect(prog: Program, run: Callable[[], dict], want: dict) -> None:
    """Run one cell and assert what the program's verdict says it must show."""
    if prog.verdict == "refused":
        with pytest.raises(PlacementError) as info:
            run()
        assert prog.says in str(info.value), str(info.value)
        return
    try:
        cell = recording(run)
    except PlacementError as e:  # where the proof stops, the eager test against the one-rank run refutes the claim
        if prog.verdict not in ("unproven", "unchecked") or prog.right or "its test refutes" not in str(e):
            raise
        return
    except LocalMapError:
        raise
    except (AssertionError, RuntimeError) as e:  # ranks disagree on a Replicate value, or shapes differ
        if prog.verdict == "ok" or prog.right:
            raise
        pytest.skip(f"a wrong {prog.verdict} program: {type(e).__name__} (the numbers differ)")
    diffs = compare(cell.got, want)
    if prog.verdict == "ok":
        assert not cell.said, cell.said
        assert matches(diffs), f"differs from one device: { {k: v for k, v in diffs.items() if v > 1e-4} }"
        return
    if prog.verdict in ("unproven", "unchecked") and not cell.said:  # settled by the eager test ("tested"): right
        assert prog.right and matches(diffs), f"a claim called tested differs from one device: {diffs}"
        return
    assert cell.said, f"an {prog.verdict} program ran without a local_map warning"
    if prog.verdict == "unproven":
        assert any("unproven" in s for s in cell.said), cell.said
    assert matches(diffs) == prog.right, f"the numbers say the program is {'wrong' if prog.right else 'right'}"


def one_device(prog: Program, tensors: Tensors, structure: str = "single", penalty: bool = False) -> dict:
    """The reference numbers; skips a penalty cell where PyTorch itself has no second derivative on one device."""
    try:
        return reference(prog, tensors, structure, penalty)
    except RuntimeError as e:
        if penalty and "is not implemented" in str(e):
            pytest.skip(f"no second derivative on one device either: {e}")
        raise


def refuses(run: Callable[[], Any], path: str, *reason: str) -> LocalMapError:
    """The path refuses the cell with a LocalMapError naming the path and the reason."""
    with pytest.raises(LocalMapError) as info:
        run()
    for fragment in (path, *reason):
        assert fragment in str(info.value), str(info.value)
    return info.value


@contextlib.contextmanager
def mesh_of(prog: Program):
    shape, names = prog.mesh
    with simulated_mesh(shape, names) as mesh:
        yield mesh


def params(programs: list[Program], known: dict[str, str] | None = None, flaky: dict[str, str] | None = None,
           quick: set[str] | None = None) -> list:
    """pytest params of programs, id'd by the catalogue's id; `known`: program id -> the issue-19 bug that makes
    its cell silently differ or crash today (a strict xfail, so the cell flips when the fix lands); `flaky`: cells
    that fail only after other cells (a non-strict xfail, named); `quick`: the programs in make test-quick's slice
    (QUICK unless given: a slower path names fewer)."""
    known, flaky, quick = known or {}, flaky or {}, QUICK if quick is None else quick
    out = []
    for p in programs:
        marks = [pytest.mark.quick] if p.id in quick else []
        reason = known.get(p.id) or (f"the catalogue's own test: {p.known}" if p.known else None)
        if reason:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        elif p.id in flaky:
            marks.append(pytest.mark.xfail(strict=False, reason=flaky[p.id]))
        out.append(pytest.param(p, id=p.id, marks=marks))
    return out


def select(*, verdicts: tuple = ("ok", "refused", "unproven", "unchecked"), differentiable: bool | None = None,
           weights: bool | None = None) -> list[Program]:
    return [p for p in PROGRAMS if p.verdict in verdicts
            and (differentiable is None or p.differentiable == differentiable)
            and (weights is None or bool(p.weights) == weights)]


# The programs every path runs in the full suite (`make test`): each kind of parallelism, each mesh, closed-over
# weights, collectives, Partial (sum and avg) outputs and inputs, a keyword argument, wrong and unproven claims.
# LOCALMAP_MATRIX=full (`make test-matrix`) runs every program on every path.
REPRESENTATIVE = [
    "types: row-parallel matmul", "types: sharded contraction to partial", "types: layer norm over unsharded features",
    "types: mean over the sharded dim is partial avg", "types: partial times replicate",
    "types: autoparallel #515: weight Partial on dp, Shard(0) on tp", "types: partial sum claimed Replicate",
    "types: softmax over the sharded dim",
    "parallel: closed-over column weight (to_local)", "parallel: closed-over row weight, partial sum",
    "parallel: swiglu column-parallel", "parallel: Megatron vocab-parallel cross-entropy, detached max",
    "parallel: keyword flag off", "parallel: rms norm on a sequence shard",
    "parallel: context-parallel attention, log-sum-exp merge", "parallel: experts: closed-over expert weights",
    "parallel: data-parallel loss, Partial(avg)", "parallel: dp x tp: column-parallel on a batch shard",
    "parallel: closed-over row weight: partial sum claimed Shard", "parallel: dp x tp: summed loss claimed Replicate on tp",
    "collectives: all_reduce_of_partial", "collectives: reduce_scatter_avg_dim1", "collectives: shift_plus_1",
]
# make test-quick's slice: these programs on every path (a right one, closed-over weights with a partial sum, a
# refused one, a collective).
QUICK = {"types: row-parallel matmul", "parallel: closed-over row weight, partial sum",
         "types: partial sum claimed Replicate", "collectives: all_reduce_of_partial"}
FULL = os.environ.get("LOCALMAP_MATRIX") == "full"
SUBSET = [BY_ID[i] for i in REPRESENTATIVE]
# The traced paths take a program's closed-over weights as module parameters; every program in the full run.
TRACED = PROGRAMS if FULL else SUBSET
# Compiling costs seconds a cell: the full suite compiles a smaller subset (a program per kind and mesh, each known
# compile bug once, a body torch.compile refuses by name).
COMPILED = PROGRAMS if FULL else [BY_ID[i] for i in (
    "types: row-parallel matmul", "types: mean over the sharded dim is partial avg",
    "types: autoparallel #515: weight Partial on dp, Shard(0) on tp", "types: partial sum claimed Replicate",
    "parallel: closed-over row weight, partial sum", "parallel: swiglu column-parallel", "parallel: keyword flag off",
    "parallel: rms norm on a sequence shard", "parallel: Megatron vocab-parallel cross-entropy, detached max",
    "parallel: dp x tp: summed loss claimed Replicate on tp", "collectives: all_reduce_of_partial",
    "parallel: branch on values with its gradient placements given")]  # (refused by name: test_eager_compile)
# What the traced paths cannot trace on fake tensors is refused by name (core.refusals.traced_untraceable_error),
# checked as such by the traced paths' cells (capture, verify, a planner's capture, make_fx): program id -> what
# its error must say. Eagerly these programs match one device.
_READS_VALUES = ("reads tensor values into Python", "torch.where", "call this region eagerly")
_NO_FAKE_IMPL = ("no fake implementation", "register_fake", "call this region eagerly")
TRACED_REFUSED = {
    "parallel: branch on values with its gradient placements given": _READS_VALUES,
    "parallel: branch on values, weight gradient inferred on the branch taken": _READS_VALUES,
    "parallel: untraceable body with its gradient placements given": _NO_FAKE_IMPL,
    "parallel: untraceable body, its weight's gradient given Replicate": _NO_FAKE_IMPL,
}
# A planner's capture costs about a second a cell: the full suite captures a program per kind and mesh, Partial
# inputs and outputs (what PyTorch's operator misstates), weights, a keyword argument, collectives, a wrong and an
# unproven claim, a body the traced paths refuse and one PyTorch's operator refuses (test_planner_paths).
PLANNED = PROGRAMS if FULL else [BY_ID[i] for i in (
    "types: row-parallel matmul", "types: sharded contraction to partial", "types: partial times replicate",
    "types: autoparallel #515: weight Partial on dp, Shard(0) on tp", "types: partial sum claimed Replicate",
    "types: reshape keeps the shard", "parallel: closed-over row weight, partial sum", "parallel: keyword flag off",
    "parallel: Megatron vocab-parallel cross-entropy, detached max", "parallel: data-parallel loss, Partial(avg)",
    "parallel: branch on values with its gradient placements given", "collectives: all_reduce_of_partial",
    "collectives: shift_plus_1")]
