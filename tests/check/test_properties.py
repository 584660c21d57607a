"""Property tests: random meshes, shapes, placements and bodies, compared with one device.

Each case draws a mesh (1-D up to 8 ranks, 2-D up to 4x4, 3-D 2x2x2), global input shapes (uneven, size-0 and
size-1 dims included), a body from a small grammar (elementwise, matmul, reductions, views) and placements per
input. An *oracle* written here types the body per mesh dim (independently of localmap's checker) and so knows
the outcome in advance:

* valid placements: the derived out_placements are claimed; the region's forward and backward on the simulated
  mesh equal the body on one device, every input gradient has the placements the oracle derives (Shard stays
  Shard, Partial becomes Replicate, Replicate becomes Partial where it met varying data), and
  ``capture(...).run`` gives the same loss and gradients;
* invalid placements for the body (a non-linear op on a Partial value, Partial mixed with Replicate in a sum,
  Partial times Partial, a mean over an unevenly sharded dim), a deliberately corrupted out claim, or a
  corrupted in_grad_placements: ``PlacementError``;
* a Partial(max) output that would need a gradient: ``LocalMapError`` (its gradient cannot be formed locally).

Combinations the checker documents as undetectable (a value that varies with no structure, e.g. flattening a
tensor sharded on its inner dim, or a view of an empty sharded tensor) are not drawn.

Environment: ``LOCALMAP_FUZZ_EXAMPLES`` (cases; default 200, ``make fuzz`` 2000), ``LOCALMAP_FUZZ_SEED=N`` (another fixed
sequence of cases, drawn from seed N), ``LOCALMAP_FUZZ_SHRINK`` (set: shrink a failure),
``LOCALMAP_FUZZ_PROGRESS=file`` (the case about to run, to find a slow one).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch.distributed.tensor import Partial, Replicate, Shard

from localmap import LocalMapError, PlacementError, capture, local_map
from localmap.placements.shapes import chunk_sizes
from localmap.testing import distribute, fake_mesh, full, on_one_device, simulated_mesh

# DTensor warns about sequential all_reduces on 3-D meshes: thousands of lines in a long run.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

EXAMPLES = int(os.environ.get("LOCALMAP_FUZZ_EXAMPLES", "200"))
settings.register_profile(
    "localmap", max_examples=EXAMPLES, deadline=None, derandomize="LOCALMAP_FUZZ_SEED" not in os.environ,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None, print_blob=True,
    # Each case runs regions on a simulated mesh and captures a program: shrinking is slow, so it is opt-in.
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("LOCALMAP_FUZZ_SHRINK") else []))

MESHES = [(1,), (2,), (3,), (4,), (5,), (8,), (2, 2), (1, 4), (3, 2), (2, 4), (4, 4), (2, 2, 2)]
SIZES = [0, 1, 1, 2, 3, 4, 5, 6, 7, 8]

# ---- the oracle: placement types per mesh dim --------------------------------------------------------------
# A type is ("R",), ("S", d), ("P", op). ERR: the checker must refuse. EXCL: not drawn (undetectable or
# undefined, e.g. an elementwise op between a shard and a replicated tensor of the same global shape).
R_, ERR, EXCL = ("R",), "ERR", "EXCL"

NONLINEAR = ("tanh", "sigmoid")


def _shape_after(op: tuple, shape: tuple) -> tuple:
    name = op[0]
    if name in NONLINEAR or name == "scale":
        return shape
    if name in ("sum", "amax", "mean"):
        return shape[:op[1]] + shape[op[1] + 1:]
    if name == "sumall":
        return ()
    if name == "t":
        return (shape[1], shape[0])
    if name == "unsqueeze":
        return (1, *shape)
    if name == "flatten":
        return (shape[0] * shape[1], *shape[2:])
    raise AssertionError(op)


def _unary_type(op: tuple, t: Any, shape: tuple, ctx: dict) -> Any:
    """The type on one mesh dim of op(value of type t and global shape `shape`)."""
    name = op[0]
    kind = t[0]
    if name in NONLINEAR:
        return ERR if kind == "P" else t
    if name == "scale":
        return EXCL if t == ("P", "max") else t
    if name in ("sum", "mean", "amax"):
        d = op[1]
        if kind == "R":
            return t
        if kind == "S":
            if t[1] != d:
                return ("S", t[1] - (t[1] > d))
            if name == "sum":
                return ("P", "sum")
            if name == "mean":
                return ERR if ctx["uneven"] else ("P", "avg")
            return ("P", "max")
        if name == "amax":
            return t if t[1] == "max" else ERR
        return ERR if t[1] == "max" else t
    if name == "sumall":
        if kind == "R":
            return t
        if kind == "S":
            return ("P", "sum")
        return ERR if t[1] == "max" else t
    if name == "t":
        return ("S", 1 - t[1]) if kind == "S" else t
    if name == "unsqueeze":
        return ("S", t[1] + 1) if kind == "S" else t
    if name == "flatten":
        if 0 in shape[:2] and kind != "R":  # empty: DTensor has no view rule here, the conservative one applies
            return ERR if kind == "P" else EXCL
        if kind != "S":
            return t
        if t[1] == 1:
            return EXCL  # varies with no structure: documented as undetectable
        if t[1] == 0:
            return EXCL if ctx["uneven"] and shape[1] > 1 else t  # uneven rows do not flatten to chunks
        return ("S", t[1] - 1)
    raise AssertionError(op)


def _binary_type(op: str, a: Any, b: Any) -> tuple[Any, bool, bool]:
    """(type, a meets varying data, b meets varying data) on one mesh dim."""
    meets_a, meets_b = b != R_, a != R_
    if op in ("add", "mul"):
        if a[0] == "S" and b[0] == "S":
            return (a if a == b else EXCL), meets_a, meets_b
        if a == R_ and b == R_:
            return R_, False, False
        if a[0] == "P" and b[0] == "P":
            if op == "add" and a == b and a[1] != "max":
                return a, meets_a, meets_b
            return (ERR if a[1] == b[1] else EXCL), meets_a, meets_b
        if op == "add" and {a[0], b[0]} == {"P", "R"}:
            return ERR, meets_a, meets_b
        if op == "mul" and {a[0], b[0]} == {"P", "R"}:
            p = a if a[0] == "P" else b
            return (EXCL if p[1] == "max" else p), meets_a, meets_b
        return EXCL, meets_a, meets_b
    # matmul [M, K] @ [K, N]
    table = {(("S", 0), R_): ("S", 0), (R_, ("S", 1)): ("S", 1), (("S", 1), ("S", 0)): ("P", "sum"), (R_, R_): R_}
    if (a, b) in table:
        return table[(a, b)], meets_a, meets_b
    if a[0] == "P" and b == R_ or a == R_ and b[0] == "P":
        p = a if a[0] == "P" else b
        return (EXCL if p[1] == "max" else p), meets_a, meets_b
    if a[0] == "P" and b[0] == "P":
        return ERR, meets_a, meets_b
    return EXCL, meets_a, meets_b


@dataclass
class Body:
    kind: str  # "unary" or "binary"
    pre: list  # op lists per input
    comb: str | None
    post: list

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        vals = [_apply_chain(x, ops) for x, ops in zip(xs, self.pre)]
        if self.comb == "add":
            v = vals[0] + vals[1]
        elif self.comb == "mul":
            v = vals[0] * vals[1]
        elif self.comb == "mm":
            v = vals[0] @ vals[1]
        else:
            v = vals[0]
        return _apply_chain(v, self.post)

    def __repr__(self) -> str:
        pre = [" . ".join(o[0] + "".join(f"({a})" for a in o[1:]) for o in ops) or "id" for ops in self.pre]
        post = " . ".join(o[0] + "".join(f"({a})" for a in o[1:]) for o in self.post) or "id"
        return f"Body({self.comb or 'unary'}[{', '.join(pre)}] -> {post})"


def _apply_chain(x: torch.Tensor, ops: list) -> torch.Tensor:
    for op in ops:
        name = op[0]
        if name == "tanh":
            x = torch.tanh(x)
        elif name == "sigmoid":
            x = torch.sigmoid(x)
        elif name == "scale":
            x = x * 1.5
        elif name == "sum":
            x = x.sum(op[1])
        elif name == "mean":
            x = x.mean(op[1])
        elif name == "amax":
            x = x.amax(op[1])
        elif name == "sumall":
            x = x.sum()
        elif name == "t":
            x = x.t()
        elif name == "unsqueeze":
            x = x.unsqueeze(0)
        elif name == "flatten":
            x = x.flatten(0, 1)
    return x


def _chain_types(ops: list, t: Any, shape: tuple, ctx: dict) -> Any:
    for op in ops:
        if t in (ERR, EXCL):
            return t, shape
        t = _unary_type(op, t, shape, ctx)
        shape = _shape_after(op, shape)
    return t, shape


def _local_sizes(size: int, mesh_dims: list[int], mesh_shape: tuple) -> list[int]:
    blocks = [size]
    for m in mesh_dims:
        blocks = [c for b in blocks for c in chunk_sizes(b, mesh_shape[m])]
    return blocks


def _uneven_mesh_dims(shapes: list, placements: list, mesh_shape: tuple) -> set[int]:
    """Mesh dims on which some input is unevenly sharded (the checker's conservative rule for means)."""
    out = set()
    for shape, pl in zip(shapes, placements):
        by_dim: dict[int, list[int]] = {}
        for m, p in enumerate(pl):
            if p[0] == "S":
                by_dim.setdefault(p[1], []).append(m)
        for d, ms in by_dim.items():
            if shape[d] % math.prod(mesh_shape[m] for m in ms):
                out.update(ms)
    return out


def evaluate(body: Body, shapes: list, placements: list, mesh_shape: tuple) -> dict:
    """Types of the output and gradients per mesh dim for input placements (per input: a tuple of types per
    mesh dim). Returns {"out": [type per mesh dim], "grads": [[type per mesh dim] per input], "status"}."""
    uneven = _uneven_mesh_dims(shapes, placements, mesh_shape)
    nmesh = len(mesh_shape)
    outs, grads = [], [[None] * nmesh for _ in shapes]
    status = "ok"
    for m in range(nmesh):
        ctx = {"uneven": m in uneven}
        ts = [pl[m] for pl in placements]
        chains = [_chain_types(ops, t, s, ctx) for ops, t, s in zip(body.pre, ts, shapes)]
        meets = [False] * len(shapes)
        if body.comb is None:
            t, shape = chains[0]
        else:
            (a, sa), (b, sb) = chains
            if EXCL in (a, b):
                t = EXCL
            elif ERR in (a, b):  # refused, unless the operands do not even fit (then the body fails as such)
                fit = _binary_type(body.comb, ts[0] if a == ERR else a, ts[1] if b == ERR else b)[0]
                t = EXCL if fit == EXCL else ERR
            else:
                t, meets[0], meets[1] = _binary_type(body.comb, a, b)
            shape = sa if body.comb != "mm" else (sa[0], sb[1])
        t, _ = _chain_types(body.post, t, shape, ctx) if t not in (ERR, EXCL) else (t, shape)
        if t == EXCL:
            return {"status": "excl"}
        if t == ERR:
            status = "err"
        outs.append(t)
        for i, ti in enumerate(ts):
            grads[i][m] = ti if ti[0] == "S" else R_ if ti[0] == "P" else (("P", "sum") if meets[i] else R_)
    if status == "ok" and not _amax_shards_nonempty(body, shapes, placements, mesh_shape):
        return {"status": "excl"}
    return {"status": status, "out": outs, "grads": grads}


def _amax_shards_nonempty(body: Body, shapes: list, placements: list, mesh_shape: tuple) -> bool:
    """amax over a sharded dim needs every rank to hold at least one element along it."""
    def walk(ops: list, shape: tuple, pl: list) -> tuple[bool, tuple, list]:
        for op in ops:
            if op[0] == "amax":
                d = op[1]
                ms = [m for m, t in enumerate(pl) if t == ("S", d)]
                if ms and min(_local_sizes(shape[d], ms, mesh_shape)) == 0:
                    return False, shape, pl
            pl = [_unary_type(op, t, shape, {"uneven": False}) if t not in (ERR, EXCL) else t for t in pl]
            pl = [t if isinstance(t, tuple) else R_ for t in pl]
            shape = _shape_after(op, shape)
        return True, shape, pl

    results = [walk(ops, s, list(p)) for ops, s, p in zip(body.pre, shapes, placements)]
    if not all(r[0] for r in results):
        return False
    if body.comb is None:
        shape, pl = results[0][1], results[0][2]
    else:
        shape = results[0][1] if body.comb != "mm" else (results[0][1][0], results[1][1][1])
        pl = []
        for a, b in zip(results[0][2], results[1][2]):
            t = _binary_type(body.comb, a, b)[0]
            pl.append(t if isinstance(t, tuple) else R_)
    return walk(body.post, shape, pl)[0]


def to_placement(t: Any) -> Any:
    if t[0] == "R":
        return Replicate()
    if t[0] == "S":
        return Shard(t[1])
    return Partial(t[1])


# ---- drawing cases ------------------------------------------------------------------------------------------

UNARY_SAME = [("tanh",), ("sigmoid",), ("scale",)]


def _unary_choices(shape: tuple) -> list[tuple]:
    nd = len(shape)
    ops = list(UNARY_SAME)
    for d in range(nd):
        ops.append(("sum", d))
        if shape[d] > 0:
            ops.append(("amax", d))
            ops.append(("mean", d))
    if nd >= 1:
        ops.append(("sumall",))
    if nd == 2:
        ops.append(("t",))
    if nd <= 2:
        ops.append(("unsqueeze",))
    if nd >= 2:
        ops.append(("flatten",))
    return ops


@st.composite
def _chain(draw: Any, shape: tuple, max_len: int, same_shape: bool = False) -> tuple[list, tuple]:
    ops = []
    for _ in range(draw(st.integers(0, max_len))):
        choices = UNARY_SAME if same_shape else _unary_choices(shape)
        op = draw(st.sampled_from(choices))
        ops.append(op)
        shape = _shape_after(op, shape)
    return ops, shape


def _candidates(nd: int) -> list[tuple]:
    return [R_, ("P", "sum"), ("P", "avg"), *[("S", d) for d in range(nd)]]


@dataclass
class Case:
    mesh_shape: tuple
    shapes: list
    body: Body
    in_types: list  # per input: types per mesh dim
    in_specs: list  # placements given to local_map (Shard dims maybe negative)
    expected: dict
    out_claim: tuple
    grad_spec: list | None
    outcome: str  # "ok", "placement_error", "maxgrad_error"
    notes: list = field(default_factory=list)


@st.composite
def cases(draw: Any) -> Case:
    mesh_shape = draw(st.sampled_from(MESHES))
    kind = draw(st.sampled_from(["unary", "unary", "add", "mul", "mm"]))
    if kind == "unary":
        shape = tuple(draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3)))
        shapes = [shape]
        post, _ = draw(_chain(shape, 3))
        body = Body("unary", [[]], None, post)
    else:
        if kind == "mm":
            m, k, n = (draw(st.sampled_from(SIZES)) for _ in range(3))
            shapes = [(m, k), (k, n)]
            out_shape = (m, n)
        else:
            shape = tuple(draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3)))
            shapes = [shape, shape]
            out_shape = shape
        pre = [draw(_chain(s, 1, same_shape=True))[0] for s in shapes]
        post, _ = draw(_chain(out_shape, 2))
        body = Body("binary", pre, kind, post)

    # Per mesh dim: every assignment of input types the oracle can judge, then pick one (mostly valid ones).
    per_dim = []
    for m, n in enumerate(mesh_shape):
        options: dict[str, list] = {"ok": [], "err": []}
        cands = [_candidates(len(s)) for s in shapes]
        combos = [(a,) for a in cands[0]] if len(shapes) == 1 else [(a, b) for a in cands[0] for b in cands[1]]
        for combo in combos:
            res = evaluate(body, shapes, [(t,) for t in combo], (n,))
            if res["status"] != "excl":
                options[res["status"]].append(combo)
        assume(options["ok"] or options["err"])
        want_err = not options["ok"] or (options["err"] and draw(st.integers(0, 9)) == 0)
        per_dim.append(draw(st.sampled_from(options["err"] if want_err else options["ok"])))
    in_types = [tuple(per_dim[m][i] for m in range(len(mesh_shape))) for i in range(len(shapes))]
    expected = evaluate(body, shapes, in_types, mesh_shape)
    assume(expected["status"] != "excl")

    # Specs as given to local_map: Shard dims sometimes negative (normalized as DTensor does).
    in_specs = []
    for shape, types in zip(shapes, in_types):
        spec = []
        for t in types:
            p = to_placement(t)
            if t[0] == "S" and draw(st.integers(0, 3)) == 0:
                p = Shard(t[1] - len(shape))
            spec.append(p)
        in_specs.append(spec)

    outcome = "placement_error" if expected["status"] == "err" else "ok"
    notes: list = []
    out_nd = len(_out_shape(body, shapes))
    if outcome == "err" or expected["status"] == "err":
        out_claim = tuple(Replicate() for _ in mesh_shape)
    else:
        out_claim = tuple(to_placement(t) for t in expected["out"])
    grad_spec = None
    if outcome == "ok":
        mode = draw(st.sampled_from(["inferred"] * 5 + ["explicit"] * 2 + ["bad_out"] * 2 + ["bad_grad"]))
        if mode == "bad_out" and any(op[0] == "flatten" for ops in [*body.pre, body.post] for op in ops):
            # A flattened shard is typed "varies" where DTensor's view rule, asked about local sizes, has no
            # strategy (rows not divisible by the ranks): a wrong Shard/Partial claim cannot be told there.
            mode = "inferred"
        if mode == "explicit":
            grad_spec = [[to_placement(t) for t in g] for g in expected["grads"]]
        elif mode == "bad_out":
            m = draw(st.integers(0, len(mesh_shape) - 1))
            true = expected["out"][m]
            wrong = [t for t in [R_, ("P", "sum"), ("P", "avg"), *[("S", d) for d in range(out_nd)]] if t != true]
            if true[0] == "P" and true[1] != "max":
                wrong = [t for t in wrong if t[0] != "P"]  # sum vs avg: a different but legitimate reading
            bad = draw(st.sampled_from(wrong))
            out_claim = tuple(to_placement(bad) if k == m else p for k, p in enumerate(out_claim))
            outcome, notes = "placement_error", [f"out claim on mesh dim {m}: {bad} instead of {true}"]
        elif mode == "bad_grad":
            i = draw(st.integers(0, len(shapes) - 1))
            m = draw(st.integers(0, len(mesh_shape) - 1))
            true = expected["grads"][i][m]
            wrong = [t for t in [R_, ("P", "sum"), *[("S", d) for d in range(len(shapes[i]))]] if t != true]
            bad = draw(st.sampled_from(wrong))
            grad_spec = [[to_placement(t) for t in g] for g in expected["grads"]]
            grad_spec[i][m] = to_placement(bad)
            outcome, notes = "placement_error", [f"grad of input {i} on mesh dim {m}: {bad} instead of {true}"]
        if outcome == "ok" and any(t == ("P", "max") for t in expected["out"]):
            outcome = "maxgrad_error"
    return Case(mesh_shape, shapes, body, in_types, in_specs, expected, out_claim, grad_spec, outcome, notes)


def _out_shape(body: Body, shapes: list) -> tuple:
    with torch.device("meta"):
        return tuple(body(*(torch.empty(s) for s in shapes)).shape)


# ---- running a case -----------------------------------------------------------------------------------------

_gen = torch.Generator()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, case: Case) -> None:
    assert tuple(a.shape) == tuple(b.shape), (what, tuple(a.shape), tuple(b.shape), case)
    scale = max(1.0, b.detach().abs().max().item() if b.numel() else 0.0)
    assert torch.allclose(a.detach().float(), b.detach().float(), rtol=1e-4, atol=1e-4 * scale, equal_nan=True), \
        (what, (a - b).abs().max().item() if a.numel() else 0, case)


def _reference(case: Case, seed: int) -> tuple:
    with on_one_device():
        _gen.manual_seed(seed)
        inputs = [torch.randn(*s, generator=_gen) for s in case.shapes]
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = case.body(*leaves)
        upstream = torch.randn(out.shape, generator=_gen)
        out.backward(upstream)
    return inputs, out.detach(), upstream, [x.grad for x in leaves]


def _grad_placements_for(out_claim: tuple) -> tuple:
    return tuple(Replicate() if isinstance(p, Partial) else p for p in out_claim)


def run_eager(case: Case, seed: int) -> None:
    inputs, ref_out, upstream, ref_grads = _reference(case, seed)
    with simulated_mesh(case.mesh_shape) as mesh:
        region = local_map(case.body, list(case.out_claim), tuple(case.in_specs), case.grad_spec, mesh)
        dts = [distribute(x, mesh, [to_placement(t) for t in types], requires_grad=True)
               for x, types in zip(inputs, case.in_types)]
        if case.outcome == "placement_error":
            with pytest.raises(PlacementError):
                region(*dts)
            return
        if case.outcome == "maxgrad_error":
            with pytest.raises(LocalMapError, match="Partial\\(max\\)"):
                region(*dts)
            with torch.no_grad():  # without a gradient the value is fine
                out = region(*dts)
            _close(full(out), ref_out, "output (no grad)", case)
            return
        out = region(*dts)
        assert tuple(out.placements) == case.out_claim, (out.placements, case)
        _close(full(out), ref_out, "output", case)
        out.backward(distribute(upstream, mesh, _grad_placements_for(case.out_claim)))
        for i, (d, g, want) in enumerate(zip(dts, ref_grads, case.expected["grads"])):
            assert tuple(d.grad.placements) == tuple(to_placement(t) for t in want), (i, d.grad.placements, case)
            _close(full(d.grad), g, f"grad of input {i}", case)


def run_captured(case: Case, seed: int) -> None:
    inputs, ref_out, upstream, ref_grads = _reference(case, seed)
    uneven = any(s[d] % math.prod(case.mesh_shape[m] for m, u in enumerate(types) if u == ("S", d))
                 for s, types in zip(case.shapes, case.in_types) for d in range(len(s)))
    with fake_mesh(case.mesh_shape) as mesh:
        region = local_map(case.body, list(case.out_claim), tuple(case.in_specs), case.grad_spec, mesh)

        def loss(*xs: torch.Tensor) -> torch.Tensor:
            return (region(*xs) * upstream).sum()

        leaves = [x.clone().requires_grad_() for x in inputs]
        if uneven:  # regions traced as graph nodes need even shards (said up front, not computed wrongly)
            with pytest.raises(LocalMapError, match="unevenly sharded"):
                capture(loss, *leaves)
            return
        if case.outcome == "placement_error":
            with pytest.raises(PlacementError):
                capture(loss, *leaves)
            return
        if case.outcome == "maxgrad_error":
            with pytest.raises(LocalMapError, match="Partial\\(max\\)"):
                capture(loss, *leaves)
            return
        prog = capture(loss, *leaves)
        result = prog.run(*inputs)
    _close(result.loss, (ref_out * upstream).sum(), "captured loss", case)
    for i, g in enumerate(ref_grads):
        _close(result.grads[f"args[{i}]"], g, f"captured grad of input {i}", case)


# ---- the property -------------------------------------------------------------------------------------------

COUNTS: dict[str, int] = {}
PROGRESS = os.environ.get("LOCALMAP_FUZZ_PROGRESS")


def _seeded(fn: Any) -> Any:
    value = os.environ.get("LOCALMAP_FUZZ_SEED")
    return hypothesis_seed(int(value))(fn) if value else fn


@_seeded
@settings(settings.get_profile("localmap"))
@given(case=cases(), seed=st.integers(0, 2**16))
def _property(case: Case, seed: int) -> None:
    if PROGRESS:  # LOCALMAP_FUZZ_PROGRESS=file: the case about to run, to find one that is slow
        with open(PROGRESS, "w") as f:
            f.write(f"{sum(COUNTS.values())} {case!r} seed={seed}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_eager(case, seed)
        run_captured(case, seed)
    COUNTS[case.outcome] = COUNTS.get(case.outcome, 0) + 1


def test_random_regions_match_one_device():
    COUNTS.clear()
    _property()
    total = sum(COUNTS.values())
    print(f"\nproperty cases: {total} ({', '.join(f'{k} {v}' for k, v in sorted(COUNTS.items()))})")
    assert total >= min(EXAMPLES, 50) // 2, COUNTS  # most drawn cases run (few are filtered out)
    assert COUNTS.get("ok", 0) > 0 and COUNTS.get("placement_error", 0) > 0, COUNTS
